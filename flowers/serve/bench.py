"""`flowers bench-serve`: every runtime of an export version behind the server, under load.

Method (written into serve.json beside the figures):
- Runtimes one after another, each alone on the machine: onnx, savedmodel, tflite, and the .keras
  file under each installed Keras backend (the export formats in serving preference).
- In-process throughput first, in a fresh process (python -m flowers.serve.bench): the runtime's
  predict() on float32 batches of real photos already decoded and resized, at each batch size the
  server will run (min(concurrency, --max-batch), and 1); 3 untimed calls, then the median of the
  timed calls; images/s = batch size / seconds per call.
- Then `flowers serve VERSION --runtime R` in its own process on a free loopback port, started and
  waited for (/health 200), load-tested by `flowers loadtest`'s clients from this process (closed
  loop, one concurrency level after another, JPEG photos in each protocol of --protocols: v1
  {"instances"} on /predict, v2 JSON or v2-binary on /v2/models/<name>/infer), then stopped with
  SIGTERM. Twice: with --max-batch N and with --max-batch 1 (no batching), which shows what
  batching buys.
- Serving overhead ratio = served images/s / in-process images/s at batch min(concurrency, N).
  The clients share the CPU with the server, so on a small machine the ratio also carries their cost.
- Mean batch = images per model call during the level, from the server's /metrics.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flowers import backend, files, host, processes, workers
from flowers.errors import FlowersError
from flowers.export import formats, runtimes
from flowers.export.runtimes import MANIFEST
from flowers.serve import loadtest
from flowers.tables import markdown_table

GOALS = {"overhead_ratio_at_16": 0.8, "p99_over_p50": 3.0, "errors": 0}
GOAL_CONCURRENCY = 16
INPROCESS_REPEATS = 10
INPROCESS_PHOTOS = 32
STARTUP_TIMEOUT_S = 600
STOP_TIMEOUT_S = 90
ROW_HEADER = ("runtime", "protocol", "max batch", "concurrency", "requests/s", "images/s", "p50 ms", "p95 ms",
              "p99 ms", "errors", "mean batch", "in-process images/s (batch)", "overhead ratio")
# Distributions whose versions serve.json records: the backends', every format's runtime
# (flowers.export.formats), the server's.
PACKAGES = tuple(dict.fromkeys((
    "keras", "tensorflow-cpu", "tensorflow", "torch", "jax", *formats.packages(writers=False),
    "fastapi", "uvicorn", "starlette", "prometheus-client", "aiohttp", "pillow", "numpy")))


@dataclass(frozen=True)
class BenchServeSettings:
    version_dir: str
    runtimes: tuple[str, ...]
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int = 400
    duration_s: float = 30.0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    images: str = ""
    protocols: tuple[str, ...] = ("v1",)  # flowers.serve.loadtest.PROTOCOLS


def runtime_choices(version_dir: Path) -> list[str]:
    """Runtimes this version holds and this environment can run, in serving preference: onnx, ...,
    keras-<backend> (a format that runs under a Keras backend, once per installed backend)."""
    names = []
    for fmt in formats.SERVE_PREFERENCE:
        record = formats.get(fmt)
        if not (version_dir / record.path).exists():
            continue
        if record.keras_backends:
            names += [f"{fmt}-{name}" for name, version in backend.installed_versions().items() if version]
        elif not runtimes.missing_modules(record.runtime_modules) and (
                record.toolchain is None or record.toolchain.ready()):
            names.append(fmt)
    return names


def parse_runtimes(version_dir: Path, text: str | None) -> tuple[str, ...]:
    """--runtimes checked against what the version holds and what is installed (default: all)."""
    if not (version_dir / MANIFEST).is_file():
        raise FlowersError(f"{version_dir} is not an export version (no {MANIFEST}); give "
                           "exports/<experiment>/v<N>")
    available = runtime_choices(version_dir)
    if text is None:
        if not available:
            raise FlowersError(f"no runtime of {version_dir} is installed here")
        return tuple(available)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name not in available:
            raise FlowersError(f"runtime {name!r} is not available for {version_dir}; choose from "
                               f"{', '.join(available)}")
    if not names:
        raise FlowersError("--runtimes names no runtime")
    return names


def run_bench_serve(settings: BenchServeSettings, out_root: Path,
                    progress: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    """Measure every runtime (see the module docstring); write serve.json and serve.md."""
    from flowers.bench import device_slug

    photos = loadtest.load_photos(Path(settings.images))
    version_dir = Path(settings.version_dir)
    rows, in_process = [], {}
    for runtime in settings.runtimes:
        fmt, _, keras_backend = runtime.partition("-")
        sizes = sorted({1, *(min(c, settings.max_batch) for c in settings.concurrency)})
        progress(f"{runtime}: in-process throughput at batch {', '.join(map(str, sizes))}")
        in_process[runtime] = measure_in_process(version_dir / formats.get(fmt).path, keras_backend,
                                                 sizes, Path(settings.images))
        for max_batch in dict.fromkeys((settings.max_batch, 1)):
            progress(f"{runtime}: serving with --max-batch {max_batch}")
            with running_server(version_dir, fmt, keras_backend, max_batch, settings.max_wait_ms) as url:
                for protocol in settings.protocols:
                    rows += _load_levels(settings, url, protocol, runtime, max_batch, photos,
                                         in_process[runtime], progress)
    machine = host.host_info()
    gpus = host.nvidia_gpus()
    results = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "version_dir": str(version_dir.resolve()),
        "manifest": {k: _manifest(version_dir).get(k) for k in ("experiment", "version", "input")},
        "settings": asdict(settings), "host": machine, "gpus": gpus,
        "packages": host.package_versions(PACKAGES),
        "method": __doc__.split("Method (written into serve.json beside the figures):")[1].strip(),
        "in_process": in_process, "rows": rows, "goals": evaluate_goals(rows, settings.max_batch),
    }
    out_dir = out_root / "serve" / device_slug(gpus[0] if gpus else "cpu", machine)
    files.write_files(out_dir, {"serve.json": json.dumps(results, indent=2) + "\n",
                                "serve.md": markdown(results)})
    return results, out_dir


def _load_levels(settings: BenchServeSettings, url: str, protocol: str, runtime: str,
                 max_batch: int, photos: list[str], in_process: dict[str, Any],
                 progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per concurrency level: a running server loaded through one protocol's route."""
    target = loadtest.predict_url(url, None, allow_remote=False, protocol=protocol)
    rows = []
    for level in settings.concurrency:
        before = _batch_totals(url)
        result = loadtest.run_loadtest(loadtest.LoadSettings(
            url=target, concurrency=(level,), requests=settings.requests,
            duration_s=settings.duration_s, protocol=protocol), photos)["levels"][0]
        after = _batch_totals(url)
        batch = min(level, max_batch)
        reference = in_process["images_per_s"][str(batch)]
        calls = after[0] - before[0]
        rows.append({"runtime": runtime, "protocol": protocol, "max_batch": max_batch, **result,
                     "mean_batch": (after[1] - before[1]) / calls if calls else None,
                     "in_process_batch": batch, "in_process_images_per_s": reference,
                     "overhead_ratio": result["images_per_s"] / reference})
        progress(f"  {protocol}, concurrency {level}: {result['images_per_s']:.1f} images/s, "
                 f"p50 {result['latency_p50_ms'] or 0:.1f} ms, {result['errors']} errors")
    return rows


