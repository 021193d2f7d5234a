"""The same random draws under every backend: initial weights and dropout masks (train.portable_random).

With one `keras.utils.set_random_seed`, Keras draws different numbers under torch, tensorflow and jax:
each backend has its own generator (torch's Philox/MT, TensorFlow's stateless threefry, jax's
threefry with another key schedule). A backend comparison would then compare one random draw per
backend. This module replaces the two draws a training run makes:

- Initial weights: every weight that is not loaded from a file is set from numpy's Philox generator
  keyed by (train.seed, the weight's path), following the initializer the layer created it with
  (`initial_values`). Layers record their initializers while the model is built
  (`recording_initializers`: Keras variables do not keep theirs). An initializer this module does
  not know is refused in one line naming the layer, unless train.portable_random is off.
- Dropout masks: `PortableDropout` draws its mask from a counter-based integer hash of
  (train.seed, the layer's name, the training step, the element's index), computed with int32
  `keras.ops` (wrapping multiplication, xor, logical shifts emulated by masking arithmetic ones),
  whose bits are identical under every backend. Its step counter is a weight, so the epoch
  checkpoint saves it and a resumed run draws the masks an uninterrupted one would.

Data order and augmentation are drawn from the seed by tf.data for every backend already
(flowers/data.py). Import only after flowers.backend.select(): it imports keras.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from collections.abc import Iterable, Iterator

import keras
import numpy as np
from keras import ops

from flowers.errors import FlowersError

# keras.random's truncated normal redraws values beyond 2 standard deviations; VarianceScaling
# divides its standard deviation by this (the sd of a unit normal truncated to [-2, 2]).
TRUNCATED_NORMAL_SD = 0.87962566103423978
# random layers PortableDropout replaces (SpatialDropout1D/2D/3D are Dropout subclasses)
PORTABLE_KINDS = (keras.layers.Dropout,)
MASK_BITS = 24  # uniform draws in [0, 2**24): exact in float32, so the threshold compare is exact


@contextlib.contextmanager
def recording_initializers() -> Iterator[dict[int, tuple[object, str]]]:
    """Within this block, every Layer.add_weight records {id(variable): (initializer, layer name)}.

    Keras variables drop their initializer once initialised, and layers name theirs by convention
    only (kernel_initializer, depthwise_initializer, gamma_initializer, ...), so the one reliable
    place to learn a weight's initializer is the add_weight call that made it (KerasHub and custom
    layers included).
    """
    original = keras.layers.Layer.add_weight
    signature = inspect.signature(original)
    records: dict[int, tuple[object, str]] = {}

    def add_weight(self, *args, **kwargs):
        variable = original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        initializer = bound.arguments.get("initializer")
        if initializer is None:  # Layer.add_weight's own default
            initializer = "glorot_uniform" if "float" in str(variable.dtype) else "zeros"
        records[id(variable)] = (keras.initializers.get(initializer)
                                 if isinstance(initializer, str | dict) else initializer, self.name)
        return variable

    keras.layers.Layer.add_weight = add_weight
    try:
        yield records
    finally:
        keras.layers.Layer.add_weight = original


def initialize(model: keras.Model, seed: int, records: dict[int, tuple[object, str]],
               loaded: Iterable = ()) -> int:
    """Set every weight of `model` but the `loaded` ones from (seed, its path) (see
    initial_values); returns how many it set.

    Raises:
        FlowersError: a weight whose initializer is unknown here, or that was made outside
            recording_initializers (one line naming the layer, and how to turn this off).
    """
    skip = {id(v) for v in loaded}
    count = 0
    for variable in model.weights:
        if id(variable) in skip:
            continue
        if id(variable) not in records:
            raise FlowersError(f"train.portable_random: weight {variable.path!r} was not created by "
                               "Layer.add_weight while the model was built, so its initializer is "
                               "unknown; set train.portable_random=false")
        initializer, layer_name = records[id(variable)]
        shape = tuple(int(d) for d in variable.shape)
        value = initial_values(initializer, shape, seed, variable.path, layer_name)
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))
        count += 1
    return count


def initial_values(initializer: object, shape: tuple[int, ...], seed: int, path: str,
                   layer_name: str = "?") -> np.ndarray:
    """What `initializer` would draw for a weight of `shape`, from numpy's Philox keyed by
    (seed, path): the same numbers under every backend. Follows Keras' definitions (the
    VarianceScaling family's fans and truncation; Orthogonal's QR with sign fix)."""
    init = keras.initializers
    rng = np.random.Generator(np.random.Philox(key=_key(seed, path)))
    if isinstance(initializer, np.ndarray | int | float):
        return np.broadcast_to(np.asarray(initializer), shape).copy()
    if isinstance(initializer, init.Zeros):
        return np.zeros(shape)
    if isinstance(initializer, init.Ones):
        return np.ones(shape)
    if isinstance(initializer, init.Constant):
        return np.full(shape, float(np.asarray(initializer.value)))
    if isinstance(initializer, init.VarianceScaling):
        return _variance_scaling(initializer, shape, rng)
    if isinstance(initializer, init.TruncatedNormal):
        return initializer.mean + initializer.stddev * _truncated_normal(rng, shape)
    if isinstance(initializer, init.RandomNormal):
        return initializer.mean + initializer.stddev * rng.standard_normal(shape)
    if isinstance(initializer, init.RandomUniform):
        return rng.uniform(initializer.minval, initializer.maxval, shape)
    if isinstance(initializer, init.Orthogonal):
        return _orthogonal(initializer.gain, shape, rng)
    if isinstance(initializer, init.Identity):
        if len(shape) != 2:
            raise FlowersError(f"train.portable_random: layer {layer_name!r}: Identity initializer "
                               f"needs a 2-D weight, got shape {shape}")
        return initializer.gain * np.eye(*shape)
    name = type(initializer).__name__
    raise FlowersError(f"train.portable_random: layer {layer_name!r} weight {path!r} uses the "
                       f"initializer {name}, which flowers cannot draw identically under every "
                       "backend; set train.portable_random=false to use the backend's own draws")


def _key(seed: int, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{path}".encode()).digest()[:16], "little")


def _variance_scaling(initializer, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    from keras.src.initializers.random_initializers import compute_fans  # Keras' own fan rule

    fan_in, fan_out = compute_fans(shape, getattr(initializer, "input_axes", None),
                                   getattr(initializer, "output_axes", None))
    scale = initializer.scale / max(1.0, {"fan_in": fan_in, "fan_out": fan_out}.get(
        initializer.mode, (fan_in + fan_out) / 2.0))
    if initializer.distribution == "truncated_normal":
        return math.sqrt(scale) / TRUNCATED_NORMAL_SD * _truncated_normal(rng, shape)
    if initializer.distribution == "untruncated_normal":
        return math.sqrt(scale) * rng.standard_normal(shape)
    limit = math.sqrt(3.0 * scale)
    return rng.uniform(-limit, limit, shape)


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit normal draws, each beyond 2 standard deviations drawn again (keras.random's rule)."""
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return values


