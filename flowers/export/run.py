"""`flowers export`: a run's model.keras as .keras / SavedModel / ONNX / LiteRT / TF.js, verified and
versioned.

    exports/<experiment>/v<N>/  manifest.json  model.keras  savedmodel/  model.onnx  model.tflite
                                tfjs/

A version is staged in exports/<experiment>/.incomplete-<id>/ and renamed to v<N> only when every
format is written and verified, so a v<N> directory is always complete; N is one more than the
highest existing version, and an existing version is never written again.

The formats, where each lives, who writes it, what runs it and how closely it must agree are the
records of flowers.export.formats (one module per format); nothing here names a format but the
source one (model.keras, copied from the run) and SavedModel, whose signatures the manifest lists.
Any training backend reaches every format: each format is written by the Keras backend that exports
it best (its record's writers, best first), in a process of its own (flowers/export/worker.py,
started through flowers.workers) that reloads model.keras. A converted format (TF.js) is made from
its source format (the SavedModel) by its own tool afterwards; the source is written into scratch
space when it was not asked for.

Verification: every exported file is opened in its own runtime (flowers/export/runtimes.py) --
.keras under each installed Keras backend, the SavedModel with tf.saved_model (both signatures),
ONNX with onnxruntime, .tflite with the LiteRT interpreter, TF.js in node on tfjs' WASM and CPU
backends -- and run on the same real images (the source run's validation images,
VERIFICATION_IMAGES of them). The reference is model.keras under the backend that trained it. Every
format is float32, so each must agree on the top-1 class for every image and stay within its
format's max_abs_prob_diff of the reference's probabilities; one that does not fails the export.
(Quantized TF.js weights have their own limit; see _compare.) Batch-1 latency p50 is recorded per
runtime. All of it runs on the CPU, where the deployment runtimes run and where float32 results are
not blurred by TF32 GPU math.

Everything a user typed is checked first (flowers/export/request.py: the run, the formats, their
toolchains, the dtype policy), in about a second and before anything is created under the exports
root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flowers import __version__, backend, data, faults, files, host, tables, workers
from flowers.config import Experiment
from flowers.errors import FlowersError
from flowers.export import formats as registry  # `formats` here: the formats a user asked for
from flowers.export import runtimes
from flowers.export.formats import savedmodel
from flowers.export.formats.base import Conversion
from flowers.export.request import ExportRequest, check_request, prepare_toolchains
from flowers.export.runtimes import MANIFEST
from flowers.metrics import LATENCY_WARMUP_CALLS

VERIFICATION_IMAGES = 64
MIN_VERIFICATION_IMAGES = 32
# What a format's slow_signatures run (tfjs' pure-JS CPU backend): the first images only.
SLOW_RUNTIME_IMAGES = 8
VERSION_NAME = re.compile(r"^v(\d+)$")
# The format training writes: an export copies the run's model.keras, the reference of every other.
SOURCE_FORMAT = "keras"
# Distributions whose versions go into the manifest: the backends', then every format's runtime and
# writers' (flowers.export.formats).
PACKAGES = tuple(dict.fromkeys(("keras", "tensorflow", "tensorflow-cpu", "torch", "jax", "jaxlib",
                                "numpy", *registry.packages(writers=True))))


@dataclasses.dataclass
class ExportRecord:
    """An export version being written: everything its manifest.json describes."""

    request: ExportRequest
    staging: Path  # where the version's files are until it is published
    images: int  # how many verification images every runtime ran
    images_from: str
    write_info: dict[str, dict[str, Any]]  # format -> written_by, write_s
    results: list[dict[str, Any]]  # one per format and runtime (_write_and_verify)


def export_run(run_dir: str | Path, formats: str | Iterable[str] | None, out_root: Path,
               on_step: Callable[[str], None] | None = None,
               quantize: dict[str, str] | None = None) -> Path:
    """Export a complete run to `formats`, verify each in its runtime, publish exports/<exp>/v<N>.

    The request is checked first (check_request), before any framework loads; then this process
    selects the tensorflow backend, on the CPU, to decode the verification images and run the
    SavedModel (Keras itself runs in one child process per backend).

    Args:
        run_dir: a complete run directory (with model.keras).
        formats: "keras,onnx", registered format names, or None for the default set.
        out_root: root of the versions (paths.exports_root()).
        on_step: called with a short line before each slow step (the CLI prints them).
        quantize: {format: quantization} for formats that offer one ({"tfjs": "float16"}).

    Returns:
        The new version directory.

    Raises:
        FlowersError: incomplete run, unknown format, missing toolchain, a writer that failed, or
            a format that failed verification. Nothing is left in out_root then.
    """
    step = on_step or (lambda line: None)
    request = check_request(run_dir, formats, quantize)
    experiment = request.experiment
    files.check_writable(out_root / experiment.name, "--out")
    request = prepare_toolchains(request, step)
    _use_tensorflow_on_cpu()

    step(f"loading verification images of {experiment.name} ({experiment.data.source})")
    images, images_from = verification_images(experiment)
    parent = out_root / experiment.name
    with files.staging_dir(parent) as staging:
        with tempfile.TemporaryDirectory(prefix="flowers-export-") as scratch:
            results, write_info = _write_and_verify(request, images, staging, Path(scratch), step)
        failed = [r for r in results if not r["passed"]]
        if failed:
            reference = results[0]["reference"]
            raise FlowersError(
                f"verification failed against {reference} on {len(images)} images: "
                + "; ".join(_describe_failure(r) for r in failed))
        step("hashing files and writing manifest.json")
        manifest = _manifest(ExportRecord(request, staging, len(images), images_from, write_info,
                                          results))
        return _publish(staging, parent, manifest)


def _use_tensorflow_on_cpu() -> None:
    """This process decodes images (tf.data) and runs the SavedModel: tensorflow, kept off the GPU."""
    backend.select("tensorflow")
    backend.hide_gpus_from_tensorflow()


def verification_images(experiment: Experiment) -> tuple[np.ndarray, str]:
    """Up to VERIFICATION_IMAGES of the run's validation images, float32 [N,S,S,3] 0..255.

    Decoded by the run's own pipeline (flowers.data). A validation split with fewer than
    MIN_VERIFICATION_IMAGES images is topped up with training images (augmentation off).

    Returns:
        (images, where they came from).
    """
    config = dataclasses.replace(experiment.data, augment=False)
    splits = data.load(config, experiment.train.batch_size, experiment.train.seed)
    size = config.image_size

    def take(dataset, wanted: int) -> np.ndarray:
        batches = [np.zeros((0, size, size, 3), np.float32)]
        for images, _ in dataset:
            batches.append(images.numpy().astype(np.float32))
            if sum(len(b) for b in batches) >= wanted:
                break
        return np.concatenate(batches)[:wanted]

    val = take(splits.val, VERIFICATION_IMAGES)
    if len(val) >= MIN_VERIFICATION_IMAGES:
        return val, f"{len(val)} validation images of the source run"
    train = take(splits.train, VERIFICATION_IMAGES - len(val))
    return np.concatenate([val, train]), (
        f"{len(val)} validation + {len(train)} training images of the source run (its validation "
        f"split has fewer than {MIN_VERIFICATION_IMAGES})")


def list_exports(root: Path, experiment: str | None = None) -> list[dict[str, Any]]:
    """Manifests of the published versions under root, by experiment then version.

    Each manifest gets a "path" key with its version directory.
    """
    found = []
    for manifest_path in root.glob(f"{experiment or '*'}/v*/{MANIFEST}"):
        if VERSION_NAME.match(manifest_path.parent.name):
            found.append({**read_manifest(manifest_path.parent), "path": str(manifest_path.parent)})
    return sorted(found, key=lambda m: (m.get("experiment", ""), m.get("version", 0)))


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """The manifest.json of an export version."""
    return files.read_json(version_dir / MANIFEST)


def render_results(manifest: dict[str, Any]) -> str:
    """The verification table of a manifest, one row per format and runtime."""
    sizes = {fmt: entry["bytes"] for fmt, entry in manifest["formats"].items()}
    rows = [("format", "runtime", "top-1 agree", "max |Δprob|", "p50 ms (batch 1)", "size MiB")]
    for r in manifest["verification"]["results"]:
        rows.append((r["format"], r["runtime"], f"{r['top1_agreement']:.1%}",
                     f"{r['max_abs_prob_diff']:.1e}", f"{r['batch1_p50_ms']:.2f}",
                     f"{sizes[r['format']] / 2**20:.1f}"))
    verification = manifest["verification"]
    header = (f"v{manifest['version']} of {manifest['experiment']}: "
              f"{verification['images']} images vs {verification['reference']}, "
              f"{'all passed' if verification['passed'] else 'FAILED'}")
    return header + "\n" + tables.text_table(rows)


def render_list(manifests: list[dict[str, Any]], root: Path, experiment: str | None = None) -> str:
    """`flowers exports list`: one row per version."""
    if not manifests:
        return f"no exports{f' of {experiment}' if experiment else ''} under {root}"
    rows = [("experiment", "version", "created", "trained", "run", "val_accuracy", "formats",
             "path")]
    for m in manifests:
        accuracy = m.get("val_metrics", {}).get("val_accuracy")
        rows.append((m["experiment"], f"v{m['version']}", m["created"], m["training_backend"],
                     m["run_id"], "-" if accuracy is None else f"{accuracy:.4f}",
                     ",".join(m["formats"]), m["path"]))
    return tables.text_table(rows)


def next_version(parent: Path) -> int:
    """1 + the highest v<N> under parent (1 for none)."""
    numbers = [int(m.group(1)) for p in parent.iterdir() if (m := VERSION_NAME.match(p.name))]
    return max(numbers, default=0) + 1


def _write_and_verify(request: ExportRequest, images: np.ndarray, staging: Path, scratch: Path,
                      step: Callable[[str], None]
                      ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Write every format into staging and run each in its runtime; returns (results, write info).

    results[i]: format, runtime, reference, images, top1_agreement, max_abs_prob_diff,
    batch1_p50_ms, limit, passed. write info: format -> written_by, write_s (and quantization).
    """
    formats, writers = request.formats, request.writers
    latency_repeats = request.experiment.train.latency_repeats
    installed = [name for name, version in backend.installed_versions().items() if version]
    trained_backend = request.run_config["backend"]
    reference_backend = trained_backend if trained_backend in installed else "tensorflow"
    keras_backends = installed if SOURCE_FORMAT in formats else []
    worker_backends = list(dict.fromkeys([reference_backend, *keras_backends, *writers.values()]))
    write_info: dict[str, dict[str, Any]] = {}
    source_path = staging / registry.get(SOURCE_FORMAT).path
    if SOURCE_FORMAT in formats:
        shutil.copyfile(request.run_dir / "model.keras", source_path)
        write_info[SOURCE_FORMAT] = {"written_by": "copy of the run's model.keras", "write_s": 0.0}
        faults.point("export-copied")
    model_path = source_path if SOURCE_FORMAT in formats else request.run_dir / "model.keras"
    np.save(scratch / "images.npy", images)

    def target(fmt: str) -> Path:  # a format asked for goes into the version, a source only to scratch
        return (staging if fmt in formats else scratch) / registry.get(fmt).path

    keras_runs = {}
    for name in worker_backends:
        writes = {fmt: str(target(fmt)) for fmt, b in writers.items() if b == name}
        step(f"keras under {name}: verification images" + "".join(f", write {f}" for f in writes))
        result, probabilities = _run_worker(name, model_path, writes, scratch, latency_repeats)
        keras_runs[name] = (result, probabilities)
        faults.point(f"export-worker:{name}")
        for fmt, seconds in result["write_s"].items():
            written_by = (f"keras {host.package_version('keras')} {registry.get(fmt).written_with} "
                          f"under {name}")
            write_info[fmt] = {"written_by": written_by, "write_s": round(seconds, 2)}
    write_info.update(_convert(request, target, step))

    reference_result, reference = keras_runs[reference_backend]
    measured = [(SOURCE_FORMAT, result["runtime"], probabilities, result["batch1_p50_ms"])
                for name, (result, probabilities) in keras_runs.items() if name in keras_backends]
    measured += _run_in_runtimes([f for f in formats if f != SOURCE_FORMAT], staging, images,
                                 latency_repeats, step)
    return [_compare(fmt, runtime, probabilities, p50, reference, reference_result["runtime"],
                     registry.get(fmt).limit(request.quantize.get(fmt)), fmt in request.quantize)
            for fmt, runtime, probabilities, p50 in measured], write_info