def evaluate_goals(rows: list[dict[str, Any]], max_batch: int) -> list[dict[str, Any]]:
    """The issue's goals at concurrency 16, for the runtime serving the most images/s there."""
    at_goal = [r for r in rows if r["concurrency"] == GOAL_CONCURRENCY and r["max_batch"] == max_batch]
    if not at_goal:
        return [{"goal": f"needs concurrency {GOAL_CONCURRENCY} in --concurrency", "met": None}]
    best = max(at_goal, key=lambda r: r["images_per_s"])
    p50, p99 = best["latency_p50_ms"], best["latency_p99_ms"]
    ratio = p99 / p50 if p50 and p99 else None
    return [
        {"goal": f"{best['runtime']}: served / in-process images/s >= {GOALS['overhead_ratio_at_16']}",
         "value": best["overhead_ratio"], "met": best["overhead_ratio"] >= GOALS["overhead_ratio_at_16"]},
        {"goal": f"{best['runtime']}: p99 <= {GOALS['p99_over_p50']:g} x p50", "value": ratio,
         "met": ratio is not None and ratio <= GOALS["p99_over_p50"]},
        {"goal": f"{best['runtime']}: zero errors", "value": best["errors"],
         "met": best["errors"] == GOALS["errors"]},
    ]


def markdown(results: dict[str, Any]) -> str:
    s, host = results["settings"], results["host"]
    packages = ", ".join(f"{k} {v}" for k, v in results["packages"].items() if v)
    lines = [
        f"# Serving benchmark: {results['manifest']['experiment']} v{results['manifest']['version']}",
        "",
        f"{results['created']}; CPU {host['cpu_model']} ({host['cpu_count']} logical cores, "
        f"{host['ram_gb']} GiB); GPU {', '.join(results['gpus']) or 'none'}.",
        f"{packages}.",
        f"Levels {', '.join(map(str, s['concurrency']))}: {s['requests']} requests or "
        f"{s['duration_s']:g} s each, 1 photo per request; --max-wait-ms {s['max_wait_ms']:g}.",
        "",
        markdown_table(ROW_HEADER, ([
            r["runtime"], r["protocol"], r["max_batch"], r["concurrency"],
            f"{r['requests_per_s']:.1f}",
            f"{r['images_per_s']:.1f}", _num(r["latency_p50_ms"]), _num(r["latency_p95_ms"]),
            _num(r["latency_p99_ms"]), r["errors"], _num(r["mean_batch"], "{:.1f}"),
            f"{r['in_process_images_per_s']:.1f} ({r['in_process_batch']})",
            f"{r['overhead_ratio']:.2f}"] for r in results["rows"]), align="ll" + "r" * 11),
    ]
    gains = batching_gains(results["rows"], s["max_batch"])
    if gains:
        lines += ["", f"What batching buys: images/s with --max-batch {s['max_batch']} / with --max-batch 1.",
                  "", markdown_table(
                      ["runtime", *(f"concurrency {c}" for c in s["concurrency"])],
                      ([runtime, *(_num(by_level.get(c), "{:.2f}x") for c in s["concurrency"])]
                       for runtime, by_level in gains.items()),
                      align="l" + "r" * len(s["concurrency"]))]
    lines += ["", "Goals (at concurrency 16, the runtime serving the most images/s):", ""]
    for goal in results["goals"]:
        met = {True: "met", False: "missed", None: "not measured"}[goal["met"]]
        value = goal.get("value")
        lines.append(f"- {goal['goal']}: {met}" + (f" ({value:.2f})" if value is not None else ""))
    lines += ["", "Method:", "", results["method"], ""]
    return "\n".join(lines)


