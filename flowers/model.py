"""The one model definition used by every backend, and saving/loading it with its class names.

build_model() puts the backbone's preprocessing INSIDE the model (the family's preprocess_input, or the
application's own preprocessing layers; flowers/backbones.py), so every saved or exported model takes
plain RGB images (0..255) and nobody has to remember a per-family scaling step.

The model trains on logits: Keras computes sparse categorical cross-entropy from probabilities
differently per backend (exact from the softmax's logits under tensorflow, from probabilities clipped
to [1e-7, 1 - 1e-7] under torch and jax, where a confidently wrong image gets no gradient), while
from_logits=True is the same stable log-softmax everywhere. What users get -- model.keras, every
export, predict -- returns probabilities: with_probabilities() is the one place that appends the
softmax, and logits_model() the one place that takes it off again (evaluation).
Import this module only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import zipfile
from pathlib import Path

import keras

from flowers import backbones, randomness
from flowers import weights as imagenet_weights
from flowers.config import Experiment, ModelConfig, resolve_path
from flowers.errors import FlowersError
from flowers.fold import EVERY_REWRITE, NO_REWRITE, Rewrite, clone_with_weights, rewrite_backbone

# Extra member stored inside model.keras (keras ignores unknown zip members when loading).
CLASS_NAMES_MEMBER = "flowers_class_names.json"
LOGITS_LAYER = "logits"
PROBABILITIES_LAYER = "probabilities"


@keras.saving.register_keras_serializable(package="flowers")
class ImagenetPreprocess(keras.layers.Layer):
    """RGB images in 0..255 -> a keras.applications family's input (imagenet_utils mode)."""

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        # The model's input is always channels_last RGB, whatever layout the backbone uses.
        return backbones.preprocess_images(images, self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="flowers")
class ResNet50Preprocess(ImagenetPreprocess):
    """RGB images in 0..255 -> ResNet50 input (RGB->BGR, ImageNet channel means subtracted).

    The layer of models saved before model.backbone existed (they still load).
    """

    def __init__(self, **kwargs):
        kwargs.pop("mode", None)
        super().__init__(mode="caffe", **kwargs)


@keras.saving.register_keras_serializable(package="flowers")
class InferenceMode(keras.layers.Wrapper):
    """Runs the wrapped layer (the frozen backbone) in inference mode however the model is called.

    Keras 3.15's functional models pass the outer call's `training` to every nested layer, over a
    `training=False` written when the graph was built (fixed upstream after 3.15.1:
    keras-team/keras#23364). A frozen backbone would then run its own Dropout layers in training
    mode under model.fit: EfficientNet's and EfficientNetV2's stochastic depth (15 Dropout layers
    in EfficientNetV2B0) noised every training step's features, which the feature cache (computed
    in inference mode) does not, and which no other backbone does. BatchNormalization was not
    affected: a frozen BatchNormalization layer runs in inference mode by itself.
    """

    def call(self, inputs):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def build_model(config: ModelConfig, image_size: int, num_classes: int,
                seed: int = 0, rewrite: Rewrite = NO_REWRITE,
                portable_random: bool = False) -> keras.Model:
    """Build the classifier: preprocessing -> backbone -> GAP -> Dense relu -> Dropout -> logits.

    Args:
        config: the [model] section (backbone, weights, freeze_backbone, head_units, dropout).
        image_size: side of the square RGB input.
        num_classes: number of classes (logits per image).
        seed: the head Dropout's seed (train.seed when training). A seeded Dropout draws its masks
            from its own SeedGenerator on every backend, whose state the epoch checkpoint saves, so
            a resumed run draws the masks an uninterrupted one would (unseeded, Keras-on-torch
            takes torch's global generator, which a new process restarts).
        rewrite: the frozen backbone's inference rewrites (rewrite_classifier; a run's models take
            backbone_rewrite(experiment)).
        portable_random: train.portable_random: every weight not loaded from a file is drawn from
            (seed, its path) and every Dropout that trains is a PortableDropout, so the model starts
            and trains with the same random numbers under every backend (flowers/randomness.py).

    Returns:
        An uncompiled keras.Model taking float RGB images [N, image_size, image_size, 3] in 0..255
        and returning class logits [N, num_classes] (float32); with_probabilities() turns it into
        the probability-returning model that is saved and exported.

    Raises:
        FlowersError: fewer than 2 classes, an unusable backbone, ImageNet weights unavailable,
            an unusable weights file, or (portable_random) a weight initializer with no portable
            implementation.
    """
    if num_classes < 2:
        raise FlowersError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    spec = backbones.fits(config.backbone_spec, image_size, config.data_format)
    imagenet_weights.check_available(spec, config.weights)
    weights = config.weights
    if weights not in ("none", "imagenet"):
        weights = str(resolve_path(weights))

    recording = randomness.recording_initializers() if portable_random else contextlib.nullcontext({})
    with recording as initializers:
        model, backbone = _classifier(config, spec, weights, image_size, num_classes, seed,
                                      portable_random)
    if portable_random:
        randomness.initialize(model, seed, initializers,
                              loaded=backbone.weights if weights != "none" else ())
    return rewrite_classifier(model, rewrite) if rewrite else model


