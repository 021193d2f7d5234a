"""Experiment files and --set overrides (in-process: nothing here imports keras)."""

import os

import pytest

from flowers import config, paths
from flowers.errors import FlowersError


def test_shipped_experiments_load():
    assert {"baseline", "flowers102", "smoke", "flowers12"} <= set(config.list_experiments())
    baseline = config.load_experiment("baseline")
    assert baseline.data.source == "tfds:oxford_flowers102"
    assert (baseline.data.train_split, baseline.data.val_split) == ("train[:80%]", "train[80%:]")
    assert baseline.data.image_size == 224 and baseline.model.weights == "imagenet"
    assert baseline.model.freeze_backbone and baseline.model.head_units == 128
    assert baseline.model.dropout == 0.5
    assert (baseline.train.learning_rate, baseline.train.batch_size, baseline.train.epochs) == (1e-3, 32, 10)
    flowers102 = config.load_experiment("flowers102")
    assert (flowers102.data.train_split, flowers102.data.val_split) == ("train+validation", "test")


def test_overrides_are_typed():
    exp = config.load_experiment("smoke", ["train.epochs=1", "data.image_size=64",
                                           "train.learning_rate=3e-4", "data.cache=false",
                                           "model.weights=none"])
    assert exp.train.epochs == 1 and exp.data.image_size == 64
    assert exp.train.learning_rate == 3e-4 and exp.data.cache is False


def test_config_hash_follows_settings_not_names():
    a = config.load_experiment("smoke")
    b = config.load_experiment("smoke", ["train.epochs=3"])
    assert a.config_hash() != b.config_hash()
    assert config.from_dict(a.to_dict()).config_hash() == a.config_hash()


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "unknown key train.epochz; valid keys of [train]: learning_rate"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("train.epochs=abc", "train.epochs='abc': expected int"),
    ("data.cache=maybe", "expected true or false"),
    ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("train.learning_rate=0", "train.learning_rate=0.0: must be > 0"),
    ("train.learning_rate=-1e-3", "must be > 0"),
    ("train.epochs=0", "train.epochs=0: must be >= 1"),
    ("data.image_size=16", "data.image_size=16: must be >= 32"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be in (0, 1)"),
    ("data.val_fraction=0", "must be in (0, 1)"),
    ("data.source=ftp:x", "expected one of tfds:NAME, folder:PATH, synthetic"),
    ("data.source=folder:/no/such/dir", "does not exist"),
    ("model.weights=/no/such/weights.h5", "weights file not found"),
    ("epochs=3", "expected section.key=value"),
    ("model.data_format=nhwc", "must be one of auto, channels_last, channels_first"),
    ("train.jit_compile=yes", "must be one of auto, true, false"),
    ("train.dtype_policy=float16", "must be one of float32, mixed_bfloat16, mixed_float16"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps=-1: must be >= 0"),
    ("train.checkpoint_every_steps=2.5", "train.checkpoint_every_steps='2.5': expected int"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(FlowersError, match=None) as info:
        config.load_experiment("smoke", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("conflict, reason", [
    ("data.augment=true", "data.augment=true changes every epoch's images"),
    ("model.freeze_backbone=false", "model.freeze_backbone=false changes the backbone"),
])
def test_feature_cache_is_refused_where_it_would_change_the_math(conflict, reason):
    with pytest.raises(FlowersError) as info:
        config.load_experiment("smoke", ["train.cache_features=true", conflict])
    assert reason in str(info.value) and "set train.cache_features=false" in str(info.value)


def test_baseline_fast_is_the_baseline_with_cached_features():
    fast, baseline = config.load_experiment("baseline-fast"), config.load_experiment("baseline")
    assert fast.train.cache_features and not baseline.train.cache_features
    assert (fast.data, fast.model) == (baseline.data, baseline.model)


def test_unknown_experiment_lists_available():
    with pytest.raises(FlowersError) as info:
        config.load_experiment("nope")
    assert "unknown experiment 'nope'" in str(info.value)
    assert "baseline" in str(info.value) and "smoke" in str(info.value)


def test_bad_experiment_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nepochs = "ten"\n')
    with pytest.raises(FlowersError, match="train.epochs='ten': expected int"):
        config.load_experiment(str(bad))
    bad.write_text("[trian]\nepochs = 1\n")
    with pytest.raises(FlowersError, match="unknown top-level key"):
        config.load_experiment(str(bad))
    bad.write_text("[train\n")
    with pytest.raises(FlowersError, match="not valid TOML"):
        config.load_experiment(str(bad))


@pytest.mark.parametrize("seed, message", [
    ("-1", "train.seed=-1: must be in 0..4294967295"),
    (str(2**32), f"train.seed={2**32}: must be in 0..4294967295"),
])
def test_seed_outside_what_numpy_accepts_is_refused(seed, message):
    # np.random.seed (called by keras.utils.set_random_seed under every backend) takes 0..2**32-1
    with pytest.raises(FlowersError) as info:
        config.load_experiment("smoke", [f"train.seed={seed}"])
    assert message in str(info.value)
    assert config.load_experiment("smoke", [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def test_resume_differences_name_each_setting_and_ignore_path_spelling(tmp_path):
    # a folder named relative to the project root in the file, as flowers12.toml names its photos
    (tmp_path / "photos" / "a").mkdir(parents=True)
    relative = os.path.relpath(tmp_path / "photos", paths.PROJECT_ROOT)
    in_file = tmp_path / "photos.toml"
    in_file.write_text(f'[data]\nsource = "folder:{relative}"\n[train]\nepochs = 8\n')
    started = config.load_experiment(str(in_file), ["train.epochs=3"]).to_dict()
    bare = config.load_experiment(str(in_file)).to_dict()
    assert config.differences(started, bare) == [("train.epochs", 3, 8)]
    # the file's relative folder and --set's absolute spelling of the same folder are one place
    absolute = config.load_experiment(
        str(in_file), [f"data.source=folder:{tmp_path / 'photos'}", "train.epochs=3"]).to_dict()
    assert absolute["data"]["source"] != started["data"]["source"]
    assert config.differences(started, absolute) == []
    # a key an older run's config.json lacks had its default then
    del started["train"]["cache_features"]
    assert config.differences(started, absolute) == []
