"""The input pipeline: one tf.data.Dataset per split, fed unchanged to model.fit on every backend.

Sources: `tfds:NAME` (tensorflow-datasets), `folder:PATH` (one subfolder per class) and `synthetic`
(generated in memory). Each source first becomes an in-memory index of its examples (`Examples`:
per image a file path, the encoded bytes of a tfds record, or the decoded image, and its label).
Pipelines are built over positions in that index:

    order of epoch e -> read -> decode -> resize (uint8 RGB) -> batch -> float32
          -> [augment(seed, epoch, batch)] -> prefetch

Order. The training order of epoch e is `numpy.random.default_rng([seed, e]).permutation(N)` over
the WHOLE training split: the indices are shuffled, not the decoded images, so a class-sorted
folder of any size is fed in a fair order (a shuffle buffer smaller than the split would feed it
almost in class order), no second copy of the images is held, and cached and uncached runs get
the same order. It depends on nothing but (seed, epoch): `Splits.train_epochs(first, epochs)`
starts a resumed run at exactly the batches it would have seen, and every backend gets the same
batches because they all consume this one tf.data pipeline.

Decoding. One decoder decides what an image is: Pillow (`flowers.images.decode_image_bytes`), converting every
mode (palette, 1-bit, grey, RGBA, CMYK) to RGB. The readability check when a folder is scanned,
training (through tf.numpy_function), `flowers predict` and the export checks all use it, so a
file that passes the check is read with the same pixels everywhere.

Caching. With data.cache (and when they fit in half the available RAM), the decoded, resized
images of both splits are held as one uint8 array each, decoded once when the data is loaded;
otherwise paths or encoded bytes are held and every epoch decodes again.

Augmentation (data.augment). Keras core layers (RandomFlip, RandomRotation, RandomZoom) run inside
tf.data with TensorFlow ops whatever the Keras backend (the way keras.layers.Pipeline and the
DataLayer base class run them). Each layer draws from its own stream, and every draw is stateless:
the seed of layer k for batch b of epoch e is derived from (seed, k, e, b) only, so the augmented
stream is reproducible in a new process, parallel map order cannot change it, and a resumed run
sees the same augmented images.

Batches are (float32 images in 0..255, int32 labels); ResNet50's preprocessing lives inside the
model, so exported models take plain RGB images too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from flowers import host
from flowers.config import DataConfig, source_kind
from flowers.errors import FlowersError
from flowers.folders import scan_folder
from flowers.images import decode_image_bytes, resize_image

# Cache decoded images only while they take at most this share of the available RAM.
CACHE_RAM_SHARE = 0.5
OFFLINE_ADVICE = "use --set data.source=folder:PATH, data.source=synthetic, or --experiment smoke"


@dataclass
class Examples:
    """One split before batching: what to read for each example, and its label.

    kind is "path" (items are file paths), "bytes" (encoded image files) or "array" (items are
    ready arrays: decoded images at the final size, or backbone features).
    """

    items: np.ndarray
    labels: np.ndarray
    kind: str

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    @cached_property
    def tensors(self):
        """(items, labels) as tf tensors, made once: every pipeline over these examples shares
        them, so building another epoch range or view never copies the images again."""
        import tensorflow as tf

        return tf.constant(self.items), tf.constant(self.labels, tf.int32)


@dataclass
class Splits:
    """What load() returns: both splits as examples, and the pipelines built over them."""

    train_examples: Examples
    val_examples: Examples
    class_names: list[str]
    image_size: int
    batch_size: int
    seed: int
    augment: bool
    skipped_files: list[str] = field(default_factory=list)
    cached: bool = False
    split_dirs: tuple[str, str] | None = None
    # whole batches only (data-parallel training: every replica gets an equal share of each batch)
    drop_remainder: bool = False
    # what each validation image is, in the split's order: its path in the data folder ("" when
    # the source has no files), kept when the images themselves are decoded into memory
    val_items: tuple[str, ...] = ()

    @property
    def num_train(self) -> int:
        return len(self.train_examples)

    @property
    def num_val(self) -> int:
        return len(self.val_examples)

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_remainder:
            return self.num_train // self.batch_size
        return -(-self.num_train // self.batch_size)

    def train_epochs(self, first_epoch: int, epochs: int, skip_steps: int = 0):
        """Training batches of epochs first_epoch..epochs-1, one epoch after the other, without
        the first `skip_steps` batches of first_epoch (a run resumed mid-epoch).

        Give it to model.fit with steps_per_epoch=self.steps_per_epoch: epoch e's order and
        augmentation depend only on (seed, e), so a run resumed at first_epoch sees exactly the
        batches an uninterrupted run sees from there.
        """
        augment = _augmenter(self.seed) if self.augment else None
        return epoch_batches(self.train_examples, self.batch_size, self.seed, first_epoch, epochs,
                             self.image_size, augment, self.drop_remainder, skip_steps)

    def feature_epochs(self, features, first_epoch: int, epochs: int, skip_steps: int = 0):
        """train_epochs for the frozen backbone's features of the training images (in the same
        order; not augmented: train.cache_features)."""
        return epoch_batches(features, self.batch_size, self.seed, first_epoch, epochs,
                             drop_remainder=self.drop_remainder, skip_steps=skip_steps)

    @property
    def train(self):
        """One training epoch (epoch 0's order and augmentation)."""
        return self.train_epochs(0, 1)

    @cached_property
    def val(self):
        """The validation split in its stored order, unaugmented (whole batches: see drop_remainder)."""
        return in_order(self.val_examples, self.batch_size, self.image_size, self.drop_remainder)

    @property
    def train_in_order(self):
        """The training split in its stored order, unaugmented (for feature caching)."""
        return in_order(self.train_examples, self.batch_size, self.image_size)

    def summary(self) -> str:
        """One line: images per split and per class, so imbalance shows before training."""
        return describe_counts(self.class_names, self.train_examples, self.val_examples)


def load(config: DataConfig, batch_size: int, seed: int) -> Splits:
    """Index both splits of `config.source` and prepare their pipelines.

    Args:
        config: the [data] section.
        batch_size: images per batch.
        seed: order, augmentation and split seed.

    Returns:
        Splits with both splits, class names, skipped files and the pipelines.

    Raises:
        FlowersError: missing or empty folder, a single class, unknown tfds dataset, or a
            dataset that must be downloaded while there is no network.
    """
    train, val, class_names, skipped, split_dirs = index(config, seed)
    root = source_kind(config.source)[1]
    val_items = tuple(os.path.relpath(str(p), root) for p in val.items) if val.kind == "path" \
        else ("",) * len(val)
    image_bytes = (len(train) + len(val)) * config.image_size**2 * 3
    cached = train.kind == "array" or (config.cache and _fits_in_memory(image_bytes))
    if cached:
        train, val = (decode_all(e, config.image_size) for e in (train, val))
    return Splits(train_examples=train, val_examples=val, class_names=list(class_names),
                  image_size=config.image_size, batch_size=batch_size, seed=seed,
                  augment=config.augment, skipped_files=skipped, cached=cached,
                  split_dirs=split_dirs, val_items=val_items)


def index(config: DataConfig, seed: int):
    """Both splits as Examples, without decoding images (beyond the folder readability check).

    Returns:
        (train, val, class_names, skipped_files, split_dirs): split_dirs names the folders used
        as splits when a folder has train/ and a validation folder, else None.
    """
    kind, arg = source_kind(config.source)
    if kind == "folder":
        listing = scan_folder(Path(arg), config.val_fraction, seed)
        train = Examples(np.array(listing.train_files), np.array(listing.train_labels, np.int32),
                         "path")
        val = Examples(np.array(listing.val_files), np.array(listing.val_labels, np.int32), "path")
        return train, val, listing.class_names, listing.skipped_files, listing.split_dirs
    if kind == "tfds":
        train, val, class_names = _tfds_examples(arg, config.train_split, config.val_split)
        return train, val, class_names, [], None
    (x_train, y_train), (x_val, y_val), class_names = synthetic_images(config, seed)
    return (Examples(x_train, y_train, "array"), Examples(x_val, y_val, "array"), class_names, [],
            None)


def describe_counts(class_names: Sequence[str], train: Examples, val: Examples) -> str:
    """E.g. "720 train / 240 val images in 12 classes; images per class: train 60, val 20"."""
    parts = []
    for name, examples in (("train", train), ("val", val)):
        counts = examples.class_counts(len(class_names))
        low, high = int(np.argmin(counts)), int(np.argmax(counts))
        parts.append(f"{name} {counts[low]}" if counts[low] == counts[high] else
                     f"{name} {counts[low]} ({class_names[low]}) to {counts[high]} ({class_names[high]})")
    return (f"{len(train)} train / {len(val)} val images in {len(class_names)} classes; "
            f"images per class: {', '.join(parts)}")


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a full permutation that depends on (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_batches(examples: Examples, batch_size: int, seed: int, first_epoch: int, epochs: int,
                  image_size: int | None = None, augment: Callable | None = None,
                  drop_remainder: bool = False, skip_steps: int = 0):
    """Batches of epochs first_epoch..epochs-1, each epoch in its own epoch_order, less the first
    skip_steps batches of first_epoch.

    Every epoch has ceil(N / batch_size) batches (the last one may be short), or N // batch_size
    whole ones with drop_remainder. augment(images, epoch, batch_index) is applied to float32
    batches when given; batch_index counts from the epoch's first batch, skipped ones included,
    so a batch is augmented alike whether or not the batches before it were skipped.
    """
    import tensorflow as tf

    if not 0 <= first_epoch < epochs:
        raise ValueError(f"first_epoch={first_epoch} must be in [0, epochs={epochs})")
    steps = len(examples) // batch_size if drop_remainder else -(-len(examples) // batch_size)
    if not 0 <= skip_steps < steps:
        raise ValueError(f"skip_steps={skip_steps} must be in [0, steps per epoch={steps})")
    orders = np.stack([epoch_order(len(examples), seed, e) for e in range(first_epoch, epochs)])
    read = _reader(examples, image_size)

    def one_epoch(epoch, order):
        # skipped in the index, before any image is read
        skipped = tf.where(tf.equal(epoch, first_epoch), np.int64(skip_steps), np.int64(0))
        ds = tf.data.Dataset.from_tensor_slices(order).skip(skipped * batch_size)
        ds = ds.map(read, tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(_to_float, tf.data.AUTOTUNE)
        if augment is not None:
            ds = ds.enumerate().map(lambda b, xy: (augment(xy[0], epoch, b + skipped), xy[1]),
                                    tf.data.AUTOTUNE)
        return ds

    epoch_ids = np.arange(first_epoch, epochs, dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((epoch_ids, orders)).flat_map(one_epoch)
    ds = ds.apply(tf.data.experimental.assert_cardinality((epochs - first_epoch) * steps - skip_steps))
    return ds.prefetch(tf.data.AUTOTUNE)


def in_order(examples: Examples, batch_size: int, image_size: int | None = None,
             drop_remainder: bool = False):
    """All examples in their stored order, batched, unaugmented."""
    import tensorflow as tf

    ds = tf.data.Dataset.range(len(examples)).map(_reader(examples, image_size), tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(_to_float, tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def decode_all(examples: Examples, image_size: int) -> Examples:
    """The examples decoded and resized into one uint8 array (the in-memory cache)."""
    if examples.kind == "array":
        return examples
    import tensorflow as tf

    images = np.empty((len(examples), image_size, image_size, 3), np.uint8)
    ds = tf.data.Dataset.range(len(examples)).map(_reader(examples, image_size), tf.data.AUTOTUNE)
    position = 0
    for batch, _ in ds.batch(256).as_numpy_iterator():
        images[position:position + len(batch)] = batch
        position += len(batch)
    return Examples(images, examples.labels, "array")


def _reader(examples: Examples, image_size: int | None):
    """position -> (image uint8 [S,S,3] or array row, int32 label), reading examples.items."""
    import tensorflow as tf

    items, labels = examples.tensors

    def read(position):
        item = tf.gather(items, position)
        if examples.kind == "path":
            item = tf.io.read_file(item)
        if examples.kind != "array":
            item = resize_image(_decode_tensor(item), image_size)
        return item, tf.gather(labels, position)

    return read


def _to_float(x, y):
    import tensorflow as tf

    return tf.cast(x, tf.float32), y


def _decode_tensor(data):
    """tf.string scalar (an encoded image file) -> uint8 [H, W, 3], decoded by Pillow."""
    import tensorflow as tf

    image = tf.numpy_function(lambda b: decode_image_bytes(bytes(b)), [data], tf.uint8,
                              stateful=False)
    image.set_shape([None, None, 3])
    return image


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


def _augmentation_layers() -> tuple:
    import keras

    return (keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(0.1, fill_mode="reflect"),
            keras.layers.RandomZoom(0.1, fill_mode="reflect"))


def augmentation_draws(seed: int, layers: tuple | None = None) -> Callable:
    """draws(images, epoch, batch_index) -> each augmentation layer's random transformation.

    Layer k draws from the key (seed, k) folded with epoch and batch index: its own stream,
    stateless, a function of (seed, epoch, batch) only.
    """
    import tensorflow as tf

    layers = layers or _augmentation_layers()
    seed_class = _stateless_seed_class()

    def draws(images, epoch, batch_index) -> list[dict]:
        transformations = []
        for stream, layer in enumerate(layers):
            key = tf.constant([seed, stream], tf.int64)
            for data in (epoch, batch_index):
                key = tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))
            with _tensorflow_ops(layer):
                transformations.append(layer.get_random_transformation(
                    images, training=True, seed=seed_class(key)))
        return transformations

    return draws


def _augmenter(seed: int) -> Callable:
    """augment(images, epoch, batch_index): random flip, rotation and zoom (see the top)."""
    layers = _augmentation_layers()
    draws = augmentation_draws(seed, layers)

    def augment(images, epoch, batch_index):
        for layer, transformation in zip(layers, draws(images, epoch, batch_index), strict=True):
            with _tensorflow_ops(layer):
                images = layer.transform_images(images, transformation, training=True)
        return images

    return augment


@contextlib.contextmanager
def _tensorflow_ops(layer):
    """What keras.layers.DataLayer.__call__ does inside tf.data: the layer's own methods run with
    TensorFlow ops whatever the Keras backend (a Sequential would convert to the backend's
    tensors and fail under torch and jax)."""
    layer.backend.set_backend("tensorflow")
    try:
        yield
    finally:
        layer.backend.reset()


def _stateless_seed_class() -> type:
    """A keras SeedGenerator that derives its draws from one key tensor and keeps no state.

    Keras' random ops take an int (one fixed draw) or a SeedGenerator (a variable advanced on each
    draw, in whatever order parallel tf.data calls happen to run). This one returns
    fold_in(key, n) for its n-th draw inside one traced call: distinct draws, no shared state.
    """
    import keras
    import tensorflow as tf

    class StatelessSeed(keras.random.SeedGenerator):
        def __init__(self, key):  # no super().__init__: there is no state variable to create
            self.key, self.draws = key, 0

        def next(self, ordered=True):
            self.draws += 1
            return tf.random.experimental.stateless_fold_in(self.key, self.draws)

    return StatelessSeed


def _tfds_examples(name: str, train_split: str, val_split: str):
    """(train, val, class_names) of a tfds dataset, images kept as their encoded bytes."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name)  # honours TFDS_DATA_DIR
    except tfds.core.registered.DatasetNotFoundError:
        raise FlowersError(f"unknown tensorflow-datasets dataset {name!r} (see "
                           "https://www.tensorflow.org/datasets/catalog)") from None
    if not builder.is_prepared():
        host_name = urlparse(builder.info.homepage or "").hostname or "storage.googleapis.com"
        if not host.can_reach(host_name):
            raise FlowersError(
                f"tfds:{name} is not in {builder.data_dir} and must be downloaded, but {host_name} "
                f"cannot be reached (offline?); {OFFLINE_ADVICE}"
            )
        try:
            builder.download_and_prepare()
        except OSError as exc:  # requests' ConnectionError is an OSError too
            raise FlowersError(f"downloading tfds:{name} failed ({exc.__class__.__name__}); "
                               f"{OFFLINE_ADVICE}") from None
    if builder.info.supervised_keys is None:
        raise FlowersError(f"tfds:{name} has no (image, label) supervised keys")
    image_key, label_key = builder.info.supervised_keys[:2]
    try:
        # Encoded bytes, decoded later by the one decoder (decode_image_bytes) like folder files.
        splits = builder.as_dataset(split=[train_split, val_split], as_supervised=True,
                                    shuffle_files=False,
                                    decoders={image_key: tfds.decode.SkipDecoding()})
    except (ValueError, KeyError) as exc:
        raise FlowersError(f"tfds:{name}: bad split in data.train_split={train_split!r} / "
                           f"data.val_split={val_split!r}: {exc}") from None
    examples = []
    for ds in splits:
        pairs = list(ds.as_numpy_iterator())
        items = np.empty(len(pairs), object)
        items[:] = [image for image, _ in pairs]
        examples.append(Examples(items, np.array([label for _, label in pairs], np.int32), "bytes"))
    return examples[0], examples[1], list(builder.info.features[label_key].names)

def _fits_in_memory(num_bytes: int) -> bool:
    import psutil

    return num_bytes <= CACHE_RAM_SHARE * psutil.virtual_memory().available
