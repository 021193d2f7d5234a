"""A learnable photo-like image set the suite makes itself, so a plain clone can test learning.

Twelve classes, each a shape (disc, ring, bar, triangle) filled with a texture (stripes, checks,
dots), on a shaded, noisy background, at a random position and scale, written as JPEG and PNG files
in class folders (train/<class>/, test/<class>/: the layout `data.source=folder:` reads, like
flowers12). Colour carries no class: the hues of shape, texture and background are drawn the same
way for every class, so a model has to see the shape and the texture, not the mean colour
(tests/unit/test_learnable.py proves both). Deterministic: the same seed gives the same bytes.

`python tests/learnable.py FOLDER` writes it (a few seconds with numpy and Pillow).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("disc", "ring", "bar", "triangle")
TEXTURES = ("stripes", "checks", "dots")
CLASSES = tuple(f"{shape}-{texture}" for shape in SHAPES for texture in TEXTURES)
TRAIN_PER_CLASS = 40
TEST_PER_CLASS = 15
SIZES_PX = (40, 48, 56)  # square images of these sides, drawn per image
PNG_EVERY = 4  # every 4th image a PNG, the rest JPEG
JPEG_QUALITY = 90


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One colour, hue in [0, 1): RGB floats in 0..255."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return 255 * value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside the shape; u, v: pixel coordinates centred on the shape, in units of its radius."""
    if shape == "disc":
        return u**2 + v**2 <= 1
    if shape == "ring":
        return (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.3)
    if shape == "bar":
        return (np.abs(u) <= 1.05) & (np.abs(v) <= 0.45)
    return (v <= 0.8) & (v >= 2.2 * np.abs(u) - 1.0)


def _texture(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The texture's foreground pixels (bool) over pixel coordinates x, y."""
    angle = rng.uniform(-0.25, 0.25)  # jitter around the texture's own orientation
    period = rng.uniform(7.0, 10.0)
    along = (x * np.cos(angle) + y * np.sin(angle)) / period
    across = (-x * np.sin(angle) + y * np.cos(angle)) / period
    phase = rng.uniform(0, 1, 2)
    if texture == "stripes":
        return (along + phase[0]) % 1 < 0.5
    if texture == "checks":
        return ((np.floor(along + phase[0]) + np.floor(across + phase[1])) % 2) == 0
    a, b = (along + phase[0]) % 1 - 0.5, (across + phase[1]) % 1 - 0.5
    return a**2 + b**2 < 0.09


def draw(class_index: int, rng: np.random.Generator) -> np.ndarray:
    """One image of the class: uint8 RGB, a square of a side from SIZES_PX."""
    shape, texture = SHAPES[class_index // len(TEXTURES)], TEXTURES[class_index % len(TEXTURES)]
    side = int(rng.choice(SIZES_PX))
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    # background: a random hue, shaded along a random direction (light falling on a scene)
    direction = rng.uniform(0, 2 * np.pi)
    shade = ((x * np.cos(direction) + y * np.sin(direction)) / side)[..., None]
    background = _hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9))
    image = background * (0.75 + 0.5 * shade)
    # the shape: random centre and radius, rotated a little, two random hues in its texture
    radius = side * rng.uniform(0.3, 0.45)
    cx, cy = rng.uniform(radius, side - radius, 2)
    turn = rng.uniform(-0.3, 0.3)
    u = ((x - cx) * np.cos(turn) + (y - cy) * np.sin(turn)) / radius
    v = (-(x - cx) * np.sin(turn) + (y - cy) * np.cos(turn)) / radius
    inside = _shape_mask(shape, u, v)
    pattern = _texture(texture, x, y, rng)
    ink = _hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    paper = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.1, 0.5))
    image = np.where((inside & pattern)[..., None], ink, np.where(inside[..., None], paper, image))
    image = image + rng.normal(0, 10, image.shape)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _encoded(pixels: np.ndarray, png: bool) -> bytes:
    buffer = io.BytesIO()
    if png:
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def make(root: Path, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS,
         test_per_class: int = TEST_PER_CLASS) -> Path:
    """Write the set under root (train/<class>/, test/<class>/); returns root.

    Each image has its own generator seeded by (seed, split, class, index), so the same seed gives
    the same bytes and a larger set starts with the images of a smaller one.
    """
    for split_index, (split, count) in enumerate((("train", train_per_class), ("test", test_per_class))):
        for class_index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_index, class_index, i])
                png = i % PNG_EVERY == PNG_EVERY - 1
                path = folder / f"{name}-{i:03d}.{'png' if png else 'jpg'}"
                path.write_bytes(_encoded(draw(class_index, rng), png))
    return root


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