def batching_gains(rows: list[dict[str, Any]], max_batch: int) -> dict[str, dict[int, float]]:
    """runtime (and protocol, when several) -> concurrency -> images/s with max_batch / images/s
    with max batch 1."""
    several = len({r["protocol"] for r in rows}) > 1

    def name(r: dict[str, Any]) -> str:
        return f"{r['runtime']} {r['protocol']}" if several else r["runtime"]

    unbatched = {(name(r), r["concurrency"]): r["images_per_s"] for r in rows if r["max_batch"] == 1}
    gains: dict[str, dict[int, float]] = {}
    if max_batch == 1:
        return gains
    for r in rows:
        base = unbatched.get((name(r), r["concurrency"]))
        if r["max_batch"] == max_batch and base:
            gains.setdefault(name(r), {})[r["concurrency"]] = r["images_per_s"] / base
    return gains


def measure_in_process(model_path: Path, keras_backend: str, sizes: Sequence[int],
                       images: Path) -> dict[str, Any]:
    """In-process images/s of a runtime at each batch size, measured in a fresh process."""
    request = {"model": str(model_path), "sizes": list(sizes), "images": str(images)}
    with tempfile.TemporaryDirectory(prefix="flowers-bench-serve-") as work_dir:
        return workers.run_worker("flowers.serve.bench", keras_backend or "tensorflow", request,
                                  Path(work_dir), f"in-process measurement of {model_path}",
                                  timeout_s=STARTUP_TIMEOUT_S)


