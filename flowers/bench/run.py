"""`flowers bench`: every backend against native code and the hardware, in one invocation.

Method (written into bench.json beside the figures):
- One worker process per backend (python -m flowers.bench.worker) builds its models once. The
  workers are driven round by round, in a rotating order, one at a time, so slow drift of a noisy
  machine spreads over all backends instead of favouring one.
- Each figure is the median of the timed calls of all rounds, with min and max; every task has
  `warmup` untimed calls first (tracing/compilation; the first call's time is kept separately).
- Images per second = images per call / seconds per call.
- Forward: predict_on_batch on real images at batch 1 and at --batch-size.
- Train step (frozen backbone, Adam on the head): train_on_batch on backend tensors already in
  memory, one call per step (compared with native code, which is timed the same way); and
  model.fit fed by in-memory arrays vs by the real tf.data pipeline, timed between batch ends
  (their ratio is the pipeline hand-off cost).
- Native: the same network and weights as plain PyTorch / a plain tf.function (flowers.bench.native);
  written for ResNet50 only, so with another --backbone the native figures are null with a reason.
- GFLOP/s = counted forward FLOP per image x forward images per second; peak = flowers.hardware.
- Memory (--memory): each of forward at --batch-size and the train step, and the native twins'
  (ResNet50), in a fresh process that builds the model and data, then runs the task's warm-up
  and two calls: peak RSS (getrusage) after building and after the task; on a GPU the
  allocator's peak too. Keras / native is the ratio of the processes' peak RSS.
- End to end: the baseline job shape (--e2e-epochs epochs, batch --batch-size, frozen --backbone +
  head) on a fixed number of real images, trained once in standard mode and once with
  train.cache_features, each in a fresh process (so memory peaks are the job's alone).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backbones, backend, files, host, paths
from flowers.bench import contention, hardware, native
from flowers.bench.render import markdown
from flowers.bench.targets import evaluate_targets
from flowers.bench.variants import BF16_VARIANT, variant_baseline
from flowers.errors import FlowersError
from flowers.workers import LineWorker, run_worker

KERAS_TASKS = ("forward_b1", "forward_batch", "train_step", "train_memory", "train_tfdata")
NATIVE_TASKS = ("native_forward", "native_train")
# Options measured one by one against each backend's defaults (forward at --batch-size).
# train.jit_compile is measured as the opposite of what "auto" resolves to on this device (jax
# always compiles); TensorFlow's CPU convolutions only run channels_last. A backbone that computes
# channels_last only (flowers.backbones) gets no layout variant (see variant_plan). Only torch
# stores kernels in a layout of its own (model.backend_kernel_layout: flowers.backend).
VARIANTS = {
    "torch": ("model.data_format=channels_last", "train.jit_compile",
              "train.dtype_policy=mixed_bfloat16", "model.fold_batchnorm=false",
              "model.backend_kernel_layout=false", "train.portable_random=false"),
    "tensorflow": ("train.jit_compile", "train.dtype_policy=mixed_bfloat16",
                   "model.fold_batchnorm=false", "train.portable_random=false"),
    "jax": ("model.data_format=channels_first", "train.dtype_policy=mixed_bfloat16",
            "model.fold_batchnorm=false", "train.portable_random=false"),
}
VARIANT_KEYS = ("model.data_format", "train.jit_compile", "train.dtype_policy", "model.fold_batchnorm",
                "model.backend_kernel_layout", "train.portable_random")

# timed again under --contention, with one busy process per logical core beside the workers
CONTENDED_TASKS = ("forward_b1", "forward_batch")
# peak memory per task, each in a fresh process (--memory); the native twins where there is one
MEMORY_TASKS = ("forward_batch", "train_step")
NATIVE_MEMORY = {"forward_batch": "native_forward", "train_step": "native_train"}
WORKER_MODULE = "flowers.bench.worker"


@dataclass(frozen=True)
class BenchSettings:
    """What `flowers bench` measures and how long it spends doing it."""

    backends: tuple[str, ...] = backend.BACKENDS
    image_size: int = 224
    batch_size: int = 32
    steps: int = 10  # timed calls per task, split over the rounds
    rounds: int = 2
    warmup: int = 2
    e2e_epochs: int = 10  # 0 skips the end-to-end runs
    e2e_images_per_class: int = 20
    images: str = ""  # class folder of real photos; "" = synthetic images
    variants: tuple[str, ...] = VARIANT_KEYS  # which experiment keys to vary; () = none
    backbone: str = backbones.DEFAULT  # model.backbone of every measured model (flowers.backbones)
    image_sizes: tuple[int, ...] = ()  # forward at batch_size for each of these sides too
    contention: bool = False  # time CONTENDED_TASKS again beside a CPU-bound load on every core
    memory: bool = False  # peak memory of MEMORY_TASKS (and the native twins), a process each

    def validate(self) -> None:
        if not self.backends:
            raise FlowersError("--backends: name at least one backend")
        for name in self.backends:
            backend.check_name(name)
            backend.check_installed(name)
        for key, low in (("image_size", 32), ("batch_size", 1), ("steps", 1), ("rounds", 1),
                         ("warmup", 1), ("e2e_epochs", 0), ("e2e_images_per_class", 2)):
            if getattr(self, key) < low:
                raise FlowersError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be >= {low}")
        unknown = sorted(set(self.variants) - set(VARIANT_KEYS))
        if unknown:
            raise FlowersError(f"--variants: unknown key(s) {', '.join(unknown)}; choose from "
                               f"{', '.join(VARIANT_KEYS)}, 'all' or 'none'")
        if self.images and not Path(self.images).is_dir():
            raise FlowersError(f"--images {self.images}: folder not found")
        for size in self.image_sizes:
            if size < 32:
                raise FlowersError(f"--image-sizes: {size} is below 32")
        for size, option in ((self.image_size, "--image-size="),
                             *((size, "--image-sizes: ") for size in self.image_sizes)):
            try:  # an unknown name, or an image size below the backbone's minimum
                backbones.check(self.backbone, size, "auto")
            except FlowersError as exc:  # the same message, naming this command's options
                raise FlowersError(str(exc).replace("model.backbone=", "--backbone=", 1)
                                   .replace("data.image_size=", option, 1)) from None

    def sweep(self) -> list[int]:
        """Every image side whose forward is measured: --image-size and --image-sizes, ascending."""
        return sorted({self.image_size, *self.image_sizes})


def run_bench(settings: BenchSettings, out_root: Path,
              progress: Callable[[str], None] = lambda message: None) -> tuple[dict[str, Any], Path]:
    """Measure every backend, write bench.json and bench.md, return (results, output folder)."""
    settings.validate()
    logs = Path(tempfile.mkdtemp(prefix="flowers-bench-"))
    samples, ready, load = _time_backends(settings, logs, progress)
    memory = _memory_runs(settings, ready, logs, progress) if settings.memory else {}
    e2e = _end_to_end_runs(settings, ready, logs, progress) if settings.e2e_epochs else {}
    shutil.rmtree(logs, ignore_errors=True)

    device = next(iter(ready.values()))["device"]
    peak = _peak(device)
    results = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": settings.backbone,
        "device": device,
        "host": host.host_info(),
        "settings": {**asdict(settings), "images": paths.project_relative(settings.images)},
        "method": __doc__.split("Method (written into bench.json beside the figures):")[1].strip(),
        "peak": peak,
        "contention": None if load is None else {
            "load_processes": load,
            "method": f"{contention.__doc__.splitlines()[0]} The {', '.join(CONTENDED_TASKS)} "
                      "figures are timed again, round by round, while the load runs; slowdown = "
                      "quiet median / contended median."},
        "backends": {name: _backend_figures(name, settings, ready[name], samples[name], e2e.get(name),
                                            peak, memory.get(name))
                     for name in settings.backends},
    }
    results["targets"] = evaluate_targets(results)
    out_dir = out_root / "bench" / device_slug(device, results["host"])
    files.write_files(out_dir, {"bench.json": json.dumps(results, indent=2) + "\n",
                                "bench.md": markdown(results)})
    return results, out_dir


def _time_backends(settings: BenchSettings, logs: Path, progress: Callable[[str], None]
                   ) -> tuple[dict[str, dict[str, dict]], dict[str, dict], int | None]:
    """Start a timing worker per backend, time every task round by round (and CONTENDED_TASKS again
    beside a CPU load, --contention), stop them: (samples, each worker's ready line, the number of
    load processes or None)."""
    workers: dict[str, LineWorker] = {}
    try:
        for name in settings.backends:
            progress(f"starting {name} worker")
            workers[name] = LineWorker(WORKER_MODULE, name, _timing_request(settings),
                                       logs / f"{name}.log", "bench worker")
        samples = _interleave(workers, settings, progress)
        load = None
        if settings.contention:
            with contention.background_load() as load:
                progress(f"contention: {load} busy processes started, one per logical core")
                contended = _interleave(workers, settings, progress,
                                        only=[f"contended:{t}" for t in CONTENDED_TASKS])
            for name in samples:
                samples[name].update(contended[name])
        return samples, {name: w.ready for name, w in workers.items()}, load
    finally:
        for worker in workers.values():
            worker.close()


def _memory_runs(settings: BenchSettings, ready: dict[str, dict], logs: Path,
                 progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """{backend: {task: peak memory}} of MEMORY_TASKS and, where there is one, the native twin's."""
    memory: dict[str, dict[str, Any]] = {}
    for name in settings.backends:
        tasks = [*MEMORY_TASKS, *(NATIVE_MEMORY[t] for t in MEMORY_TASKS if ready[name]["native"])]
        for task in tasks:
            progress(f"{name}: peak memory of {task} (a fresh process)")
            memory.setdefault(name, {})[task] = _memory(name, task, settings, logs)
    return memory


