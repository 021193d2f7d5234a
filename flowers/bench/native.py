"""The flowers model written natively, for `flowers bench`: plain PyTorch and a plain tf.function.

Both are the same network as flowers.model.build_model (Keras' ResNet50 v1: the stride sits in the
first 1x1 convolution of a block, every convolution has a bias, BatchNorm epsilon 1.001e-5), take
the same input (RGB 0..255, NHWC) and load their weights from the Keras model, so a benchmark
ratio compares frameworks, not models. The Keras model is build_model's (it returns logits, with the
last Dense named "logits"); forward() returns probabilities like with_probabilities(model) and
train_step() takes the cross-entropy from the logits, as Keras trains it. differences() proves the
equivalence numerically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# (stack name, bottleneck filters, blocks, stride of the first block) -- keras resnet.py ResNet50
STACKS = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
BN_EPSILON = 1.001e-5
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
# the one model.backbone the twins are written for, and the backends they are written in
BACKBONE = "ResNet50"
BACKENDS = ("torch", "tensorflow")


def unavailable(backend_name: str, backbone: str) -> str | None:
    """Why `backend_name` has no native twin of `backbone` (the null reason of its figures), or None."""
    if backend_name not in BACKENDS:
        return "no native baseline for this backend (native: torch and tensorflow)"
    if backbone != BACKBONE:
        return f"native twins are {BACKBONE}-only"
    return None


@dataclass
class NativeModel:
    """The three calls the benchmark times, all on numpy NHWC RGB images in 0..255."""

    features: Callable[[np.ndarray], np.ndarray]  # pooled backbone features
    forward: Callable[[np.ndarray], np.ndarray]  # class probabilities
    train_step: Callable[[np.ndarray, np.ndarray], float]  # one Adam step on the head; loss


def keras_weights(model) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {variable name: array}} of every conv, batch-norm and dense layer of `model`."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for layer in model._flatten_layers(include_self=False):
        if layer.weights and not hasattr(layer, "layers"):
            found[layer.name] = {w.path.rsplit("/", 1)[-1]: np.asarray(w) for w in layer.weights}
    return found


def _blocks():
    """(block name, stride, has a projection shortcut) in network order."""
    for stack, _, count, stride in STACKS:
        for i in range(1, count + 1):
            yield f"{stack}_block{i}", (stride if i == 1 else 1), i == 1


# ----------------------------------------------------------------------------- PyTorch


def torch_model(model, channels_last_memory: bool = False):
    """A torch.nn.Module equal to the Keras `model` (weights copied), in eval mode."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    conv, bn, dense = _torch_layers(keras_weights(model))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _torch_backbone(conv, bn, channels_last_memory)
            self.dense = dense("head_dense")
            self.dropout = nn.Dropout(float(model.get_layer("head_dropout").rate))
            self.out = dense("logits")

        def logits(self, images):
            with torch.no_grad():  # frozen backbone: no gradients flow into it
                features = self.backbone(images)
            return self.out(self.dropout(F.relu(self.dense(features))))

        def forward(self, images):
            return torch.softmax(self.logits(images), dim=-1)

    module = Classifier().eval()
    if channels_last_memory:
        module = module.to(memory_format=torch.channels_last)
    for p in module.backbone.parameters():
        p.requires_grad_(False)
    return module


def _torch_layers(weights: dict[str, dict[str, np.ndarray]]) -> tuple[Callable, Callable, Callable]:
    """(conv, bn, dense): each makes the torch layer of that kind holding the weights of the Keras
    layer it is named after (kernels transposed from Keras' HWIO / IO to torch's OIHW / OI)."""
    import torch
    from torch import nn

    def conv(name: str, stride: int = 1, padding: int = 0) -> nn.Conv2d:
        kernel, bias = weights[name]["kernel"], weights[name]["bias"]
        layer = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2], stride, padding)
        layer.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        layer.bias.data = torch.from_numpy(bias.copy())
        return layer

    def bn(name: str) -> nn.BatchNorm2d:
        w = weights[name]
        layer = nn.BatchNorm2d(len(w["gamma"]), eps=BN_EPSILON)
        for attr, key in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                          ("running_var", "moving_variance")):
            getattr(layer, attr).data = torch.from_numpy(w[key].copy())
        return layer

    def dense(name: str) -> nn.Linear:
        kernel, bias = weights[name]["kernel"], weights[name]["bias"]
        layer = nn.Linear(*kernel.shape)
        layer.weight.data = torch.from_numpy(kernel.T.copy())
        layer.bias.data = torch.from_numpy(bias.copy())
        return layer

    return conv, bn, dense


def _torch_backbone(conv: Callable, bn: Callable, channels_last_memory: bool):
    """The ResNet50 backbone as an nn.Module (NHWC RGB 0..255 -> pooled features), its layers made
    by _torch_layers' conv and bn."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Bottleneck(nn.Module):
        def __init__(self, name: str, stride: int, projection: bool):
            super().__init__()
            self.conv1, self.bn1 = conv(f"{name}_1_conv", stride), bn(f"{name}_1_bn")
            self.conv2, self.bn2 = conv(f"{name}_2_conv", 1, 1), bn(f"{name}_2_bn")
            self.conv3, self.bn3 = conv(f"{name}_3_conv"), bn(f"{name}_3_bn")
            self.shortcut = (nn.Sequential(conv(f"{name}_0_conv", stride), bn(f"{name}_0_bn"))
                             if projection else nn.Identity())

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = F.relu(self.bn2(self.conv2(y)))
            return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = conv("conv1_conv", 2, 3), bn("conv1_bn")
            self.blocks = nn.Sequential(*(Bottleneck(*b) for b in _blocks()))
            self.register_buffer("mean", torch.tensor(IMAGENET_BGR_MEAN).view(1, 3, 1, 1))

        def forward(self, images):  # NHWC RGB 0..255 -> pooled features
            x = images.permute(0, 3, 1, 2).flip(1) - self.mean  # RGB->BGR, NCHW, centre
            if channels_last_memory:
                x = x.contiguous(memory_format=torch.channels_last)
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)  # keras: ZeroPadding2D(1) + MaxPool
            return self.blocks(x).mean(dim=(2, 3))

    return Backbone()


def torch_native(model, learning_rate: float, channels_last_memory: bool = False) -> NativeModel:
    """The Keras `model` as plain PyTorch: an nn.Module, torch.optim.Adam on the head."""
    import torch

    module = torch_model(model, channels_last_memory)

    head_params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(head_params, lr=learning_rate)

    def features(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module.backbone(torch.from_numpy(images)).numpy()

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    def train_step(images: np.ndarray, labels: np.ndarray) -> float:
        module.train()
        module.backbone.eval()  # frozen BatchNorm stays in inference mode, as in keras
        optimizer.zero_grad(set_to_none=True)
        logits = module.logits(torch.from_numpy(images))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long())
        loss.backward()
        optimizer.step()
        module.eval()
        return float(loss.detach())

    return NativeModel(features, forward, train_step)


# ----------------------------------------------------------------------------- TensorFlow


def tensorflow_native(model, learning_rate: float) -> NativeModel:
    """The Keras `model` as plain tf.functions over tf.nn ops, with a hand-written Adam."""
    import tensorflow as tf

    weights = {layer: {k: tf.constant(v) for k, v in w.items()}
               for layer, w in keras_weights(model).items()}
    head = {name: {k: tf.Variable(v) for k, v in weights.pop(name).items()}
            for name in ("head_dense", "logits")}
    dropout = float(model.get_layer("head_dropout").rate)
    backbone = _tensorflow_backbone(weights)

    def logits(features, training: bool):
        h = tf.nn.relu(features @ head["head_dense"]["kernel"] + head["head_dense"]["bias"])
        if training and dropout:
            h = tf.nn.dropout(h, dropout)
        return h @ head["logits"]["kernel"] + head["logits"]["bias"]

    adam_step = _tensorflow_adam([v for layer in head.values() for v in layer.values()],
                                 learning_rate)
    features_fn = tf.function(backbone)

    @tf.function
    def forward_fn(images):
        return tf.nn.softmax(logits(backbone(images), training=False))

    @tf.function
    def train_fn(images, labels):
        features = tf.stop_gradient(backbone(images))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, logits(features, training=True)))
        adam_step(tape, loss)
        return loss

    return NativeModel(
        features=lambda images: features_fn(tf.constant(images)).numpy(),
        forward=lambda images: forward_fn(tf.constant(images)).numpy(),
        train_step=lambda images, labels: float(train_fn(tf.constant(images),
                                                         tf.constant(labels, tf.int32))),
    )


def _tensorflow_backbone(weights: dict[str, dict[str, Any]]) -> Callable:
    """The ResNet50 backbone over tf.nn ops with `weights` (constants): NHWC RGB 0..255 -> pooled
    features."""
    import tensorflow as tf

    mean = tf.constant(IMAGENET_BGR_MEAN, tf.float32)

    def conv(x, name, stride=1, padding="VALID"):
        w = weights[name]
        return tf.nn.bias_add(tf.nn.conv2d(x, w["kernel"], stride, padding), w["bias"])

    def bn(x, name):
        w = weights[name]
        return tf.nn.batch_normalization(x, w["moving_mean"], w["moving_variance"], w["beta"],
                                         w["gamma"], BN_EPSILON)

    def backbone(images):
        x = tf.reverse(images, axis=[-1]) - mean
        x = tf.pad(x, [[0, 0], [3, 3], [3, 3], [0, 0]])
        x = tf.nn.relu(bn(conv(x, "conv1_conv", 2), "conv1_bn"))
        x = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 2, "VALID")
        for name, stride, projection in _blocks():
            shortcut = bn(conv(x, f"{name}_0_conv", stride), f"{name}_0_bn") if projection else x
            y = tf.nn.relu(bn(conv(x, f"{name}_1_conv", stride), f"{name}_1_bn"))
            y = tf.nn.relu(bn(conv(y, f"{name}_2_conv", 1, "SAME"), f"{name}_2_bn"))
            x = tf.nn.relu(bn(conv(y, f"{name}_3_conv"), f"{name}_3_bn") + shortcut)
        return tf.reduce_mean(x, axis=[1, 2])

    return backbone


def _tensorflow_adam(variables: list, learning_rate: float) -> Callable:
    """step(tape, loss): one Adam update of `variables` from the tape's gradients of loss, as
    keras.optimizers.Adam(learning_rate) makes it (its moments live in the closure)."""
    import tensorflow as tf

    moments = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in variables]
    step = tf.Variable(0.0)

    def adam_step(tape, loss) -> None:
        step.assign_add(1.0)
        for v, g, (m, s) in zip(variables, tape.gradient(loss, variables), moments, strict=True):
            m.assign(0.9 * m + 0.1 * g)  # Adam, as keras.optimizers.Adam(learning_rate)
            s.assign(0.999 * s + 0.001 * g * g)
            m_hat, s_hat = m / (1 - 0.9**step), s / (1 - 0.999**step)
            v.assign_sub(learning_rate * m_hat / (tf.sqrt(s_hat) + 1e-7))

    return adam_step


def differences(keras_model, native: NativeModel, images: np.ndarray) -> dict[str, float]:
    """How far the native model is from the Keras one on the same images.

    probabilities_max_abs: max |Δ| of the class probabilities. With random weights these are
    often saturated at 0/1, so features_max_rel (max |Δ| of the pooled backbone features divided
    by their largest magnitude) is reported too: it tests the 53 convolutions themselves.
    """
    from flowers.model import feature_extractor, with_probabilities

    expected_features = np.asarray(feature_extractor(keras_model).predict_on_batch(images))
    expected = np.asarray(with_probabilities(keras_model).predict_on_batch(images), np.float32)
    scale = float(np.max(np.abs(expected_features))) or 1.0
    return {
        "probabilities_max_abs": float(np.max(np.abs(expected - native.forward(images)))),
        "features_max_rel": float(np.max(np.abs(expected_features - native.features(images)))) / scale,
    }