@contextlib.contextmanager
def running_server(version_dir: Path, fmt: str, keras_backend: str, max_batch: int,
                   max_wait_ms: float) -> Iterator[str]:
    """`flowers serve` in its own process on a free loopback port; yields its base URL, then
    stops it with SIGTERM (killed if it has not exited within STOP_TIMEOUT_S)."""
    port = free_port()
    command = [sys.executable, "-m", "flowers.cli", "serve", str(version_dir), "--runtime", fmt,
               "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
               "--max-wait-ms", str(max_wait_ms), *(["--backend", keras_backend] if keras_backend else [])]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        # the Vertex AI variables would override --port and the routes
        process = processes.start_process(command, log, drop_env=(
            "AIP_HTTP_PORT", "AIP_HEALTH_ROUTE", "AIP_PREDICT_ROUTE"))
        try:
            try:
                wait_until_ready(url, process, STARTUP_TIMEOUT_S)
            except FlowersError as exc:
                log.seek(0)
                last = [line for line in log.read().splitlines() if line.strip()] or ["no output"]
                raise FlowersError(f"the {fmt} server did not start ({exc}): {last[-1]}") from None
            yield url
        finally:
            stop(process)


def wait_until_ready(url: str, process: processes.Process, timeout_s: float) -> None:
    """Poll GET /health until 200; raises FlowersError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowersError(f"server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while it loads
        time.sleep(0.25)
    raise FlowersError(f"server not ready after {timeout_s:g} s")


def stop(process: processes.Process) -> int:
    """SIGTERM, wait for the graceful exit, SIGKILL after STOP_TIMEOUT_S; returns the exit status."""
    return processes.stop_process(process, STOP_TIMEOUT_S)


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch_totals(url: str) -> tuple[float, float]:
    """(model calls, images) so far, from the server's flowers_serve_batch_size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"flowers_serve_batch_size_count": 0.0, "flowers_serve_batch_size_sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] = sample.value
    return totals["flowers_serve_batch_size_count"], totals["flowers_serve_batch_size_sum"]


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _manifest(version_dir: Path) -> dict[str, Any]:
    return files.read_json(version_dir / MANIFEST)


def _in_process(request: dict[str, Any]) -> dict[str, Any]:
    """The child side of measure_in_process: request model, sizes, images, backend -> figures."""
    from flowers.images import load_image_files
    from flowers.metrics import time_calls

    model = runtimes.open_model(request["model"])
    photo_files = sorted(p for p in Path(request["images"]).rglob("*")
                         if p.suffix.lower() in loadtest.PHOTO_SUFFIXES)
    photos = load_image_files(photo_files[:INPROCESS_PHOTOS], model.image_size).astype(np.float32)
    images_per_s, p50_ms = {}, {}
    for size in request["sizes"]:
        batch = np.resize(photos, (size, *photos.shape[1:]))
        seconds = float(np.median(time_calls(lambda b=batch: model.predict(b), INPROCESS_REPEATS))) / 1000
        images_per_s[str(size)], p50_ms[str(size)] = size / seconds, seconds * 1000
    # onnxruntime (CPUExecutionProvider) and LiteRT run on the CPU whatever TensorFlow sees.
    device = "cpu" if formats.get(model.format).cpu_only else backend.device(request["backend"])
    return {"runtime": model.runtime, "device": device, "images_per_s": images_per_s,
            "call_p50_ms": p50_ms}


if __name__ == "__main__":
    workers.worker_main(run=_in_process)
