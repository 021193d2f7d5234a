"""flowers.paths: the one resolver of folders (option, else environment variable, else default), the
workspace (FLOWERS_HOME, else the checkout, else the current folder), the experiment search path and
the photo folder (FLOWERS_PHOTOS)."""

from pathlib import Path

import pytest

from flowers import config, host, paths
from flowers.errors import FlowersError

ROOTS = [("runs", "FLOWERS_RUNS_DIR", paths.runs_root),
         ("exports", "FLOWERS_EXPORTS_DIR", paths.exports_root),
         ("reports", "FLOWERS_REPORTS_DIR", paths.reports_root)]


@pytest.fixture(autouse=True)
def no_flowers_variables(monkeypatch):
    for name in ("FLOWERS_RUNS_DIR", "FLOWERS_EXPORTS_DIR", "FLOWERS_REPORTS_DIR", "FLOWERS_EXPERIMENTS_DIR",
                 "FLOWERS_HOME", "FLOWERS_PHOTOS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """flowers as a wheel install sees it (no checkout), standing in an empty folder."""
    monkeypatch.setattr(paths, "CHECKOUT", None)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


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
    shared = paths.PROJECT_ROOT.parent / "shared" / "data" / "flowers12"
    assert paths.project_relative(shared) == str(Path("../shared/data/flowers12"))
    assert paths.project_relative("") == ""


def test_the_photo_folder_is_the_option_else_the_variable_else_the_shared_default(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWERS_PHOTOS", raising=False)
    monkeypatch.delenv("FLOWERS_HOME", raising=False)
    assert paths.photos_dir() == paths.PROJECT_ROOT.parent / "shared" / "data" / "flowers12"
    monkeypatch.setenv("FLOWERS_PHOTOS", str(tmp_path / "mine"))
    assert paths.photos_dir() == tmp_path / "mine"
    assert paths.photos_dir(tmp_path) == tmp_path


@pytest.mark.parametrize(("text", "expected"), [
    ('[project]\nname = "flowers"\n', True),
    ('[project]\nname = "other"\n', False),
    ("[project\n", False),  # not TOML
    (None, False),  # no pyproject.toml: site-packages
])
def test_a_checkout_is_a_folder_whose_pyproject_names_flowers(tmp_path, text, expected):
    if text is not None:
        (tmp_path / "pyproject.toml").write_text(text)
    assert paths.is_checkout(tmp_path) is expected


def test_this_checkout_is_its_own_workspace():
    assert paths.CHECKOUT == paths.PROJECT_ROOT
    assert paths.workspace() == paths.PROJECT_ROOT
    assert paths.experiments_search_path() == [paths.PROJECT_ROOT / "experiments"]


def test_an_installed_flowers_works_in_the_current_folder(installed):
    assert paths.workspace() == installed
    assert paths.runs_root() == installed / "experiments" / "runs"
    assert paths.exports_root() == installed / "exports"
    assert paths.reports_root() == installed / "reports"
    assert paths.builtin_experiments() == paths.WHEEL_EXPERIMENTS
    assert paths.experiments_search_path() == [installed / "experiments", paths.WHEEL_EXPERIMENTS]
    assert paths.resolve_path("weights.h5") == installed / "weights.h5"
    assert paths.project_relative(installed / "exports" / "smoke") == str(Path("exports/smoke"))
    assert paths.module_search_path() == [str(installed), str(paths.WHEEL_EXPERIMENTS.parent)]


def test_flowers_home_beats_the_checkout_and_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERS_HOME", str(tmp_path / "home"))
    assert paths.workspace() == tmp_path / "home"
    assert paths.exports_root() == tmp_path / "home" / "exports"
    assert paths.runs_root() == tmp_path / "home" / "experiments" / "runs"
    # the checkout's experiments are then the built-in ones, searched second
    assert paths.experiments_search_path() == [tmp_path / "home" / "experiments",
                                               paths.PROJECT_ROOT / "experiments"]


def test_the_workspace_experiments_are_found_before_the_built_in_ones(monkeypatch, installed):
    builtin = installed.parent / "builtin"
    builtin.mkdir()
    (builtin / "smoke.toml").write_text('description = "built in"\n')
    (builtin / "other.toml").write_text('description = "built in"\n')
    monkeypatch.setattr(paths, "WHEEL_EXPERIMENTS", builtin)
    assert config.load_experiment("smoke").description == "built in"
    (installed / "experiments").mkdir()
    (installed / "experiments" / "smoke.toml").write_text('description = "mine"\n')
    (installed / "experiments" / "x.toml").write_text('description = "x"\n')
    assert paths.find_experiment("smoke") == installed / "experiments" / "smoke.toml"
    assert config.load_experiment("smoke").description == "mine"
    assert config.list_experiments() == ["other", "smoke", "x"]
    with pytest.raises(FlowersError, match=f"available: other, smoke, x \\(in {installed / 'experiments'}, "
                                           f"{builtin}\\)"):
        config.load_experiment("nope")
    # $FLOWERS_EXPERIMENTS_DIR takes the place of the workspace's folder, built-ins still follow
    monkeypatch.setenv("FLOWERS_EXPERIMENTS_DIR", str(installed.parent))
    assert paths.experiments_search_path() == [installed.parent, builtin]
    assert paths.find_experiment("other") == builtin / "other.toml"


def test_flowers_photos_beats_the_default_beside_the_workspace(monkeypatch, tmp_path, installed):
    assert paths.photos_dir() == installed.parent / "shared" / "data" / "flowers12"
    monkeypatch.setenv("FLOWERS_PHOTOS", "photos")  # relative: from where the user stands
    assert paths.photos_dir() == installed / "photos"
    assert paths.photos_dir(tmp_path) == tmp_path  # an option still wins
    assert paths.resolve_path("$FLOWERS_PHOTOS") == installed / "photos"
    assert paths.resolve_path("$FLOWERS_PHOTOS/train") == installed / "photos" / "train"
    assert paths.resolve_path("$FLOWERS_PHOTOSX") == installed / "$FLOWERS_PHOTOSX"  # no partial name


def test_the_flowers12_experiments_follow_flowers_photos(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERS_PHOTOS", str(tmp_path))
    for name in ("flowers12", "flowers12-custom", "flowers12-efficientnet", "flowers12-mobilenetv3"):
        experiment = config.load_experiment(name)
        assert experiment.data.source == "folder:$FLOWERS_PHOTOS"
        assert config.source_kind(experiment.data.source) == ("folder", str(tmp_path))
    # --set keeps the placeholder (it is not a path relative to the current folder)
    assert config.load_experiment("smoke", ["data.source=folder:$FLOWERS_PHOTOS"]).data.source == \
        "folder:$FLOWERS_PHOTOS"


def test_a_missing_photo_folder_says_where_photos_go(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERS_PHOTOS", str(tmp_path / "missing"))
    with pytest.raises(FlowersError) as info:
        config.load_experiment("flowers12")
    message = str(info.value)
    assert "\n" not in message and f"no photos at {tmp_path / 'missing'}" in message
    assert "../shared/data/flowers12" in message and "-e tf_flowers" in message
    # any other missing folder keeps the plain message
    with pytest.raises(FlowersError, match="does not exist"):
        config.load_experiment("smoke", [f"data.source=folder:{tmp_path / 'other'}"])


def test_an_installed_flowers_reports_no_commit(monkeypatch):
    monkeypatch.setattr(host, "CHECKOUT", None)
    state = host.git_state()
    assert state["commit"] is None and "wheel" in state["null_reason"]
