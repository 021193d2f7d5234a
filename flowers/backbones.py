"""Which network sits under the head: model.backbone, resolved and built in one place.

model.backbone is one of
- a keras.applications name ("ResNet50", "MobileNetV3Small", "EfficientNetV2B0", ...): the table
  below says, per family, where its preprocessing is (inside the application, or an ImageNet
  preprocess_input mode that flowers puts inside the model), which file Keras downloads for its
  ImageNet weights and whether it can compute channels_first;
- "package.module:function": a team's own backbone, a function (input_shape, weights) ->
  keras.Model taking RGB images in 0..255 (channels_last, shape input_shape) and returning a feature
  map [N, H, W, C] or pooled features [N, C]; it does its own preprocessing and receives
  model.weights as given ("imagenet", "none" or a path);
- "hub:PRESET": a KerasHub backbone from its preset (keras-hub, installed apart; see hub_backbone).

resolve() reads only this table, so an unknown name is refused before any framework is imported;
build() imports keras (call it after flowers.backend.select()).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowers.errors import FlowersError
from flowers.paths import module_search_path

DEFAULT = "ResNet50"
HUB_PREFIX = "hub:"
IMAGENET_HOST = "storage.googleapis.com"


@dataclass(frozen=True)
class Backbone:
    """What flowers needs to know about one backbone."""

    name: str
    # "application" (keras.applications), "custom" (module:function) or "hub" (KerasHub preset)
    kind: str
    # keras.applications module (preprocess_input, weights) and constructor
    module: str = ""
    # imagenet_utils.preprocess_input mode flowers applies inside the model ("caffe", "tf",
    # "torch"), or None when the application preprocesses inside itself (or is custom/hub)
    preprocess: str | None = None
    # the file Keras downloads into ~/.keras/models for weights="imagenet", include_top=False
    weights_file: str | None = None
    # smallest image side the application accepts with include_top=False
    min_size: int = 32
    # False where the family cannot compute channels_first under some backend (auto then picks
    # channels_last, and channels_first is refused)
    channels_first: bool = True

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT


def _family(module: str, preprocess: str | None, names: dict[str, str], min_size: int = 32,
            channels_first: bool = True) -> dict[str, Backbone]:
    return {name: Backbone(name, "application", module, preprocess, file, min_size, channels_first)
            for name, file in names.items()}


_TF_KERNELS = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
# Every image family of keras.applications but NASNet (Keras does not build NASNetMobile under torch,
# nor NASNet channels_first). File names, preprocessing and minimum sizes as Keras 3.15.1 has them.
APPLICATIONS: dict[str, Backbone] = {
    **_family("resnet", "caffe", {n: n.lower() + _TF_KERNELS
                                  for n in ("ResNet50", "ResNet101", "ResNet152")}),
    **_family("resnet_v2", "tf", {n: n.lower() + _TF_KERNELS
                                  for n in ("ResNet50V2", "ResNet101V2", "ResNet152V2")}),
    **_family("mobilenet", "tf", {"MobileNet": "mobilenet_1_0_224_tf_no_top.h5"}),
    **_family("mobilenet_v2", "tf", {
        "MobileNetV2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"}),
    **_family("mobilenet_v3", None, {
        "MobileNetV3Small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "MobileNetV3Large": "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"}),
    **_family("efficientnet", None, {f"EfficientNetB{i}": f"efficientnetb{i}_notop.h5"
                                     for i in range(8)}),
    **_family("efficientnet_v2", None, {f"EfficientNetV2{v}": f"efficientnetv2-{v.lower()}_notop.h5"
                                        for v in ("B0", "B1", "B2", "B3", "S")}),
    # channels_first under torch differs from channels_last for M and L (relative 0.66 and 0.85 on
    # random weights, 64 px), while every other family agrees to ~1e-6: channels_last only.
    **_family("efficientnet_v2", None, {f"EfficientNetV2{v}": f"efficientnetv2-{v.lower()}_notop.h5"
                                        for v in ("M", "L")}, channels_first=False),
    # Keras refuses channels_first for these two families ("does not support the channels_first
    # image data format").
    **_family("convnext", None, {f"ConvNeXt{v}": f"convnext_{v.lower()}_notop.h5"
                                 for v in ("Tiny", "Small", "Base", "Large", "XLarge")},
              channels_first=False),
    **_family("densenet", "torch", {n: n.lower() + _TF_KERNELS
                                    for n in ("DenseNet121", "DenseNet169", "DenseNet201")},
              channels_first=False),
    **_family("xception", "tf", {"Xception": "xception" + _TF_KERNELS}, min_size=71),
    **_family("inception_v3", "tf", {"InceptionV3": "inception_v3" + _TF_KERNELS}, min_size=75),
    **_family("inception_resnet_v2", "tf",
              {"InceptionResNetV2": "inception_resnet_v2" + _TF_KERNELS}, min_size=75),
    **_family("vgg16", "caffe", {"VGG16": "vgg16" + _TF_KERNELS}),
    **_family("vgg19", "caffe", {"VGG19": "vgg19" + _TF_KERNELS}),
}


def resolve(name: str) -> Backbone:
    """The Backbone that model.backbone names, without importing anything heavy.

    Raises:
        FlowersError: an unknown keras.applications name (with the close matches), or a malformed
            "module:function" / "hub:PRESET".
    """
    name = name.strip()
    if name.startswith(HUB_PREFIX):
        preset = name[len(HUB_PREFIX):]
        if not preset:
            raise FlowersError(f"model.backbone={name!r}: expected hub:PRESET, e.g. hub:resnet_50_imagenet")
        return Backbone(name, "hub", channels_first=False)
    if ":" in name:
        module, _, function = name.partition(":")
        if not module or not function.isidentifier() or \
                not all(part.isidentifier() for part in module.split(".")):
            raise FlowersError(f"model.backbone={name!r}: a custom backbone is "
                               "'package.module:function'")
        return Backbone(name, "custom", module=module, channels_first=False)
    if name in APPLICATIONS:
        return APPLICATIONS[name]
    by_lower = {n.lower(): n for n in APPLICATIONS}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(by_lower[c] for c in close)}? " if close else ""
    raise FlowersError(f"model.backbone={name!r}: not a keras.applications backbone; {hint}"
                       f"known: {', '.join(APPLICATIONS)}; or 'package.module:function' for your own, "
                       "or 'hub:PRESET' for KerasHub")


def check(name: str, image_size: int, data_format: str) -> Backbone:
    """resolve() plus fits(): a backbone name checked against an image size and layout."""
    return fits(resolve(name), image_size, data_format)


def fits(spec: Backbone, image_size: int, data_format: str) -> Backbone:
    """The checks of a resolved spec that need the image size and layout; returns spec.

    Raises:
        FlowersError: images smaller than the family accepts, or channels_first where the family
            computes channels_last only.
    """
    if image_size < spec.min_size:
        raise FlowersError(f"data.image_size={image_size}: {spec.name} needs images of at least "
                           f"{spec.min_size} px")
    if data_format == "channels_first" and not spec.channels_first:
        raise FlowersError(f"model.data_format='channels_first': {spec.name} computes channels_last "
                           "only (use auto or channels_last)")
    return spec


# ---- building (imports keras: call after flowers.backend.select()) ---------------------------------


def build(spec: Backbone, weights: str, image_size: int, data_format: str) -> Any:
    """The backbone as a keras.Model: preprocessed images in `data_format` -> feature map or features.

    Args:
        spec: from resolve().
        weights: model.weights ("imagenet", "none" or a resolved path).
        image_size: side of the square input.
        data_format: "channels_last" or "channels_first" (already resolved).

    Raises:
        FlowersError: the weights cannot be had or do not fit, or a custom/hub backbone is unusable.
    """
    if spec.kind == "custom":
        return _custom(spec, weights, image_size)
    if spec.kind == "hub":
        return hub_backbone(spec, weights, image_size)
    import keras

    shape = (image_size, image_size, 3) if data_format == "channels_last" else (3, image_size, image_size)
    keras_weights = None if weights == "none" else weights
    constructor = getattr(keras.applications, spec.name)
    options = {"include_preprocessing": True} if spec.module in (
        "mobilenet_v3", "efficientnet_v2", "convnext") else {}
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format(data_format)  # keras.applications reads the global setting
    try:
        return constructor(include_top=False, weights=keras_weights, input_shape=shape, **options)
    except Exception as exc:  # keras raises bare Exception for failed downloads
        if weights == "imagenet":
            raise FlowersError(f"could not download {spec.name} ImageNet weights "
                               f"({spec.weights_file}): {_first_line(exc)}; use "
                               "--set model.weights=none or model.weights=PATH") from None
        if weights != "none":
            raise FlowersError(f"model.weights={weights!r}: not a {spec.name} (include_top=False) "
                               f"weights file: {_first_line(exc)}") from None
        raise FlowersError(f"model.backbone={spec.name!r} cannot be built at {image_size} px "
                           f"({data_format}): {_first_line(exc)}") from None
    finally:
        keras.config.set_image_data_format(previous)


def preprocess_images(images: Any, mode: str) -> Any:
    """ImageNet preprocessing (keras.applications.imagenet_utils) of channels_last RGB 0..255."""
    import keras

    return keras.applications.imagenet_utils.preprocess_input(images, data_format="channels_last",
                                                              mode=mode)


def _custom(spec: Backbone, weights: str, image_size: int) -> Any:
    import keras

    function = load_function(spec.name)
    shape = (image_size, image_size, 3)
    try:
        model = function(shape, weights)
    except FlowersError:
        raise
    except Exception as exc:
        raise FlowersError(f"model.backbone={spec.name!r}: the function failed for input_shape="
                           f"{shape}, weights={weights!r}: {type(exc).__name__}: "
                           f"{_first_line(exc)}") from None
    if not isinstance(model, keras.Model):
        raise FlowersError(f"model.backbone={spec.name!r} returned {type(model).__name__}, not a "
                           "keras.Model")
    inputs = model.inputs if isinstance(model.inputs, list) else [model.inputs]
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != shape:
        got = [tuple(i.shape) for i in inputs]
        raise FlowersError(f"model.backbone={spec.name!r} returned a model with input(s) {got}; "
                           f"expected one input of shape (None, {image_size}, {image_size}, 3)")
    if len(model.outputs) != 1 or len(model.outputs[0].shape) not in (2, 4):
        got = [tuple(o.shape) for o in model.outputs]
        raise FlowersError(f"model.backbone={spec.name!r} returned a model with output(s) {got}; "
                           "expected one feature map [N, H, W, C] or features [N, C]")
    return model


def load_function(name: str) -> Callable[..., Any]:
    """Import the function that "package.module:function" names."""
    module_name, _, function_name = name.partition(":")
    import sys

    # like `python -m`: modules from PYTHONPATH, then the folders paths.module_search_path names
    for folder in module_search_path():
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise FlowersError(f"model.backbone={name!r}: cannot import {module_name}: "
                           f"{type(exc).__name__}: {_first_line(exc)} (is it on PYTHONPATH?)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise FlowersError(f"model.backbone={name!r}: {module_name} has no function {function_name}")
    return function


HUB_VERSION = "0.32.0"
# keras-hub without its tensorflow-text requirement (which pulls full `tensorflow` over the
# tensorflow-cpu the extras install; image backbones never import it) plus its other requirements
HUB_INSTALL = (f"pip install --no-deps 'keras-hub=={HUB_VERSION}' && pip install absl-py numpy packaging "
               "regex rich 'kagglehub!=1.0.1' 'kagglesdk==0.1.28' sentencepiece tokenizers")
# the preprocessing of a preset that has no image converter: RGB 0..255 -> 0..1
HUB_DEFAULT_SCALE = 1 / 255


def hub_backbone(spec: Backbone, weights: str, image_size: int) -> Any:
    """A KerasHub image backbone from its preset, with its own image preprocessing in front.

    The preset is what follows "hub:" in model.backbone: a built-in name ("resnet_50_imagenet"), a
    Kaggle or Hugging Face handle ("kaggle://...", "hf://...") or a local preset directory (written
    by `backbone.save_to_preset(dir)` and `image_converter.save_to_preset(dir)`).

    KerasHub backbones do no preprocessing; their preset's ImageConverter rescales (and resizes)
    images. flowers takes only the converter's `scale` and `offset` (x * scale + offset on RGB
    0..255, per channel or one number) into a keras.layers.Rescaling in front of the backbone, and
    never its resizing: flowers already resizes to data.image_size, and the backbone is built for
    that size. A preset without an image converter gets scale 1/255, offset 0 (images in 0..1).

    The returned model is one flat keras.Model (input, Rescaling, then the backbone's own layers,
    sharing their weights), so finetune.unfreeze counts and names the backbone's layers as it does
    for keras.applications, and a model.keras whose backbone uses only core Keras layers (ResNet)
    loads without keras_hub.

    Args:
        spec: from resolve(), kind "hub".
        weights: "imagenet" loads the preset's weights, "none" builds it with random weights; a
            path is refused (a preset carries its own weights).
        image_size: side of the square input the backbone is built for.

    Returns:
        A keras.Model taking float RGB images [N, image_size, image_size, 3] in 0..255
        (channels_last) and returning the backbone's feature map [N, H, W, C].

    Raises:
        FlowersError: keras_hub not installed, weights a path, the preset unknown, not downloadable
            (offline?) or not an image backbone, or the backbone unusable at this size.
    """
    import keras

    backbone, scale, offset = _load_hub_preset(spec, weights, image_size)
    images = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(scale, offset, name="hub_preprocess")(images)
    # call(), not __call__: replays the backbone's layers on x, so they join this one flat graph
    features = backbone.call(x)
    return keras.Model(images, features, name=backbone.name)


def _load_hub_preset(spec: Backbone, weights: str, image_size: int) -> tuple[Any, Any, Any]:
    """(the preset's backbone built for image_size, the scale and offset of its preprocessing),
    checked to take one image and return a feature map (see hub_backbone)."""
    import keras

    preset = spec.name[len(HUB_PREFIX):].strip()
    if weights not in ("imagenet", "none"):
        raise FlowersError(f"model.weights={weights!r}: a KerasHub preset carries its own weights; "
                           f"use 'imagenet' (the preset's) or 'none' (random) with {spec.name}")
    keras_hub = _import_keras_hub(spec.name)
    shape = (image_size, image_size, 3)
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_last")  # KerasHub backbones read the global setting
    try:
        try:
            backbone = keras_hub.models.Backbone.from_preset(
                preset, load_weights=weights == "imagenet", image_shape=shape,
                dtype=keras.config.dtype_policy().name)
        except Exception as exc:
            raise _hub_error(spec.name, exc, image_size) from None
        scale, offset = _hub_rescaling(keras_hub, spec.name, preset)
    finally:
        keras.config.set_image_data_format(previous)
    _check_hub_interface(spec, backbone, image_size)
    return backbone, scale, offset


def _check_hub_interface(spec: Backbone, backbone: Any, image_size: int) -> None:
    """Refuse a KerasHub backbone that does not take one image or return one feature map."""
    inputs = getattr(backbone, "inputs", None) or []
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != (image_size, image_size, 3):
        got = [tuple(i.shape) for i in inputs]
        raise FlowersError(f"model.backbone={spec.name!r}: the {type(backbone).__name__} takes input(s) "
                           f"{got}; flowers needs one image input of shape (None, {image_size}, "
                           f"{image_size}, 3)")
    if len(backbone.outputs) != 1 or len(backbone.outputs[0].shape) != 4:
        got = [tuple(o.shape) for o in backbone.outputs]
        raise FlowersError(f"model.backbone={spec.name!r}: the {type(backbone).__name__} returns "
                           f"{got}; flowers needs a convolutional feature map [N, H, W, C] (e.g. "
                           "ResNet, EfficientNet, MobileNet, ConvNeXt, CSPNet, DenseNet, VGG presets)")


def _import_keras_hub(name: str) -> Any:
    try:
        import keras_hub
    except ImportError as exc:
        raise FlowersError(f"model.backbone={name!r} needs KerasHub, which is not installed "
                           f"({_first_line(exc)}); install it with: {HUB_INSTALL}") from None
    return keras_hub


def _hub_rescaling(keras_hub: Any, name: str, preset: str) -> tuple[Any, Any]:
    """(scale, offset) of the preset's ImageConverter; (1/255, 0) when the preset has none."""
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except FileNotFoundError:  # the preset has no image_converter.json
        converter = None
    except ValueError as exc:
        if "Unable to find a subclass" not in str(exc):  # no converter class for this backbone
            raise _hub_error(name, exc, part="'s image converter") from None
        converter = None
    except Exception as exc:
        raise _hub_error(name, exc, part="'s image converter") from None
    if converter is None:
        return HUB_DEFAULT_SCALE, 0.0
    scale = HUB_DEFAULT_SCALE if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    # one float, or a list of 3 (Rescaling broadcasts either over the channels of NHWC)
    return (_plain_numbers(scale), _plain_numbers(offset))


def _plain_numbers(value: Any) -> Any:
    """float or list of floats (a config that serializes to JSON), from a number, tuple or array."""
    import numpy as np

    array = np.asarray(value, dtype="float64").reshape(-1)
    return float(array[0]) if array.size == 1 else [float(v) for v in array]


def _hub_error(name: str, exc: BaseException, image_size: int | None = None,
               part: str = "") -> FlowersError:
    """One line for a KerasHub loading failure (KerasHub's own messages span several lines)."""
    preset = name[len(HUB_PREFIX):].strip()
    text = str(exc)
    if "Unknown preset identifier" in text:
        return FlowersError(f"model.backbone={name!r}: unknown KerasHub preset {preset!r}; use a "
                            "built-in name (e.g. hub:resnet_50_imagenet), a kaggle:// or hf:// handle, "
                            "or a local preset directory")
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        # requests' ConnectionError and the like: Kaggle / Hugging Face unreachable
        return FlowersError(f"model.backbone={name!r}: could not download KerasHub preset {preset!r}"
                            f"{part} (offline?): {type(exc).__name__}: {_first_line(exc)}")
    size = f" at {image_size} px" if image_size is not None else ""
    return FlowersError(f"model.backbone={name!r}: could not load KerasHub preset {preset!r}{part}"
                        f"{size}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