def _convert(request: ExportRequest, target: Callable[[str], Path], step: Callable[[str], None]
             ) -> dict[str, dict[str, Any]]:
    """Each converted format (TF.js) from its source format, by its tool: format -> write info."""
    class_names = files.read_json(request.run_dir / "class_names.json")
    info = {}
    for fmt in request.formats:
        record = registry.get(fmt)
        if record.convert is None:
            continue
        quantize = request.quantize.get(fmt)
        start = time.perf_counter()
        written_by = record.convert(target(record.converted_from), target(fmt),
                                    Conversion(class_names, quantize, step))
        info[fmt] = {"written_by": written_by, "write_s": round(time.perf_counter() - start, 2),
                     **({"quantization": quantize} if quantize else {})}
        faults.point(f"export-converted:{fmt}")
    return info


def _run_in_runtimes(formats: list[str], staging: Path, images: np.ndarray, latency_repeats: int,
                     step: Callable[[str], None]) -> list[tuple[str, str, np.ndarray, float]]:
    """Each written format in its own runtime, once per signature: (format, runtime, probabilities,
    batch-1 p50 ms) for each. A slow signature runs the first SLOW_RUNTIME_IMAGES images only."""
    measured = []
    for fmt in formats:
        record = registry.get(fmt)
        step(f"running {fmt} in its runtime")
        for signature in record.signatures or (None,):
            loaded = runtimes.open_model(staging / record.path, signature=signature)
            some = images[:SLOW_RUNTIME_IMAGES] if signature in record.slow_signatures else images
            probabilities, p50 = runtimes.run_and_time(loaded, some, latency_repeats)
            measured.append((fmt, loaded.runtime, probabilities, p50))
    return measured


