"""Options and defaults shared by the command families: one definition each."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import click

from flowers.errors import FlowersError

DEFAULT_BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")


def backend_option_for(default: str = "$KERAS_BACKEND or tensorflow"):
    return click.option("--backend", "backend_name", default=None, metavar="NAME",
                        help=f"torch, tensorflow or jax (default: {default}).")


backend_option = backend_option_for()
runs_dir_option = click.option(
    "--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Root of the run directories (default: $FLOWERS_RUNS_DIR or experiments/runs of the workspace).",
)


out_option = click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Reports root (default: $FLOWERS_REPORTS_DIR or reports/ of the workspace).",
)


exports_dir_option = click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Root of the export versions (default: $FLOWERS_EXPORTS_DIR or exports/ of the workspace).",
)


def track_option(what: str):
    return click.option(
        "--track", "track", multiple=True, metavar="TRACKER", envvar="FLOWERS_TRACK",
        help=f"Also log {what} to a tracker: mlflow, at $MLFLOW_TRACKING_URI (MLflow's default "
             "sqlite:///mlflow.db when unset; needs flowers[track]). Default: $FLOWERS_TRACK.")


def tracking_for(track: tuple[str, ...]) -> Any:
    """The checked --track values as a flowers.tracking.Tracking warning on stderr."""
    from flowers import tracking

    return tracking.Tracking(tracking.parse(track),
                             warn=lambda line: click.echo(f"warning: {line}", err=True))


def default(settings: type, name: str) -> Any:
    """The default of field `name` of a settings dataclass: an option's default is read from the
    settings it fills, so the two cannot drift apart."""
    for field in dataclasses.fields(settings):
        if field.name == name:
            if field.default is dataclasses.MISSING:
                raise ValueError(f"{settings.__name__}.{name} has no default")
            return field.default
    raise ValueError(f"{settings.__name__} has no field {name!r}")


def levels_text(levels: tuple[int, ...]) -> str:
    """(1, 4, 16) -> "1,4,16": a tuple default as an option accepts it."""
    return ",".join(str(level) for level in levels)


def parse_sizes(text: str) -> tuple[int, ...]:
    """--image-sizes "32,64,224" -> (32, 64, 224); a part that is not a whole number: one line."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in parts if not part.isdigit()]
    if bad:
        raise FlowersError(f"--image-sizes: {bad[0]!r} is not a whole number (e.g. 32,64,224)")
    return tuple(int(part) for part in parts)
