"""What a run trains in this process: its phases, and where each starts when the run resumes.

Plain numbers and tuples, no keras: the decisions fit() carries out (flowers.training.loop) are
made here, where an in-process test can check them. A position is (epochs done, steps of the next
epoch done), as flowers.checkpoint.Position (a tuple) is.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowers.config import Experiment
from flowers.errors import FlowersError

if TYPE_CHECKING:
    from flowers.data import Splits

FRESH = (0, 0)  # the position of a phase that restores no checkpoint


@dataclass(frozen=True)
class Phase:
    """One fit() of a run: the head-only phase, then (finetune.epochs > 0) fine-tuning.

    Epochs are numbered continuously over the phases: fine-tuning's first epoch is train.epochs.
    """

    name: str
    start: int
    end: int
    learning_rate: float

    @property
    def epochs(self) -> range:
        return range(self.start, self.end)


def phases(cfg: Experiment) -> list[Phase]:
    head_phase = Phase("head", 0, cfg.train.epochs, cfg.train.learning_rate)
    if not cfg.finetune.epochs:
        return [head_phase]
    return [head_phase, Phase("finetune", cfg.train.epochs, cfg.total_epochs, cfg.finetune.learning_rate)]


def phase_dir(phase_name: str, backup_dir: Path) -> Path:
    """Where a phase keeps its epoch checkpoints: the head phase in backup_dir itself (as before
    fine-tuning existed), fine-tuning in backup_dir/finetune."""
    return backup_dir if phase_name == "head" else backup_dir / "finetune"


@dataclass(frozen=True)
class Segment:
    """One model.fit() call: epochs first..end-1, the first of them from step `skip` on.

    restore: the checkpoint position the call restores (FRESH: none).
    """

    first: int
    end: int
    skip: int
    restore: tuple[int, int]


@dataclass(frozen=True)
class PhaseRun:
    """A phase as this process runs it.

    restore: the checkpoint position it restores (FRESH: it starts at its first epoch).
    from_boundary_weights: fine-tuning starts from the head phase's final weights, which
        PhaseWeights published (the head phase ended in an earlier process).
    saves_boundary_weights: the head phase of a run that fine-tunes publishes those weights.
    caches_features: the head phase trains on the frozen backbone's features (train.cache_features).
    """

    phase: Phase
    restore: tuple[int, int]
    from_boundary_weights: bool
    saves_boundary_weights: bool
    caches_features: bool

    @property
    def begin(self) -> int:
        """The first epoch this process trains."""
        return max(self.restore[0], self.phase.start)

    def segments(self) -> list[Segment]:
        """Keras fit() has no first step: a phase resumed inside an epoch fits that epoch's steps
        left first (steps_per_epoch = the steps left), then the phase's other epochs."""
        begin, step = self.begin, self.restore[1]
        segments = [Segment(begin, begin + 1, step, self.restore)] if step else []
        if begin + bool(step) < self.phase.end:
            segments.append(Segment(begin + bool(step), self.phase.end, 0,
                                    FRESH if step else self.restore))
        return segments


def plan(cfg: Experiment, start: Sequence[int], stopped: Collection[str] = ()) -> list[PhaseRun]:
    """The phases this process trains, from `start` (the newest position every process saved).

    A phase is left out when its epochs are all done, or when early stopping ended it (its name
    in `stopped`). An empty plan: the run had trained everything before this process started.
    """
    start = tuple(start)
    runs: list[PhaseRun] = []
    for phase in phases(cfg):
        if start[0] >= phase.end or phase.name in stopped:
            continue
        restore = start if start > (phase.start, 0) else FRESH
        head = phase.name == "head"
        runs.append(PhaseRun(
            phase, restore,
            from_boundary_weights=not head and restore == FRESH and not any(
                run.phase.name == "head" for run in runs),
            saves_boundary_weights=head and bool(cfg.finetune.epochs),
            caches_features=head and cfg.train.cache_features))
    return runs


def validates_every_epoch(splits: Splits) -> bool:
    """False when whole global batches leave no validation batch (per-epoch validation skipped)."""
    return not (splits.drop_remainder and splits.num_val < splits.batch_size)


def unfreeze_from(layer_names: Sequence[str], which: str, backbone_name: str) -> int:
    """The index of the first backbone layer finetune.unfreeze selects (flowers.training.phases.unfreeze).

    Raises:
        FlowersError: a count larger than the backbone, or a name no backbone layer has.
    """
    which = which.strip()
    if which == "all":
        return 0
    if which.isdigit():
        if int(which) > len(layer_names):
            raise FlowersError(f"finetune.unfreeze={which}: {backbone_name} has only {len(layer_names)} "
                               "layers")
        return len(layer_names) - int(which)
    for index, name in enumerate(layer_names):
        if name == which or name.startswith(which):
            return index
    close = difflib.get_close_matches(which, layer_names, n=3)
    hint = f"; close: {', '.join(close)}" if close else ""
    raise FlowersError(f"finetune.unfreeze={which!r}: no layer of {backbone_name} is named or starts "
                       f"with that{hint} (first layers: {', '.join(layer_names[:3])}, last: "
                       f"{layer_names[-1]})")