def _orthogonal(gain: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return gain * q.reshape(shape)


# lowbias32 (Chris Wellons' hash-prospector): an invertible 32-bit mix with good avalanche. Its
# second multiplier does not fit int32 and is written as its two's-complement value.
_MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B - 2**32)


def _shift_right(x, bits: int):
    """Logical right shift of int32 values: the arithmetic shift with the sign bits masked off."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _mix(x):
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = ops.multiply(x, ops.convert_to_tensor(np.int32(_MIX_MULTIPLIERS[0])))
    x = ops.bitwise_xor(x, _shift_right(x, 15))
    x = ops.multiply(x, ops.convert_to_tensor(np.int32(_MIX_MULTIPLIERS[1])))
    return ops.bitwise_xor(x, _shift_right(x, 16))


def _layer_keys(seed: int, name: str) -> tuple[int, int]:
    digest = hashlib.sha256(f"dropout/{seed}/{name}".encode()).digest()
    return tuple(int(np.frombuffer(digest[i:i + 4], "<i4")[0]) for i in (0, 4))


def uniform_bits(shape, keys: tuple[int, int], step):
    """int32 values in [0, 2**MASK_BITS) for every element of `shape` at training step `step`,
    from (keys, step, the element's row-major index) alone: the same under every backend."""
    index = ops.zeros((), "int32")
    for axis, size in enumerate(shape):
        steps = ops.arange(size, dtype="int32")
        index = index * ops.cast(size, "int32") + ops.reshape(
            steps, [-1 if a == axis else 1 for a in range(len(shape))])
    stream = _mix(ops.bitwise_xor(ops.cast(step, "int32"), keys[0]))
    value = _mix(ops.bitwise_xor(_mix(index + stream), keys[1]))
    return _shift_right(value, 32 - MASK_BITS)


@keras.saving.register_keras_serializable(package="flowers")
class PortableDropout(keras.layers.Layer):
    """keras.layers.Dropout whose masks are the same under every backend for one (seed, name, step).

    `noise_shape` is Dropout's (None: the input's size on that axis; 1: one draw shared along it),
    so SpatialDropout and EfficientNet's stochastic depth (noise_shape (None, 1, 1, 1)) map onto it.
    Kept values are scaled by 1 / (1 - rate), as Keras does. The `step` weight counts the training
    calls; inference calls change nothing.
    """

    def __init__(self, rate: float, seed: int = 0, noise_shape=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise FlowersError(f"dropout rate {rate!r}: must be in [0, 1)")
        self.rate, self.seed = float(rate), int(seed)
        self.noise_shape = None if noise_shape is None else tuple(noise_shape)
        self.supports_masking = True
        self._keys = _layer_keys(self.seed, self.name)
        self._threshold = int(round(self.rate * 2**MASK_BITS))

    def build(self, input_shape):
        self.step = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                    name="step")

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        shape = ops.shape(inputs)
        noise = shape if self.noise_shape is None else \
            [size if given is None else given for size, given in zip(shape, self.noise_shape, strict=True)]
        keep = uniform_bits(noise, self._keys, self.step) >= self._threshold
        scale = ops.cast(1.0 / (1.0 - self.rate), inputs.dtype)
        outputs = ops.where(keep, inputs * scale, ops.zeros_like(inputs))
        # After the mask is drawn: under torch and tensorflow a variable converted to a tensor can
        # be the variable itself, which the assignment would change before it is read.
        self.step.assign(self.step + 1)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed,
                "noise_shape": self.noise_shape}


