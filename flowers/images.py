"""Images: the one decoder and the one resize, shared by training, predict, export, serve and parity.

Pillow decodes (`decode_image_bytes`), converting every mode (palette, 1-bit, grey, RGBA, CMYK) to
RGB; TensorFlow resizes (`resize_image`: bilinear with antialias, rounded to uint8). The folder
check, the tf.data pipeline, `flowers predict`, the served routes and the export checks all go
through these, so a file is read with the same pixels everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flowers.errors import FlowersError

# What Pillow may decode for training (format names as Pillow reports them).
IMAGE_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"}


def decode_image_bytes(data: bytes, draft_size: int | None = None) -> np.ndarray:
    """The one image decoder: an encoded file's bytes -> uint8 RGB [H, W, 3] (first frame).

    draft_size (the folder check only) lets JPEG decode at a reduced scale: every byte is still
    read and checked, in a fraction of the time.

    Raises:
        ValueError: not an image, an unsupported format, or a corrupt file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise ValueError(f"unsupported image format {image.format}")
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt ({exc})") from None


def resize_image(image, image_size: int):
    """Resize one decoded RGB image (any dtype, 0..255) to uint8 [image_size, image_size, 3]."""
    import tensorflow as tf

    resized = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_and_resize(data: bytes, image_size: int) -> np.ndarray:
    """An encoded image file's bytes -> uint8 [image_size, image_size, 3], as training sees it.

    `flowers predict` and `flowers serve` both go through here, so a served photo gets the same
    pixels as the same file given to predict.

    Raises:
        ValueError: not an image, an unsupported format, or a corrupt file.
    """
    return resize_image(decode_image_bytes(data), image_size).numpy()


def load_image_files(paths: Sequence[str | Path], image_size: int) -> np.ndarray:
    """Images for prediction, decoded exactly as training decodes them: uint8 [N,S,S,3].

    Raises:
        FlowersError: a file is missing, not an image, or corrupt.
    """
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FlowersError(f"image file not found: {path}")
        try:
            images.append(decode_and_resize(Path(path).read_bytes(), image_size))
        except ValueError as exc:
            raise FlowersError(f"cannot read image {path}: {exc}") from None
    return np.stack(images)


def image_problem(path: Path) -> str | None:
    """None when the file decodes with the training decoder, else what is wrong with it."""
    try:
        decode_image_bytes(path.read_bytes(), draft_size=64)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except ValueError as exc:
        return str(exc)
    return None
