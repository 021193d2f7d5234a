"""Request bodies in, images out: the Vertex AI / TF Serving "instances" format, checked strictly.

A body is {"instances": [...], "parameters": {"top_k": K}} ("signature_name" is accepted and
ignored, as TF Serving clients send it). An instance is {"b64": "<base64 of a JPEG/PNG/... file>"}
(the TF Serving and Vertex AI convention for binary data) or a nested list of RGB pixels [H, W, 3]
in 0..255. Both are resized by flowers.data exactly as training did. Every mistake raises a
ClientError with the HTTP status and a message that names the instance and what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowers import images

DEFAULT_TOP_K = 5
KNOWN_KEYS = {"instances", "parameters", "signature_name"}
KNOWN_PARAMETERS = {"top_k"}
INSTANCE_FORMS = 'an instance is {"b64": "<base64 JPEG/PNG>"} or an [H, W, 3] array of 0..255 pixels'


class ClientError(Exception):
    """A request the client has to change: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PredictRequest:
    instances: list[Any]
    top_k: int


def parse_body(body: bytes, max_instances: int) -> PredictRequest:
    """Check a predict body's JSON structure (the cheap part; images are decoded later).

    Raises:
        ClientError: 400 for non-JSON, a missing or empty "instances", unknown keys or parameters,
            a bad top_k, or more than max_instances instances.
    """
    request = json_object(body, "the body", '{"instances": [...]}')
    if "inputs" in request:
        raise ClientError(400, 'the columnar "inputs" format is not supported; send '
                               '{"instances": [...]}')
    unknown = sorted(set(request) - KNOWN_KEYS)
    if unknown:
        raise ClientError(400, f"unknown key {unknown[0]!r}; a request has "
                               f"{', '.join(sorted(KNOWN_KEYS))}")
    instances = request.get("instances")
    if instances is None:
        raise ClientError(400, 'missing "instances": send {"instances": [...]}')
    if not isinstance(instances, list) or not instances:
        raise ClientError(400, '"instances" must be a non-empty list')
    if len(instances) > max_instances:
        raise ClientError(400, f"{len(instances)} instances; this server takes at most "
                               f"{max_instances} per request")
    return PredictRequest(instances=instances, top_k=_top_k(request.get("parameters")))


def json_object(text: bytes, what: str, form: str) -> dict[str, Any]:
    """`text` parsed as one JSON object; `what` and `form` name it in the 400 otherwise."""
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientError(400, f"{what} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ClientError(400, f"{what} must be a JSON object {form}")
    return value


def decode_instances(instances: list[Any], image_size: int) -> np.ndarray:
    """uint8 images [N, image_size, image_size, 3], decoded and resized as training did.

    CPU-bound (Pillow, TensorFlow's resize): the app runs it in a thread pool.

    Raises:
        ClientError: 400 naming the first bad instance.
    """
    return np.stack([_decode_instance(instance, index, image_size)
                     for index, instance in enumerate(instances)])


def _decode_instance(instance: Any, index: int, image_size: int) -> np.ndarray:
    if isinstance(instance, dict):
        if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise ClientError(400, f"instance {index}: {INSTANCE_FORMS}")
        return decode_photo(from_base64(instance["b64"], f"instance {index}"), f"instance {index}",
                            image_size)
    if isinstance(instance, list):
        return resize_pixels(_pixels(instance, index), f"instance {index}", image_size)
    raise ClientError(400, f"instance {index}: {INSTANCE_FORMS}")


def from_base64(text: str, what: str) -> bytes:
    """Strict base64 (no stray characters) -> bytes; `what` names the input in the error."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(400, f"{what}: bad base64 ({exc})") from None


def decode_photo(encoded: bytes, what: str, image_size: int) -> np.ndarray:
    """An encoded JPEG/PNG/... file -> uint8 [S, S, 3], as `flowers predict` reads it (every protocol)."""
    try:
        return images.decode_and_resize(encoded, image_size)
    except ValueError as exc:
        raise ClientError(400, f"{what}: cannot read the image: {exc}") from None


def resize_pixels(pixels: np.ndarray, what: str, image_size: int) -> np.ndarray:
    """RGB pixels [H, W, 3] of any numeric type -> uint8 [S, S, 3], as training resizes them.

    Raises:
        ClientError: 400 for values outside 0..255 (or NaN).
    """
    if not np.all(np.isfinite(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        raise ClientError(400, f"{what}: pixel values must be within 0..255")
    return images.resize_image(pixels, image_size).numpy()


def _pixels(instance: list, index: int) -> np.ndarray:
    try:
        pixels = np.asarray(instance, dtype=np.float32)
    except (ValueError, TypeError):
        raise ClientError(400, f"instance {index}: not a rectangular array of numbers; "
                               f"{INSTANCE_FORMS}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ClientError(400, f"instance {index}: pixel array of shape {list(pixels.shape)}; "
                               "expected [H, W, 3] (RGB)")
    return pixels


def _top_k(parameters: Any) -> int:
    return whole_number(known_parameters(parameters, KNOWN_PARAMETERS).get("top_k", DEFAULT_TOP_K),
                        "top_k")


def known_parameters(parameters: Any, known: set[str]) -> dict[str, Any]:
    """A request's "parameters" object ({} when absent), holding only `known` names.

    Raises:
        ClientError: 400 for a non-object or an unknown name.
    """
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ClientError(400, f'"parameters" must be an object such as {{"{min(known)}": ...}}')
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ClientError(400, f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return parameters


def whole_number(value: Any, name: str) -> int:
    """A parameter that must be a whole number >= 1. An integral double (2.0) counts: Google's
    clients send every number as a protobuf Struct double; {"top_k": true} is a mistake, not 1.

    Raises:
        ClientError: 400 naming the parameter and the value.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ClientError(400, f"{name} must be a whole number of at least 1, not {value!r}")
    return value
