"""Open Inference Protocol (KServe v2) tensors: an infer request in, images out; probabilities out.

What a request may carry (checked strictly; every mistake is a ClientError naming it):
- exactly one input: "photos", BYTES [N] -- encoded JPEG/PNG files, base64 strings in JSON or raw
  bytes with Triton's binary-data extension -- or "images", UINT8 or FP32 [N, H, W, 3] RGB pixels
  in 0..255 (JSON numbers, nested or flat, or raw little-endian bytes). Both are decoded and resized
  exactly as `flowers predict` and the v1 routes do.
- "outputs" (optional): "probabilities", with the parameters `binary_data` (Triton's binary-data
  extension) and `classification` K (Triton's classification extension: BYTES [N, K] strings
  "probability:index:class", most probable first).
- "parameters": `binary_data_output` (every output as binary data), as tritonclient sends it.
- "id" is echoed back; "model_name" (kserve's client sends it) must name the served model.

The binary-data extension (Triton's, which tritonclient and kserve use by default): the body is the
JSON header followed by each binary tensor in input order; the header's length is in the
Inference-Header-Content-Length HTTP header and each binary input says its byte count in
parameters.binary_data_size. BYTES elements are each a 4-byte little-endian length, then the bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowers.serve.payload import (
    ClientError,
    decode_photo,
    from_base64,
    json_object,
    known_parameters,
    resize_pixels,
    whole_number,
)

HEADER_LENGTH = "inference-header-content-length"
PHOTOS, IMAGES, PROBABILITIES = "photos", "images", "probabilities"
PIXEL_TYPES = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
REQUEST_KEYS = {"id", "model_name", "parameters", "inputs", "outputs"}
INPUT_KEYS = {"name", "datatype", "shape", "data", "parameters"}
INPUT_FORMS = (f'one input: "{PHOTOS}" (BYTES [N], encoded JPEG/PNG files) or "{IMAGES}" '
               "(UINT8 or FP32 [N, H, W, 3], RGB 0..255)")


@dataclass
class InferRequest:
    """A checked infer request: the pixels or encoded photos, and how to answer."""

    photos: list[bytes] | None  # encoded files ("photos"), or
    pixels: np.ndarray | None  # [N, H, W, 3] ("images")
    binary_output: bool
    classification: int  # 0: the probabilities themselves
    id: str | None

    def decode(self, image_size: int) -> np.ndarray:
        """uint8 [N, S, S, 3]; CPU-bound (the app runs it in a decoding thread)."""
        if self.photos is not None:
            return np.stack([decode_photo(photo, f"{PHOTOS}[{i}]", image_size)
                             for i, photo in enumerate(self.photos)])
        return np.stack([resize_pixels(image, f"{IMAGES}[{i}]", image_size)
                         for i, image in enumerate(self.pixels)])


def parse_infer(body: bytes, header_length: str | None, model_name: str,
                max_instances: int) -> InferRequest:
    """Check an infer request body (and binary tensors after its JSON header).

    Raises:
        ClientError: 400 naming the first mistake.
    """
    header, binary = _split(body, header_length)
    request = json_object(header, "the request header", '{"inputs": [...]}')
    unknown = sorted(set(request) - REQUEST_KEYS)
    if unknown:
        raise ClientError(400, f"unknown key {unknown[0]!r}; an infer request has "
                               f"{', '.join(sorted(REQUEST_KEYS))}")
    if request.get("model_name", model_name) != model_name:
        raise ClientError(400, f"model_name {request['model_name']!r} is not this route's "
                               f"model {model_name!r}")
    binary_output = _request_parameters(request.get("parameters"))
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(400, f'"inputs" must hold {INPUT_FORMS}')
    name, values = _input(inputs[0], binary, max_instances)
    output_binary, classification = _outputs(request.get("outputs"))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ClientError(400, f'"id" must be a string, not {request_id!r}')
    return InferRequest(photos=values if name == PHOTOS else None,
                        pixels=values if name == IMAGES else None,
                        binary_output=binary_output if output_binary is None else output_binary,
                        classification=classification, id=request_id)


def encode_response(request: InferRequest, probabilities: np.ndarray, class_names: list[str],
                    model_name: str, model_version: str) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the infer response; binary outputs follow the JSON header."""
    probabilities = np.asarray(probabilities, dtype="<f4")
    if request.classification:
        k = min(request.classification, probabilities.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        labels = [f"{row[i]:f}:{i}:{class_names[i]}" for row, top in zip(probabilities, order, strict=True)
                  for i in top]
        output = {"name": PROBABILITIES, "datatype": "BYTES", "shape": [len(probabilities), k]}
        data, raw = labels, serialize_bytes([label.encode() for label in labels])
    else:
        output = {"name": PROBABILITIES, "datatype": "FP32", "shape": list(probabilities.shape)}
        data, raw = probabilities.ravel().tolist(), probabilities.tobytes()
    if request.binary_output:
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = data
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                                "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not request.binary_output:
        return header, {"content-type": "application/json"}
    return header + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def model_metadata(name: str, version: str, platform: str, image_size: int,
                   class_names: list[str]) -> dict[str, Any]:
    """GET /v2/models/<name>: the protocol's model metadata, with the class names as a parameter."""
    return {
        "name": name, "versions": [version], "platform": platform,
        "inputs": [{"name": PHOTOS, "datatype": "BYTES", "shape": [-1]},
                   {"name": IMAGES, "datatype": "UINT8", "shape": [-1, image_size, image_size, 3]}],
        "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(class_names)]}],
        "parameters": {"class_names": class_names, "image_size": image_size,
                       "images_datatypes": sorted(PIXEL_TYPES)},
    }


def serialize_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the binary-data extension: each a 4-byte little-endian length, then it."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(raw: bytes, what: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ClientError(400, f"{what}: binary BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ClientError(400, f"{what}: binary BYTES element of {size} bytes runs past the data")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
        raise ClientError(400, f"Inference-Header-Content-Length {header_length!r} is not a byte "
                               f"count within the body's {len(body)} bytes")
    return body[:int(header_length)], body[int(header_length):]


def _request_parameters(parameters: Any) -> bool:
    """binary_data_output, the one request parameter this server reads."""
    known = known_parameters(parameters, {"binary_data_output"})
    return _flag(known.get("binary_data_output", False), "binary_data_output")


def _outputs(outputs: Any) -> tuple[bool | None, int]:
    """(binary_data of the requested output or None, classification K or 0)."""
    if outputs is None:
        return None, 0
    if (not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict)
            or outputs[0].get("name") != PROBABILITIES):
        raise ClientError(400, f'"outputs" may name one output, "{PROBABILITIES}"')
    parameters = outputs[0].get("parameters") or {}
    if not isinstance(parameters, dict) or set(parameters) - {"binary_data", "classification"}:
        raise ClientError(400, f'the parameters of output "{PROBABILITIES}" are binary_data and '
                               "classification")
    binary = parameters.get("binary_data")
    classification = parameters.get("classification", 0)
    return (None if binary is None else _flag(binary, "binary_data"),
            0 if classification == 0 else whole_number(classification, "classification"))


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ClientError(400, f"{name} must be true or false, not {value!r}")
    return value


