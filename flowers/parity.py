"""Cross-backend parity: the same weights and the same real images give the same numbers everywhere.

Keras initialises weights differently under each backend even with the same seed, so the model is
built ONCE (under the reference backend, the first one listed), its weights are saved, and every
backend loads that file in its own process. Each process then:

1. predicts the same batch of real flowers12 photos (two test images per class), and
2. trains a few steps from that identical init on identical batches (one training image per class
   per step) with dropout set to 0 and the backbone frozen (BatchNorm in inference mode), so
   nothing random is left in the step.

Compared with the reference backend:
- max_abs_prob_diff: max |p_backend - p_reference| over every image and class (target <= 1e-4);
- top1_agreement: share of images with the same top-1 class (target 100%);
- max_abs_loss_diff: max |loss_backend - loss_reference| over the training steps;
- max_abs_weight_diff: max |w_backend - w_reference| over every trainable weight after training;
- weight_drift_vs_update: ||w_backend - w_reference|| / ||w_reference - w_init||, i.e. the drift
  as a share of how far training moved the weights.

Images, architecture and optimiser settings come from experiments/flowers12.toml (weights "none",
so nothing is downloaded). This module imports keras only inside the worker processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, config
from flowers.errors import FlowersError

PARITY_EXPERIMENT = "flowers12"
TARGET_MAX_ABS_PROB_DIFF = 1e-4
TARGET_TOP1_AGREEMENT = 1.0
FORWARD_IMAGES_PER_CLASS = 2
TRAIN_STEPS = 5
DEFAULT_BACKENDS = backend.BACKENDS
PARITY_FILE = "parity.json"
INIT_WEIGHTS_FILE = "init.weights.h5"
INPUTS_FILE = "inputs.npz"


def parse_backends(text: str) -> list[str]:
    """"torch,jax" -> ["torch", "jax"]; at least two distinct known backends, else FlowersError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        backend.check_name(name)
    if len(set(names)) != len(names):
        raise FlowersError(f"--backends {text!r}: a backend is listed twice")
    if len(names) < 2:
        raise FlowersError(f"--backends {text!r}: parity needs at least two backends, "
                           f"e.g. {','.join(DEFAULT_BACKENDS)}")
    return names


def parity_experiment(image_size: int) -> config.Experiment:
    """The flowers12 experiment at `image_size`, random weights, dropout off (validated)."""
    if image_size < 32:
        raise FlowersError(f"--image-size {image_size}: must be >= 32 (ResNet50 minimum)")
    return config.load_experiment(PARITY_EXPERIMENT, [
        f"data.image_size={image_size}", "model.weights=none", "model.dropout=0",
        "model.freeze_backbone=true"])


