"""The serving family: `flowers serve`, `flowers loadtest` and `flowers bench-serve`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from flowers import backend, files, paths
from flowers.cli.options import DEFAULT_BACKEND, backend_option_for, default, levels_text, out_option
from flowers.export import formats
from flowers.serve.bench import BenchServeSettings
from flowers.serve.loadtest import PROTOCOLS, LoadSettings
from flowers.serve.settings import DEFAULT_MAX_BODY_MB, ServeSettings


def runtime_names_help() -> list[str]:
    """What bench-serve's --runtimes takes: each format, a Keras one once per backend."""
    return [f"{name}-{b}" if formats.get(name).keras_backends else name
            for name in formats.SERVE_PREFERENCE
            for b in (backend.BACKENDS if formats.get(name).keras_backends else ("",))]


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--runtime", default=None, metavar="NAME",
              help=f"{', '.join(formats.NAMES)} (default for a version: the first of "
                   f"{', '.join(formats.SERVE_PREFERENCE)} it holds).")
@backend_option_for("$KERAS_BACKEND or tensorflow; keras runtime only")
@click.option("--host", default=None,
              help="Address to listen on (default: 0.0.0.0 when $AIP_HTTP_PORT is set, as on "
                   "Vertex AI, else 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: $AIP_HTTP_PORT or 8080).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Server processes, each with its own model.")
@click.option("--max-batch", type=int, default=default(ServeSettings, "max_batch"), show_default=True,
              help="Most images per model call (dynamic batching).")
@click.option("--max-wait-ms", type=float, default=default(ServeSettings, "max_wait_ms"), show_default=True,
              help="Longest a request waits for others to join its batch.")
@click.option("--max-queue", type=int, default=default(ServeSettings, "max_queue"), show_default=True,
              help="Most requests held at once; more get 503 with Retry-After.")
@click.option("--max-instances", type=int, default=default(ServeSettings, "max_instances"), show_default=True,
              help="Most instances per request.")
@click.option("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, show_default=True,
              help="Largest request body in MB (10^6 bytes; Vertex AI's online limit is 1.5).")
@click.option("--access-log", is_flag=True, help="Log every request (off: it costs throughput).")
def serve(model: Path, runtime: str | None, backend_name: str | None, host: str | None,
          port: int | None, workers: int, max_batch: int, max_wait_ms: float, max_queue: int,
          max_instances: int, max_body_mb: float, access_log: bool) -> None:
    """Serve an export version or a model file over HTTP (Vertex AI, TF Serving / KServe v1 and
    Open Inference Protocol v2 routes).

    MODEL is exports/<experiment>/v<N>, a .keras/.onnx/.tflite file or a SavedModel directory.
    Routes: $AIP_HEALTH_ROUTE (/health), $AIP_PREDICT_ROUTE (/predict), /v1/models/<experiment>
    and its :predict, /v2/health/ready, /v2/models/<experiment> and its /ready and /infer,
    /metrics. SIGTERM answers every open request, then exits 0.
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


@click.command()
@click.argument("url")
@click.option("--concurrency", default=levels_text(default(LoadSettings, "concurrency")), show_default=True,
              help="Comma-separated numbers of closed-loop clients, one level after another.")
@click.option("--requests", "request_count", type=int, default=default(LoadSettings, "requests"),
              show_default=True,
              help="Requests per level (a level also stops at --duration-s).")
@click.option("--duration-s", type=float, default=default(LoadSettings, "duration_s"), show_default=True,
              help="Longest time per level.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of JPEG/PNG photos (default: $FLOWERS_PHOTOS, else ../shared/data/flowers12).")
@click.option("--instances", type=int, default=default(LoadSettings, "instances"),
              show_default=True, help="Photos per request.")
@click.option("--route", default=None,
              help="Route to load (default: the URL's path, else the protocol's: /predict for v1, "
                   "/v2/models/<the served model>/infer for v2).")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="v1", show_default=True,
              help="Request bodies: v1 {\"instances\"} (Vertex AI, TF Serving, KServe v1); v2 the "
                   "Open Inference Protocol with base64 JSON photos; v2-binary with raw photos in "
                   "Triton's binary-data extension.")
@click.option("--timeout-s", type=float, default=default(LoadSettings, "timeout_s"),
              show_default=True, help="Per request.")
@click.option("--allow-remote", is_flag=True, help="Allow a host other than this machine.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON to this file.")
def loadtest(url: str, concurrency: str, request_count: int, duration_s: float, images: Path | None,
             instances: int, route: str | None, protocol: str, timeout_s: float, allow_remote: bool,
             out_file: Path | None) -> None:
    """Load-test a running server with real photos: requests/s, images/s, p50/p95/p99, errors."""
    from flowers.serve import loadtest as load

    settings = load.LoadSettings(url=load.predict_url(url, route, allow_remote, protocol),
                                 concurrency=load.parse_levels(concurrency), requests=request_count,
                                 duration_s=duration_s, instances=instances, timeout_s=timeout_s,
                                 protocol=protocol)
    photos = load.load_photos(paths.photos_dir(images))
    result = load.run_loadtest(settings, photos)
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(out_file, result)
    click.echo(load.render_table(result))


@click.command("bench-serve")
@click.argument("version_dir", type=click.Path(path_type=Path))
@click.option("--runtimes", "runtime_names", default=None, metavar="LIST",
              help=f"Comma-separated among {', '.join(runtime_names_help())} (default: every one "
                   "the version and this environment have).")
@click.option("--concurrency", default=levels_text(default(BenchServeSettings, "concurrency")),
              show_default=True)
@click.option("--requests", "request_count", type=int, default=default(BenchServeSettings, "requests"),
              show_default=True,
              help="Requests per level.")
@click.option("--duration-s", type=float, default=default(BenchServeSettings, "duration_s"),
              show_default=True,
              help="Longest time per level.")
@click.option("--max-batch", type=int, default=default(BenchServeSettings, "max_batch"), show_default=True)
@click.option("--max-wait-ms", type=float, default=default(BenchServeSettings, "max_wait_ms"),
              show_default=True)
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of JPEG/PNG photos (default: $FLOWERS_PHOTOS, else ../shared/data/flowers12).")
@click.option("--protocols", default="v1", show_default=True, metavar="LIST",
              help=f"Comma-separated among {', '.join(PROTOCOLS)}: the routes loaded, each in turn "
                   "on the same server (see flowers loadtest --protocol).")
@out_option
def bench_serve(version_dir: Path, runtime_names: str | None, concurrency: str, request_count: int,
                duration_s: float, max_batch: int, max_wait_ms: float, images: Path | None,
                protocols: str, out: Path | None) -> None:
    """Every runtime of an export version behind the server, under load, with and without batching.

    Writes OUT/serve/<device>/serve.json and serve.md; the last line printed is the serve.md path.
    """
    from flowers.serve import bench as serve_bench
    from flowers.serve import loadtest as load

    settings = serve_bench.BenchServeSettings(
        version_dir=str(version_dir), runtimes=serve_bench.parse_runtimes(version_dir, runtime_names),
        concurrency=load.parse_levels(concurrency), requests=request_count, duration_s=duration_s,
        max_batch=max_batch, max_wait_ms=max_wait_ms,
        images=str(paths.photos_dir(images)), protocols=load.parse_protocols(protocols))
    results, out_dir = serve_bench.run_bench_serve(settings, paths.reports_root(out),
                                                   progress=lambda line: click.echo(line, err=True))
    click.echo(serve_bench.markdown(results))
    click.echo(str(out_dir / "serve.md"))
