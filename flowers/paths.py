"""Where flowers reads and writes: the ONE resolver of every folder rule.

- The workspace: the folder flowers reads experiments from and writes runs, exports and reports
  under. $FLOWERS_HOME when set; else, in a checkout (the package's parent holds the pyproject.toml
  of project "flowers"), the checkout; else (installed from a wheel) the current folder. Never
  site-packages.
- Experiments are searched in order: $FLOWERS_EXPERIMENTS_DIR, else <workspace>/experiments; then the
  built-in ones (experiments/ of the checkout, or the copy shipped inside the wheel).
- Output roots, one rule for all three: the command's option, else its environment variable, else
  the default folder of the workspace (runs under experiments/runs, exports/, reports/).
- Paths inside experiments and run files: `$FLOWERS_PHOTOS` (a leading placeholder) is the photo
  folder, `~` expanded, relative ones taken from the workspace; reports record paths relative to it
  (project_relative), never a folder of the machine.
- Tool environments (the TF.js converter's Python, its node packages): $FLOWERS_TOOLS_DIR, else
  flowers/tools in the user's cache folder (platformdirs: ~/.cache on Linux), shared by every
  checkout and workspace of the user, since they are large and the same for all.
- The photo folder of the real-photo jobs (flowers12*, parity, bench, loadtest): the option, else
  $FLOWERS_PHOTOS, else ../shared/data/flowers12 beside the workspace.

This module imports nothing of flowers, so every layer may use it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The folder that holds the package: the checkout in a clone, site-packages after `pip install .`.
PROJECT_ROOT = PACKAGE_DIR.parent
# Where the wheel carries the built-in experiments (setup.py copies experiments/ there): a folder of
# its own, so putting its parent on sys.path (for "experiments.custom_backbone:small_cnn") exposes
# `experiments` and nothing else.
WHEEL_EXPERIMENTS = PACKAGE_DIR / "_builtin" / "experiments"
PHOTOS_PLACEHOLDER = "$FLOWERS_PHOTOS"
# ../shared/data/flowers12, relative to the workspace
DEFAULT_PHOTOS_RELATIVE = Path("..") / "shared" / "data" / "flowers12"

# output root -> (environment variable, default folder relative to the workspace)
OUTPUT_ROOTS = {
    "runs": ("FLOWERS_RUNS_DIR", Path("experiments") / "runs"),
    "exports": ("FLOWERS_EXPORTS_DIR", Path("exports")),
    "reports": ("FLOWERS_REPORTS_DIR", Path("reports")),
}


def is_checkout(folder: Path) -> bool:
    """True when `folder` is a source checkout of flowers: its pyproject.toml names project "flowers"."""
    try:
        project = tomllib.loads((folder / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return project.get("name") == "flowers"


# The checkout this package runs from, or None when it is installed (a wheel in site-packages).
CHECKOUT: Path | None = PROJECT_ROOT if is_checkout(PROJECT_ROOT) else None


def workspace() -> Path:
    """$FLOWERS_HOME, else the checkout, else (an installed wheel) the current folder."""
    home = os.environ.get("FLOWERS_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return CHECKOUT if CHECKOUT is not None else Path.cwd()


def builtin_experiments() -> Path:
    """The experiments that come with flowers: experiments/ of the checkout, or the wheel's copy."""
    return CHECKOUT / "experiments" if CHECKOUT is not None else WHEEL_EXPERIMENTS


def experiments_dir() -> Path:
    """The workspace's own experiments: $FLOWERS_EXPERIMENTS_DIR, else <workspace>/experiments."""
    env = os.environ.get("FLOWERS_EXPERIMENTS_DIR")
    return Path(env).expanduser().absolute() if env else workspace() / "experiments"


def experiments_search_path() -> list[Path]:
    """Where experiment names are looked up, first match wins: the workspace's, then the built-in."""
    folders = [experiments_dir(), builtin_experiments()]
    return [f for i, f in enumerate(folders) if f.resolve() not in {g.resolve() for g in folders[:i]}]


def find_experiment(name: str) -> Path | None:
    """The file of experiment `name` (NAME.toml) on the search path, or None."""
    for folder in experiments_search_path():
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    return None


def module_search_path() -> list[str]:
    """Folders a "package.module:function" backbone is imported from (after PYTHONPATH), like
    `python -m`: the current folder, the workspace, and the folder holding the built-in experiments
    package (so "experiments.custom_backbone:small_cnn" works wherever flowers runs from)."""
    folders = [os.getcwd(), str(workspace()), str(builtin_experiments().parent)]
    return list(dict.fromkeys(folders))


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
    return workspace() / default


def runs_root(override: str | Path | None = None) -> Path:
    """--runs-dir, else $FLOWERS_RUNS_DIR, else experiments/runs of the workspace."""
    return output_root("runs", override)


def exports_root(override: str | Path | None = None) -> Path:
    """--out, else $FLOWERS_EXPORTS_DIR, else exports/ of the workspace."""
    return output_root("exports", override)


def reports_root(override: str | Path | None = None) -> Path:
    """--out, else $FLOWERS_REPORTS_DIR, else reports/ of the workspace."""
    return output_root("reports", override)


def tools_dir() -> Path:
    """Where flowers keeps tool environments: $FLOWERS_TOOLS_DIR, else <user cache>/flowers/tools."""
    env = os.environ.get("FLOWERS_TOOLS_DIR")
    if env:
        return Path(env).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("flowers")) / "tools"


def names_photos(text: str) -> bool:
    """True when a path from an experiment starts with the $FLOWERS_PHOTOS placeholder."""
    return text == PHOTOS_PLACEHOLDER or text.startswith(PHOTOS_PLACEHOLDER + "/")


def resolve_path(text: str) -> Path:
    """A path from an experiment: a leading $FLOWERS_PHOTOS is the photo folder (photos_dir), `~`
    expanded, a relative path taken from the workspace.

    Experiment files and run config.json files live in and under the workspace, next to the
    runs/exports/reports roots that resolve from it too, so one rule holds wherever flowers is run
    from. Paths given with --set are made absolute from the current directory first
    (config.apply_overrides), so they never reach this rule as relative paths.
    """
    if names_photos(text):
        return Path(os.path.normpath(photos_dir() / text[len(PHOTOS_PLACEHOLDER):].lstrip("/")))
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(workspace() / path))


def project_relative(path: str | Path) -> str:
    """`path` as reports record it: relative to the workspace (e.g. ../shared/data/flowers12),
    so a committed report never names a folder of the machine that wrote it."""
    return os.path.relpath(Path(path).resolve(), workspace().resolve()) if str(path) else ""


def default_photos() -> Path:
    """$FLOWERS_PHOTOS, else ../shared/data/flowers12 beside the workspace."""
    env = os.environ.get("FLOWERS_PHOTOS")
    if env:
        return Path(env).expanduser().absolute()
    return Path(os.path.normpath(workspace() / DEFAULT_PHOTOS_RELATIVE))


def photos_dir(override: str | Path | None = None) -> Path:
    """The real-photo folder: the option, else $FLOWERS_PHOTOS, else ../shared/data/flowers12."""
    return Path(override) if override else default_photos()


def missing_photos(folder: Path) -> str:
    """The one line that says where the real photos go, for a photo folder that is not there."""
    return (f"no photos at {folder}: put a folder with one subfolder per class (or train/ and "
            f"test/ ones) at {DEFAULT_PHOTOS_RELATIVE.as_posix()} beside the workspace "
            f"({workspace()}) or set FLOWERS_PHOTOS to it; with internet, `flowers train -e "
            f"tf_flowers` downloads real photos (tfds tf_flowers, 5 species)")