def dropout_noise_shape(layer: keras.layers.Dropout) -> tuple | None:
    """The noise shape of a Keras Dropout layer, SpatialDropout's included (None = elementwise)."""
    spatial = {keras.layers.SpatialDropout1D: (None, 1, None)}
    for kind, rank in ((keras.layers.SpatialDropout2D, 4), (keras.layers.SpatialDropout3D, 5)):
        if isinstance(layer, kind):
            ones = (1,) * (rank - 2)
            return (None, *ones, None) if layer.data_format == "channels_last" else (None, None, *ones)
    for kind, shape in spatial.items():
        if isinstance(layer, kind):
            return shape
    return layer.noise_shape


def portable_layer(layer: keras.layers.Layer, seed: int) -> keras.layers.Layer:
    """The PortableDropout standing in for a Keras Dropout (same name and rate); other layers as a
    fresh copy from their config (keras.models.clone_model's default)."""
    if type(layer) in (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
                       keras.layers.SpatialDropout3D):
        return PortableDropout(layer.rate, seed, dropout_noise_shape(layer), name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def random_layers(model: keras.Model, skip: Iterable = ()) -> tuple[list[str], list[str]]:
    """(portable dropout layers, other random layers) of `model` that run in training mode: every
    layer with a Keras SeedGenerator is a random one; layers inside `skip` (frozen backbones, run in
    inference mode) never draw."""
    skipped = {id(layer) for inner in skip for layer in _all_layers(inner)}
    portable, other = [], []
    for layer in _all_layers(model):
        if id(layer) in skipped:
            continue
        if isinstance(layer, PortableDropout):
            portable.append(layer.name)
        elif getattr(layer, "seed_generator", None) is not None:
            other.append(f"{layer.name} ({type(layer).__name__})")
    return portable, other


def summary(model: keras.Model, enabled: bool, frozen: Iterable = (), weights_loaded: int = 0) -> dict:
    """metrics.json "portable_random": whether it was on, how many weights were drawn portably and
    loaded from a file, the portable dropout layers, and every random layer that trains with the
    backend's own draws ("not_portable": the report names them)."""
    portable, other = random_layers(model, frozen)
    return {"enabled": enabled,
            "weights_initialized": len(model.weights) - weights_loaded if enabled else 0,
            "weights_loaded": weights_loaded, "dropout_layers": portable, "not_portable": other}


def _all_layers(model) -> list:
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        inner = getattr(layer, "layer", None)  # a Wrapper (InferenceMode)
        found.extend(_all_layers(inner) if inner is not None else [])
        found.extend(_all_layers(layer) if isinstance(layer, keras.Model) else [])
    return found
