"""`flowers info`: installed backends and versions, devices, and where data and weights live."""

from __future__ import annotations

import os
from pathlib import Path

import click

from flowers import __version__, backend, config, host, paths, weights


@click.command()
def info() -> None:
    """Installed backends and versions, devices, and where data and weights live."""
    installed = backend.installed_versions()
    machine = host.host_info()
    gpus = host.nvidia_gpus()
    versions = backend.versions("tensorflow")
    weights_file = weights.keras_cache_file()
    tfds_dir = Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))
    photos = paths.photos_dir()
    where = ("FLOWERS_HOME" if os.environ.get("FLOWERS_HOME") else
             "the checkout" if paths.CHECKOUT else "the current folder; FLOWERS_HOME")
    searched = ", then ".join(str(folder) for folder in paths.experiments_search_path())
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
        f"  workspace   {paths.workspace()} ({where})",
        f"  experiments {searched} (FLOWERS_EXPERIMENTS_DIR)",
        f"              {', '.join(config.list_experiments())}",
        f"  runs        {paths.runs_root()} (FLOWERS_RUNS_DIR)",
        f"  exports     {paths.exports_root()} (FLOWERS_EXPORTS_DIR)",
        f"  reports     {paths.reports_root()} (FLOWERS_REPORTS_DIR)",
        f"  tools       {paths.tools_dir()} (FLOWERS_TOOLS_DIR): {_tools()}",
        f"  tfds        {tfds_dir} (TFDS_DATA_DIR)",
        f"  weights     {weights_file} ({'cached' if weights_file.is_file() else 'not cached'})",
        f"  flowers12   {photos} ({'present' if photos.is_dir() else 'absent'}) (FLOWERS_PHOTOS)",
    ]
    click.echo("\n".join(lines))


def _tools() -> str:
    """What of the export formats' own tools (TF.js) is installed."""
    from flowers.export import formats

    with_tools = [r for r in formats.REGISTRY.values() if r.toolchain is not None]
    return ", ".join(f"{r.name} {'ready' if r.toolchain.ready() else 'not installed (made on first use)'}"
                     for r in with_tools) or "none needed"