def _compare(fmt: str, runtime: str, probabilities: np.ndarray, p50: float, reference: np.ndarray,
             reference_runtime: str, limit: float, quantized: bool) -> dict[str, Any]:
    """One runtime's result against the reference probabilities, within its format's tolerance.

    Float32: the top-1 class must agree on every image. Quantized weights move probabilities by up
    to the (larger) limit, so two classes within the limit of each other may swap: the top-1 must
    agree on every image whose reference top-1 leads its runner-up by more than the limit.
    """
    reference = reference[:len(probabilities)]  # a slow runtime ran the first images only
    agrees = probabilities.argmax(1) == reference.argmax(1)
    ordered = np.sort(reference, axis=1)
    near_ties = (ordered[:, -1] - ordered[:, -2] <= limit) if quantized else np.zeros_like(agrees)
    max_diff = float(np.max(np.abs(probabilities - reference)))
    return {
        "format": fmt, "runtime": runtime, "reference": reference_runtime,
        "images": len(reference), "top1_agreement": float(np.mean(agrees)),
        "max_abs_prob_diff": max_diff, "batch1_p50_ms": round(p50, 3), "limit": limit,
        **({"near_ties_swapped": int(np.sum(~agrees & near_ties))} if quantized else {}),
        "passed": bool(np.all(agrees | near_ties)) and max_diff <= limit,
    }


