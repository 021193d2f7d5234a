"""flowers.serve.oip_codec: Open Inference Protocol requests checked strictly; responses that clients read."""

import base64
import json

import numpy as np
import pytest

from flowers.serve.oip_codec import (
    InferRequest,
    deserialize_bytes,
    encode_response,
    model_metadata,
    parse_infer,
    serialize_bytes,
)
from flowers.serve.payload import ClientError

NAMES = ["daisy", "rose", "tulip"]


def parse(request: dict, binary: bytes = b"", max_instances: int = 8) -> InferRequest:
    header = json.dumps(request).encode()
    return parse_infer(header + binary, str(len(header)) if binary else None, "flowers", max_instances)


def photos(*items: str) -> dict:
    return {"name": "photos", "datatype": "BYTES", "shape": [len(items)], "data": list(items)}


def test_json_photos_are_base64_files_and_the_id_comes_back():
    request = parse({"id": "a", "model_name": "flowers",
                     "inputs": [photos(base64.b64encode(b"jpeg1").decode(), "anBlZzI=")]})
    assert request.photos == [b"jpeg1", b"jpeg2"] and request.pixels is None and len(request.photos) == 2
    assert (request.id, request.binary_output, request.classification) == ("a", False, 0)


def test_binary_photos_and_pixels_follow_the_json_header():
    raw = serialize_bytes([b"first", b""])
    request = parse({"inputs": [{"name": "photos", "datatype": "BYTES", "shape": [2],
                                 "parameters": {"binary_data_size": len(raw)}}],
                     "parameters": {"binary_data_output": True}}, raw)
    assert request.photos == [b"first", b""] and request.binary_output
    pixels = np.arange(2 * 2 * 2 * 3, dtype="<f4").reshape(2, 2, 2, 3)
    request = parse({"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 2, 2, 3],
                                 "parameters": {"binary_data_size": pixels.nbytes}}]}, pixels.tobytes())
    assert np.array_equal(request.pixels, pixels)


def test_nested_and_flat_json_pixels_are_the_same_tensor():
    nested = np.arange(12).reshape(1, 2, 2, 3)
    flat = parse({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                              "data": nested.ravel().tolist()}]})
    deep = parse({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                              "data": nested.tolist()}]})
    assert np.array_equal(flat.pixels, nested) and np.array_equal(deep.pixels, nested)


def test_a_requested_output_sets_binary_and_classification():
    request = parse({"inputs": [photos("eA==")], "parameters": {"binary_data_output": True},
                     "outputs": [{"name": "probabilities", "parameters": {"binary_data": False,
                                                                          "classification": 2.0}}]})
    assert request.binary_output is False and request.classification == 2


@pytest.mark.parametrize(("request_body", "message"), [
    ({"inputs": [photos("eA==")], "extra": 1}, "unknown key 'extra'"),
    ({"inputs": [photos("eA==")], "model_name": "roses"}, "model_name 'roses' is not this route's"),
    ({"inputs": [photos("eA=="), photos("eA==")]}, '"inputs" must hold one input'),
    ({"inputs": [{**photos("eA=="), "name": "pixels"}]}, "unknown input 'pixels'"),
    ({"inputs": [{**photos("eA=="), "datatype": "FP32"}]}, 'input "photos" is BYTES'),
    ({"inputs": [{**photos("eA=="), "shape": [1, 2]}]}, "expected [N] (one file each)"),
    ({"inputs": [{**photos("eA=="), "shape": [2]}]}, "shape [2] but 1 files"),
    ({"inputs": [{**photos("eA=="), "shape": "1"}]}, "shape must be a list of whole numbers"),
    ({"inputs": [photos(*["eA=="] * 9)]}, "9 items; this server takes 1 to 8"),
    ({"inputs": [{**photos("eA=="), "shape": [0]}]}, "0 items"),
    ({"inputs": [photos(7)]}, "each file is a base64 string"),
    ({"inputs": [{**photos("eA=="), "data": "eA=="}]}, "data must be a list"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 2.5]}]},
     "UINT8 data must be whole numbers"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [1, 2, True]}]},
     "FP32 data must be numbers"),
    ({"inputs": [photos("eA==")], "parameters": {"binary_data_output": "yes"}},
     "binary_data_output must be true or false"),
    ({"inputs": [photos("eA==")], "outputs": [{"name": "probabilities", "parameters": {"top_k": 1}}]},
     "parameters of output"),
    ({"inputs": [photos("eA==")], "outputs": [{"name": "probabilities",
                                               "parameters": {"classification": 0.5}}]},
     "classification must be a whole number"),
    ({"inputs": [{**photos("eA=="), "parameters": {"binary_data_size": 4}}]},
     "both data and binary_data_size"),
    ({"inputs": [photos("eA==")], "id": 3}, '"id" must be a string'),
])
def test_each_mistake_is_a_400_that_names_it(request_body, message):
    with pytest.raises(ClientError) as error:
        parse(request_body)
    assert error.value.status == 400 and message in error.value.message, error.value.message
    assert "\n" not in error.value.message


