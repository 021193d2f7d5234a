"""What `flowers export` was asked for, checked before anything is written: the request.

check_request turns what a user typed (the run, the formats, a quantization) into an ExportRequest
in about a second, importing no ML framework and creating nothing: an incomplete run, an unknown
format, a missing writer or runtime, or a non-float32 run is refused with one line first.
prepare_toolchains then installs what a format needs outside flowers' environment (TF.js: its
converter and node packages, on first use), dropping a format whose tools cannot be made with one
line saying why, so the others are still written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flowers import backend, runs
from flowers.config import Experiment
from flowers.errors import FlowersError
from flowers.export import formats as registry  # `formats` here: the formats a user asked for
from flowers.export import runtimes
from flowers.export.runtimes import EXPORT_EXTRA


def parse_formats(text: str | Iterable[str]) -> list[str]:
    """"keras,onnx" (or a list) -> validated format names in registry order, without repeats."""
    return registry.parse_names(text.split(",") if isinstance(text, str) else text)


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """A checked `flowers export` request: the source run and what to write it to, with what."""

    run_dir: Path
    experiment: Experiment
    run_config: dict[str, Any]  # the run's config.json
    formats: list[str]  # in registry order
    writers: dict[str, str]  # format -> the backend whose process writes it (keras: none, a copy)
    quantize: dict[str, str] = dataclasses.field(default_factory=dict)  # format -> "float16"
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # format -> why not written


def plan_writers(formats: Iterable[str]) -> dict[str, str]:
    """format -> the backend whose process writes it; checks every needed tool is installed.

    A converted format (TF.js) is written by its tool from its source format, whose writer is then
    planned too, even when the source was not asked for (it is written into scratch space).

    Raises:
        FlowersError: a format's writer or runtime is not installed (the extra is named).
    """
    installed = {name for name, version in backend.installed_versions().items() if version}
    plan = {}
    formats = list(formats)
    for fmt in formats + [registry.get(f).converted_from for f in formats]:
        if not fmt or fmt in plan:
            continue
        record = registry.get(fmt)
        runtimes.require(record.runtime_modules, f"verifying format {fmt!r}")
        if not record.writers:  # copied from the run, or converted from another format
            continue
        usable = [w.backend for w in record.writers
                  if w.backend in installed and not runtimes.missing_modules(w.modules)]
        if not usable:
            options = " or ".join("+".join(w.modules) for w in record.writers)
            raise FlowersError(f"format {fmt!r} cannot be written: it needs {options}, not "
                               f"installed; install them with: {EXPORT_EXTRA}")
        plan[fmt] = usable[0]
    return plan


def default_formats() -> list[str]:
    """What `flowers export` writes without --formats: every format, an optional one (TF.js) only
    once its toolchain is ready (`--formats tfjs` creates it)."""
    return [name for name in registry.NAMES if registry.get(name).available_by_default()]


def parse_quantize(quantize: dict[str, str] | None, formats: list[str]) -> dict[str, str]:
    """{format: quantization}, checked against the formats asked for and what each offers."""
    checked = {}
    for fmt, kind in (quantize or {}).items():
        record = registry.get(fmt)
        if kind not in record.quantizations:
            offered = ", ".join(record.quantizations) or "none"
            raise FlowersError(f"{fmt} cannot be quantized to {kind!r} (offered: {offered})")
        if fmt not in formats:
            raise FlowersError(f"quantizing {fmt} needs {fmt} among the formats (--formats ...,{fmt})")
        checked[fmt] = kind
    return checked


def check_request(run_dir: str | Path, formats: str | Iterable[str] | None,
                  quantize: dict[str, str] | None = None) -> ExportRequest:
    """Everything a user typed, checked in a second: the run, the formats, their toolchains and
    the run's dtype policy. Imports no ML framework and creates nothing.

    Args:
        run_dir: the run to export.
        formats: "keras,onnx", a list of names, or None for the default set (default_formats).
        quantize: {format: quantization}, e.g. {"tfjs": "float16"}.

    Raises:
        FlowersError: incomplete run, unknown format, missing toolchain, or a non-float32 run.
    """
    run_dir = runs.check_complete(run_dir)
    names = parse_formats(default_formats() if formats is None else formats)
    quantize = parse_quantize(quantize, names)
    writers = plan_writers(names)
    experiment, run_config = runs.read_run_config(run_dir)
    policy = getattr(experiment.train, "dtype_policy", "float32")
    if policy != "float32":
        # onnxruntime cannot run the bfloat16 graph such a model exports, and the 1e-4 agreement
        # between runtimes only holds in float32.
        raise FlowersError(f"{run_dir} was trained with train.dtype_policy={policy!r}; exports are "
                           "float32 only: train with train.dtype_policy=float32 to export")
    return ExportRequest(run_dir, experiment, run_config, names, writers, quantize)


def prepare_toolchains(request: ExportRequest, step: Callable[[str], None]) -> ExportRequest:
    """Install what the requested formats need outside flowers (first use only). A format whose
    toolchain cannot be made (no Node.js, offline) is dropped with one line saying why; the other
    formats are still written, and the manifest lists the dropped one under "skipped".

    Raises:
        FlowersError: nothing would be left to write.
    """
    skipped = {}
    for fmt in request.formats:
        toolchain = registry.get(fmt).toolchain
        if toolchain is None:
            continue
        try:
            problem = toolchain.problem()
            if problem:
                raise FlowersError(problem)
            toolchain.prepare(step)
        except FlowersError as exc:
            skipped[fmt] = str(exc)
            step(f"warning: {fmt} is not written: {exc}")
    formats = [f for f in request.formats if f not in skipped]
    if not formats:
        raise FlowersError("; ".join(f"{fmt} cannot be written: {why}" for fmt, why in skipped.items()))
    return dataclasses.replace(request, formats=formats, skipped=skipped,
                               quantize={f: q for f, q in request.quantize.items() if f in formats})
