"""flowers.serve.payload: request bodies are checked strictly, every mistake a 400 naming it."""

import base64
import io
import json

import numpy as np
import pytest

from flowers.serve.payload import DEFAULT_TOP_K, ClientError, decode_instances, parse_body


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_valid_body_gives_its_instances_and_top_k():
    request = parse_body(body(instances=[{"b64": "x"}], parameters={"top_k": 2}, signature_name="s"), 8)
    assert request.instances == [{"b64": "x"}] and request.top_k == 2
    assert parse_body(body(instances=[[1]]), 8).top_k == DEFAULT_TOP_K
    # Google's clients send every number as a double (a protobuf Struct): 2.0 is 2.
    assert parse_body(body(instances=[[1]], parameters={"top_k": 2.0}), 8).top_k == 2


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "the body is not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (body(inputs=[1]), 'columnar "inputs" format is not supported'),
    (body(instances=[1], extra=1), "unknown key 'extra'"),
    (body(), 'missing "instances"'),
    (body(instances=[]), "must be a non-empty list"),
    (body(instances=[1] * 9), "9 instances; this server takes at most 8"),
    (body(instances=[1], parameters=[5]), '"parameters" must be an object'),
    (body(instances=[1], parameters={"k": 1}), "unknown parameter 'k'"),
    (body(instances=[1], parameters={"top_k": True}), "top_k must be a whole number"),
    (body(instances=[1], parameters={"top_k": 0}), "top_k must be a whole number"),
    (body(instances=[1], parameters={"top_k": 2.5}), "top_k must be a whole number of at least 1, not 2.5"),
])
def test_each_mistake_is_a_400_that_names_it(raw, message):
    with pytest.raises(ClientError) as error:
        parse_body(raw, 8)
    assert error.value.status == 400 and message in error.value.message
    assert "\n" not in error.value.message


@pytest.mark.parametrize(("instance", "message"), [
    ({"b64": "%%%"}, "instance 0: bad base64"),
    ({"b64": base64.b64encode(b"not an image").decode()}, "instance 0: cannot read the image: not an image"),
    ({"image": "x"}, 'instance 0: an instance is {"b64"'),
    ([[1, 2], [3]], "instance 0: not a rectangular array"),
    ([[1, 2, 3]], "instance 0: pixel array of shape [1, 3]"),
    ([[[0, 0, 300]]], "instance 0: pixel values must be within 0..255"),
    ("pixels", 'instance 0: an instance is {"b64"'),
])
def test_a_bad_instance_is_a_400_naming_it(instance, message):
    with pytest.raises(ClientError) as error:
        decode_instances([instance], 8)
    assert error.value.status == 400 and message in error.value.message


def test_a_photo_and_its_pixels_decode_to_the_same_resized_image():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (20, 12, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    decoded = decode_instances([{"b64": base64.b64encode(png.getvalue()).decode()},
                                pixels.tolist()], 8)
    assert decoded.shape == (2, 8, 8, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0], decoded[1])
