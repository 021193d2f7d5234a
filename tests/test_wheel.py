"""A wheel that works from any folder: built, installed into a fresh venv, run from an empty folder.

`pip wheel` builds the package as users get it (from a copy of the files the build reads, so the
checkout gets no build/ folder); the venv gets only that wheel,
and sees the test environment's already-installed dependencies through a .pth line naming its
site-packages. A plain path line in a .pth does not run that folder's own .pth files, so the test
environment's editable flowers stays out (asserted: `import flowers` resolves into the venv).
PYTHONPATH is dropped for the same reason. Then, from an empty folder: info, train, export and
compare write under that folder (or $FLOWERS_HOME), nothing under site-packages, and an
experiments/ folder there is searched before the built-in experiments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

# The built-in smoke experiment, made tinier, as the user's own experiments/smoke.toml: it must win
# over the built-in one of the same name (its description and epochs show which file was read).
LOCAL_SMOKE = """description = "local smoke: found in the workspace before the built-in one"

[data]
source = "synthetic"
image_size = 32
synthetic_train_images = 32
synthetic_val_images = 32
synthetic_classes = 4

[model]
weights = "none"

[train]
epochs = 1
batch_size = 32
latency_repeats = 1
"""


def _run(command: list[str], cwd: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONPATH", "KERAS_BACKEND") and not k.startswith("FLOWERS_")}
    full_env.update(PYTHONWARNINGS="ignore", **env)
    result = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the flowers wheel, with the test environment's dependencies visible."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the build reads, so the checkout gets no build/ or egg-info
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, source)
    skip = shutil.ignore_patterns("__pycache__", "runs")
    for name in ("flowers", "experiments"):
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=skip)
    (source / "experiments" / "runs" / "smoke").mkdir(parents=True)  # a run's files must stay out
    (source / "experiments" / "runs" / "smoke" / "config.toml").write_text("")
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
          "-q", "-w", str(root / "dist")], cwd=root, timeout=180)
    wheel = next((root / "dist").glob("flowers-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("flowers/_builtin/experiments/")}
    assert {p.name for p in (PROJECT_ROOT / "experiments").glob("*.toml")} <= shipped
    assert "custom_backbone.py" in shipped and not any("/runs/" in n for n in names)
    tfjs = PROJECT_ROOT / "flowers" / "export" / "formats" / "_tfjs"  # TF.js' node side and demo
    assert {f"flowers/export/formats/_tfjs/{p.relative_to(tfjs)}" for p in tfjs.rglob("*")
            if p.is_file()} <= set(names)

    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], cwd=root, timeout=60)
    python = root / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
         cwd=root, timeout=180)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root, timeout=60).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "test-environment-dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    where = _run([str(python), "-c", "import flowers, keras; print(flowers.__file__)"], cwd=root,
                 timeout=120).stdout.strip()
    assert Path(where).is_relative_to(site), f"flowers imported from {where}, not the wheel in {site}"
    return root / "venv"


def test_the_wheel_works_from_an_empty_folder(venv, tmp_path):
    flowers = str(venv / "bin" / "flowers")
    site = next((venv / "lib").glob("python*/site-packages"))
    installed = _files_under(site)
    here = tmp_path / "workspace"
    here.mkdir()

    info = _run([flowers, "info"], cwd=here, timeout=120).stdout
    assert f"workspace   {here} (the current folder" in info
    assert f"experiments {here / 'experiments'}, then {site / 'flowers/_builtin/experiments'}" in info
    assert "smoke" in info and "tf_flowers" in info and f"runs        {here / 'experiments/runs'}" in info

    (here / "experiments").mkdir()
    (here / "experiments" / "smoke.toml").write_text(LOCAL_SMOKE)
    trained = _run([flowers, "train", "-e", "smoke", "--backend", "tensorflow"], cwd=here, timeout=240)
    run_dir = Path(trained.stdout.strip().splitlines()[-1])
    assert run_dir.is_relative_to(here / "experiments" / "runs" / "smoke" / "tensorflow")
    experiment = json.loads((run_dir / "config.json").read_text())["experiment"]
    assert experiment["description"].startswith("local smoke") and experiment["train"]["epochs"] == 1

    exported = _run([flowers, "export", str(run_dir), "--formats", "savedmodel"], cwd=here, timeout=300)
    version = Path(exported.stdout.strip().splitlines()[-1])
    assert version == here / "exports" / "smoke" / "v1" and (version / "savedmodel").is_dir()

    compared = _run([flowers, "compare", "-e", "smoke"], cwd=here, timeout=180)
    assert Path(compared.stdout.strip().splitlines()[-1]) == here / "reports" / "smoke" / "comparison.md"

    # $FLOWERS_HOME beats the current folder: the report of the same run goes under it
    home = tmp_path / "home"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    compared = _run([flowers, "compare", str(run_dir)], cwd=elsewhere, timeout=180, FLOWERS_HOME=str(home))
    assert Path(compared.stdout.strip().splitlines()[-1]).is_relative_to(home / "reports")
    assert not any(elsewhere.iterdir())

    assert _files_under(site) == installed, "flowers wrote into site-packages"
