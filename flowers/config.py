"""Experiments: the TOML files in experiments/, their validation and `--set section.key=value` overrides.

An experiment is four frozen sections ([data], [model], [train], [finetune]). Every knob that changes a result
lives here, so a run's config.json says everything needed to repeat it. Validation happens before any
heavy import or data loading: a typo costs a second, not a model build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from flowers import backbones, paths
from flowers.backbones import Backbone
from flowers.errors import FlowersError
from flowers.paths import resolve_path

# np.random.seed (which keras.utils.set_random_seed calls under every backend) takes 0..2**32-1.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they become batches."""

    # "tfds:NAME" | "folder:PATH" | "synthetic"
    source: str = "synthetic"
    # tfds split expressions (e.g. "train[:80%]"); ignored by other sources
    train_split: str = "train"
    # the validation split, a tfds split expression too
    val_split: str = "test"
    # folder sources without train/ and test|val/ subfolders are split by this fraction
    val_fraction: float = 0.2
    # side in pixels every image is resized to (>= 32; some backbones need more)
    image_size: int = 224
    # cache decoded, resized images in memory when they fit (see data.py)
    cache: bool = True
    # random flip / rotation / zoom on training images (Keras preprocessing layers)
    augment: bool = False
    # the "synthetic" source: training images it generates
    synthetic_train_images: int = 256
    # the "synthetic" source: validation images it generates
    synthetic_val_images: int = 64
    # the "synthetic" source: classes (>= 2), each its own colour and stripe direction
    synthetic_classes: int = 5


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: a backbone + GAP -> Dense(head_units, relu) -> Dropout -> Dense logits (every
    exported or saved model ends in a softmax: probabilities)."""

    # a keras.applications name ("ResNet50", "MobileNetV3Small", ...), "package.module:function"
    # (a team's own backbone) or "hub:PRESET" (KerasHub); see flowers/backbones.py
    backbone: str = "ResNet50"
    # "imagenet" | "none" | path to the backbone's (include_top=False) weights file; a custom
    # backbone function receives the value as its `weights` argument
    weights: str = "imagenet"
    # train the head only (fine-tuning unfreezes layers later); false trains the whole network
    freeze_backbone: bool = True
    # units of the head's Dense relu layer
    head_units: int = 128
    # the head's dropout rate, in [0, 1)
    dropout: float = 0.5
    # layout of the backbone's tensors: "auto" takes the measured-fastest one for the backend
    # (see backend.preferred_data_format); saved models are always channels_last
    data_format: str = "auto"
    # fold a frozen backbone's BatchNormalization layers into the convolutions before them
    # (flowers/fold.py: the same function in inference mode, fewer ops); only for a backbone frozen
    # the whole run (off with finetune.epochs > 0 or freeze_backbone=false)
    fold_batchnorm: bool = True
    # store a frozen backbone's convolution kernels in the memory layout the backend's convolution
    # reads (flowers/fold.py; torch: no kernel copy per call, the same values); the same condition
    backend_kernel_layout: bool = True

    @cached_property
    def backbone_spec(self) -> Backbone:
        """model.backbone resolved (flowers.backbones.resolve), once per config: validation, the
        training and the model builder all read this one spec.

        Raises:
            FlowersError: model.backbone names no backbone (resolve()'s message).
        """
        return backbones.resolve(self.backbone)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and measurement settings."""

    # Adam's learning rate in the head-only phase (> 0)
    learning_rate: float = 1e-3
    # images per training step: the global batch, split over every replica when data-parallel
    batch_size: int = 32
    # epochs of the head-only phase (>= 1)
    epochs: int = 10
    # seeds the data order, augmentation, initial weights and dropout masks (0 to 2**32 - 1)
    seed: int = 42
    # timed predict calls per batch size for latency_ms (after 3 untimed warm-up calls)
    latency_repeats: int = 20
    # "auto" (keras: XLA on tensorflow/jax, eager on torch), "true" (XLA / torch.compile), "false"
    jit_compile: str = "auto"
    # keras dtype policy: "float32", "mixed_bfloat16" or "mixed_float16"
    dtype_policy: str = "float32"
    # frozen backbone, no augmentation: compute backbone features once, train the head on them
    cache_features: bool = False
    # "none" or "data_parallel": the global batch split over every device of every process
    # (flowers/distribute.py; `flowers train --distribute data-parallel` sets it)
    distribution: str = "none"
    # learning rate over each phase's steps: "constant" or "cosine" (decays to 0 by the phase's end)
    lr_schedule: str = "constant"
    # end a phase when val_loss has not improved for this many epochs, keeping its best epoch's
    # weights (0 = off)
    early_stopping_patience: int = 0
    # also checkpoint every this many training steps inside an epoch, so a kill loses at most that
    # many steps; --resume continues mid-epoch with the batches left (0 = after each epoch only)
    checkpoint_every_steps: int = 0
    # the same initial weights and dropout masks for one seed under every backend
    # (flowers/randomness.py); off: each backend draws its own (as Keras does)
    portable_random: bool = True
    # each framework's deterministic-kernel switch (TensorFlow op determinism,
    # torch.use_deterministic_algorithms, XLA's deterministic GPU ops); on a CPU only recorded
    deterministic: bool = False


@dataclass(frozen=True)
class FinetuneConfig:
    """The second phase of transfer learning: unfreeze backbone layers, train on at a lower rate."""

    # epochs after the head-only phase (train.epochs); 0 = no fine-tuning
    epochs: int = 0
    # the fine-tuning phase's learning rate, with a fresh Adam (> 0)
    learning_rate: float = 1e-5
    # "all", a number N (the backbone's last N layers) or a layer name (that layer and every one
    # after it; a name prefix such as "conv5" means the first layer whose name starts with it)
    unfreeze: str = "all"


DATA_FORMATS = ("auto", "channels_last", "channels_first")
JIT_COMPILE = ("auto", "true", "false")
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
DISTRIBUTIONS = ("none", "data_parallel")
LR_SCHEDULES = ("constant", "cosine")
SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                             "finetune": FinetuneConfig}
# String settings that may also be written as a whole number in TOML (kept as its text)
NUMBER_OR_TEXT = {"finetune.unfreeze"}
SOURCE_KINDS = ("tfds:NAME", "folder:PATH", "synthetic")
# Keys that existed once: refused in experiment files and --set (with the reason), dropped when an
# older run's config.json is read so that its model still evaluates and exports.
REMOVED_KEYS = {
    "data.shuffle_buffer": "removed: the training order is a full seeded permutation of the whole "
                           "split every epoch, whatever its size (see flowers/data.py)",
}