def run_parity(backends: Sequence[str], image_size: int = 224) -> dict[str, Any]:
    """Run the parity check: one worker process per backend, compared with the first backend.

    Args:
        backends: two or more backend names; the first is the reference and builds the model.
        image_size: side of the square input images.

    Returns:
        The parity result (what `flowers parity` prints and writes to parity.json), with
        `failures` listing every missed target (empty when all targets are met).

    Raises:
        FlowersError: unknown backend, bad image size, flowers12 photos missing, or a worker
            failing (its one-line reason is passed on).
    """
    from flowers.data import scan_folder

    backends = parse_backends(",".join(backends))
    experiment = parity_experiment(image_size)
    _, folder = config.source_kind(experiment.data.source)
    listing = scan_folder(Path(folder), experiment.data.val_fraction, experiment.train.seed)
    num_classes = len(listing.class_names)
    forward_files = _per_class(listing.val_files, listing.val_labels, num_classes,
                               FORWARD_IMAGES_PER_CLASS)
    train_files = _per_class(listing.train_files, listing.train_labels, num_classes, TRAIN_STEPS)
    if len(train_files) < TRAIN_STEPS * num_classes:
        raise FlowersError(f"{folder}: parity needs {TRAIN_STEPS} training images per class")
    # step i trains on the i-th image of every class
    steps = [[train_files[c * TRAIN_STEPS + i] for c in range(num_classes)]
             for i in range(TRAIN_STEPS)]

    with tempfile.TemporaryDirectory(prefix="flowers-parity-") as tmp:
        work_dir = Path(tmp)
        spec = {
            "work_dir": str(work_dir),
            "experiment": experiment.to_dict(),
            "num_classes": num_classes,
            "forward_files": forward_files,
            "train_steps": steps,
        }
        outputs = {}
        for index, name in enumerate(backends):
            outputs[name] = _run_worker({**spec, "backend": name, "create": index == 0}, work_dir)
        arrays = {name: dict(np.load(work_dir / f"{name}.npz")) for name in backends}

    reference = backends[0]
    ref = arrays[reference]
    results = [_compare(name, arrays[name], ref) for name in backends[1:]]
    failures = missed_targets(results)
    sorted_ref = np.sort(ref["probs"], axis=1)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "reference": reference,
        "backends": list(backends),
        "image_size": image_size,
        "images_from": folder,
        "num_forward_images": len(forward_files),
        "train_steps": TRAIN_STEPS,
        "train_batch_size": num_classes,
        "learning_rate": experiment.train.learning_rate,
        "dropout": experiment.model.dropout,
        "freeze_backbone": experiment.model.freeze_backbone,
        "targets": {"max_abs_prob_diff": TARGET_MAX_ABS_PROB_DIFF,
                    "top1_agreement": TARGET_TOP1_AGREEMENT},
        # how decisive the reference's top-1 was: a near-tie would make top-1 agreement fragile
        "reference_min_top1_margin": float((sorted_ref[:, -1] - sorted_ref[:, -2]).min()),
        "reference_losses": [float(v) for v in ref["losses"]],
        # per step: training images whose true-class probability was below 1e-7 (see docstring)
        "reference_clipped_images": [int(v) for v in ref["clipped"]],
        "runs": outputs,
        "results": results,
        "failures": failures,
        "passed": not failures,
    }


def missed_targets(results: Sequence[dict[str, Any]],
                   max_abs_prob_diff: float = TARGET_MAX_ABS_PROB_DIFF,
                   top1_agreement: float = TARGET_TOP1_AGREEMENT) -> list[str]:
    """One line per missed target, e.g. "jax: max |Δprob| 2.1e-04 > 1.0e-04"."""
    failures = []
    for result in results:
        name = result["backend"]
        if not result["max_abs_prob_diff"] <= max_abs_prob_diff:
            failures.append(f"{name}: max |Δprob| {result['max_abs_prob_diff']:.1e} > "
                            f"{max_abs_prob_diff:.1e}")
        if not result["top1_agreement"] >= top1_agreement:
            failures.append(f"{name}: top-1 agreement {result['top1_agreement']:.1%} < "
                            f"{top1_agreement:.0%}")
    return failures


