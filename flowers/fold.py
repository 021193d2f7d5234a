"""Rewrite a frozen backbone for inference: BatchNormalization folded into the convolutions before
it, and convolution kernels stored in the memory layout the backend's convolution reads.

In inference mode BatchNormalization is an affine map per channel, y = (x - mean) * s + beta with
s = gamma / sqrt(variance + epsilon). When x is a Conv2D's output that nothing else reads, the two
are one Conv2D with kernel W * s (per output channel) and bias (b - mean) * s + beta: the same
function up to float rounding, with one layer call and no normalisation ops. Under eager torch each
BatchNormalization is several eager ops; folded, they are gone (ResNet50: 53 of them).

Keras stores a Conv2D kernel as (kh, kw, in, out) and Keras-on-torch permutes it to torch's
(out, in, kh, kw) on every call: a non-contiguous view that torch's convolution copies each time.
The kernel layout rewrite creates each kernel variable in the strides whose permutation is
contiguous (flowers.backend.conv_kernel_storage); the variable's shape, values and everything saved
are unchanged, only where its numbers lie in memory.

Both are a Keras model clone (keras.models.clone_model), so the rewritten backbone is an ordinary
functional model of stock layers: it saves, loads and exports like any other. They are only meant
for a backbone that always runs in inference mode (flowers.model: a frozen backbone) and whose
weights never change (no fine-tuning).

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import keras
import numpy as np

from flowers import backend


@dataclass(frozen=True)
class Rewrite:
    """Which rewrites rewrite_backbone applies (model.fold_batchnorm, model.backend_kernel_layout)."""

    fold_batchnorm: bool = True
    kernel_layout: bool = True

    def __bool__(self) -> bool:
        return self.fold_batchnorm or self.kernel_layout


NO_REWRITE = Rewrite(False, False)
EVERY_REWRITE = Rewrite()


def clone_with_weights(model: keras.Model, clone_function: Callable, call_function: Callable | None = None,
                       weights: dict[str, list] | None = None,
                       keep: Collection[str] = ()) -> keras.Model:
    """A copy of the functional `model` (keras.models.clone_model with these functions) whose
    inputs are named as its own, and whose layers take the weights and trainable flag of the
    same-named layer of `model`: `weights[name]` instead where given, nothing for a name in `keep`
    (a layer the clone function brought with its weights)."""
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name)
              for t in model.inputs]
    copy = keras.models.clone_model(model, input_tensors=inputs if len(inputs) > 1 else inputs[0],
                                    clone_function=clone_function, call_function=call_function)
    copy_weights(model, copy, weights, keep, clone=True)
    return copy


def copy_weights(source: keras.Model, target: keras.Model, weights: dict[str, list] | None = None,
                 keep: Collection[str] = (), clone: bool = False) -> None:
    """Give each layer of `target` the weights of the same-named layer of `source`: `weights[name]`
    instead where given, nothing for an input layer or a name in `keep`.

    clone: `target` is a clone of `source` (clone_with_weights): every layer has its namesake, whose
    weights it must be able to take, and takes its trainable flag too. Otherwise `target` was built
    again with other options (flowers bench's variants): a layer `source` lacks, or whose namesake
    holds another number of weights (a keras Dropout has none where a PortableDropout has its step
    counter), keeps its own.
    """
    weights = weights or {}
    for layer in target.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer.name in keep:
            continue
        try:
            origin = source.get_layer(layer.name)
        except ValueError:
            if clone:
                raise
            continue
        if layer.name in weights:
            layer.set_weights(weights[layer.name])
        elif origin.weights and (clone or len(origin.weights) == len(layer.weights)):
            layer.set_weights(origin.get_weights())
        if clone:
            layer.trainable = origin.trainable


def foldable_pairs(model: keras.Model) -> dict[str, str]:
    """{BatchNormalization layer name: the Conv2D layer name it folds into} for a functional model.

    A pair folds when the BatchNormalization's one input is the output of a Conv2D without an
    activation, no other layer (and no model output) reads that output, and the normalised axis is
    the convolution's channel axis. A model that is not functional has no pairs.
    """
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if not nodes_by_depth:
        return {}
    nodes = list(itertools.chain.from_iterable(nodes_by_depth.values()))
    readers = Counter(id(tensor) for node in nodes for tensor in node.input_tensors)
    readers.update(id(tensor) for tensor in keras.tree.flatten(model.outputs))
    pairs = {}
    for node in nodes:
        bn = node.operation
        if not isinstance(bn, keras.layers.BatchNormalization) or len(node.input_tensors) != 1:
            continue
        (tensor,) = node.input_tensors
        conv = tensor._keras_history.operation
        if (type(conv) is keras.layers.Conv2D and readers[id(tensor)] == 1
                and conv.activation is keras.activations.linear
                and len(conv._inbound_nodes) == 1 and len(bn._inbound_nodes) == 1
                and _channel_axis(conv) == _axis(bn, len(tensor.shape))):
            pairs[bn.name] = conv.name
    return pairs


def rewrite_backbone(model: keras.Model,
                     rewrite: Rewrite = EVERY_REWRITE) -> tuple[keras.Model, dict[str, int]]:
    """A copy of `model` rewritten as `rewrite` says, and what changed: {"folded": BatchNormalization
    layers folded (see foldable_pairs), "kernels": Conv2D kernels stored in the backend's layout};
    `model` itself when nothing changes. The copy has the same name, inputs, layer names, weights
    (up to the folding) and trainable flags, less the folded BatchNormalization layers."""
    pairs = foldable_pairs(model) if rewrite.fold_batchnorm else {}
    storage = {}
    if rewrite.kernel_layout:
        for layer in model.layers:
            if type(layer) is keras.layers.Conv2D:
                made = backend.conv_kernel_storage(keras.backend.backend(), layer.data_format)
                if made is not None:
                    storage[layer.name] = made
    if not pairs and not storage:
        return model, {"folded": 0, "kernels": 0}
    convs = set(pairs.values())
    initializers = {}

    def clone(layer):
        config = layer.get_config()
        if layer.name in convs:
            config["use_bias"] = True
        copy = layer.__class__.from_config(config)
        if layer.name in storage:  # the kernel variable is made when the clone builds the layer
            initializers[layer.name] = copy.kernel_initializer
            copy.kernel_initializer = storage[layer.name]
        return copy

    def call(layer, *args, **kwargs):
        if layer.name in pairs:  # computed by the convolution before it now
            return args[0]
        return layer(*args, **kwargs)

    weights = {conv: _folded_weights(model.get_layer(conv), model.get_layer(bn))
               for bn, conv in pairs.items()}
    rewritten = clone_with_weights(model, clone, call, weights)
    for name, initializer in initializers.items():  # the saved config names the layer's own
        rewritten.get_layer(name).kernel_initializer = initializer
    rewritten.trainable = model.trainable
    return rewritten, {"folded": len(pairs), "kernels": len(storage)}


def _folded_weights(conv, bn) -> list[np.ndarray]:
    """[kernel, bias] of the Conv2D that computes conv followed by bn in inference mode."""
    values = dict(zip((v.name for v in bn.weights), bn.get_weights(), strict=True))
    variance = values["moving_variance"].astype(np.float64)
    scale = 1.0 / np.sqrt(variance + bn.epsilon)
    if "gamma" in values:
        scale = scale * values["gamma"]
    beta = values.get("beta", np.zeros_like(variance))
    kernel = keras.ops.convert_to_numpy(conv.kernel).astype(np.float64)
    bias = keras.ops.convert_to_numpy(conv.bias).astype(np.float64) if conv.use_bias else 0.0
    dtype = conv.kernel.dtype
    return [(kernel * scale).astype(dtype),
            ((bias - values["moving_mean"]) * scale + beta).astype(dtype)]


def _channel_axis(conv) -> int:
    return 1 if conv.data_format == "channels_first" else 3


def _axis(bn, rank: int) -> int | None:
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    return None if axis is None else axis % rank
