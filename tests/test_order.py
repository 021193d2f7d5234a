"""Training order and augmentation: a fair, full, seeded permutation per epoch, the same everywhere.

Each case runs `flowers.data` in a fresh process under one backend and reports, per epoch, a hash
of every batch (images and labels) and the labels themselves; the assertions compare those.
"""

import json

import numpy as np
import pytest

from conftest import BACKENDS, python

EPOCHS = 2


def _epochs(backend: str, experiment: str, sets: list[str], tfds_mock: bool = False) -> dict:
    """Labels and batch hashes of epochs 0..EPOCHS-1, plus epoch 1 alone (as a resumed run reads it)."""
    driver = f"""
        import hashlib, json
        from flowers import backend, config, host
        backend.select({backend!r})
        from flowers import data

        def epochs():
            exp = config.load_experiment({experiment!r}, {sets!r})
            splits = data.load(exp.data, 32, exp.train.seed)
            steps = splits.steps_per_epoch

            def read(ds):
                labels, hashes = [], []
                for x, y in ds:
                    labels.append(y.numpy().tolist())
                    hashes.append(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
                return labels, hashes

            labels, hashes = read(splits.train_epochs(0, {EPOCHS}))
            resumed_labels, resumed_hashes = read(splits.train_epochs(1, {EPOCHS}))
            return {{"steps": steps, "num_train": splits.num_train, "cached": splits.cached,
                    "labels": [labels[e * steps:(e + 1) * steps] for e in range({EPOCHS})],
                    "hashes": [hashes[e * steps:(e + 1) * steps] for e in range({EPOCHS})],
                    "resumed_hashes": resumed_hashes}}

        if {tfds_mock!r}:
            import numpy as np
            import tensorflow as tf
            import tensorflow_datasets as tfds
            from PIL import Image
            import io
            host.can_reach = lambda *args, **kwargs: True

            def class_sorted(self, split, decoders=None, read_config=None, **kwargs):
                # 4 classes x 25 images, sorted by class like many prepared datasets
                rng = np.random.default_rng(0)
                labels = np.repeat(np.arange(4), 25)
                encoded = []
                for label in labels:
                    noise = rng.integers(0, 20, (40, 40, 3), dtype=np.uint8)
                    image = np.full((40, 40, 3), 60 * label, np.uint8) + noise
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    encoded.append(buffer.getvalue())
                return tf.data.Dataset.from_tensor_slices({{"image": encoded, "label": labels}})

            with tfds.testing.mock_data(as_dataset_fn=class_sorted):
                print(json.dumps(epochs()))
        else:
            print(json.dumps(epochs()))
    """
    result = python(driver, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_fair_full_permutations(run: dict, num_classes: int, min_distinct: float) -> None:
    for epoch_labels in run["labels"]:
        assert len(epoch_labels) == run["steps"]
        flat = np.concatenate(epoch_labels)
        assert len(flat) == run["num_train"]
        distinct = np.mean([len(set(batch)) for batch in epoch_labels[:-1]])  # full batches
        assert distinct >= min_distinct, distinct
        assert np.bincount(flat, minlength=num_classes).min() > 0
    assert run["labels"][0] != run["labels"][1], "two epochs in the same order"
    assert run["hashes"][0] != run["hashes"][1]
    # a run resumed at epoch 1 reads exactly the batches an uninterrupted run reads there
    assert run["resumed_hashes"] == run["hashes"][1]


@pytest.mark.parametrize("cache", ["true", "false"])
def test_folder_batches_are_fair_full_permutations(learnable_experiments, cache):
    """480 class-sorted images, 12 classes: a fair batch of 32 holds ~11.2 classes on average."""
    run = _epochs("tensorflow", str(learnable_experiments["flowers12"]), [f"data.cache={cache}"])
    assert run["cached"] is (cache == "true") and run["num_train"] == 480
    _assert_fair_full_permutations(run, 12, min_distinct=9)


def test_every_image_once_per_epoch(tmp_path, learnable_experiments):
    """The hash of each image, not only its label: every training image exactly once an epoch."""
    driver = f"""
        import hashlib, json
        from flowers import backend, config
        backend.select("tensorflow")
        from flowers import data
        exp = config.load_experiment("{learnable_experiments['flowers12']}", ["data.cache=false"])
        splits = data.load(exp.data, 32, exp.train.seed)
        seen = [hashlib.sha256(image.tobytes()).hexdigest()
                for x, _ in splits.train_epochs(0, 1) for image in x.numpy()]
        stored = [hashlib.sha256(image.tobytes()).hexdigest()
                  for x, _ in splits.train_in_order for image in x.numpy()]
        print(json.dumps({{"seen": seen, "stored": stored}}))
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(out["seen"]) == sorted(out["stored"]) and len(out["seen"]) == 480
    assert out["seen"] != out["stored"]


def test_tfds_class_sorted_split_is_permuted():
    run = _epochs("tensorflow", "baseline", ["data.image_size=32", "data.train_split=train",
                                             "data.val_split=test"], tfds_mock=True)
    assert run["num_train"] == 100
    # 4 classes x 25 in class order: a fair batch of 32 holds all 4 almost always
    _assert_fair_full_permutations(run, 4, min_distinct=3.5)


def test_order_and_augmentation_are_the_same_in_every_backend_and_process(learnable_experiments):
    """Same seed: identical (augmented) batches under torch, tensorflow and jax, and twice in one."""
    sets = ["data.augment=true", "data.cache=false"]
    experiment = str(learnable_experiments["flowers12"])
    runs = {b: _epochs(b, experiment, sets) for b in BACKENDS}
    again = _epochs("tensorflow", experiment, sets)
    assert runs["torch"]["hashes"] == runs["tensorflow"]["hashes"] == runs["jax"]["hashes"]
    assert again["hashes"] == runs["tensorflow"]["hashes"]
    assert runs["jax"]["resumed_hashes"] == runs["jax"]["hashes"][1]
    other_seed = _epochs("tensorflow", experiment, [*sets, "train.seed=7"])
    assert other_seed["hashes"][0] != runs["tensorflow"]["hashes"][0]


def test_augmentation_layers_draw_independently():
    """Flip, rotation and zoom each have their own random stream (they once shared one seed)."""
    driver = """
        import json
        import numpy as np
        from flowers import backend
        backend.select("jax")
        import tensorflow as tf
        from flowers import data
        images = tf.zeros((256, 32, 32, 3))
        draws = data.augmentation_draws(42)(images, tf.constant(3, tf.int64), tf.constant(5, tf.int64))
        flips = np.asarray(draws[0]["flips"], np.float32).ravel()
        angles = np.asarray(draws[1]["angle"]).ravel()
        zooms = np.asarray(draws[2]["height_zoom"]).ravel()
        print(json.dumps({"flip_sign": float(np.corrcoef(flips, np.sign(angles))[0, 1]),
                          "angle_zoom": float(np.corrcoef(angles, zooms)[0, 1]),
                          "flip_share": float(flips.mean())}))
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # 256 independent draws: |corr| above 0.25 is a 4-sigma event
    assert abs(out["flip_sign"]) < 0.25 and abs(out["angle_zoom"]) < 0.25, out
    assert 0.35 < out["flip_share"] < 0.65, out
