"""The `flowers` command: parses, picks the backend, calls one library function, prints.

Keras is imported only inside commands, after flowers.backend.select() has set KERAS_BACKEND.
Every FlowersError (and click usage error) becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from flowers import __version__, backend, config, files, host, interrupt, runs, weights
from flowers import distribute as distribute_lib
from flowers.errors import FlowersError, PeerLost

DEFAULT_BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")


def _backend_option(default: str = "$KERAS_BACKEND or tensorflow"):
    return click.option("--backend", "backend_name", default=None, metavar="NAME",
                        help=f"torch, tensorflow or jax (default: {default}).")


backend_option = _backend_option()
runs_dir_option = click.option(
    "--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Root of the run directories (default: $FLOWERS_RUNS_DIR or experiments/runs).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowers")
def cli() -> None:
    """Train, evaluate, compare and export one Keras image classifier under every backend."""


@cli.command()
def info() -> None:
    """Installed backends and versions, devices, and where data and weights live."""
    from flowers.export.run import exports_root

    installed = backend.installed_versions()
    machine = host.host_info()
    gpus = host.nvidia_gpus()
    versions = backend.versions("tensorflow")
    weights_file = weights.keras_cache_file()
    tfds_dir = Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))
    shared = config.PROJECT_ROOT.parent / "shared" / "data" / "flowers12"
    lines = [
        f"flowers {__version__}  keras {versions['keras_version']}  "
        f"python {versions['python_version']}",
        "backends:",
        *(f"  {name:<11} {version or 'not installed (pip install -e .[' + name + '])'}"
          for name, version in installed.items()),
        f"devices:\n  cpu         {machine['cpu_model']} ({machine['cpu_count']} logical cores, "
        f"{machine['ram_gb']} GiB RAM)",
        *(f"  gpu         {name}" for name in gpus),
        *([] if gpus else ["  gpu         none found (nvidia-smi)"]),
        "data:",
        f"  experiments {config.experiments_dir()} ({', '.join(config.list_experiments())})",
        f"  runs        {runs.runs_root()}",
        f"  exports     {exports_root()} (FLOWERS_EXPORTS_DIR)",
        f"  tfds        {tfds_dir} (TFDS_DATA_DIR)",
        f"  weights     {weights_file} ({'cached' if weights_file.is_file() else 'not cached'})",
        f"  flowers12   {shared} ({'present' if shared.is_dir() else 'absent'})",
    ]
    click.echo("\n".join(lines))


@cli.command()
@click.option("--experiment", "-e", required=True, help="Name in experiments/ or a .toml path.")
@backend_option
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one experiment setting; repeatable.")
@click.option("--resume", is_flag=True,
              help="Continue the newest unfinished run of this experiment and backend.")
@click.option("--distribute", type=click.Choice(["none", "data-parallel"]), default=None,
              help="Data-parallel training over every device and process (train.distribution).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train N runs, one after the other: seeds train.seed, train.seed+1, ... "
                   "(flowers compare reports the seed-to-seed spread and paired tests).")
@runs_dir_option
def train(experiment: str, backend_name: str | None, overrides: tuple[str, ...], resume: bool,
          distribute: str | None, seeds: int, runs_dir: Path | None) -> None:
    """Train an experiment; the last line printed is the run directory.

    With --resume the unfinished run continues with the settings it was started with; a --set
    that changes one of them is refused. With --distribute data-parallel every process of the
    cluster (torchrun, KERAS_DISTRIBUTION_*, Vertex AI's CLUSTER_SPEC) runs this same command.
    With --seeds N each seed is a complete run directory of its own, printed as it finishes.
    """
    if distribute:
        overrides = (*overrides, f"train.distribution={distribute.replace('-', '_')}")
    if resume and seeds > 1:
        raise FlowersError("--resume continues one unfinished run: leave out --seeds (the seeds "
                           "after it can be trained with --set train.seed=N --seeds M)")
    exp = config.load_experiment(experiment, () if resume else overrides)
    experiments = [config.apply_overrides(exp, [f"train.seed={exp.train.seed + i}"])
                   for i in range(seeds)]
    name = backend.check_name(backend_name or DEFAULT_BACKEND)
    root = runs.runs_root(runs_dir)
    files.check_writable(root, "--runs-dir")
    resume_dir = None
    if resume:  # checked before select() imports the frameworks: a refusal takes a second
        resume_dir, exp = runs.resume_settings(root, exp.name, name, overrides)
        experiments = [exp]
    backend.select(name)
    gpu_warning = backend.gpu_warning(name)
    if gpu_warning:
        click.echo(f"warning: {gpu_warning}", err=True)
    from flowers.training import train_seeds

    try:
        for run_dir in train_seeds(experiments, name, root, resume_dir=resume_dir, progress=click.echo):
            _report_run(run_dir)
    except interrupt.Interrupted as stop:
        if stop.hint:
            again = f"flowers train -e {experiment} --backend {name} --resume" + \
                (f" --runs-dir {runs_dir}" if runs_dir else "")
            stop.hint += f"; continue it with: {again}"
        raise


def _report_run(run_dir: Path) -> None:
    """The lines `flowers train` ends each run with: its scores, then its directory."""
    cluster = distribute_lib.detect_cluster()
    if not cluster.is_chief:
        click.echo(f"process {cluster.process_id} of {cluster.num_processes}: training done; "
                   f"process 0 evaluates and writes {run_dir}")
        return
    metrics = files.read_json(run_dir / "metrics.json")
    click.echo(f"seed={metrics['seed']} val_accuracy={metrics['val_accuracy']:.4f} "
               f"val_loss={metrics['val_loss']:.4f} train_time_s={metrics['train_time_s']:.1f} "
               f"device={metrics['device']}")
    click.echo(str(run_dir))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@_backend_option("the backend that trained the run")
def evaluate(run_dir: Path, backend_name: str | None) -> None:
    """Re-evaluate a run's model.keras on its validation data (default: the run's own backend)."""
    runs.check_complete(run_dir)
    _, raw = runs.read_run_config(run_dir)
    name = backend.select(backend_name or raw["backend"])
    from flowers.training import evaluate_run

    click.echo(json.dumps(evaluate_run(run_dir, name), indent=2))


out_option = click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Reports root (default: $FLOWERS_REPORTS_DIR or reports/).",
)


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--experiment", "-e", default=None,
              help="Compare the newest complete runs of this experiment that share one "
                   "configuration: per backend, the newest run of each seed (others are named as "
                   "left out).")
@out_option
@click.option("--allow-mixed", is_flag=True,
              help="Compare runs with different settings or devices (the report says so).")
@runs_dir_option
def compare(run_dirs: tuple[Path, ...], experiment: str | None, out: Path | None, allow_mixed: bool,
            runs_dir: Path | None) -> None:
    """Compare runs side by side: OUT/<experiment>/comparison.md, charts, CSV and JSON.

    Give --experiment NAME (the newest complete runs with the same settings but the seed and the
    same device: per backend, the newest of each seed) or RUN_DIR arguments (at most one per backend
    and seed). The last line printed is the path of comparison.md.
    """
    from flowers import report

    if run_dirs and experiment:
        raise FlowersError("give --experiment NAME or RUN_DIR arguments, not both")
    files.check_writable(report.reports_root(out), "--out")
    if not run_dirs:
        if not experiment:
            raise FlowersError("nothing to compare: give --experiment NAME (newest complete runs "
                               "per backend and seed) or RUN_DIR arguments")
        chosen, left_out = report.newest_runs(runs.runs_root(runs_dir), experiment)
        for line in left_out:
            click.echo(line)
        run_dirs = tuple(chosen)
    report_dir, comparison = report.compare(run_dirs, report.reports_root(out), allow_mixed)
    click.echo(report.render_table(comparison))
    click.echo(str(report_dir / "comparison.md"))


@cli.command()
@click.option("--backends", default=",".join(backend.BACKENDS), show_default=True,
              help="Comma-separated backends; the first is the reference that builds the model.")
@click.option("--image-size", type=int, default=224, show_default=True,
              help="Side of the square input images.")
@click.option("--backbone", default="ResNet50", show_default=True,
              help="model.backbone of the compared model (flowers/backbones.py).")
@out_option
def parity(backends: str, image_size: int, backbone: str, out: Path | None) -> None:
    """Same weights, same real photos under each backend: prediction and training drift.

    Writes OUT/parity.json (the comparison report embeds it) and exits non-zero when a target
    (max |Δprob| <= 1e-4, top-1 agreement 100%, max |Δloss| <= 1e-4 over the training steps)
    is missed.
    """
    from flowers import parity as parity_check
    from flowers import report

    names = parity_check.parse_backends(backends)
    # a bad --image-size or --backbone fails before any process starts
    parity_check.parity_experiment(image_size, backbone)
    result = parity_check.run_parity(names, image_size, on_step=lambda line: click.echo(f"  {line}"),
                                     backbone=backbone)
    path = parity_check.write_parity(result, report.reports_root(out))
    click.echo(parity_check.describe(result))
    click.echo(parity_check.format_table(result))
    for note in parity_check.notes(result):
        click.echo(note)
    click.echo(str(path))
    if result["failures"]:
        raise FlowersError("parity target missed: " + "; ".join(result["failures"]))


exports_dir_option = click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Root of the export versions (default: $FLOWERS_EXPORTS_DIR or exports/).",
)


@cli.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--formats", default=None, metavar="LIST",
              help="Comma-separated: keras, savedmodel, onnx, tflite (default: all four).")
@exports_dir_option
def export_command(run_dir: Path, formats: str | None, out: Path | None) -> None:
    """Export a run to every format, verified in each runtime; the last line is the version dir."""
    from flowers.export import run as export

    # export_run checks the request before any framework loads, then selects tensorflow itself.
    version_dir = export.export_run(run_dir, formats, export.exports_root(out),
                                    on_step=lambda line: click.echo(f"  {line}"))
    click.echo(export.render_results(export.read_manifest(version_dir)))
    click.echo(str(version_dir))


@cli.group("exports")
def exports_group() -> None:
    """Exported model versions: exports/<experiment>/v<N>/."""


@exports_group.command("list")
@click.option("--experiment", "-e", default=None, help="Only this experiment's versions.")
@exports_dir_option
def exports_list(experiment: str | None, out: Path | None) -> None:
    """Versions with their source run, training backend, accuracy and formats."""
    from flowers.export import run as export

    root = export.exports_root(out)
    manifests = export.list_exports(root, experiment)
    if experiment and not manifests and experiment not in config.list_experiments():
        raise config.unknown_experiment(experiment)
    click.echo(export.render_list(manifests, root, experiment))


@cli.command()
@click.argument("model_file", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes to show per image.")
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def predict(model_file: Path, images: tuple[Path, ...], top: int, backend_name: str | None,
            as_json: bool) -> None:
    """Classify images with a .keras file (under --backend), a SavedModel dir, .onnx or .tflite."""
    from flowers.export import runtimes

    fmt = runtimes.format_of(model_file)
    if backend_name and fmt != "keras":
        raise FlowersError(f"--backend applies to .keras files only; {model_file} runs in its "
                           f"own runtime ({fmt})")
    # Other formats run in their own runtimes; TensorFlow still decodes the images.
    name = backend.select(backend_name or DEFAULT_BACKEND if fmt == "keras" else "tensorflow")
    backend.hide_gpus_from_tensorflow(name)
    results = runtimes.predict_files(model_file, images, top)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for result in results:
        click.echo(result["image"])
        width = max(len(t["class"]) for t in result["top"])
        for t in result["top"]:
            click.echo(f"  {t['class']:<{width}}  {t['probability']:.4f}")


@cli.command()
@click.option("--backends", default=",".join(backend.BACKENDS), show_default=True,
              help="Comma-separated backends, all measured in this one invocation.")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--image-sizes", default="", metavar="N,N,...",
              help="Also time the forward pass at these image sides (e.g. 32,64,224): "
                   "small-image overhead as a figure, with its own target.")
@click.option("--contention", is_flag=True,
              help="Also time the forward pass beside a CPU-bound load on every core (bounded "
                   "busy processes, stopped afterwards): each backend's slowdown.")
@click.option("--memory", is_flag=True,
              help="Also measure the peak memory of forward and the train step (and of the native "
                   "twins), each in a fresh process.")
@click.option("--steps", type=int, default=10, show_default=True,
              help="Timed calls per figure (split over the rounds).")
@click.option("--rounds", type=int, default=2, show_default=True,
              help="Interleaved rounds over the backends.")
@click.option("--warmup", type=int, default=2, show_default=True,
              help="Untimed calls before a task is timed.")
@click.option("--e2e-epochs", type=int, default=10, show_default=True,
              help="Epochs of the end-to-end baseline-shaped runs (0 skips them).")
@click.option("--e2e-images-per-class", type=int, default=20, show_default=True,
              help="Training images per class in the end-to-end runs (half as many validate).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Class folder of real photos (default: ../shared/data/flowers12 if present, "
                   "else synthetic images).")
@click.option("--variants", "variant_keys", default="all", show_default=True,
              help="Experiment keys whose other values get a variant each (a forward pass; "
                   "train.portable_random a train step): 'all', 'none' or a comma list of "
                   "model.data_format, train.jit_compile, train.dtype_policy, model.fold_batchnorm, "
                   "model.backend_kernel_layout, train.portable_random.")
@click.option("--backbone", default="ResNet50", show_default=True,
              help="model.backbone of every measured model: a keras.applications name, "
                   "package.module:function or hub:PRESET (native twins: ResNet50 only).")
@out_option
def bench(backends: str, image_size: int, batch_size: int, image_sizes: str, contention: bool,
          memory: bool, steps: int,
          rounds: int, warmup: int, e2e_epochs: int, e2e_images_per_class: int,
          images: Path | None, variant_keys: str, backbone: str, out: Path | None) -> None:
    """Measure every backend against native PyTorch/TensorFlow and the hardware.

    Prints the table and writes OUT/bench/<device>/bench.json and bench.md; the last line printed
    is the bench.md path.
    """
    from flowers import bench as benchmark
    from flowers import report

    if images is None and benchmark.DEFAULT_IMAGES.is_dir():
        images = benchmark.DEFAULT_IMAGES
    settings = benchmark.BenchSettings(
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
        image_size=image_size, batch_size=batch_size, steps=steps, rounds=rounds, warmup=warmup,
        e2e_epochs=e2e_epochs, e2e_images_per_class=e2e_images_per_class,
        images=str(images.resolve()) if images else "",
        variants={"all": benchmark.VARIANT_KEYS, "none": ()}.get(
            variant_keys, tuple(k.strip() for k in variant_keys.split(",") if k.strip())),
        backbone=backbone.strip(), image_sizes=_sizes(image_sizes), contention=contention,
        memory=memory)
    results, out_dir = benchmark.run_bench(settings, report.reports_root(out),
                                           progress=lambda line: click.echo(line, err=True))
    click.echo(benchmark.markdown(results))
    click.echo(str(out_dir / "bench.md"))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--runtime", default=None, metavar="NAME",
              help="keras, savedmodel, onnx or tflite (default for a version: the first of onnx, "
                   "savedmodel, tflite, keras it holds).")
@_backend_option("$KERAS_BACKEND or tensorflow; keras runtime only")
@click.option("--host", default=None,
              help="Address to listen on (default: 0.0.0.0 when $AIP_HTTP_PORT is set, as on "
                   "Vertex AI, else 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: $AIP_HTTP_PORT or 8080).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Server processes, each with its own model.")
@click.option("--max-batch", type=int, default=32, show_default=True,
              help="Most images per model call (dynamic batching).")
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True,
              help="Longest a request waits for others to join its batch.")
@click.option("--max-queue", type=int, default=128, show_default=True,
              help="Most requests held at once; more get 503 with Retry-After.")
@click.option("--max-instances", type=int, default=64, show_default=True,
              help="Most instances per request.")
@click.option("--max-body-mb", type=float, default=1.5, show_default=True,
              help="Largest request body in MB (10^6 bytes; Vertex AI's online limit is 1.5).")
@click.option("--access-log", is_flag=True, help="Log every request (off: it costs throughput).")
def serve(model: Path, runtime: str | None, backend_name: str | None, host: str | None,
          port: int | None, workers: int, max_batch: int, max_wait_ms: float, max_queue: int,
          max_instances: int, max_body_mb: float, access_log: bool) -> None:
    """Serve an export version or a model file over HTTP (Vertex AI and TF Serving routes).

    MODEL is exports/<experiment>/v<N>, a .keras/.onnx/.tflite file or a SavedModel directory.
    Routes: $AIP_HEALTH_ROUTE (/health), $AIP_PREDICT_ROUTE (/predict), /v1/models/<experiment>
    and its :predict, /metrics. SIGTERM answers every open request, then exits 0.
    """
    from flowers.serve import server, settings

    target = settings.resolve_target(model, runtime, backend_name, DEFAULT_BACKEND)
    health_route, predict_route = settings.routes_from_env()
    serve_settings = settings.ServeSettings(
        target=target, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
        max_instances=max_instances, max_body_bytes=int(max_body_mb * 1_000_000),
        health_route=health_route, predict_route=predict_route)
    port = settings.port_from_env() if port is None else port
    host = host or ("0.0.0.0" if os.environ.get(settings.PORT_ENV) else "127.0.0.1")
    if workers == 1:  # this process runs the model; with more, each worker selects its backend
        backend.select(target.backend)
        backend.hide_gpus_from_tensorflow(target.backend)
    server.serve(serve_settings, host, port, workers=workers, access_log=access_log)


@cli.command()
@click.argument("url")
@click.option("--concurrency", default="1,4,16,64", show_default=True,
              help="Comma-separated numbers of closed-loop clients, one level after another.")
@click.option("--requests", "request_count", type=int, default=2000, show_default=True,
              help="Requests per level (a level also stops at --duration-s).")
@click.option("--duration-s", type=float, default=60.0, show_default=True,
              help="Longest time per level.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of JPEG/PNG photos (default: ../shared/data/flowers12).")
@click.option("--instances", type=int, default=1, show_default=True, help="Photos per request.")
@click.option("--route", default=None,
              help="Predict route (default: the URL's path, else /predict).")
@click.option("--timeout-s", type=float, default=30.0, show_default=True, help="Per request.")
@click.option("--allow-remote", is_flag=True, help="Allow a host other than this machine.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON to this file.")
def loadtest(url: str, concurrency: str, request_count: int, duration_s: float, images: Path | None,
             instances: int, route: str | None, timeout_s: float, allow_remote: bool,
             out_file: Path | None) -> None:
    """Load-test a running server with real photos: requests/s, images/s, p50/p95/p99, errors."""
    from flowers.serve import loadtest as load

    settings = load.LoadSettings(url=load.predict_url(url, route, allow_remote),
                                 concurrency=load.parse_levels(concurrency), requests=request_count,
                                 duration_s=duration_s, instances=instances, timeout_s=timeout_s)
    photos = load.load_photos(images or config.PROJECT_ROOT.parent / "shared" / "data" / "flowers12")
    result = load.run_loadtest(settings, photos)
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(out_file, result)
    click.echo(load.render_table(result))


def _sizes(text: str) -> tuple[int, ...]:
    """--image-sizes "32,64,224" -> (32, 64, 224); a part that is not a whole number: one line."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in parts if not part.isdigit()]
    if bad:
        raise FlowersError(f"--image-sizes: {bad[0]!r} is not a whole number (e.g. 32,64,224)")
    return tuple(int(part) for part in parts)