def _end_to_end_runs(settings: BenchSettings, ready: dict[str, dict], logs: Path,
                     progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """{backend: {mode: run}}: standard and feature-cache runs, and the feature-cache run again in
    mixed_bfloat16 where bf16 is native (its accuracy)."""
    bf16 = hardware.peak_for(next(iter(ready.values()))["device"])["native_bf16"]
    e2e: dict[str, dict[str, Any]] = {}
    for name in settings.backends:
        for mode in ("standard", "cache", *(["cache-bf16"] if bf16 else [])):
            progress(f"{name}: end-to-end {mode} ({settings.e2e_epochs} epochs)")
            e2e.setdefault(name, {})[mode] = _end_to_end(name, mode, settings, logs)
    return e2e


def _peak(device: str) -> dict[str, Any]:
    """The device's peaks (flowers.bench.hardware); on a CPU, a measured GEMM rate beside them."""
    peak = hardware.peak_for(device)
    if device == "cpu":
        peak["gemm_gflops_measured"] = round(hardware.measured_gemm_gflops(), 1)
        peak["gemm_method"] = "best of 5 float32 2048x2048 matrix products through numpy's BLAS"
    return peak


def _interleave(workers: dict[str, LineWorker], settings: BenchSettings,
                progress: Callable[[str], None],
                only: Sequence[str] | None = None) -> dict[str, dict[str, dict]]:
    """Run every task (or `only` these) on every backend, round by round in rotating order;
    collect the samples."""
    per_round = max(1, -(-settings.steps // settings.rounds))
    names = list(workers)
    samples: dict[str, dict[str, dict]] = {name: {} for name in names}
    for round_index in range(settings.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for task in only or (*KERAS_TASKS, *NATIVE_TASKS, "variants", "sizes"):
            for name in order:
                worker = workers[name]
                tasks = _expand(task, name, worker, settings)
                for each in tasks:
                    progress(f"round {round_index + 1}/{settings.rounds}: {name} {each}")
                    reply = worker.ask({"task": each, "steps": per_round}, f"bench {each}")
                    entry = samples[name].setdefault(each, {"samples_s": []})
                    entry["samples_s"].extend(reply["samples_s"])
                    entry["images_per_call"] = reply["images_per_call"]
                    for key in ("first_call_s", "native_differences"):
                        if key in reply:
                            entry[key] = reply[key]
    return samples


def _expand(task: str, name: str, worker: LineWorker, settings: BenchSettings) -> list[str]:
    if task in NATIVE_TASKS:
        return [task] if worker.ready["native"] else []
    if task == "sizes":
        return [f"forward_size:{size}" for size in settings.sweep() if size != settings.image_size]
    if task == "variants":
        jit = f"train.jit_compile={'false' if worker.ready['jit_compile'] else 'true'}"
        return [f"variant:{jit if v == 'train.jit_compile' else v}"
                for v in variant_plan(name, settings)[0]]
    return [task]


def variant_plan(name: str, settings: BenchSettings) -> tuple[list[str], dict[str, str]]:
    """The variants of VARIANTS[name] that settings.variants asks for: (measured, {skipped: reason}).

    A backbone that computes channels_last only has no other layout to try (channels_first is
    refused), and channels_last is already its default, so the layout variants are skipped.
    """
    spec = backbones.resolve(settings.backbone)
    measured, skipped = [], {}
    for variant in VARIANTS[name]:
        key = variant.split("=")[0]
        if key not in settings.variants:
            continue
        if key == "model.data_format" and not spec.channels_first:
            skipped[variant] = f"{spec.name} computes channels_last only, the default layout"
        else:
            measured.append(variant)
    return measured, skipped


def summary(samples_s: Sequence[float], images_per_call: int) -> dict[str, float]:
    """Median, min and max images per second over timed calls."""
    rates = images_per_call / np.asarray(samples_s, dtype=float)
    return {"median": float(np.median(rates)), "min": float(rates.min()), "max": float(rates.max()),
            "calls": len(rates)}


# Some of one backend's figures and, for each of them that is None, the reason (bench.json's
# null_reasons), in the order they are written.
Figures = tuple[dict[str, Any], dict[str, str]]


def _backend_figures(name: str, settings: BenchSettings, ready: dict, samples: dict[str, dict],
                     e2e: dict | None, peak: dict, memory: dict | None = None) -> dict[str, Any]:
    """One backend's entry of bench.json: its timed rates and every figure derived from them."""
    figures = _timed_figures(ready, samples)
    median = {task: figures[f"{task}_img_s"]["median"] for task in (*KERAS_TASKS, *NATIVE_TASKS)
              if f"{task}_img_s" in figures}
    variants = _variant_figures(name, settings, samples, median, figures["forward_batch_img_s"])
    reasons: dict[str, str] = {}
    for values, null_reasons in (_throughput_figures(ready, median, peak),
                                 _native_figures(name, settings, samples, median),
                                 variants,
                                 _bf16_figures(ready, variants[0]["variants"], peak),
                                 _end_to_end_figures(e2e),
                                 _contention_figures(settings, samples, median),
                                 _memory_figures(name, settings, memory)):
        figures.update(values)
        reasons.update(null_reasons)
    figures["null_reasons"] = reasons
    return figures


def _timed_figures(ready: dict, samples: dict[str, dict]) -> dict[str, Any]:
    """What the worker reported about itself, the rate of every plain task and the first calls."""
    figures: dict[str, Any] = {
        key: ready[key] for key in ("versions", "device", "data_format", "jit_compile",
                                   "gflops_per_image")}
    for task, entry in samples.items():
        if not task.startswith(("variant:", "forward_size:", "contended:")):
            figures[f"{task}_img_s"] = summary(entry["samples_s"], entry["images_per_call"])
    figures["first_call_s"] = {t: e["first_call_s"] for t, e in samples.items() if "first_call_s" in e}
    return figures


def _throughput_figures(ready: dict, median: dict[str, float], peak: dict) -> Figures:
    """Forward GFLOP/s and its share of the FP32 peak; the tf.data pipeline's cost."""
    forward_gflops = ready["gflops_per_image"] * median["forward_batch"]
    share = forward_gflops / peak["fp32_gflops"] if peak.get("fp32_gflops") else None
    return ({"forward_gflops": forward_gflops, "forward_peak_share": share,
             "tfdata_vs_memory": median["train_tfdata"] / median["train_memory"]},
            {"forward_peak_share": peak["method"]} if share is None else {})


def _native_figures(name: str, settings: BenchSettings, samples: dict[str, dict],
                    median: dict[str, float]) -> Figures:
    """Keras over its native twin (forward, train step) and how far apart their outputs are."""
    if "native_forward" in median:
        return ({"keras_vs_native_forward": median["forward_batch"] / median["native_forward"],
                 "keras_vs_native_train": median["train_step"] / median["native_train"],
                 "native_differences": samples["native_forward"].get("native_differences")}, {})
    reason = native.unavailable(name, settings.backbone) or "the native twin was not run"
    keys = ("native_forward_img_s", "native_train_img_s", "keras_vs_native_forward",
            "keras_vs_native_train", "native_differences")
    return dict.fromkeys(keys), dict.fromkeys(keys, reason)


def _variant_figures(name: str, settings: BenchSettings, samples: dict[str, dict],
                     median: dict[str, float], forward_batch: dict[str, float]) -> Figures:
    """Each variant's rate against its baseline's; forward at batch_size per image side (the main
    side is forward_batch itself)."""
    variants = {
        task[8:]: {**summary(e["samples_s"], e["images_per_call"]),
                   "vs_default": summary(e["samples_s"], e["images_per_call"])["median"]
                   / median[variant_baseline(task[8:])],
                   "first_call_s": e.get("first_call_s")}
        for task, e in samples.items() if task.startswith("variant:")}
    by_size = {
        str(size): forward_batch if size == settings.image_size else
        summary(samples[f"forward_size:{size}"]["samples_s"],
                samples[f"forward_size:{size}"]["images_per_call"])
        for size in settings.sweep()}
    return ({"variants": variants, "variants_skipped": variant_plan(name, settings)[1],
             "forward_by_size_img_s": by_size}, {})


def _bf16_figures(ready: dict, variants: dict[str, dict], peak: dict) -> Figures:
    """The mixed_bfloat16 variant's share of the bf16 peak."""
    bf16 = variants.get(BF16_VARIANT)
    share = (ready["gflops_per_image"] * bf16["median"] / peak["bf16_gflops"]
             if bf16 and peak.get("bf16_gflops") else None)
    if share is not None:
        return {"bf16_peak_share": share}, {}
    return {"bf16_peak_share": None}, {"bf16_peak_share": (
        peak["bf16_method"] if bf16 else f"the {BF16_VARIANT} variant was not measured (--variants)")}


def _end_to_end_figures(e2e: dict | None) -> Figures:
    """The end-to-end runs, the feature cache's speed-up and accuracy deltas, the standard run's
    memory peaks."""
    if not e2e:
        keys = ("e2e", "peak_host_rss_mb", "peak_device_mem_mb")
        return dict.fromkeys(keys), dict.fromkeys(keys, "end-to-end runs skipped (--e2e-epochs 0)")
    standard, cache = e2e["standard"], e2e["cache"]
    runs = {**e2e, "speedup": standard["wall_s"] / cache["wall_s"],
            "accuracy_delta_pp": 100 * (cache["val_accuracy"] - standard["val_accuracy"])}
    if "cache-bf16" in e2e:
        runs["bf16_accuracy_delta_pp"] = 100 * (e2e["cache-bf16"]["val_accuracy"] - cache["val_accuracy"])
    reasons = ({"peak_device_mem_mb": standard["null_reasons"]["peak_device_mem_mb"]}
               if standard["peak_device_mem_mb"] is None else {})
    return ({"e2e": runs, "peak_host_rss_mb": standard["peak_host_rss_mb"],
             "peak_device_mem_mb": standard["peak_device_mem_mb"]}, reasons)


def _contention_figures(settings: BenchSettings, samples: dict[str, dict],
                        median: dict[str, float]) -> Figures:
    """CONTENDED_TASKS' rates under --contention and their slowdown against the quiet rates."""
    if not settings.contention:
        return {"contended": None}, {"contended": "not measured (--contention off)"}
    contended = {}
    for task in CONTENDED_TASKS:
        entry = samples[f"contended:{task}"]
        loaded = summary(entry["samples_s"], entry["images_per_call"])
        contended[f"{task}_img_s"] = loaded
        contended[f"{task}_slowdown"] = median[task] / loaded["median"]
    return {"contended": contended}, {}


def _memory_figures(name: str, settings: BenchSettings, memory: dict | None) -> Figures:
    """The peak memory of each task (--memory) and Keras' peak RSS over its native twin's."""
    if memory is None:
        return {"memory": None}, {"memory": "not measured (--memory off)"}
    figures: dict[str, Any] = {"memory": memory}
    reasons = {}
    for task, native_task in NATIVE_MEMORY.items():
        key = f"keras_vs_native_{task}_rss"
        figures[key] = (memory[task]["peak_rss_mb"] / memory[native_task]["peak_rss_mb"]
                        if native_task in memory else None)
        if figures[key] is None:
            reasons[key] = native.unavailable(name, settings.backbone) or "no native twin"
    return figures, reasons


def device_slug(device: str, host: dict[str, Any]) -> str:
    name = f"cpu-{host['cpu_model']}-{host['cpu_count']}c" if device == "cpu" else device
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _timing_request(settings: BenchSettings) -> dict[str, Any]:
    """What a timing worker needs to build its models and data (see flowers.bench.worker)."""
    return {"image_size": settings.image_size, "batch_size": settings.batch_size,
            "warmup": settings.warmup, "images": settings.images, "backbone": settings.backbone}


def _memory(name: str, task: str, settings: BenchSettings, logs: Path) -> dict[str, Any]:
    """One task's peak memory, measured in a fresh worker process."""
    log = logs / f"{name}-memory-{task}.log"
    request = {"memory": task, **_timing_request(settings)}
    try:
        return run_worker(WORKER_MODULE, name, request, logs, f"bench memory run ({task})", log=log)
    except FlowersError as exc:
        raise FlowersError(f"{exc} (log: {log})") from None


def _end_to_end(name: str, mode: str, settings: BenchSettings, logs: Path) -> dict[str, Any]:
    """One end-to-end run (standard or cache mode) in a fresh worker process."""
    log = logs / f"{name}-e2e-{mode}.log"
    request = {"e2e": mode, "epochs": settings.e2e_epochs,
               "images_per_class": settings.e2e_images_per_class, **_timing_request(settings)}
    try:
        return run_worker(WORKER_MODULE, name, request, logs, f"bench end-to-end {mode} run", log=log)
    except FlowersError as exc:
        raise FlowersError(f"{exc} (log: {log})") from None
