"""tests/learnable.py: the generated set is deterministic, photo-like files, and carries its classes
in shape and texture, not in colour (the learning itself: tests/test_train.py, every backend)."""

from pathlib import Path

import numpy as np
from PIL import Image

import learnable

CHANCE = 1 / len(learnable.CLASSES)


def _images(root: Path, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    pictures, labels = [], []
    for label, name in enumerate(learnable.CLASSES):
        for path in sorted((root / split / name).iterdir()):
            pictures.append(np.asarray(Image.open(path).convert("RGB"), np.float64))
            labels.append(label)
    return pictures, np.array(labels)


def _nearest_class_mean(train: np.ndarray, train_labels, test: np.ndarray, test_labels) -> float:
    """Accuracy of the nearest class centroid, features standardised on the training set."""
    mean, std = train.mean(0), train.std(0) + 1e-9
    train, test = (train - mean) / std, (test - mean) / std
    centroids = np.stack([train[train_labels == c].mean(0) for c in range(len(learnable.CLASSES))])
    predicted = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(predicted == test_labels))


def _mean_colour(picture: np.ndarray) -> np.ndarray:
    return picture.reshape(-1, 3).mean(0)


def _orientations(picture: np.ndarray) -> np.ndarray:
    """Luminance-gradient orientations (8 bins, weighted by magnitude, normalised): texture."""
    gray = picture.mean(-1)
    dy, dx = np.gradient(gray)
    magnitude = np.hypot(dx, dy)
    angle = np.mod(np.arctan2(dy, dx), np.pi)
    histogram, _ = np.histogram(angle, bins=8, range=(0, np.pi), weights=magnitude)
    return histogram / (histogram.sum() + 1e-9)


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_ones(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    small = {"train_per_class": 2, "test_per_class": 1}
    first = files(learnable.make(tmp_path / "a", seed=3, **small))
    assert first == files(learnable.make(tmp_path / "b", seed=3, **small))
    other = files(learnable.make(tmp_path / "c", seed=4, **small))
    assert first.keys() == other.keys() and all(first[k] != other[k] for k in first)
    assert len(first) == 3 * len(learnable.CLASSES)
    suffixes = {path.suffix for path in first}
    assert suffixes == {".jpg", ".png"} or len(first) < learnable.PNG_EVERY * len(learnable.CLASSES)


def test_the_set_is_class_folders_of_jpeg_and_png_photos_of_varied_sizes(tmp_path):
    root = learnable.make(tmp_path / "set")
    for split, count in (("train", learnable.TRAIN_PER_CLASS), ("test", learnable.TEST_PER_CLASS)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(learnable.CLASSES)
        assert {len(list(d.iterdir())) for d in (root / split).iterdir()} == {count}
    files = list(root.rglob("*.*"))
    formats = {Image.open(p).format for p in files}
    sizes = {Image.open(p).size for p in files}
    assert formats == {"JPEG", "PNG"}
    assert {w for w, h in sizes} == set(learnable.SIZES_PX) and all(w == h for w, h in sizes)


def test_mean_colour_cannot_tell_the_classes_apart_but_texture_can(tmp_path):
    """Nearest class mean of the mean colour stays near chance (1/12); the same classifier on a
    gradient-orientation histogram (which sees stripes, checks and dots, not shapes) is far above."""
    root = learnable.make(tmp_path / "set")
    train, train_labels = _images(root, "train")
    test, test_labels = _images(root, "test")

    def accuracy(feature) -> float:
        return _nearest_class_mean(np.stack([feature(p) for p in train]), train_labels,
                                   np.stack([feature(p) for p in test]), test_labels)

    by_colour, by_texture = accuracy(_mean_colour), accuracy(_orientations)
    # 180 test images: chance +- 2 standard errors is 0.04..0.12
    assert by_colour <= CHANCE + 0.06, by_colour
    assert by_texture >= 2.5 * CHANCE, by_texture
