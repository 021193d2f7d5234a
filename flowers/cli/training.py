"""The training family: `flowers train` (one or several seeds, resume, data-parallel) and `evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from flowers import backend, config, files, interrupt, paths, runs
from flowers import distribute as distribute_lib
from flowers.cli.options import (
    DEFAULT_BACKEND,
    backend_option,
    backend_option_for,
    runs_dir_option,
    track_option,
    tracking_for,
)
from flowers.errors import FlowersError


@click.command()
@click.option("--experiment", "-e", required=True,
              help="Name (searched in the workspace's experiments/, then the built-in ones) or a .toml path.")
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
@track_option("each run (parameters, per-epoch and final metrics, files)")
def train(experiment: str, backend_name: str | None, overrides: tuple[str, ...], resume: bool,
          distribute: str | None, seeds: int, runs_dir: Path | None, track: tuple[str, ...]) -> None:
    """Train an experiment; the last line printed is the run directory.

    With --resume the unfinished run continues with the settings it was started with; a --set
    that changes one of them is refused. With --distribute data-parallel every process of the
    cluster (torchrun, KERAS_DISTRIBUTION_*, Vertex AI's CLUSTER_SPEC) runs this same command.
    With --seeds N each seed is a complete run directory of its own, printed as it finishes.
    With --track mlflow each run is also an MLflow run (--resume continues the same one).
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
    root = paths.runs_root(runs_dir)
    files.check_writable(root, "--runs-dir")
    resume_dir = None
    if resume:  # checked before select() imports the frameworks: a refusal takes a second
        resume_dir, exp = runs.resume_settings(root, exp.name, name, overrides)
        experiments = [exp]
    # Only the chief tracks: the other processes of a data-parallel run never open MLflow's store
    # (several processes creating one new SQLite store at once would race).
    track_to = tracking_for(track if distribute_lib.detect_cluster().is_chief else ())
    backend.select(name)
    gpu_warning = backend.gpu_warning(name)
    if gpu_warning:
        click.echo(f"warning: {gpu_warning}", err=True)
    from flowers.training.loop import train_seeds

    try:
        for run_dir in train_seeds(experiments, name, root, resume_dir=resume_dir, progress=click.echo,
                                   track=track_to):
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
    from flowers.tracking.mlflow_run import saved_run

    if tracked := saved_run(run_dir):
        click.echo(f"mlflow: run {tracked['run_id']} at {tracked['tracking_uri']}")
    click.echo(str(run_dir))


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@backend_option_for("the backend that trained the run")
def evaluate(run_dir: Path, backend_name: str | None) -> None:
    """Re-evaluate a run's model.keras on its validation data (default: the run's own backend)."""
    runs.check_complete(run_dir)
    _, raw = runs.read_run_config(run_dir)
    name = backend.select(backend_name or raw["backend"])
    from flowers.training.measure import evaluate_run

    click.echo(json.dumps(evaluate_run(run_dir, name), indent=2))