def _classifier(config: ModelConfig, spec: backbones.Backbone, weights: str, image_size: int,
                num_classes: int, seed: int, portable_random: bool) -> tuple[keras.Model, keras.Model]:
    """build_model's graph: (the classifier, its backbone)."""
    data_format = resolve_data_format(config)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    if spec.preprocess:
        # the family's preprocess_input inside the model (applications that preprocess inside
        # themselves, custom and KerasHub backbones get RGB 0..255)
        x = ImagenetPreprocess(spec.preprocess, name=f"{spec.module}_preprocess")(x)
    if data_format == "channels_first":
        x = keras.layers.Permute((3, 1, 2), name="to_channels_first")(x)
    backbone = backbones.build(spec, weights, image_size, data_format)
    if portable_random and not config.freeze_backbone:  # its random layers run in training mode
        backbone = clone_with_weights(backbone, lambda layer: randomness.portable_layer(layer, seed))
    backbone.trainable = not config.freeze_backbone
    # A frozen backbone runs in inference mode (its BatchNormalization and Dropout layers; the
    # transfer-learning rule), also while fine-tuning unfreezes layers of this same graph.
    x = InferenceMode(backbone, name=f"{backbone.name}_inference")(x) \
        if config.freeze_backbone else backbone(x)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(data_format=data_format, name="avg_pool")(x)
    else:  # a custom backbone that pools its own features
        x = keras.layers.Identity(name="avg_pool")(x)
    x = keras.layers.Dense(config.head_units, activation="relu", name="head_dense")(x)
    x = (randomness.PortableDropout(config.dropout, seed, name="head_dropout") if portable_random
         else keras.layers.Dropout(config.dropout, seed=seed, name="head_dropout"))(x)
    # float32 logits even under a mixed-precision policy, so the loss is computed in float32
    # (keras mixed-precision guide)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"flowers_{_identifier(spec.name)}"), backbone


def backbone_rewrite(experiment: Experiment) -> Rewrite:
    """The rewrites a run's model gets (model.fold_batchnorm, model.backend_kernel_layout): none
    unless the backbone stays frozen, in inference mode, for the whole run (fine-tuning trains its
    convolutions with the BatchNormalization after them, and finetune.unfreeze counts its layers)."""
    m = experiment.model
    if not m.freeze_backbone or experiment.finetune.epochs:
        return NO_REWRITE
    return Rewrite(fold_batchnorm=m.fold_batchnorm, kernel_layout=m.backend_kernel_layout)