# Keys added with a default that changed what runs do: a run's config.json without one was made with
# this value (older runs drew random numbers the backend's own way).
LEGACY_VALUES = {"train.portable_random": False}


@dataclass(frozen=True)
class Experiment:
    """One experiment: a name, a description and the sections."""

    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    finetune: FinetuneConfig = FinetuneConfig()
    description: str = ""

    @property
    def total_epochs(self) -> int:
        """Head-only epochs plus fine-tuning epochs (the run's epochs, numbered continuously)."""
        return self.train.epochs + self.finetune.epochs

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS},
        }

    def config_hash(self) -> str:
        """Short hash of the settings that change results (not name or description)."""
        settings = {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def list_experiments() -> list[str]:
    """Names of the experiments on the search path (the workspace's, then the built-in ones)."""
    return sorted({p.stem for folder in paths.experiments_search_path() for p in folder.glob("*.toml")})


def unknown_experiment(name: str) -> FlowersError:
    """The one-line error for an experiment name with no file, listing the ones there are."""
    available = ", ".join(list_experiments()) or "none"
    searched = ", ".join(str(f) for f in paths.experiments_search_path())
    return FlowersError(f"unknown experiment {name!r}; available: {available} (in {searched})")


def load_experiment(name_or_path: str, overrides: Iterable[str] = ()) -> Experiment:
    """Read an experiment by name (NAME.toml on the search path: the workspace's experiments/, then
    the built-in ones) or path, apply overrides, validate.

    Args:
        name_or_path: experiment name, or a path to a .toml file.
        overrides: strings "section.key=value", applied in order.

    Returns:
        The validated Experiment.

    Raises:
        FlowersError: unknown experiment, unknown key, bad type or out-of-range value.
    """
    path = Path(name_or_path) if name_or_path.endswith(".toml") else paths.find_experiment(name_or_path)
    if path is None or not path.is_file():
        raise unknown_experiment(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FlowersError(f"{path}: not valid TOML: {exc}") from None
    experiment = from_dict(raw, name=path.stem, origin=str(path))
    return apply_overrides(experiment, overrides)


def from_dict(raw: Mapping[str, Any], name: str | None = None, origin: str = "config") -> Experiment:
    """Build and validate an Experiment from a dict shaped like the TOML file (or config.json)."""
    allowed_top = {"name", "description", *SECTIONS}
    unknown = sorted(set(raw) - allowed_top)
    if unknown:
        raise FlowersError(
            f"{origin}: unknown top-level key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(allowed_top))}"
        )
    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section, {})
        if not isinstance(values, Mapping):
            raise FlowersError(f"{origin}: [{section}] must be a table of key = value")
        kwargs = {key.split(".")[1]: value for key, value in LEGACY_VALUES.items()
                  if key.startswith(f"{section}.") and origin.endswith("config.json")
                  and key.split(".")[1] not in values}
        for key, value in values.items():
            if f"{section}.{key}" in REMOVED_KEYS:
                if origin.endswith("config.json"):
                    continue
                raise FlowersError(f"{origin}: {section}.{key} {REMOVED_KEYS[section + '.' + key]}")
            field_type = _field_types(cls).get(key)
            if field_type is None:
                raise _unknown_key(section, key)
            if f"{section}.{key}" in NUMBER_OR_TEXT and type(value) is int:
                value = str(value)
            kwargs[key] = _check_type(f"{section}.{key}", value, field_type)
        sections[section] = cls(**kwargs)
    experiment = Experiment(
        name=str(raw.get("name") or name or "unnamed"),
        description=str(raw.get("description", "")),
        **sections,
    )
    validate(experiment)
    return experiment


def apply_overrides(experiment: Experiment, overrides: Iterable[str]) -> Experiment:
    """Apply "section.key=value" strings; values are parsed by the field's type."""
    for override in overrides:
        target, sep, text = override.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot:
            raise FlowersError(f"--set {override!r}: expected section.key=value, e.g. train.epochs=1")
        if section not in SECTIONS:
            raise FlowersError(
                f"--set {override!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}"
            )
        if target.strip() in REMOVED_KEYS:
            raise FlowersError(f"--set {target.strip()}: {REMOVED_KEYS[target.strip()]}")
        field_type = _field_types(SECTIONS[section]).get(key)
        if field_type is None:
            raise _unknown_key(section, key)
        value = _absolute_from_cwd(f"{section}.{key}", _parse(f"{section}.{key}", text.strip(),
                                                                  field_type))
        updated = dataclasses.replace(getattr(experiment, section), **{key: value})
        experiment = dataclasses.replace(experiment, **{section: updated})
    validate(experiment)
    return experiment


def validate(experiment: Experiment) -> None:
    """Range and consistency checks; raises FlowersError naming the key and the bad value."""
    d, m, t, f = experiment.data, experiment.model, experiment.train, experiment.finetune
    _require(d.image_size >= 32, "data.image_size", d.image_size, "must be >= 32")
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    for key in ("synthetic_train_images", "synthetic_val_images"):
        _require(getattr(d, key) >= 1, f"data.{key}", getattr(d, key), "must be >= 1")
    _require(d.synthetic_classes >= 2, "data.synthetic_classes", d.synthetic_classes, "must be >= 2")
    source_kind(d.source)  # validates the form and, for folders, that the path exists
    _require(m.head_units >= 1, "model.head_units", m.head_units, "must be >= 1")
    _require(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    if m.weights not in ("imagenet", "none") and not resolve_path(m.weights).is_file():
        raise FlowersError(
            f"model.weights={m.weights!r}: weights file not found; use 'imagenet', 'none' "
            f"or the path of a {m.backbone} (include_top=False) weights file"
        )
    _require(bool(m.backbone.strip()), "model.backbone", m.backbone,
             "must name a backbone, e.g. ResNet50, MobileNetV3Small or package.module:function")
    backbones.fits(m.backbone_spec, d.image_size, m.data_format)
    _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be > 0")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _require(0 <= t.seed <= MAX_SEED, "train.seed", t.seed, f"must be in 0..{MAX_SEED} (2**32 - 1)")
    _require(t.latency_repeats >= 1, "train.latency_repeats", t.latency_repeats, "must be >= 1")
    _require(m.data_format in DATA_FORMATS, "model.data_format", m.data_format,
             f"must be one of {', '.join(DATA_FORMATS)}")
    _require(t.jit_compile in JIT_COMPILE, "train.jit_compile", t.jit_compile,
             f"must be one of {', '.join(JIT_COMPILE)}")
    _require(t.dtype_policy in DTYPE_POLICIES, "train.dtype_policy", t.dtype_policy,
             f"must be one of {', '.join(DTYPE_POLICIES)}")
    _require(t.distribution in DISTRIBUTIONS, "train.distribution", t.distribution,
             f"must be one of {', '.join(DISTRIBUTIONS)}")
    _require(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", t.lr_schedule,
             f"must be one of {', '.join(LR_SCHEDULES)}")
    _require(t.early_stopping_patience >= 0, "train.early_stopping_patience", t.early_stopping_patience,
             "must be >= 0 (0 = off)")
    _require(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", t.checkpoint_every_steps,
             "must be >= 0 (0 = after each epoch only)")
    _require(f.epochs >= 0, "finetune.epochs", f.epochs, "must be >= 0 (0 = no fine-tuning)")
    _require(f.learning_rate > 0, "finetune.learning_rate", f.learning_rate, "must be > 0")
    unfreeze = f.unfreeze.strip()
    _require(bool(unfreeze), "finetune.unfreeze", f.unfreeze,
             "must be 'all', a number of layers or a layer name")
    if unfreeze.lstrip("-").isdigit():
        _require(int(unfreeze) >= 1, "finetune.unfreeze", f.unfreeze,
                 "a number of layers must be >= 1")
    if f.epochs and not m.freeze_backbone:
        raise FlowersError("finetune.epochs > 0 needs model.freeze_backbone=true: the head-only "
                           "phase trains a frozen backbone, fine-tuning then unfreezes part of it")
    if t.cache_features and (d.augment or not m.freeze_backbone):
        why = "data.augment=true changes every epoch's images" if d.augment else \
            "model.freeze_backbone=false changes the backbone every step"
        raise FlowersError(f"train.cache_features=true needs fixed backbone features, but {why}; "
                           "set train.cache_features=false")


def source_kind(source: str) -> tuple[str, str]:
    """Split data.source into (kind, argument): ("tfds", NAME), ("folder", PATH), ("synthetic", "")."""
    kind, sep, arg = source.partition(":")
    if kind == "synthetic" and not sep:
        return "synthetic", ""
    if kind == "tfds" and arg:
        return "tfds", arg
    if kind == "folder" and arg:
        path = resolve_path(arg)
        if not path.is_dir() and (paths.names_photos(arg) or path == paths.photos_dir()):
            raise FlowersError(f"data.source={source!r}: {paths.missing_photos(path)}")
        if not path.is_dir():
            raise FlowersError(f"data.source={source!r}: folder {str(path)!r} does not exist")
        return "folder", str(path)
    raise FlowersError(f"data.source={source!r}: expected one of {', '.join(SOURCE_KINDS)}")


def settings(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """{"section.key": value} of an Experiment.to_dict() shape (a run's config.json "experiment").

    A key missing from an older run's config.json had its default then (LEGACY_VALUES: the value
    it ran with where the default changed); name, description and
    removed keys are not settings.
    """
    flat = {}
    for section, cls in SECTIONS.items():
        given = experiment.get(section, {})
        for key, default in dataclasses.asdict(cls()).items():
            flat[f"{section}.{key}"] = given.get(key, LEGACY_VALUES.get(f"{section}.{key}", default))
    return flat


def same_place(key: str, value: Any) -> Any:
    """A setting's value with paths made absolute, so that a relative path in a file and the
    absolute path --set made of it compare equal; other values unchanged."""
    if key == "data.source" and str(value).startswith("folder:"):
        return "folder:" + str(resolve_path(str(value)[len("folder:"):]).resolve())
    if key == "model.weights" and value not in ("imagenet", "none"):
        return str(resolve_path(str(value)).resolve())
    return value


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(section.key, value in a, value in b) for every setting that differs between two experiments
    (Experiment.to_dict() shapes); paths that name the same place are equal."""
    left, right = settings(a), settings(b)
    return [(key, left[key], right[key]) for key in left
            if same_place(key, left[key]) != same_place(key, right[key])]


def _absolute_from_cwd(name: str, value: Any) -> Any:
    """--set paths are typed relative to where the user stands, not to the project root."""
    def absolute(text: str) -> str:
        return os.path.abspath(Path(text).expanduser())

    folder = value[len("folder:"):] if name == "data.source" and value.startswith("folder:") else ""
    if folder and not paths.names_photos(folder):
        return "folder:" + absolute(folder)
    if name == "model.weights" and value not in ("imagenet", "none"):
        return absolute(value)
    return value


def _field_types(cls: type) -> dict[str, type]:
    # `from __future__ import annotations` makes f.type a string; map it back to the builtin.
    builtin = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: builtin[f.type] for f in fields(cls)}


def _unknown_key(section: str, key: str) -> FlowersError:
    valid = ", ".join(f.name for f in fields(SECTIONS[section]))
    return FlowersError(f"unknown key {section}.{key}; valid keys of [{section}]: {valid}")


def _check_type(name: str, value: Any, field_type: type) -> Any:
    if field_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if field_type is not bool and isinstance(value, bool) or not isinstance(value, field_type):
        raise FlowersError(f"{name}={value!r}: expected {field_type.__name__}")
    return value


def _parse(name: str, text: str, field_type: type) -> Any:
    if field_type is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise FlowersError(f"{name}={text!r}: expected true or false")
    if field_type is str:
        return text
    try:
        return field_type(text)
    except ValueError:
        raise FlowersError(f"{name}={text!r}: expected {field_type.__name__}") from None


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise FlowersError(f"{name}={value!r}: {rule}")