@cli.command("bench-serve")
@click.argument("version_dir", type=click.Path(path_type=Path))
@click.option("--runtimes", "runtime_names", default=None, metavar="LIST",
              help="Comma-separated among onnx, savedmodel, tflite, keras-torch, keras-tensorflow, "
                   "keras-jax (default: every one the version and this environment have).")
@click.option("--concurrency", default="1,4,16,64", show_default=True)
@click.option("--requests", "request_count", type=int, default=400, show_default=True,
              help="Requests per level.")
@click.option("--duration-s", type=float, default=30.0, show_default=True,
              help="Longest time per level.")
@click.option("--max-batch", type=int, default=32, show_default=True)
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True)
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of JPEG/PNG photos (default: ../shared/data/flowers12).")
@out_option
def bench_serve(version_dir: Path, runtime_names: str | None, concurrency: str, request_count: int,
                duration_s: float, max_batch: int, max_wait_ms: float, images: Path | None,
                out: Path | None) -> None:
    """Every runtime of an export version behind the server, under load, with and without batching.

    Writes OUT/serve/<device>/serve.json and serve.md; the last line printed is the serve.md path.
    """
    from flowers import report
    from flowers.serve import bench as serve_bench
    from flowers.serve import loadtest as load

    settings = serve_bench.BenchServeSettings(
        version_dir=str(version_dir), runtimes=serve_bench.parse_runtimes(version_dir, runtime_names),
        concurrency=load.parse_levels(concurrency), requests=request_count, duration_s=duration_s,
        max_batch=max_batch, max_wait_ms=max_wait_ms,
        images=str(images or config.PROJECT_ROOT.parent / "shared" / "data" / "flowers12"))
    results, out_dir = serve_bench.run_bench_serve(settings, report.reports_root(out),
                                                   progress=lambda line: click.echo(line, err=True))
    click.echo(serve_bench.markdown(results))
    click.echo(str(out_dir / "serve.md"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, non-zero exits, no tracebacks for user mistakes."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("flowers").addHandler(handler)
    # tensorflow-datasets and TF warn through absl about internals a user cannot act on.
    logging.getLogger("absl").setLevel(logging.ERROR)
    interrupt.install()
    try:
        cli.main(args=argv, prog_name="flowers", standalone_mode=False)
    except interrupt.Interrupted as stop:
        click.echo(f"error: interrupted by {stop}" + (f"; {stop.hint}" if stop.hint else ""),
                   err=True)
        sys.exit(stop.exit_code)
    except PeerLost as exc:
        click.echo(f"error: {exc}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except FlowersError as exc:
        click.echo(f"error: {files.write_error(exc) or exc}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see flowers --help)", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("error: interrupted; an unfinished training run continues with --resume",
                   err=True)
        sys.exit(130)
    except Exception as exc:  # a full disk reaches here from whichever library was writing
        line = files.write_error(exc)
        if line is None:
            raise
        click.echo(f"error: {line}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