def _run_worker(name: str, model_path: Path, writes: dict[str, str], scratch: Path,
                latency_repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    """Run flowers.export.worker under backend `name`, on the CPU (see the module docstring).

    Returns:
        (its result, the probabilities it computed). The child's output is kept from the user
        unless it fails, when its one-line error becomes the FlowersError (flowers.workers).
    """
    probabilities_out = scratch / f"probabilities-{name}.npy"
    request = {"model": str(model_path), "images": str(scratch / "images.npy"),
               "probabilities_out": str(probabilities_out), "latency_repeats": latency_repeats,
               "writes": writes}
    what = ", ".join(f"writing {f}" for f in writes) or "running model.keras"
    result = workers.run_worker("flowers.export.worker", name, request, scratch, what, cpu_only=True)
    return result, np.load(probabilities_out)


def _describe_failure(result: dict[str, Any]) -> str:
    differing = round((1 - result["top1_agreement"]) * result["images"])
    return (f"{result['format']} in {result['runtime']}: top-1 differs on {differing} of "
            f"{result['images']} images, max |Δprob| {result['max_abs_prob_diff']:.1e} "
            f"(limit {result['limit']:.0e})")


def _manifest(record: ExportRecord) -> dict[str, Any]:
    """manifest.json of the version being written (its "version" is set by _publish)."""
    request = record.request
    class_names = files.read_json(request.run_dir / "class_names.json")
    file_entries = _file_entries(record.staging, request.formats)
    return {
        "version": None,  # set by _publish
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **_source(request),
        "class_names": class_names,
        **_interface(request.experiment.data.image_size, len(class_names)),
        "formats": _format_entries(record, file_entries),
        "files": file_entries,
        "verification": _verification(record),
        "git": host.git_state(),
        "packages": {"flowers": __version__, "python": platform.python_version(),
                     **host.package_versions(PACKAGES), **_tool_versions(request.formats)},
        **({"skipped": request.skipped} if request.skipped else {}),
    }


def _tool_versions(formats: list[str]) -> dict[str, str]:
    """Versions of what formats with a toolchain of their own used (TF.js: converter, node, tfjs)."""
    versions = {}
    for fmt in formats:
        toolchain = registry.get(fmt).toolchain
        if toolchain is not None:
            versions.update(toolchain.versions())
    return versions


def _source(request: ExportRequest) -> dict[str, Any]:
    """The run the version was exported from: its experiment, backend, config and accuracy."""
    metrics = files.read_json(request.run_dir / "metrics.json")
    return {
        "experiment": request.experiment.name,
        "source_run": str(request.run_dir.resolve()),
        "run_id": request.run_config["run_id"],
        "training_backend": request.run_config["backend"],
        "config_hash": request.experiment.config_hash(),
        "config": request.experiment.to_dict(),
        "val_metrics": {k: metrics.get(k) for k in ("num_val", "val_loss", "val_accuracy",
                                                    "val_top5_accuracy")},
    }


def _interface(size: int, num_classes: int) -> dict[str, Any]:
    """What every format takes and returns."""
    return {
        "input": {
            "shape": [None, size, size, 3], "layout": "NHWC", "channels": "RGB",
            "dtype": "float32", "value_range": [0, 255],
            "resize": f"bilinear, antialiased, to {size}x{size} (flowers.images.load_image_files)",
            "preprocessing": "inside the model (ResNet50 preprocess_input); send plain RGB",
            "savedmodel_signatures": {savedmodel.FLOAT_SIGNATURE: "float32",
                                      savedmodel.UINT8_SIGNATURE: "uint8"},
        },
        "output": {"shape": [None, num_classes], "dtype": "float32",
                   "meaning": "softmax class probabilities, in class_names order"},
    }


def _file_entries(staging: Path, formats: list[str]) -> dict[str, dict[str, Any]]:
    """Every file of every format: relative path -> format, bytes, sha256."""
    entries = {}
    for fmt in formats:
        target = staging / registry.get(fmt).path
        for path in sorted([target] if target.is_file() else (target.rglob("*"))):
            if path.is_file():
                entries[str(path.relative_to(staging))] = {"format": fmt,
                                                           "bytes": path.stat().st_size,
                                                           "sha256": _sha256(path)}
    return entries


def _format_entries(record: ExportRecord, file_entries: dict[str, dict[str, Any]]
                    ) -> dict[str, dict[str, Any]]:
    """Per format: where it is, its size, how it was written, what it is for, what ran it."""
    return {
        fmt: {"path": registry.get(fmt).path,
              "bytes": sum(f["bytes"] for f in file_entries.values() if f["format"] == fmt),
              **record.write_info[fmt], "targets": registry.get(fmt).purpose,
              "runtimes": [r["runtime"] for r in record.results if r["format"] == fmt]}
        for fmt in record.request.formats
    }


def _verification(record: ExportRecord) -> dict[str, Any]:
    """How every format was checked against the reference, and each runtime's result."""
    results = record.results
    return {
        "images": record.images,
        "images_from": record.images_from,
        "reference": results[0]["reference"] if results else None,
        "device": "cpu",
        "criteria": {"top1_agreement": 1.0,
                     "max_abs_prob_diff": registry.tolerance(record.request.formats,
                                                            record.request.quantize),
                     **({"quantized": "top-1 agreement is required where the reference's top-1 "
                                      "leads its runner-up by more than the format's limit"}
                        if record.request.quantize else {})},
        "latency_method": (f"predict() on 1 image: {record.request.experiment.train.latency_repeats}"
                           f" timed calls after {LATENCY_WARMUP_CALLS} untimed warm-up calls, p50;"
                           " numpy in and out"),
        "passed": all(r["passed"] for r in results),
        "results": results,
    }


def _publish(staging: Path, parent: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json and rename staging to the next free v<N>; never replaces a version."""
    while True:
        version = next_version(parent)
        manifest["version"] = version
        files.write_json(staging / MANIFEST, manifest)
        try:
            return files.publish_dir(staging, parent / f"v{version}")
        except FileExistsError:
            continue  # another export took v<N> first


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()
