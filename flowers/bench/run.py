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
- Native: the same network and weights as plain PyTorch / a plain tf.function (flowers.native).
- GFLOP/s = counted forward FLOP per image x forward images per second; peak = flowers.hardware.
- End to end: the baseline job shape (--e2e-epochs epochs, batch --batch-size, frozen ResNet50 +
  head) on a fixed number of real images, trained once in standard mode and once with
  train.cache_features, each in a fresh process (so memory peaks are the job's alone).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, config, host
from flowers.bench import hardware
from flowers.errors import FlowersError

KERAS_TASKS = ("forward_b1", "forward_batch", "train_step", "train_memory", "train_tfdata")
NATIVE_TASKS = ("native_forward", "native_train")
# Options measured one by one against each backend's defaults (forward at --batch-size).
# train.jit_compile is measured as the opposite of what "auto" resolves to on this device (jax
# always compiles); TensorFlow's CPU convolutions only run channels_last.
VARIANTS = {
    "torch": ("model.data_format=channels_last", "train.jit_compile",
              "train.dtype_policy=mixed_bfloat16"),
    "tensorflow": ("train.jit_compile", "train.dtype_policy=mixed_bfloat16"),
    "jax": ("model.data_format=channels_first", "train.dtype_policy=mixed_bfloat16"),
}
VARIANT_KEYS = ("model.data_format", "train.jit_compile", "train.dtype_policy")
TARGETS = {
    "keras_vs_native_torch": 0.9, "keras_vs_native_tensorflow": 0.95, "tfdata_vs_memory": 0.95,
    "forward_vs_fastest": 0.8, "fastest_peak_share": 0.6, "cache_speedup": 5.0,
    "cache_accuracy_pp": 1.0,
}
DEFAULT_IMAGES = config.PROJECT_ROOT.parent / "shared" / "data" / "flowers12"


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


def run_bench(settings: BenchSettings, out_root: Path,
              progress: Callable[[str], None] = lambda message: None) -> tuple[dict[str, Any], Path]:
    """Measure every backend, write bench.json and bench.md, return (results, output folder)."""
    settings.validate()
    logs = Path(tempfile.mkdtemp(prefix="flowers-bench-"))
    workers = {}
    try:
        for name in settings.backends:
            progress(f"starting {name} worker")
            workers[name] = _Worker(name, settings, logs)
        samples = _interleave(workers, settings, progress)
        ready = {name: w.ready for name, w in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    e2e = {}
    if settings.e2e_epochs:
        for name in settings.backends:
            for mode in ("standard", "cache"):
                progress(f"{name}: end-to-end {mode} ({settings.e2e_epochs} epochs)")
                e2e.setdefault(name, {})[mode] = _end_to_end(name, mode, settings, logs)
    shutil.rmtree(logs, ignore_errors=True)

    device = next(iter(ready.values()))["device"]
    peak = hardware.peak_for(device)
    if device == "cpu":
        peak["gemm_gflops_measured"] = round(hardware.measured_gemm_gflops(), 1)
        peak["gemm_method"] = "best of 5 float32 2048x2048 matrix products through numpy's BLAS"
    results = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "host": host.host_info(),
        "settings": asdict(settings),
        "method": __doc__.split("Method (written into bench.json beside the figures):")[1].strip(),
        "peak": peak,
        "backends": {name: _backend_figures(ready[name], samples[name], e2e.get(name), peak)
                     for name in settings.backends},
    }
    results["targets"] = evaluate_targets(results)
    out_dir = out_root / "bench" / device_slug(device, results["host"])
    _write_atomically(out_dir, {"bench.json": json.dumps(results, indent=2) + "\n",
                                "bench.md": markdown(results)})
    return results, out_dir


def _interleave(workers: dict[str, _Worker], settings: BenchSettings,
                progress: Callable[[str], None]) -> dict[str, dict[str, dict]]:
    """Run every task on every backend, round by round in rotating order; collect the samples."""
    per_round = max(1, -(-settings.steps // settings.rounds))
    names = list(workers)
    samples: dict[str, dict[str, dict]] = {name: {} for name in names}
    for round_index in range(settings.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for task in (*KERAS_TASKS, *NATIVE_TASKS, "variants"):
            for name in order:
                worker = workers[name]
                tasks = _expand(task, name, worker, settings)
                for each in tasks:
                    progress(f"round {round_index + 1}/{settings.rounds}: {name} {each}")
                    reply = worker.ask(each, per_round)
                    entry = samples[name].setdefault(each, {"samples_s": []})
                    entry["samples_s"].extend(reply["samples_s"])
                    entry["images_per_call"] = reply["images_per_call"]
                    for key in ("first_call_s", "native_differences"):
                        if key in reply:
                            entry[key] = reply[key]
    return samples


def _expand(task: str, name: str, worker: _Worker, settings: BenchSettings) -> list[str]:
    if task in NATIVE_TASKS:
        return [task] if worker.ready["native"] else []
    if task == "variants":
        jit = f"train.jit_compile={'false' if worker.ready['jit_compile'] else 'true'}"
        return [f"variant:{jit if v == 'train.jit_compile' else v}" for v in VARIANTS[name]
                if v.split("=")[0] in settings.variants]
    return [task]


def summary(samples_s: Sequence[float], images_per_call: int) -> dict[str, float]:
    """Median, min and max images per second over timed calls."""
    rates = images_per_call / np.asarray(samples_s, dtype=float)
    return {"median": float(np.median(rates)), "min": float(rates.min()), "max": float(rates.max()),
            "calls": len(rates)}


def _backend_figures(ready: dict, samples: dict[str, dict], e2e: dict | None,
                     peak: dict) -> dict[str, Any]:
    figures: dict[str, Any] = {
        key: ready[key] for key in ("versions", "device", "data_format", "jit_compile",
                                   "gflops_per_image")}
    reasons: dict[str, str] = {}
    for task, entry in samples.items():
        if not task.startswith("variant:"):
            figures[f"{task}_img_s"] = summary(entry["samples_s"], entry["images_per_call"])
    figures["first_call_s"] = {t: e["first_call_s"] for t, e in samples.items() if "first_call_s" in e}
    median = {task: figures[f"{task}_img_s"]["median"] for task in (*KERAS_TASKS, *NATIVE_TASKS)
              if f"{task}_img_s" in figures}
    figures["forward_gflops"] = ready["gflops_per_image"] * median["forward_batch"]
    figures["forward_peak_share"] = (figures["forward_gflops"] / peak["fp32_gflops"]
                                     if peak.get("fp32_gflops") else None)
    if figures["forward_peak_share"] is None:
        reasons["forward_peak_share"] = peak["method"]
    figures["tfdata_vs_memory"] = median["train_tfdata"] / median["train_memory"]
    if "native_forward" in median:
        figures["keras_vs_native_forward"] = median["forward_batch"] / median["native_forward"]
        figures["keras_vs_native_train"] = median["train_step"] / median["native_train"]
        figures["native_differences"] = samples["native_forward"].get("native_differences")
    else:
        for key in ("keras_vs_native_forward", "keras_vs_native_train", "native_differences"):
            figures[key] = None
            reasons[key] = "no native baseline for this backend (native: torch and tensorflow)"
    figures["variants"] = {
        task[8:]: {**summary(e["samples_s"], e["images_per_call"]),
                   "vs_default": summary(e["samples_s"], e["images_per_call"])["median"]
                   / median["forward_batch"],
                   "first_call_s": e.get("first_call_s")}
        for task, e in samples.items() if task.startswith("variant:")}
    if e2e:
        standard, cache = e2e["standard"], e2e["cache"]
        figures["e2e"] = {**e2e, "speedup": standard["wall_s"] / cache["wall_s"],
                          "accuracy_delta_pp": 100 * (cache["val_accuracy"] - standard["val_accuracy"])}
        figures["peak_host_rss_mb"] = standard["peak_host_rss_mb"]
        figures["peak_device_mem_mb"] = standard["peak_device_mem_mb"]
        if standard["peak_device_mem_mb"] is None:
            reasons["peak_device_mem_mb"] = standard["null_reasons"]["peak_device_mem_mb"]
    else:
        for key in ("e2e", "peak_host_rss_mb", "peak_device_mem_mb"):
            figures[key] = None
            reasons[key] = "end-to-end runs skipped (--e2e-epochs 0)"
    figures["null_reasons"] = reasons
    return figures


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each performance target of the project with its measured value and whether it is met."""
    rows = []
    figures = results["backends"]

    def add(name: str, value: float | None, target: float, better: str = "higher") -> None:
        met = None if value is None else (value >= target if better == "higher" else value <= target)
        rows.append({"target": name, "value": value, "goal": target, "better": better, "met": met})

    for name in ("torch", "tensorflow"):
        if name in figures and figures[name]["keras_vs_native_forward"] is not None:
            goal = TARGETS[f"keras_vs_native_{name}"]
            add(f"keras-on-{name} forward / native {name}", figures[name]["keras_vs_native_forward"], goal)
            add(f"keras-on-{name} train step / native {name}", figures[name]["keras_vs_native_train"],
                goal)
    for name, f in figures.items():
        add(f"{name}: tf.data-fed / in-memory train step", f["tfdata_vs_memory"],
            TARGETS["tfdata_vs_memory"])
    fastest = max(figures, key=lambda n: figures[n]["forward_batch_img_s"]["median"])
    for name, f in figures.items():
        if name != fastest:
            add(f"{name} forward / fastest ({fastest})", f["forward_batch_img_s"]["median"]
                / figures[fastest]["forward_batch_img_s"]["median"], TARGETS["forward_vs_fastest"])
    add(f"fastest ({fastest}) forward share of FP32 peak", figures[fastest]["forward_peak_share"],
        TARGETS["fastest_peak_share"])
    for name, f in figures.items():
        if f["e2e"]:
            add(f"{name}: feature-cache end-to-end speed-up", f["e2e"]["speedup"],
                TARGETS["cache_speedup"])
            add(f"{name}: |feature-cache - standard| val accuracy (pp)",
                abs(f["e2e"]["accuracy_delta_pp"]), TARGETS["cache_accuracy_pp"], better="lower")
    return rows


def device_slug(device: str, host: dict[str, Any]) -> str:
    name = f"cpu-{host['cpu_model']}-{host['cpu_count']}c" if device == "cpu" else device
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(results: dict[str, Any]) -> str:
    """bench.md: the figures table (median, min-max) and the targets, with the method."""
    names = list(results["backends"])
    f = results["backends"]
    s = results["settings"]

    def rate(entry: dict | None) -> str:
        return "n/a" if not entry else f"{entry['median']:.1f} ({entry['min']:.1f}-{entry['max']:.1f})"

    def num(value: float | None, fmt: str = "{:.2f}") -> str:
        return "n/a" if value is None else fmt.format(value)

    rows = [
        ("forward img/s, batch 1", [rate(f[n].get("forward_b1_img_s")) for n in names]),
        (f"forward img/s, batch {s['batch_size']}", [rate(f[n].get("forward_batch_img_s")) for n in names]),
        ("forward GFLOP/s (share of FP32 peak)",
         [f"{f[n]['forward_gflops']:.1f} ({num(f[n]['forward_peak_share'], '{:.0%}')})" for n in names]),
        ("train step img/s (train_on_batch, tensors in memory)",
         [rate(f[n].get("train_step_img_s")) for n in names]),
        ("fit img/s, in-memory arrays", [rate(f[n].get("train_memory_img_s")) for n in names]),
        ("fit img/s, tf.data pipeline", [rate(f[n].get("train_tfdata_img_s")) for n in names]),
        ("tf.data / in-memory (fit)", [num(f[n]["tfdata_vs_memory"]) for n in names]),
        ("native forward img/s", [rate(f[n].get("native_forward_img_s")) for n in names]),
        ("native train step img/s", [rate(f[n].get("native_train_img_s")) for n in names]),
        ("keras / native, forward", [num(f[n]["keras_vs_native_forward"]) for n in names]),
        ("keras / native, train step", [num(f[n]["keras_vs_native_train"]) for n in names]),
        ("native max |Δprob| / max rel. Δfeatures",
         [("n/a" if not f[n]["native_differences"] else
           f"{f[n]['native_differences']['probabilities_max_abs']:.1e} / "
           f"{f[n]['native_differences']['features_max_rel']:.1e}") for n in names]),
        ("first forward call s (compile/warm-up)",
         [num(f[n]["first_call_s"].get("forward_batch"), "{:.1f}") for n in names]),
        ("device", [f[n]["device"] for n in names]),
        ("layout / jit", [f"{f[n]['data_format']} / {'on' if f[n]['jit_compile'] else 'off'}"
                          for n in names]),
    ]
    variant_names = sorted({v for n in names for v in f[n]["variants"]})
    for variant in variant_names:
        rows.append((f"forward img/s with {variant} (× default)",
                     [(f"{rate(f[n]['variants'][variant])} ({f[n]['variants'][variant]['vs_default']:.2f}×)"
                       if variant in f[n]["variants"] else "—") for n in names]))
    if any(f[n]["e2e"] for n in names):
        e = {n: f[n]["e2e"] for n in names}
        rows += [
            (f"end-to-end s, standard ({s['e2e_epochs']} epochs; val acc)",
             [f"{e[n]['standard']['wall_s']:.1f} ({e[n]['standard']['val_accuracy']:.3f})" for n in names]),
            ("end-to-end s, train.cache_features (val acc)",
             [f"{e[n]['cache']['wall_s']:.1f} ({e[n]['cache']['val_accuracy']:.3f})" for n in names]),
            ("feature-cache speed-up", [f"{e[n]['speedup']:.1f}×" for n in names]),
            ("peak host RSS MiB (standard run)", [f"{f[n]['peak_host_rss_mb']:.0f}" for n in names]),
            ("peak device memory MiB", [num(f[n]["peak_device_mem_mb"], "{:.0f}") for n in names]),
        ]
    peak = results["peak"]
    lines = [
        f"# flowers bench — {results['device']} ({results['host']['cpu_model']}, "
        f"{results['host']['cpu_count']} logical cores)",
        "",
        f"{results['created']} · image {s['image_size']} px · batch {s['batch_size']} · "
        f"{s['steps']} timed calls per figure over {s['rounds']} interleaved rounds after "
        f"{s['warmup']} warm-up calls · images: {s['images'] or 'synthetic'}",
        "",
        "Versions: " + "; ".join(
            f"{n} {f[n]['versions']['backend_version']}" for n in names)
        + f"; keras {f[names[0]]['versions']['keras_version']}",
        "",
        f"FP32 peak: {num(peak.get('fp32_gflops'), '{:.0f}')} GFLOP/s — {peak['method']}"
        + (f"; measured float32 GEMM: {peak['gemm_gflops_measured']} GFLOP/s"
           if "gemm_gflops_measured" in peak else ""),
        f"Model: {f[names[0]]['gflops_per_image']:.2f} GFLOP per image (forward, counted from the "
        "Keras layers). Figures: median (min-max).",
        "",
        "| figure | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
        *(f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows),
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "| --- | --- | --- | --- |",
        *(f"| {t['target']} | {'≥' if t['better'] == 'higher' else '≤'} {t['goal']} | "
          f"{num(t['value'])} | {'n/a' if t['met'] is None else ('yes' if t['met'] else 'NO')} |"
          for t in results["targets"]),
        "",
    ]
    return "\n".join(lines)


class _Worker:
    """A bench_worker subprocess for one backend, spoken to one JSON line at a time."""

    def __init__(self, name: str, settings: BenchSettings, logs: Path):
        self.name = name
        self.log = logs / f"{name}.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            _worker_command(name, settings), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log_file, text=True, env=_worker_env())
        self.ready = self._read()["ready"]

    def ask(self, task: str, steps: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"task": task, "steps": steps}) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise FlowersError(f"bench: {self.name} {task} failed: {reply['error']}")
        return reply

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self._log_file.flush()
            raise FlowersError(f"bench: {self.name} worker exited with code "
                               f"{self.process.returncode}: {_last_error(self.log)}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"task": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
        self._log_file.close()


def _end_to_end(name: str, mode: str, settings: BenchSettings, logs: Path) -> dict[str, Any]:
    log = logs / f"{name}-e2e-{mode}.log"
    with log.open("w") as log_file:
        result = subprocess.run([*_worker_command(name, settings), "--e2e", mode],
                                stdout=subprocess.PIPE, stderr=log_file, text=True, env=_worker_env())
    if result.returncode != 0 or not result.stdout.strip():
        raise FlowersError(f"bench: {name} end-to-end {mode} run failed: {_last_error(log)}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _last_error(log: Path) -> str:
    """The last exception line of a worker's log (its last line if none), for a one-line error."""
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1][:500] + f" (log: {log})"


def _worker_command(name: str, settings: BenchSettings) -> list[str]:
    return [sys.executable, "-m", "flowers.bench.worker", "--backend", name,
            "--image-size", str(settings.image_size), "--batch-size", str(settings.batch_size),
            "--warmup", str(settings.warmup), "--images", settings.images,
            "--e2e-epochs", str(settings.e2e_epochs),
            "--e2e-images-per-class", str(settings.e2e_images_per_class)]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)  # each worker selects its own
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _write_atomically(folder: Path, files: dict[str, str]) -> None:
    """Write every file to a temporary name first, then rename them all into place."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = []
    for name, text in files.items():
        temporary = folder / f".{name}.tmp"
        temporary.write_text(text)
        staged.append((temporary, folder / name))
    for temporary, final in staged:
        os.replace(temporary, final)
