"""Every user mistake: one line on stderr, a non-zero exit, no traceback, no run directory."""

import pytest

from conftest import flowers, one_line_error, python


def _no_runs(root):
    return not root.exists() or not any(p for p in root.rglob("*") if p.is_dir())


@pytest.mark.parametrize("args, message", [
    (["-e", "nope"], "unknown experiment 'nope'; available: baseline"),
    (["-e", "smoke", "--set", "train.lr=1"], "valid keys of [train]: learning_rate"),
    (["-e", "smoke", "--set", "train.epochs=ten"], "expected int"),
    (["-e", "smoke", "--set", "train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    (["-e", "smoke", "--set", "train.learning_rate=0"], "must be > 0"),
    (["-e", "smoke", "--set", "train.epochs=-1"], "train.epochs=-1: must be >= 1"),
    (["-e", "smoke", "--set", "train.seed=-1"], "train.seed=-1: must be in 0..4294967295"),
    (["-e", "smoke", "--set", "data.image_size=8"], "must be >= 32"),
    (["-e", "smoke", "--set", "data.val_fraction=1"], "must be in (0, 1)"),
    (["-e", "smoke", "--backend", "mxnet"], "unknown backend 'mxnet'; choose one of torch"),
    (["-e", "smoke", "--set", "model.weights=/missing.weights.h5"], "weights file not found"),
    (["-e", "smoke", "--set", "data.source=folder:/missing"], "does not exist"),
    (["-e", "smoke", "--resume"], "nothing to resume"),
    (["-e", "smoke", "--bogus"], "No such option '--bogus'"),
])
def test_train_rejects(tmp_path, args, message):
    error = one_line_error(flowers("train", *args, "--runs-dir", str(tmp_path / "runs")))
    assert message in error
    assert _no_runs(tmp_path / "runs")


def test_folder_problems_fail_before_any_run_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    error = one_line_error(flowers("train", "-e", "smoke", "--backend", "tensorflow",
                                   "--set", f"data.source=folder:{empty}",
                                   "--runs-dir", str(tmp_path / "runs")))
    assert "has no class subfolders" in error
    assert _no_runs(tmp_path / "runs")


@pytest.mark.parametrize("experiment", ["flowers12", "flowers12-custom"])
def test_missing_photo_folder_says_where_photos_go(tmp_path, experiment):
    missing = tmp_path / "no-photos"
    error = one_line_error(flowers("train", "-e", experiment, "--runs-dir", str(tmp_path / "runs"),
                                   env={"FLOWERS_PHOTOS": str(missing)}))
    assert f"no photos at {missing}" in error
    assert "one subfolder per class" in error and "FLOWERS_PHOTOS" in error
    assert "../shared/data/flowers12" in error and "-e tf_flowers" in error
    assert _no_runs(tmp_path / "runs")


def test_backend_not_installed_names_the_extra(tmp_path):
    driver = f"""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "jax" else real(name, *a)
        from flowers.cli import main
        main(["train", "-e", "smoke", "--backend", "jax", "--runs-dir", "{tmp_path}"])
    """
    error = one_line_error(python(driver))
    assert "needs jax, which is not installed" in error and "pip install -e '.[jax]'" in error


OFFLINE = """
    import socket
    def no_network(*args, **kwargs):
        raise OSError("network unreachable (simulated)")
    socket.create_connection = no_network
    from flowers.cli import main
"""


def test_offline_tfds_download_says_what_to_do(tmp_path):
    error = one_line_error(python(OFFLINE + f"""
    main(["train", "-e", "baseline", "--backend", "tensorflow", "--runs-dir", "{tmp_path}/runs",
          "--set", "model.weights=none"])
    """, env={"TFDS_DATA_DIR": str(tmp_path / "tfds")}))
    assert "tfds:oxford_flowers102 is not in" in error and "cannot be reached" in error
    assert "data.source=folder:PATH" in error and "smoke" in error
    assert _no_runs(tmp_path / "runs")


def test_offline_imagenet_weights_say_what_to_do(tmp_path):
    error = one_line_error(python(OFFLINE + f"""
    main(["train", "-e", "smoke", "--backend", "tensorflow", "--runs-dir", "{tmp_path}/runs",
          "--set", "model.weights=imagenet"])
    """, env={"KERAS_HOME": str(tmp_path / "keras")}))
    assert "ImageNet weights are not cached" in error and "model.weights=none" in error
    assert _no_runs(tmp_path / "runs")


def test_resume_with_other_settings_is_refused(tmp_path):
    incomplete = tmp_path / "smoke" / "tensorflow" / ".incomplete-20260101-000000-abcd"
    incomplete.mkdir(parents=True)
    from flowers import config, files

    files.write_json(incomplete / "config.json", {
        "run_id": "20260101-000000-abcd", "backend": "tensorflow",
        "experiment": config.load_experiment("smoke").to_dict()})
    error = one_line_error(flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                                   "--set", "train.epochs=5", "--runs-dir", str(tmp_path)))
    assert "train.epochs: 2 -> 5" in error


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "run directory not found"),
    (lambda p: (p / "half").mkdir() or p / "half", "not a complete run directory (missing config.json"),
])
def test_evaluate_rejects_bad_run_dirs(tmp_path, make, message):
    error = one_line_error(flowers("evaluate", str(make(tmp_path))))
    assert message in error


@pytest.mark.parametrize("args", [
    ["compare", "-e", "smokee"],
    ["exports", "list", "-e", "smokee"],
])
def test_a_mistyped_experiment_is_unknown_not_empty(tmp_path, args):
    """`compare -e smokee` once suggested training smokee; `exports list -e smokee` exited 0."""
    where = ["--runs-dir", str(tmp_path)] if args[0] == "compare" else ["--out", str(tmp_path)]
    error = one_line_error(flowers(*args, *where))
    assert "unknown experiment 'smokee'; available: baseline" in error and "smoke" in error


def test_evaluate_help_names_one_default():
    help_text = " ".join(flowers("evaluate", "--help").stdout.split())
    assert "default: the backend that trained the run" in help_text
    assert "$KERAS_BACKEND" not in help_text
