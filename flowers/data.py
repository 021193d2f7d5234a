"""The input pipeline: one tf.data.Dataset per split, fed unchanged to model.fit on every backend.

Sources: `tfds:NAME` (tensorflow-datasets), `folder:PATH` (one subfolder per class) and `synthetic`
(generated in memory). Every source ends in the same steps:

    decode -> resize to image_size (uint8 RGB 0..255) -> cache (when it fits) -> shuffle(seed)
           -> batch -> cast to float32 -> [augment] -> prefetch

Caching comes before shuffling so each epoch still sees a new order (a cache after shuffle would
replay the first epoch's order forever). Batches are (float32 images in 0..255, int32 labels);
ResNet50's preprocessing lives inside the model, so exported models take plain RGB images too.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from flowers.config import DataConfig, source_kind
from flowers.errors import FlowersError

# Only these are decodable by tf.io.decode_image; anything else in a class folder is skipped.
IMAGE_FORMATS = {"JPEG", "PNG", "BMP", "GIF"}
# Cache decoded images only while they take at most this share of the available RAM.
CACHE_RAM_SHARE = 0.5
log = logging.getLogger(__name__)
OFFLINE_ADVICE = "use --set data.source=folder:PATH, data.source=synthetic, or --experiment smoke"


@dataclass
class Splits:
    """What load() returns: the two pipelines and the facts a run records about its data."""

    train: object  # tf.data.Dataset of (float32 [B,S,S,3] 0..255, int32 [B]), shuffled
    val: object
    train_in_order: object  # the training images unshuffled, unaugmented (for feature caching)
    class_names: list[str]
    num_train: int
    num_val: int
    skipped_files: list[str] = field(default_factory=list)
    cached: bool = False


@dataclass
class FolderListing:
    """A scanned image folder: readable files with labels, and the files that were skipped."""

    class_names: list[str]
    train_files: list[str]
    train_labels: list[int]
    val_files: list[str]
    val_labels: list[int]
    skipped_files: list[str]


def load(config: DataConfig, batch_size: int, seed: int) -> Splits:
    """Build the train and validation pipelines for `config`.

    Args:
        config: the [data] section.
        batch_size: images per batch.
        seed: shuffle and split seed.

    Returns:
        Splits with both pipelines, class names, counts and skipped files.

    Raises:
        FlowersError: missing or empty folder, a single class, unknown tfds dataset, or a
            dataset that must be downloaded while there is no network.
    """
    import tensorflow as tf

    kind, arg = source_kind(config.source)
    skipped: list[str] = []
    if kind == "folder":
        listing = scan_folder(Path(arg), config.val_fraction, seed)
        class_names, skipped = listing.class_names, listing.skipped_files
        size = config.image_size
        train = _files_dataset(listing.train_files, listing.train_labels, size)
        val = _files_dataset(listing.val_files, listing.val_labels, size)
        num_train, num_val = len(listing.train_files), len(listing.val_files)
    elif kind == "tfds":
        train, val, class_names = _tfds_datasets(arg, config.train_split, config.val_split)
        train = train.map(lambda x, y: (resize_image(x, config.image_size), y), tf.data.AUTOTUNE)
        val = val.map(lambda x, y: (resize_image(x, config.image_size), y), tf.data.AUTOTUNE)
        num_train, num_val = _count(train), _count(val)
    else:
        (x_train, y_train), (x_val, y_val), class_names = synthetic_images(config, seed)
        train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        val = tf.data.Dataset.from_tensor_slices((x_val, y_val))
        num_train, num_val = len(x_train), len(x_val)

    image_bytes = (num_train + num_val) * config.image_size**2 * 3
    cached = config.cache and _fits_in_memory(image_bytes)
    return Splits(
        train=_finish(train, config, batch_size, seed, training=True, cached=cached),
        val=_finish(val, config, batch_size, seed, training=False, cached=cached),
        train_in_order=_finish(train, config, batch_size, seed, training=False, cached=False),
        class_names=list(class_names),
        num_train=num_train,
        num_val=num_val,
        skipped_files=skipped,
        cached=cached,
    )


def resize_image(image, image_size: int):
    """Resize one decoded RGB image (any dtype, 0..255) to uint8 [image_size, image_size, 3]."""
    import tensorflow as tf

    resized = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_image_file(path, image_size: int):
    """Read, decode (JPEG/PNG/BMP/GIF, first frame) and resize one image file: uint8 HxWx3."""
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return resize_image(image, image_size)


def load_image_files(paths: Sequence[str | Path], image_size: int) -> np.ndarray:
    """Images for prediction, decoded exactly as training decoded them: uint8 [N,S,S,3].

    Raises:
        FlowersError: a file is missing, not an image, or corrupt.
    """
    for path in paths:
        if not Path(path).is_file():
            raise FlowersError(f"image file not found: {path}")
        problem = _image_problem(Path(path))
        if problem:
            raise FlowersError(f"cannot read image {path}: {problem}")
    return np.stack([decode_image_file(str(p), image_size).numpy() for p in paths])


def scan_folder(root: Path, val_fraction: float, seed: int) -> FolderListing:
    """List a class-per-subfolder image folder and check every file decodes.

    Uses root/train with root/test (or val, validation) when present; otherwise splits each class
    by val_fraction (stratified, seeded). Unreadable files are skipped and listed.
    """
    split_dirs = _explicit_split_dirs(root)
    if split_dirs:
        train_dir, val_dir = split_dirs
        class_names = _class_dirs(train_dir)
        extra = sorted(set(_class_dirs(val_dir, required=False)) - set(class_names))
        if extra:
            raise FlowersError(f"{val_dir} has classes missing from {train_dir}: {', '.join(extra)}")
        train_per_class = [_list_files(train_dir / c) for c in class_names]
        val_per_class = [_list_files(val_dir / c) for c in class_names]
    else:
        class_names = _class_dirs(root)
        train_per_class, val_per_class = [], []
        rng = np.random.default_rng(seed)
        for name in class_names:
            files = _list_files(root / name)
            order = rng.permutation(len(files))
            n_val = int(round(len(files) * val_fraction)) if len(files) > 1 else 0
            val_per_class.append(sorted(files[i] for i in order[:n_val]))
            train_per_class.append(sorted(files[i] for i in order[n_val:]))

    every_file = [f for group in (*train_per_class, *val_per_class) for f in group]
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = dict(zip(every_file, pool.map(_image_problem, every_file), strict=True))
    skipped = [str(f) for f, problem in problems.items() if problem]
    if skipped:
        first = "; ".join(f"{f}: {problems[Path(f)]}" for f in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        log.warning("skipped %d unreadable file(s) in %s: %s%s", len(skipped), root, first, more)

    def keep(per_class: list[list[Path]]) -> tuple[list[str], list[int]]:
        pairs = [(str(f), label) for label, files in enumerate(per_class) for f in files
                 if not problems[f]]
        return [p for p, _ in pairs], [label for _, label in pairs]

    train_files, train_labels = keep(train_per_class)
    val_files, val_labels = keep(val_per_class)
    empty = [name for label, name in enumerate(class_names) if label not in set(train_labels)]
    if empty:
        raise FlowersError(f"{root}: no readable training images for class(es) {', '.join(empty)}")
    if not val_files:
        raise FlowersError(f"{root}: no readable validation images (add more images per class "
                           "or a test/ folder)")
    return FolderListing(class_names, train_files, train_labels, val_files, val_labels, skipped)


def synthetic_images(config: DataConfig, seed: int):
    """Generated, learnable images: each class has its own colour and stripe direction, plus noise.

    Returns:
        ((x_train, y_train), (x_val, y_val), class_names) with uint8 images at image_size.
    """
    rng = np.random.default_rng(seed)
    size, n_classes = config.image_size, config.synthetic_classes
    hues = np.linspace(0, 1, n_classes, endpoint=False)
    base_colors = 255 * np.stack([0.5 + 0.4 * np.cos(2 * np.pi * (hues + k / 3)) for k in range(3)], 1)
    yy, xx = np.mgrid[0:size, 0:size] / size

    def make(count: int):
        labels = np.arange(count) % n_classes
        rng.shuffle(labels)
        angle = np.pi * labels / n_classes
        phase = rng.uniform(0, 2 * np.pi, count)
        stripes = np.sin(8 * np.pi * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None]
                                      * yy) + phase[:, None, None])
        images = base_colors[labels][:, None, None, :] * (0.75 + 0.25 * stripes[..., None])
        images += rng.normal(0, 20, images.shape)
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int32)

    names = [f"class_{i:02d}" for i in range(n_classes)]
    return make(config.synthetic_train_images), make(config.synthetic_val_images), names


def _finish(ds, config: DataConfig, batch_size: int, seed: int, training: bool, cached: bool):
    import tensorflow as tf

    if cached:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.int32)), tf.data.AUTOTUNE)
    if training and config.augment:
        augment = _augmenter(seed)
        ds = ds.map(lambda x, y: (augment(x, training=True), y), tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _augmenter(seed: int):
    import keras

    # Keras core preprocessing layers run inside tf.data on every backend.
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed),
    ])


def _files_dataset(files: list[str], labels: list[int], image_size: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((files, np.asarray(labels, np.int32)))
    return ds.map(lambda p, y: (decode_image_file(p, image_size), y), tf.data.AUTOTUNE)


def _tfds_datasets(name: str, train_split: str, val_split: str):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name)  # honours TFDS_DATA_DIR
    except tfds.core.registered.DatasetNotFoundError:
        raise FlowersError(f"unknown tensorflow-datasets dataset {name!r} (see "
                           "https://www.tensorflow.org/datasets/catalog)") from None
    if not builder.is_prepared():
        host = urlparse(builder.info.homepage or "").hostname or "storage.googleapis.com"
        if not can_reach(host):
            raise FlowersError(
                f"tfds:{name} is not in {builder.data_dir} and must be downloaded, but {host} "
                f"cannot be reached (offline?); {OFFLINE_ADVICE}"
            )
        try:
            builder.download_and_prepare()
        except OSError as exc:  # requests' ConnectionError is an OSError too
            raise FlowersError(f"downloading tfds:{name} failed ({exc.__class__.__name__}); "
                               f"{OFFLINE_ADVICE}") from None
    if builder.info.supervised_keys is None:
        raise FlowersError(f"tfds:{name} has no (image, label) supervised keys")
    try:
        train, val = builder.as_dataset(split=[train_split, val_split], as_supervised=True,
                                        shuffle_files=False)
    except (ValueError, KeyError) as exc:
        raise FlowersError(f"tfds:{name}: bad split in data.train_split={train_split!r} / "
                           f"data.val_split={val_split!r}: {exc}") from None
    label = builder.info.features[builder.info.supervised_keys[1]]
    return train, val, list(label.names)


def can_reach(host: str, port: int = 443, timeout_s: float = 5.0) -> bool:
    """True when a TCP connection to host:port opens (used before a download, to fail fast)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _count(ds) -> int:
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(ds.reduce(0, lambda n, _: n + 1))


def _fits_in_memory(num_bytes: int) -> bool:
    import psutil

    return num_bytes <= CACHE_RAM_SHARE * psutil.virtual_memory().available


def _explicit_split_dirs(root: Path) -> tuple[Path, Path] | None:
    if not (root / "train").is_dir():
        return None
    for name in ("test", "val", "validation"):
        if (root / name).is_dir():
            return root / "train", root / name
    return None


def _class_dirs(root: Path, required: bool = True) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if required and not names:
        raise FlowersError(f"{root} has no class subfolders (expected {root}/<class>/<image files>)")
    if required and len(names) < 2:
        raise FlowersError(f"{root} has a single class ({names[0]}); a classifier needs at least 2")
    return names


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _image_problem(path: Path) -> str | None:
    """None when the file fully decodes as a supported image, else what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                return f"unsupported image format {image.format}"
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; still reads every byte
            image.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"corrupt ({exc})"
    return None