def rewrite_classifier(model: keras.Model, rewrite: Rewrite = EVERY_REWRITE) -> keras.Model:
    """build_model's classifier with its frozen backbone rewritten (flowers.fold.rewrite_backbone:
    BatchNormalization folded, kernels in the backend's layout); `model` itself when nothing changes.

    Every layer is a copy (a layer shared by two models would have two outputs, and
    feature_extractor reads avg_pool's), with the weights of `model`'s.
    """
    wrapper = next((layer for layer in model.layers if isinstance(layer, InferenceMode)), None)
    if wrapper is None:
        return model
    backbone, _ = rewrite_backbone(wrapper.layer, rewrite)
    if backbone is wrapper.layer:
        return model
    replacement = InferenceMode(backbone, name=wrapper.name)
    return clone_with_weights(
        model, lambda layer: replacement if layer is wrapper else
        layer.__class__.from_config(layer.get_config()), keep={wrapper.name})


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone inside a model from build_model (its one nested keras.Model, unwrapped from
    InferenceMode when it is frozen)."""
    nested = [layer.layer if isinstance(layer, InferenceMode) else layer for layer in model.layers]
    nested = [layer for layer in nested if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise FlowersError(f"model {model.name!r} has {len(nested)} nested models; expected one "
                           "backbone")
    return nested[0]


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def with_probabilities(model: keras.Model) -> keras.Model:
    """The probability-returning model: `model` (logits) plus a float32 Softmax named "probabilities".

    The layers, and so the weights, are shared with `model`. A model that already ends in a softmax
    (this function's output, or an older run's model.keras whose last Dense has the softmax inside)
    is returned unchanged.
    """
    if _softmax_output(model) is not None:
        return model
    outputs = keras.layers.Softmax(name=PROBABILITIES_LAYER, dtype="float32")(model.output)
    return keras.Model(model.input, outputs, name=model.name)


def logits_model(model: keras.Model) -> keras.Model:
    """The logits of a classifier that returns probabilities (the inverse of with_probabilities).

    Evaluating through the logits with from_logits=True computes the cross-entropy of the
    probabilities exactly and identically on every backend. Handles both a final Softmax layer
    and an older run's Dense(activation="softmax"), whose logits come from a linear twin of that
    Dense with the same weights. A model that already returns logits is returned unchanged.

    Raises:
        FlowersError: the model ends in neither a Dense nor a Softmax layer.
    """
    last = _softmax_output(model)
    if last is None:
        if not isinstance(model.layers[-1], keras.layers.Dense):
            raise FlowersError(f"model {model.name!r} ends in {type(model.layers[-1]).__name__}, not "
                               "a Dense or Softmax layer: not a flowers classifier")
        return model
    if isinstance(last, keras.layers.Softmax):
        outputs = last.input
    else:
        linear = keras.layers.Dense(last.units, dtype="float32", name=LOGITS_LAYER)
        outputs = linear(last.input)
        linear.set_weights(last.get_weights())
    return keras.Model(model.input, outputs, name=model.name)


def _softmax_output(model: keras.Model) -> keras.layers.Layer | None:
    """The model's last layer when it applies the softmax (a Softmax, or a Dense with softmax)."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return last
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax:
        return last
    return None


def resolve_data_format(config: ModelConfig) -> str:
    """model.data_format, with "auto" replaced by the measured-fastest layout for this backend
    (channels_last for backbones that compute only that, see flowers.backbones)."""
    if config.data_format != "auto":
        return config.data_format
    from flowers.backend import preferred_data_format

    if not config.backbone_spec.channels_first:
        return "channels_last"
    return preferred_data_format(keras.backend.backend())


def portable(model: keras.Model, config: ModelConfig, image_size: int, num_classes: int,
             rewrite: Rewrite = NO_REWRITE) -> keras.Model:
    """The model in the channels_last layout every backend and exporter can run (same weights).

    Keras stores kernels in one layout whatever data_format a layer computes in, so the weights
    of a channels_first model load unchanged into its channels_last twin.
    """
    if resolve_data_format(config) == "channels_last":
        return model
    twin = build_model(dataclasses.replace(config, weights="none", data_format="channels_last"),
                       image_size, num_classes, rewrite=rewrite,
                       portable_random=uses_portable_dropout(model))
    twin.set_weights(model.get_weights())
    return twin