def _input(tensor: dict[str, Any], binary: bytes,
           max_instances: int) -> tuple[str, list[bytes] | np.ndarray]:
    """(name, encoded photos or pixels) of the one input; consumes all of `binary`."""
    unknown = sorted(set(tensor) - INPUT_KEYS)
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if unknown:
        raise ClientError(400, f"input {name!r}: unknown key {unknown[0]!r}")
    if name not in (PHOTOS, IMAGES):
        raise ClientError(400, f"unknown input {name!r}; send {INPUT_FORMS}")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ClientError(400, f"input {name!r}: shape must be a list of whole numbers, not {shape!r}")
    count = shape[0]
    if not 1 <= count <= max_instances:
        raise ClientError(400, f"input {name!r}: {count} items; this server takes 1 to "
                               f"{max_instances} per request")
    raw = _binary_part(tensor, binary, name)
    if name == PHOTOS:
        return name, _photos(tensor, datatype, shape, raw)
    return name, _pixels(tensor, datatype, shape, raw)


def _binary_part(tensor: dict[str, Any], binary: bytes, name: str) -> bytes | None:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict) or set(parameters) - {"binary_data_size"}:
        raise ClientError(400, f"input {name!r}: the one input parameter is binary_data_size")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise ClientError(400, f"{len(binary)} bytes follow the JSON header but input "
                                   f"{name!r} has no binary_data_size")
        return None
    if "data" in tensor:
        raise ClientError(400, f"input {name!r} has both data and binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ClientError(400, f"input {name!r}: binary_data_size {size!r}, but {len(binary)} "
                               "bytes follow the JSON header (Inference-Header-Content-Length)")
    return binary


def _photos(tensor: dict[str, Any], datatype: Any, shape: list[int], raw: bytes | None) -> list[bytes]:
    if datatype != "BYTES":
        raise ClientError(400, f'input "{PHOTOS}" is BYTES (encoded files), not {datatype!r}')
    if math.prod(shape) != shape[0]:
        raise ClientError(400, f'input "{PHOTOS}": shape {shape}; expected [N] (one file each)')
    if raw is not None:
        photos = deserialize_bytes(raw, f'input "{PHOTOS}"')
    else:
        data = _flat(tensor.get("data"), PHOTOS)
        if not all(isinstance(item, str) for item in data):
            raise ClientError(400, f'input "{PHOTOS}": in JSON each file is a base64 string')
        photos = [from_base64(item, f"{PHOTOS}[{i}]") for i, item in enumerate(data)]
    if len(photos) != shape[0]:
        raise ClientError(400, f'input "{PHOTOS}": shape {shape} but {len(photos)} files')
    return photos


def _pixels(tensor: dict[str, Any], datatype: Any, shape: list[int], raw: bytes | None) -> np.ndarray:
    if datatype not in PIXEL_TYPES:
        raise ClientError(400, f'input "{IMAGES}" is UINT8 or FP32, not {datatype!r}')
    if len(shape) != 4 or shape[3] != 3 or 0 in shape:
        raise ClientError(400, f'input "{IMAGES}": shape {shape}; expected [N, H, W, 3] (RGB)')
    dtype, size = PIXEL_TYPES[datatype], math.prod(shape)
    if raw is not None:
        if len(raw) != size * dtype.itemsize:
            raise ClientError(400, f'input "{IMAGES}": {len(raw)} bytes of binary data; shape '
                                   f"{shape} of {datatype} is {size * dtype.itemsize}")
        return np.frombuffer(raw, dtype).reshape(shape).astype(np.float32)
    data = _flat(tensor.get("data"), IMAGES)
    numbers = (int, float) if datatype == "FP32" else (int,)
    if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in data):
        raise ClientError(400, f'input "{IMAGES}": {datatype} data must be '
                               f"{'numbers' if datatype == 'FP32' else 'whole numbers'}")
    if len(data) != size:
        raise ClientError(400, f'input "{IMAGES}": {len(data)} values; shape {shape} needs {size}')
    return np.asarray(data, np.float32).reshape(shape)


def _flat(data: Any, name: str) -> list[Any]:
    """The protocol allows row-major flat or nested lists: flattened, or a 400."""
    if not isinstance(data, list):
        raise ClientError(400, f"input {name!r}: data must be a list (or use binary_data_size)")
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat
