"""Broken custom backbones for tests/test_backbones.py (model.backbone = "tests.backbone_fixtures:NAME")."""

import keras


def not_a_model(input_shape, weights):
    return "a string"


def wrong_input(input_shape, weights):
    inputs = keras.Input(shape=(input_shape[0] + 1, input_shape[1], 3))
    return keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))


def raises(input_shape, weights):
    raise RuntimeError("weights server said no")


def blind(input_shape, weights):
    """A backbone whose features ignore the image (all zeros): nothing for parity to compare."""
    inputs = keras.Input(shape=input_shape)
    zeros = keras.layers.Lambda(lambda x: keras.ops.zeros_like(x[..., :8]))(inputs)
    return keras.Model(inputs, zeros)