@pytest.mark.parametrize(("header_length", "message"), [
    ("x", "is not a byte count"),
    ("0", "is not a byte count"),
    ("99999", "is not a byte count"),
    (None, "binary_data_size 9, but 0 bytes follow the JSON header"),  # no header: no binary part
])
def test_binary_framing_mistakes(header_length, message):
    header = json.dumps({"inputs": [{"name": "photos", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 9}}]}).encode()
    with pytest.raises(ClientError) as error:
        parse_infer(header + b"x" * 9, header_length, "flowers", 8) if header_length else \
            parse_infer(header, None, "flowers", 8)
    assert message in error.value.message, error.value.message


def test_binary_sizes_must_add_up():
    raw = serialize_bytes([b"abc"])
    header = {"inputs": [{"name": "photos", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": len(raw) + 1}}]}
    with pytest.raises(ClientError, match="binary_data_size 8, but 7 bytes follow"):
        parse(header, raw)
    with pytest.raises(ClientError, match="ends inside an element's length"):
        deserialize_bytes(raw + b"\x01", "photos")
    with pytest.raises(ClientError, match="runs past the data"):
        deserialize_bytes(raw[:-1], "photos")
    pixels = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 1, 3],
                          "parameters": {"binary_data_size": 2}}]}
    with pytest.raises(ClientError, match="2 bytes of binary data; shape"):
        parse(pixels, b"\x00\x00")


def test_bytes_serialization_round_trips():
    items = [b"", b"a", bytes(range(256)) * 3]
    assert deserialize_bytes(serialize_bytes(items), "x") == items


def test_json_and_binary_responses_carry_the_same_probabilities():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    request = parse({"id": "r", "inputs": [photos("eA==", "eA==")]})
    body, headers = encode_response(request, probabilities, NAMES, "flowers", "3")
    answer = json.loads(body)
    assert headers["content-type"] == "application/json" and answer["id"] == "r"
    assert answer["model_name"] == "flowers" and answer["model_version"] == "3"
    output = answer["outputs"][0]
    assert output["shape"] == [2, 3] and np.array_equal(np.float32(output["data"]), probabilities.ravel())

    request.binary_output = True
    body, headers = encode_response(request, probabilities, NAMES, "flowers", "3")
    length = int(headers["inference-header-content-length"])
    output = json.loads(body[:length])["outputs"][0]
    assert output["parameters"]["binary_data_size"] == len(body) - length and "data" not in output
    assert np.array_equal(np.frombuffer(body[length:], "<f4").reshape(2, 3), probabilities)


def test_classification_is_tritons_value_index_label_most_probable_first():
    probabilities = np.array([[0.1, 0.7, 0.2]], np.float32)
    request = parse({"inputs": [photos("eA==")], "outputs": [
        {"name": "probabilities", "parameters": {"classification": 5}}]})
    output = json.loads(encode_response(request, probabilities, NAMES, "flowers", "1")[0])["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 3]  # at most the 3 classes
    assert output["data"] == ["0.700000:1:rose", "0.200000:2:tulip", "0.100000:0:daisy"]


def test_metadata_names_the_inputs_outputs_and_classes():
    metadata = model_metadata("flowers", "2", "onnx", 224, NAMES)
    assert metadata["inputs"][1] == {"name": "images", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["parameters"]["class_names"] == NAMES and metadata["versions"] == ["2"]


def test_the_load_tests_v2_bodies_are_what_the_server_parses():
    from flowers.serve.loadtest import request_bodies

    photos = [base64.b64encode(b"photo-%d" % i).decode() for i in range(3)]
    for protocol in ("v2", "v2-binary"):
        bodies = request_bodies(protocol, photos, instances=2)
        assert len(bodies) == 3
        body, headers = bodies[2]  # rotates through the set: photos 2, then 0
        request = parse_infer(body, headers.get("inference-header-content-length"), "flowers", 8)
        assert request.photos == [b"photo-2", b"photo-0"]
        assert request.binary_output == (protocol == "v2-binary")


@pytest.mark.parametrize("text", ["v3", "", "v1,grpc"])
def test_an_unknown_protocol_is_refused(text):
    from flowers.errors import FlowersError
    from flowers.serve.loadtest import parse_protocols

    with pytest.raises(FlowersError, match="--protocols takes a comma-separated list of v1, v2, v2-binary"):
        parse_protocols(text)


def test_bench_serve_compares_batching_per_protocol():
    from flowers.serve.bench import batching_gains

    rows = [{"runtime": "onnx", "protocol": p, "max_batch": b, "concurrency": 4, "images_per_s": v}
            for p, b, v in (("v1", 32, 200.0), ("v1", 1, 100.0), ("v2", 32, 150.0), ("v2", 1, 100.0))]
    assert batching_gains(rows, 32) == {"onnx v1": {4: 2.0}, "onnx v2": {4: 1.5}}
    assert batching_gains(rows[:2], 32) == {"onnx": {4: 2.0}}  # one protocol: the runtime alone
