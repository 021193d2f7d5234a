"""flowers.paths: the one resolver of folders (option, else environment variable, else default)."""

from pathlib import Path

import pytest

from flowers import paths

ROOTS = [("runs", "FLOWERS_RUNS_DIR", paths.runs_root),
         ("exports", "FLOWERS_EXPORTS_DIR", paths.exports_root),
         ("reports", "FLOWERS_REPORTS_DIR", paths.reports_root)]


@pytest.fixture(autouse=True)
def no_flowers_variables(monkeypatch):
    for name in ("FLOWERS_RUNS_DIR", "FLOWERS_EXPORTS_DIR", "FLOWERS_REPORTS_DIR", "FLOWERS_EXPERIMENTS_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("kind", "variable", "root"), ROOTS)
def test_an_option_beats_the_variable_which_beats_the_default(monkeypatch, tmp_path, kind, variable, root):
    default = root()
    assert default.is_relative_to(paths.PROJECT_ROOT)
    monkeypatch.setenv(variable, str(tmp_path / "from-env"))
    assert root() == tmp_path / "from-env"
    assert root(tmp_path / "option") == tmp_path / "option"
    assert paths.output_root(kind, str(tmp_path / "option")) == tmp_path / "option"


def test_default_roots_are_the_checkout_folders():
    assert paths.exports_root() == paths.PROJECT_ROOT / "exports"
    assert paths.reports_root() == paths.PROJECT_ROOT / "reports"
    assert paths.runs_root() == paths.PROJECT_ROOT / "experiments" / "runs"
    assert (paths.experiments_dir() / "smoke.toml").is_file()


def test_runs_live_beside_the_chosen_experiments_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERS_EXPERIMENTS_DIR", str(tmp_path))
    assert paths.experiments_dir() == tmp_path
    assert paths.runs_root() == tmp_path / "runs"
    monkeypatch.setenv("FLOWERS_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert paths.runs_root() == tmp_path / "elsewhere"


def test_an_unknown_output_root_is_refused():
    with pytest.raises(KeyError):
        paths.output_root("models")


def test_experiment_paths_are_taken_from_the_project_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the current folder must not matter
    shared = paths.PROJECT_ROOT.parent / "shared" / "data" / "flowers12"
    assert paths.resolve_path("../shared/data/flowers12") == shared
    assert paths.resolve_path(str(tmp_path / "x")) == tmp_path / "x"
    assert paths.resolve_path("~/photos") == Path.home() / "photos"


def test_reports_record_project_relative_paths():
    assert paths.project_relative(paths.PROJECT_ROOT / "exports" / "smoke") == str(Path("exports/smoke"))
    assert paths.project_relative(paths.DEFAULT_PHOTOS) == str(Path("../shared/data/flowers12"))
    assert paths.project_relative("") == ""


def test_the_photo_folder_is_the_option_else_the_shared_default(tmp_path):
    assert paths.photos_dir() == paths.DEFAULT_PHOTOS
    assert paths.photos_dir(tmp_path) == tmp_path
