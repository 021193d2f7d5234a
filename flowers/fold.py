"""Fold a frozen backbone's BatchNormalization layers into the convolutions before them.

In inference mode BatchNormalization is an affine map per channel, y = (x - mean) * s + beta with
s = gamma / sqrt(variance + epsilon). When x is a Conv2D's output that nothing else reads, the two
are one Conv2D with kernel W * s (per output channel) and bias (b - mean) * s + beta: the same
function up to float rounding, with one layer call and no normalisation ops. Under eager torch each
BatchNormalization is several eager ops; folded, they are gone (ResNet50: 53 of them).

The transformation is a Keras model clone (keras.models.clone_model with a call_function that
passes a folded BatchNormalization's input through), so the folded backbone is an ordinary
functional model of stock layers: it saves, loads and exports like any other. It is only exact for
a backbone that always runs in inference mode (flowers.model: a frozen backbone) and whose
BatchNormalization statistics never change (no fine-tuning).

Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import itertools
from collections import Counter

import keras
import numpy as np


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


def fold_batchnorm(model: keras.Model) -> tuple[keras.Model, int]:
    """A copy of `model` with every foldable BatchNormalization folded (see foldable_pairs), and
    how many were folded; `model` itself when none is. The copy has the same name, inputs, layer
    names and trainable flags, less the folded BatchNormalization layers."""
    pairs = foldable_pairs(model)
    if not pairs:
        return model, 0
    convs = set(pairs.values())

    def clone(layer):
        config = layer.get_config()
        if layer.name in convs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        if layer.name in pairs:  # computed by the convolution before it now
            return args[0]
        return layer(*args, **kwargs)

    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name)
              for t in model.inputs]
    folded = keras.models.clone_model(model, input_tensors=inputs if len(inputs) > 1 else inputs[0],
                                      clone_function=clone, call_function=call)
    bn_of = {conv: bn for bn, conv in pairs.items()}
    for layer in folded.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        source = model.get_layer(layer.name)
        if layer.name in bn_of:
            layer.set_weights(_folded_weights(source, model.get_layer(bn_of[layer.name])))
        elif source.weights:
            layer.set_weights(source.get_weights())
        layer.trainable = source.trainable
    folded.trainable = model.trainable
    return folded, len(pairs)


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
