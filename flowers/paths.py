"""Where flowers reads and writes: the ONE resolver of every folder rule.

- The project root: the checkout that holds experiments/, exports/ and reports/ (the parent of the
  package folder).
- The experiments folder: $FLOWERS_EXPERIMENTS_DIR, else experiments/ of the project.
- Output roots, one rule for all three: the command's option, else its environment variable, else
  the default folder (runs under experiments/runs, exports/, reports/).
- Paths inside experiments and run files: `~` expanded, relative ones taken from the project root;
  reports record paths relative to it (project_relative), never a folder of the machine.
- The photo folder of the real-photo jobs (flowers12, parity, bench): ../shared/data/flowers12.

This module imports nothing of flowers, so every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The real-photo folder the flowers12 experiments, `flowers parity` and `flowers bench` default to.
DEFAULT_PHOTOS = PROJECT_ROOT.parent / "shared" / "data" / "flowers12"

# output root -> (environment variable, default folder relative to the project root)
OUTPUT_ROOTS = {
    "runs": ("FLOWERS_RUNS_DIR", Path("experiments") / "runs"),
    "exports": ("FLOWERS_EXPORTS_DIR", Path("exports")),
    "reports": ("FLOWERS_REPORTS_DIR", Path("reports")),
}


def experiments_dir() -> Path:
    """experiments/ of this checkout, or $FLOWERS_EXPERIMENTS_DIR."""
    env = os.environ.get("FLOWERS_EXPERIMENTS_DIR")
    return Path(env) if env else PROJECT_ROOT / "experiments"


def output_root(kind: str, override: str | Path | None = None) -> Path:
    """The root of `kind` ("runs", "exports", "reports"): override, else its variable, else default.

    The runs root follows $FLOWERS_EXPERIMENTS_DIR (runs/ beside the experiments) when
    $FLOWERS_RUNS_DIR is not set.
    """
    variable, default = OUTPUT_ROOTS[kind]
    if override:
        return Path(override)
    env = os.environ.get(variable)
    if env:
        return Path(env)
    if kind == "runs":
        return experiments_dir() / "runs"
    return PROJECT_ROOT / default


def runs_root(override: str | Path | None = None) -> Path:
    """--runs-dir, else $FLOWERS_RUNS_DIR, else experiments/runs."""
    return output_root("runs", override)


def exports_root(override: str | Path | None = None) -> Path:
    """--out, else $FLOWERS_EXPORTS_DIR, else exports/ of this checkout."""
    return output_root("exports", override)


def reports_root(override: str | Path | None = None) -> Path:
    """--out, else $FLOWERS_REPORTS_DIR, else reports/ of this checkout."""
    return output_root("reports", override)


def resolve_path(text: str) -> Path:
    """A path from an experiment: `~` expanded, a relative path taken from the project root.

    Experiment files and run config.json files live in and under the project, next to the
    runs/exports/reports roots that resolve from it too, so one rule holds wherever flowers is run
    from. Paths given with --set are made absolute from the current directory first
    (config.apply_overrides), so they never reach this rule as relative paths.
    """
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(PROJECT_ROOT / path))


def project_relative(path: str | Path) -> str:
    """`path` as reports record it: relative to the project root (e.g. ../shared/data/flowers12),
    so a committed report never names a folder of the machine that wrote it."""
    return os.path.relpath(Path(path).resolve(), PROJECT_ROOT.resolve()) if str(path) else ""


def photos_dir(override: str | Path | None = None) -> Path:
    """The real-photo folder: the option, else ../shared/data/flowers12 beside the project."""
    return Path(override) if override else DEFAULT_PHOTOS
