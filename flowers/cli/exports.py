"""The export family: `flowers export`, `flowers exports list` and `flowers predict`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from flowers import backend, config, paths
from flowers.cli.options import (
    DEFAULT_BACKEND,
    backend_option,
    exports_dir_option,
    track_option,
    tracking_for,
)
from flowers.errors import FlowersError
from flowers.export import formats


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--formats", "format_names", default=None, metavar="LIST",
              help=f"Comma-separated: {', '.join(formats.NAMES)} (default: all of them, "
                   f"{', '.join(n for n in formats.NAMES if formats.get(n).optional)} once its "
                   "tools are installed; see `flowers exports formats`).")
@click.option("--tfjs-quantize", type=click.Choice(formats.get("tfjs").quantizations),
              default=None, help="Store the TF.js weights as float16 (half the size; the drift is "
                                 "measured and recorded in the manifest).")
@exports_dir_option
@track_option("the export, as a new version of the registered model named after the experiment")
def export_command(run_dir: Path, format_names: str | None, tfjs_quantize: str | None,
                   out: Path | None, track: tuple[str, ...]) -> None:
    """Export a run to every format, verified in each runtime; the last line is the version dir."""
    from flowers.export import run as export

    track_to = tracking_for(track)

    # export_run checks the request before any framework loads, then selects tensorflow itself.
    version_dir = export.export_run(run_dir, format_names, paths.exports_root(out),
                                    on_step=lambda line: click.echo(f"  {line}"),
                                    quantize={"tfjs": tfjs_quantize} if tfjs_quantize else None)
    manifest = export.read_manifest(version_dir)
    click.echo(export.render_results(manifest))
    if "mlflow" in track_to.names:
        from flowers.tracking import mlflow_client, mlflow_registry

        name, version = mlflow_registry.register_export(version_dir, manifest)
        click.echo(f"mlflow: registered model {name!r} version {version} at {mlflow_client.tracking_uri()}")
    click.echo(str(version_dir))


@click.group("exports")
def exports_group() -> None:
    """Exported model versions: exports/<experiment>/v<N>/."""


@exports_group.command("list")
@click.option("--experiment", "-e", default=None, help="Only this experiment's versions.")
@exports_dir_option
def exports_list(experiment: str | None, out: Path | None) -> None:
    """Versions with their source run, training backend, accuracy and formats."""
    from flowers.export import run as export

    root = paths.exports_root(out)
    manifests = export.list_exports(root, experiment)
    if experiment and not manifests and experiment not in config.list_experiments():
        raise config.unknown_experiment(experiment)
    click.echo(export.render_list(manifests, root, experiment))


@exports_group.command("formats")
def exports_formats() -> None:
    """The export formats: file, writers, runtime packages, tolerance, what each is for."""
    from flowers import tables

    click.echo(tables.text_table(formats.table()))


@click.command()
@click.argument("model_file", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes to show per image.")
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def predict(model_file: Path, images: tuple[Path, ...], top: int, backend_name: str | None,
            as_json: bool) -> None:
    """Classify images with a .keras file (under --backend), a SavedModel dir, .onnx, .tflite or
    a TF.js model folder."""
    from flowers.export import runtimes

    fmt = runtimes.format_of(model_file)
    keras_backends = formats.get(fmt).keras_backends
    if backend_name and not keras_backends:
        raise FlowersError(f"--backend applies to .keras files only; {model_file} runs in its "
                           f"own runtime ({fmt})")
    # Other formats run in their own runtimes; TensorFlow still decodes the images.
    name = backend.select(backend_name or DEFAULT_BACKEND if keras_backends else "tensorflow")
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