def uses_portable_dropout(model: keras.Model) -> bool:
    """Whether `model` was built with portable_random (its head Dropout is a PortableDropout)."""
    return any(isinstance(layer, randomness.PortableDropout) for layer in model.layers)


def feature_extractor(model: keras.Model) -> keras.Model:
    """Images -> pooled backbone features (the input of the head)."""
    return keras.Model(model.input, model.get_layer("avg_pool").output, name="backbone_features")


def head(model: keras.Model) -> keras.Model:
    """Pooled features -> logits, sharing the head layers (and weights) of `model` (from build_model)."""
    features = keras.Input(shape=model.get_layer("avg_pool").output.shape[1:], name="features")
    x = features
    for name in ("head_dense", "head_dropout", LOGITS_LAYER):
        x = model.get_layer(name)(x)
    return keras.Model(features, x, name="head")


def save_model(model: keras.Model, path: Path, class_names: list[str]) -> None:
    """Save model.keras, returning probabilities (see with_probabilities), with its class names inside."""
    with_probabilities(model).save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(CLASS_NAMES_MEMBER, json.dumps(class_names))


def load_model(path: Path) -> tuple[keras.Model, list[str]]:
    """Load a model.keras written by save_model(); returns (model, class_names).

    Raises:
        FlowersError: the file is missing or is not a Keras model.
    """
    path = Path(path)
    if not path.is_file():
        raise FlowersError(f"model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            class_names = (json.loads(archive.read(CLASS_NAMES_MEMBER))
                           if CLASS_NAMES_MEMBER in names else None)
            uses_hub = "config.json" in names and b"keras_hub" in archive.read("config.json")
        if uses_hub:  # a KerasHub backbone's own layers are registered when keras_hub is imported
            try:
                import keras_hub  # noqa: F401
            except ImportError:
                raise FlowersError(f"{path}: the model has KerasHub layers and keras_hub is not "
                                   "installed (docs/backbones.md, KerasHub backbones)") from None
        model = keras.saving.load_model(path, compile=False)  # safe mode: no Python lambdas
    except (zipfile.BadZipFile, ValueError, TypeError, OSError, KeyError) as exc:
        raise FlowersError(f"{path}: not a readable .keras model ({_load_failure(exc)})") from None
    if class_names is None:
        class_names = [f"class_{i}" for i in range(model.output_shape[-1])]
    return model, class_names


def _load_failure(exc: Exception) -> str:
    """The reason a .keras file did not load, in one line (Keras nests the cause in a long message)."""
    text = str(exc).strip() or type(exc).__name__
    unknown = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if unknown:
        module = re.search(r"Full object config: \{'module': '([^']+)'", text)
        origin = f" from {module.group(1)}" if module else ""
        return (f"it uses the class {unknown.group(1)!r}{origin}, which is not registered here: a "
                "model loads by name only Keras, KerasHub and flowers layers, or custom ones "
                "registered with @keras.saving.register_keras_serializable and imported first")
    text = text.split("Exception encountered: ")[-1]
    return text.splitlines()[0].strip()


def compile_model(model: keras.Model, learning_rate: float, num_classes: int,
                  jit_compile: str = "auto") -> None:
    """Adam + sparse categorical cross-entropy on logits, with top-1 and top-5 accuracy.

    `model` returns logits (build_model, head, logits_model). The accuracy metrics read the logits
    directly: they rank classes exactly as the probabilities do.
    jit_compile is train.jit_compile: "auto" (keras decides), "true" or "false".
    """
    model.compile(
        jit_compile={"auto": "auto", "true": True, "false": False}[jit_compile],
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy"),
        ],
    )
