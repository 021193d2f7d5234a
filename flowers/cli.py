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

from flowers import __version__, backend, config, runs, weights
from flowers.errors import FlowersError

DEFAULT_BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
backend_option = click.option(
    "--backend", "backend_name", default=None, metavar="NAME",
    help="torch, tensorflow or jax (default: $KERAS_BACKEND or tensorflow).",
)
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
    installed = backend.installed_versions()
    host = backend.host_info()
    gpus = backend.nvidia_gpus()
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
        f"devices:\n  cpu         {host['cpu_model']} ({host['cpu_count']} logical cores, "
        f"{host['ram_gb']} GiB RAM)",
        *(f"  gpu         {name}" for name in gpus),
        *([] if gpus else ["  gpu         none found (nvidia-smi)"]),
        "data:",
        f"  experiments {config.experiments_dir()} ({', '.join(config.list_experiments())})",
        f"  runs        {runs.runs_root()}",
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
@runs_dir_option
def train(experiment: str, backend_name: str | None, overrides: tuple[str, ...], resume: bool,
          runs_dir: Path | None) -> None:
    """Train an experiment; the last line printed is the run directory."""
    exp = config.load_experiment(experiment, overrides)
    name = backend.select(backend_name or DEFAULT_BACKEND)
    root = runs.runs_root(runs_dir)
    resume_dir = None
    if resume:
        resume_dir = runs.find_incomplete(root, exp.name, name)
        saved, _ = runs.read_run_config(resume_dir)
        if saved.to_dict() != exp.to_dict():
            raise FlowersError(f"--resume: {resume_dir.name} was started with other settings "
                               f"({_differences(saved.to_dict(), exp.to_dict())}); "
                               "resume with the same --set values or start a new run")
    from flowers.train import train as run_training

    run_dir = run_training(exp, name, root, resume_dir=resume_dir)
    metrics = runs.read_json(run_dir / "metrics.json")
    click.echo(f"val_accuracy={metrics['val_accuracy']:.4f} val_loss={metrics['val_loss']:.4f} "
               f"train_time_s={metrics['train_time_s']:.1f} device={metrics['device']}")
    click.echo(str(run_dir))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@backend_option
def evaluate(run_dir: Path, backend_name: str | None) -> None:
    """Re-evaluate a run's model.keras on its validation data (default: the run's own backend)."""
    runs.check_complete(run_dir)
    _, raw = runs.read_run_config(run_dir)
    name = backend.select(backend_name or raw["backend"])
    from flowers.train import evaluate_run

    click.echo(json.dumps(evaluate_run(run_dir, name), indent=2))


def _differences(saved: dict, wanted: dict) -> str:
    diffs = [f"{section}.{key}: {saved[section][key]!r} -> {wanted[section][key]!r}"
             for section in config.SECTIONS for key in saved[section]
             if saved[section][key] != wanted[section][key]]
    return "; ".join(diffs) or "name or description"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, non-zero exits, no tracebacks for user mistakes."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("flowers").addHandler(handler)
    # tensorflow-datasets and TF warn through absl about internals a user cannot act on.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        cli.main(args=argv, prog_name="flowers", standalone_mode=False)
    except FlowersError as exc:
        click.echo(f"error: {exc}", err=True)
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


if __name__ == "__main__":
    main()
