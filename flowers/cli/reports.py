"""The comparison family: `flowers compare` (the report over runs) and `flowers parity`."""

from __future__ import annotations

from pathlib import Path

import click

from flowers import backend, files, paths
from flowers.cli.options import out_option, runs_dir_option, track_option, tracking_for
from flowers.errors import FlowersError


@click.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--experiment", "-e", default=None,
              help="Compare the newest complete runs of this experiment that share one "
                   "configuration: per backend, the newest run of each seed (others are named as "
                   "left out).")
@out_option
@click.option("--allow-mixed", is_flag=True,
              help="Compare runs with different settings or devices (the report says so).")
@runs_dir_option
@track_option("the report, as a parent run over the compared runs")
def compare(run_dirs: tuple[Path, ...], experiment: str | None, out: Path | None, allow_mixed: bool,
            runs_dir: Path | None, track: tuple[str, ...]) -> None:
    """Compare runs side by side: OUT/<experiment>/comparison.md, charts, CSV and JSON.

    Give --experiment NAME (the newest complete runs with the same settings but the seed and the
    same device: per backend, the newest of each seed) or RUN_DIR arguments (at most one per backend
    and seed). The last line printed is the path of comparison.md. With --track mlflow the report
    is also an MLflow run whose children are the compared runs.
    """
    from flowers import report

    if run_dirs and experiment:
        raise FlowersError("give --experiment NAME or RUN_DIR arguments, not both")
    track_to = tracking_for(track)
    files.check_writable(paths.reports_root(out), "--out")
    if not run_dirs:
        if not experiment:
            raise FlowersError("nothing to compare: give --experiment NAME (newest complete runs "
                               "per backend and seed) or RUN_DIR arguments")
        chosen, left_out = report.newest_runs(paths.runs_root(runs_dir), experiment)
        for line in left_out:
            click.echo(line)
        run_dirs = tuple(chosen)
    report_dir, comparison = report.compare(run_dirs, paths.reports_root(out), allow_mixed)
    click.echo(report.render_table(comparison))
    if "mlflow" in track_to.names:
        from flowers.tracking import mlflow_client, mlflow_compare

        parent = mlflow_compare.log_comparison(report_dir, comparison, [Path(d) for d in run_dirs])
        click.echo(f"mlflow: comparison run {parent} at {mlflow_client.tracking_uri()}")
    click.echo(str(report_dir / "comparison.md"))


@click.command()
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

    names = parity_check.parse_backends(backends)
    # a bad --image-size or --backbone fails before any process starts
    parity_check.parity_experiment(image_size, backbone)
    result = parity_check.run_parity(names, image_size, on_step=lambda line: click.echo(f"  {line}"),
                                     backbone=backbone)
    path = parity_check.write_parity(result, paths.reports_root(out))
    click.echo(parity_check.describe(result))
    click.echo(parity_check.format_table(result))
    for note in parity_check.notes(result):
        click.echo(note)
    click.echo(str(path))
    if result["failures"]:
        raise FlowersError("parity target missed: " + "; ".join(result["failures"]))