def write_parity(result: dict[str, Any], out_dir: Path) -> Path:
    """Write out_dir/parity.json (replaced whole, never half-written); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PARITY_FILE
    with tempfile.NamedTemporaryFile("w", dir=out_dir, prefix=".parity-", suffix=".json",
                                     delete=False) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    os.replace(f.name, path)
    return path


def read_parity(path: Path) -> dict[str, Any] | None:
    """A parity.json written by write_parity, None when absent; FlowersError when corrupt."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        _ = (result["reference"], result["image_size"], result["passed"])
        for row in result["results"]:
            _ = (row["backend"], float(row["max_abs_prob_diff"]), float(row["top1_agreement"]),
                 float(row["max_abs_loss_diff"]), float(row["max_abs_weight_diff"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlowersError(f"{path}: unreadable parity result ({exc.__class__.__name__}: {exc}); "
                           "delete it or run flowers parity again") from None
    return result


def format_table(result: dict[str, Any]) -> str:
    """The parity result as a markdown table (printed by the CLI, embedded in the report)."""
    ref = result["reference"]
    lines = [
        f"| vs {ref} | max abs Δprob | top-1 agreement | max abs Δloss | max abs Δweight "
        "| weight drift / update | target met |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    failed = {line.split(":")[0] for line in result["failures"]}
    for row in result["results"]:
        drift = row["weight_drift_vs_update"]
        lines.append(
            f"| {row['backend']} | {row['max_abs_prob_diff']:.1e} | {row['top1_agreement']:.0%} "
            f"| {row['max_abs_loss_diff']:.1e} | {row['max_abs_weight_diff']:.1e} "
            f"| {'n/a' if drift is None else f'{drift:.1e}'} "
            f"| {'no' if row['backend'] in failed else 'yes'} |"
        )
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    """One sentence saying what was compared, on what."""
    devices = sorted({run["device"] for run in result["runs"].values()})
    return (f"{result['num_forward_images']} flowers12 photos at {result['image_size']} px, "
            f"then {result['train_steps']} Adam steps (lr {result['learning_rate']:g}, batch "
            f"{result['train_batch_size']}, dropout {result['dropout']:g}, backbone frozen) from "
            f"one saved init; reference {result['reference']}; device {', '.join(devices)}; "
            f"targets: max abs Δprob <= {result['targets']['max_abs_prob_diff']:.0e}, top-1 "
            f"agreement {result['targets']['top1_agreement']:.0%}")


def notes(result: dict[str, Any]) -> list[str]:
    """Generated explanations of the drift (why a backend's training left the others)."""
    clipped = result.get("reference_clipped_images", [])
    steps = [i + 1 for i, count in enumerate(clipped) if count]
    if not steps or "tensorflow" not in result["backends"]:
        return []
    before = [f"{row['backend']} {row['max_abs_loss_diff_before_clipping']:.1e}"
              for row in result["results"] if row.get("max_abs_loss_diff_before_clipping") is not None]
    return [
        f"Training step(s) {', '.join(map(str, steps))} had a training image whose true-class "
        "probability was below Keras' epsilon (1e-7). There Keras computes the cross-entropy "
        "differently per backend: from the softmax's logits under tensorflow, from the clipped "
        "probabilities under torch and jax (so that image's loss is capped at -log(1e-7) = 16.1 "
        "and its gradient is zero). tensorflow's loss and weights leave the others from that step "
        "on; this is Keras behaviour, not numerical noise."
        + (f" Before step {steps[0]}, max abs Δloss: {', '.join(before)}." if before else "")
    ]


def _per_class(files: list[str], labels: list[int], num_classes: int, count: int) -> list[str]:
    """The first `count` files of every class, class by class."""
    by_class: list[list[str]] = [[] for _ in range(num_classes)]
    for file, label in zip(files, labels, strict=True):
        by_class[label].append(file)
    return [file for group in by_class for file in group[:count]]


def _compare(name: str, arrays: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    weight_keys = sorted(k for k in ref if k.startswith("trained_"))
    diff = np.concatenate([(arrays[k] - ref[k]).ravel() for k in weight_keys])
    update = np.concatenate([(ref[k] - ref["init_" + k.removeprefix("trained_")]).ravel()
                             for k in weight_keys])
    update_norm = float(np.linalg.norm(update))
    loss_diff = np.abs(arrays["losses"] - ref["losses"])
    first_clipped = int(np.argmax(ref["clipped"] > 0)) if ref["clipped"].any() else len(loss_diff)
    return {
        "backend": name,
        "max_abs_prob_diff": float(np.abs(arrays["probs"] - ref["probs"]).max()),
        "top1_agreement": float((arrays["probs"].argmax(1) == ref["probs"].argmax(1)).mean()),
        "max_abs_loss_diff": float(loss_diff.max()),
        # the steps before any image's loss was clipped, where every backend computes the same math
        "max_abs_loss_diff_before_clipping": (float(loss_diff[:first_clipped].max())
                                              if first_clipped else None),
        "max_abs_weight_diff": float(np.abs(diff).max()),
        "weight_drift_vs_update": float(np.linalg.norm(diff)) / update_norm if update_norm else None,
        "losses": [float(v) for v in arrays["losses"]],
    }


def _run_worker(spec: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run one backend's worker in a fresh process; returns what it reports about itself."""
    spec_path = work_dir / f"{spec['backend']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run([sys.executable, "-m", "flowers.parity", str(spec_path)],
                          capture_output=True, text=True, env=env)
    report_path = work_dir / f"{spec['backend']}.json"
    if done.returncode != 0 or not report_path.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        reason = (errors or lines or [f"exit status {done.returncode}"])[-1]
        raise FlowersError(f"parity under {spec['backend']} failed: {reason}")
    return json.loads(report_path.read_text())


def _worker(spec: dict[str, Any]) -> None:
    """One backend's side of the check (runs in its own process, see _run_worker)."""
    name = backend.select(spec["backend"])
    backend.hide_gpus_from_tensorflow(name)
    import keras

    from flowers.model import build_model, compile_model

    work_dir = Path(spec["work_dir"])
    experiment = config.from_dict(spec["experiment"])
    size, num_classes = experiment.data.image_size, spec["num_classes"]
    keras.utils.set_random_seed(experiment.train.seed)
    model = build_model(experiment.model, size, num_classes)
    if spec["create"]:
        from flowers.data import load_image_files

        train_files = [f for step in spec["train_steps"] for f in step]
        np.savez(work_dir / INPUTS_FILE,
                 forward=load_image_files(spec["forward_files"], size),
                 train=load_image_files(train_files, size),
                 train_labels=np.tile(np.arange(num_classes, dtype=np.int32), len(spec["train_steps"])))
        model.save_weights(work_dir / INIT_WEIGHTS_FILE)
    model.load_weights(work_dir / INIT_WEIGHTS_FILE)
    inputs = np.load(work_dir / INPUTS_FILE)

    def trainable() -> dict[str, np.ndarray]:
        return {f"{i:03d}": keras.ops.convert_to_numpy(v.value)
                for i, v in enumerate(model.trainable_variables)}

    probs = keras.ops.convert_to_numpy(model.predict_on_batch(inputs["forward"].astype(np.float32)))
    init = trainable()
    compile_model(model, experiment.train.learning_rate, num_classes)
    batches = zip(np.split(inputs["train"].astype(np.float32), len(spec["train_steps"])),
                  np.split(inputs["train_labels"], len(spec["train_steps"])), strict=True)
    losses, clipped = [], []
    for x, y in batches:
        # Samples whose true-class probability is below keras' epsilon: torch and jax compute the
        # cross-entropy from clipped probabilities there, tensorflow from the softmax's logits.
        p_true = keras.ops.convert_to_numpy(model.predict_on_batch(x))[np.arange(len(y)), y]
        clipped.append(int((p_true < keras.config.epsilon()).sum()))
        losses.append(float(model.train_on_batch(x, y, return_dict=True)["loss"]))
    trained = trainable()
    np.savez(work_dir / f"{name}.npz", probs=probs, losses=np.asarray(losses),
             clipped=np.asarray(clipped),
             **{f"init_{k}": v for k, v in init.items()},
             **{f"trained_{k}": v for k, v in trained.items()})
    (work_dir / f"{name}.json").write_text(json.dumps({
        "device": backend.device(name),
        "data_format": model.get_layer("avg_pool").data_format,
        "jit_compile": bool(model.jit_compile),
        **backend.versions(name),
    }))


def _worker_main(argv: list[str]) -> None:
    try:
        _worker(json.loads(Path(argv[0]).read_text()))
    except FlowersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
