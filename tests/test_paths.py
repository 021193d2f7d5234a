"""One rule for relative paths: experiment files (and run config.json files) resolve from the project
root, --set values from the current directory; published folders get the umask's permissions.

In-process and fast: config loading, the folder scan and the staging/publishing code, no training.
"""

import os
import stat
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, one_line_error
from flowers import config, files, paths, runs
from flowers.errors import FlowersError
from flowers.export import run as export
from flowers.folders import scan_folder


def test_experiment_paths_resolve_from_the_project_root_wherever_flowers_runs(
        monkeypatch, tmp_path, learnable_set):
    """An experiment file naming its folder relative to the project root, as flowers12.toml does."""
    relative = os.path.relpath(learnable_set, PROJECT_ROOT)
    in_file = tmp_path / "relative.toml"
    in_file.write_text(f'[data]\nsource = "folder:{relative}"\n')
    monkeypatch.chdir(PROJECT_ROOT / "experiments")
    experiment = config.load_experiment(str(in_file))
    assert experiment.data.source == f"folder:{relative}"  # stored as written
    kind, folder = config.source_kind(experiment.data.source)
    assert (kind, folder) == ("folder", str(learnable_set))
    listing = scan_folder(paths.resolve_path(folder), experiment.data.val_fraction,
                          experiment.train.seed)
    assert len(listing.class_names) == 12
    assert (len(listing.train_files), len(listing.val_files)) == (480, 180)


def test_set_paths_resolve_from_the_current_directory(monkeypatch, tmp_path, learnable_set):
    monkeypatch.chdir(PROJECT_ROOT / "experiments")
    from_here = os.path.relpath(learnable_set)  # ../../<tmp>/learnable-set from experiments/
    experiment = config.load_experiment("smoke", [f"data.source=folder:{from_here}"])
    assert experiment.data.source == f"folder:{learnable_set}"  # made absolute, so resume/evaluate agree
    with pytest.raises(FlowersError, match="does not exist"):
        # the same folder relative to the project root (as a file would name it), but not from here
        in_a_file = os.path.relpath(learnable_set, PROJECT_ROOT)
        config.load_experiment("smoke", [f"data.source=folder:{in_a_file}"])


def test_weights_paths_follow_the_same_rule(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # any existing file passes validation; pyproject.toml is relative to the project root
    in_file = tmp_path / "weights.toml"
    in_file.write_text('[model]\nweights = "pyproject.toml"\n')
    assert config.load_experiment(str(in_file)).model.weights == "pyproject.toml"
    with pytest.raises(FlowersError, match="weights file not found"):
        config.load_experiment("smoke", ["model.weights=pyproject.toml"])  # not in tmp_path
    (tmp_path / "mine.h5").write_bytes(b"")
    assert config.load_experiment("smoke", ["model.weights=mine.h5"]).model.weights == str(
        tmp_path / "mine.h5")


def test_info_and_train_agree_from_another_directory(flowers12):
    """`flowers info` said flowers12 was present while `flowers train` could not find it."""
    def run(*args):
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("KERAS_BACKEND", None)
        return subprocess.run([sys.executable, "-m", "flowers.cli", *args], capture_output=True,
                              text=True, cwd=PROJECT_ROOT / "experiments", env=env, timeout=300)

    info = run("info")
    assert info.returncode == 0, info.stderr
    assert f"flowers12   {flowers12} (present)" in info.stdout
    # train gets past every path check of the experiment from there; the one error is the one asked for
    error = one_line_error(run("train", "-e", "flowers12", "--set", "train.seed=-1"))
    assert error == "error: train.seed=-1: must be in 0..4294967295 (2**32 - 1)"


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_published_directories_get_the_umask_permissions(tmp_path):
    expected = 0o777 & ~_umask()
    # a run: staged as .incomplete-<id>, renamed when complete
    run = runs.start_run(tmp_path / "runs", config.load_experiment("smoke"), "torch")
    for name in runs.RUN_FILES:
        (run / name).touch()
    assert _mode(runs.finalize(run)) == expected
    # an export version and a report folder: staged with the helper export and report use, then
    # published by their own code
    staging = files.make_public_dir(tmp_path / "exports" / "smoke", files.INCOMPLETE_PREFIX)
    version = export._publish(staging, staging.parent, {"experiment": "smoke"})
    assert version.name == "v1" and _mode(version) == expected
    assert _mode(files.make_public_dir(tmp_path / "reports", ".smoke-")) == expected


def test_export_run_publishes_a_readable_version(tmp_path, monkeypatch):
    """export_run end to end with its slow parts (images, writers, runtimes) replaced."""
    run = runs.start_run(tmp_path / "runs", config.load_experiment("smoke"), "tensorflow")
    for name in runs.RUN_FILES:
        if not (run / name).exists():
            (run / name).write_text("{}")
    run = runs.finalize(run)
    monkeypatch.setattr(export, "_use_tensorflow_on_cpu", lambda: None)
    monkeypatch.setattr(export, "verification_images", lambda experiment: ([0] * 32, "fake"))

    def write(request, images, staging, scratch, step):
        (staging / "model.keras").write_text("model")
        return [{"passed": True, "reference": "keras"}], {}

    monkeypatch.setattr(export, "_write_and_verify", write)
    monkeypatch.setattr(export, "_manifest", lambda *args: {"experiment": "smoke"})
    saved = os.umask(0o022)  # a typical umask: the version must come out 0o755, not 0o700
    try:
        version = export.export_run(run, ["keras"], tmp_path / "exports")
    finally:
        os.umask(saved)
    assert version == tmp_path / "exports" / "smoke" / "v1"
    assert _mode(version) == 0o755
    assert _mode(version / "model.keras") == 0o644
