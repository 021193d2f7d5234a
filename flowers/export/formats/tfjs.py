"""TensorFlow.js graph model, converted from the SavedModel; run in node (CPU and WASM backends).

    tfjs/  model.json  group1-shard*.bin  class_names.json
           index.html  demo.js  resize.js  tf.min.js  tf-backend-wasm.min.js  *.wasm   (the demo)

Written by `tensorflowjs_converter` (tf_saved_model -> tfjs_graph_model, the float32
serving_default signature) in its own virtualenv: tensorflowjs 4.22 pins tensorflow 2.19, tf_keras,
jax and TF Decision Forests, which cannot share flowers' environment (tensorflow 2.21). flowers
creates it on first use under paths.tools_dir() and reuses it (flowers.toolenvs), with ydf<0.16:
ydf 0.16 is built for protobuf 6 while tensorflow 2.19 forces protobuf 5 (the converter dies with
a protobuf VersionError). The conversion runs with TF_ENABLE_ONEDNN_OPTS=0: with oneDNN rewrites
on, MobileNetV3's hard-swish is fused into _FusedConv2D, which tfjs cannot run.

After conversion, model.json is made runnable on tfjs' WASM backend too (for_every_backend): WASM's
fused convolutions take only a rank-1 bias, while TensorFlow's grappler fuses a BatchNorm-folded
[1,1,1,C] bias (squeezed here to [C]) and even a residual AddV2 of a whole tensor (split here into
Conv2D + AddV2 + activation, what the fused op computes).

Verified like every format: the node runner (_tfjs/runner.mjs, pure @tensorflow/tfjs 4.22.0 and
@tensorflow/tfjs-backend-wasm from the pinned package-lock.json, `npm ci` into tools_dir) runs the
verification images once per tfjs backend ("signatures" here are the backends: cpu, wasm).
@tensorflow/tfjs-node is not used: it downloads a native library when installed, which fails
offline. Images of any size are resized as flowers resizes (_tfjs/resize.js), in node and the page.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import struct
import weakref
from pathlib import Path

import numpy as np

from flowers import files, processes, toolenvs
from flowers.errors import FlowersError
from flowers.export.formats.base import (
    FLOAT32_MAX_ABS_PROB_DIFF,
    Conversion,
    ExportFormat,
    LoadedModel,
)

TFJS_VERSION = "4.22.0"
SUPPORT = Path(__file__).resolve().parent / "_tfjs"
CONVERTER = toolenvs.PythonEnv("tfjs-converter", (f"tensorflowjs=={TFJS_VERSION}", "ydf<0.16"),
                               "the TF.js converter")
NODE = toolenvs.NodeEnv("tfjs-node", SUPPORT, "TF.js")
BACKENDS = ("wasm", "cpu")  # the tfjs backends verification runs; the first serves and predicts
CONVERT_TIMEOUT_S = 900
REPLY_TIMEOUT_S = 600  # one batch through the node runner
DEMO_FILES = ("index.html", "demo.js", "resize.js")
# The browser bundles the demo page loads, from the installed node packages.
VENDOR_FILES = {
    "@tensorflow/tfjs/dist/tf.min.js": "tf.min.js",
    "@tensorflow/tfjs-backend-wasm/dist/tf-backend-wasm.min.js": "tf-backend-wasm.min.js",
    "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm": "tfjs-backend-wasm.wasm",
    "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm": "tfjs-backend-wasm-simd.wasm",
    "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm":
        "tfjs-backend-wasm-threaded-simd.wasm",
}
# Fused activations tfjs' graph executor knows as plain ops (the op name is the same).
ACTIVATIONS = {"Relu", "Relu6", "Elu", "Sigmoid", "Tanh", "LeakyRelu"}
FUSED_ONLY_ATTRS = {"fused_ops", "num_args", "epsilon", "leakyrelu_alpha", "num_host_args"}


class TfjsToolchain:
    """The converter's virtualenv and the node packages (flowers.toolenvs), created on first use."""

    def problem(self) -> str | None:
        return NODE.problem()

    def ready(self) -> bool:
        return CONVERTER.ready() and NODE.ready()

    def prepare(self, step) -> None:
        NODE.ensure(step)
        CONVERTER.ensure(step)

    def versions(self) -> dict[str, str]:
        return {"tensorflowjs (converter)": TFJS_VERSION,
                "@tensorflow/tfjs": NODE.package_version("@tensorflow/tfjs"),
                "@tensorflow/tfjs-backend-wasm": NODE.package_version("@tensorflow/tfjs-backend-wasm"),
                "node": toolenvs.node_version()}


def convert_tfjs(source: Path, path: Path, conversion: Conversion) -> str:
    """SavedModel folder -> tfjs graph model folder with the demo page; the manifest's written_by."""
    # What this uses, asked for once each: prepare_toolchains made both before conversion, so each
    # returns at once; a direct caller still gets them made (node first: it fails fast without node).
    node_env = NODE.ensure(conversion.step)
    CONVERTER.ensure(conversion.step)
    python = str(CONVERTER.python())
    quantize = ["--quantize_float16=*"] if conversion.quantize == "float16" else []
    conversion.step(f"converting the SavedModel to TF.js{' (float16 weights)' if quantize else ''}")
    env = {**processes.child_env(cpu_only=True), "TF_ENABLE_ONEDNN_OPTS": "0",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    script = "import sys; from tensorflowjs.converters.converter import convert; convert(sys.argv[1:])"
    processes.run_tool([python, "-c", script, "--input_format=tf_saved_model",
                        "--output_format=tfjs_graph_model", "--signature_name=serving_default",
                        "--saved_model_tags=serve", *quantize, str(source), str(path)],
                       CONVERT_TIMEOUT_S, env=env)
    model_json = path / "model.json"
    if not model_json.is_file():
        raise FlowersError(f"tensorflowjs_converter wrote no model.json into {path}")
    changed = for_every_backend(files.read_json(model_json))
    files.write_json(model_json, changed)
    files.write_json(path / "class_names.json", conversion.class_names)
    for name in DEMO_FILES:
        shutil.copyfile(SUPPORT / "demo" / name if name != "resize.js" else SUPPORT / name,
                        path / name)
    for package_path, name in VENDOR_FILES.items():
        shutil.copyfile(node_env / "node_modules" / package_path, path / name)
    tensorflow = processes.run_tool(
        [python, "-c",
         "import importlib.metadata as m; print(m.version('tensorflow'))"], 120).strip()
    return (f"tensorflowjs_converter {TFJS_VERSION} (tensorflow {tensorflow}, its own environment) "
            f"from the SavedModel's serving_default, oneDNN rewrites off"
            + (", float16 weights" if quantize else ""))


def for_every_backend(model: dict) -> dict:
    """model.json with every fused convolution in a form tfjs' WASM backend runs (module docstring).

    The CPU and WebGL backends run both forms; the numbers are the same.
    """
    weights = {w["name"]: w for group in model["weightsManifest"] for w in group["weights"]}
    nodes = []
    for node in model["modelTopology"]["node"]:
        fused = [base64.b64decode(s).decode() for s in
                 node.get("attr", {}).get("fused_ops", {}).get("list", {}).get("s", [])]
        if node["op"] not in ("_FusedConv2D", "FusedDepthwiseConv2dNative") or fused[:1] != ["BiasAdd"]:
            nodes.append(node)
            continue
        bias = weights.get(node["input"][2].split(":")[0])
        shape = bias["shape"] if bias else None
        if shape is not None and len(shape) == 4 and shape[:3] == [1, 1, 1]:
            bias["shape"] = shape[3:]  # the same values, the rank WASM accepts
        if (bias is not None and len(bias["shape"]) == 1) or (fused[1:] and fused[1] not in ACTIVATIONS):
            nodes.append(node)
            continue
        nodes += _unfused(node, fused[1] if len(fused) > 1 else None)
    return {**model, "modelTopology": {**model["modelTopology"], "node": nodes}}


def _unfused(node: dict, activation: str | None) -> list[dict]:
    """Conv2D (or DepthwiseConv2dNative) + AddV2 [+ activation]: what one fused node computes. The
    last node keeps the fused node's name, so its consumers are unchanged."""
    name, attr = node["name"], node["attr"]
    controls = [i for i in node["input"] if i.startswith("^")]
    data = [i for i in node["input"] if not i.startswith("^")]
    plain = "Conv2D" if node["op"] == "_FusedConv2D" else "DepthwiseConv2dNative"
    conv = {"name": f"{name}/flowers_conv", "op": plain, "input": data[:2] + controls,
            "attr": {k: v for k, v in attr.items() if k not in FUSED_ONLY_ATTRS}}
    add = {"name": f"{name}/flowers_bias" if activation else name, "op": "AddV2",
           "input": [conv["name"], data[2]], "attr": {"T": attr["T"]}}
    if not activation:
        return [conv, add]
    act = {"name": name, "op": activation, "input": [add["name"]], "attr": {"T": attr["T"]}}
    if activation == "LeakyRelu" and "leakyrelu_alpha" in attr:
        act["attr"]["alpha"] = attr["leakyrelu_alpha"]
    return [conv, add, act]


class NodeRunner:
    """One `node runner.mjs MODEL_DIR BACKEND` process and its frames (see _tfjs/runner.mjs)."""

    def __init__(self, model_dir: Path, backend: str) -> None:
        node_env = NODE.ensure(lambda line: None)
        env = {**processes.child_env(), "FLOWERS_NODE_ENV": str(node_env)}
        self.backend = backend
        self.process = processes.start_pipe(["node", str(SUPPORT / "runner.mjs"), str(model_dir),
                                             backend], cwd=SUPPORT, env=env)
        self._stop = weakref.finalize(self, processes.stop_process, self.process, 5)
        self.info = self._read_header(timeout_s=REPLY_TIMEOUT_S)

    def predict(self, images: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(images, dtype="<f4")
        self._send({"shape": list(data.shape)}, data.tobytes())
        header = self._read_header(REPLY_TIMEOUT_S)
        count = int(np.prod(header["shape"]))
        raw = self._read_exact(4 * count, REPLY_TIMEOUT_S)
        return np.frombuffer(raw, "<f4").reshape(header["shape"]).astype(np.float32)

    def close(self) -> None:
        self._stop()

    def _send(self, header: dict, data: bytes = b"") -> None:
        head = json.dumps(header).encode()
        try:
            self.process.stdin.write(struct.pack("<I", len(head)) + head + data)
            self.process.stdin.flush()
        except BrokenPipeError:
            raise FlowersError(f"the tfjs {self.backend} runner stopped (node exited "
                               f"{self.process.poll()})") from None

    def _read_header(self, timeout_s: float) -> dict:
        length = struct.unpack("<I", self._read_exact(4, timeout_s))[0]
        header = json.loads(self._read_exact(length, timeout_s))
        if "error" in header:
            self.close()
            raise FlowersError(f"tfjs {self.backend} backend: {header['error']}")
        return header

    def _read_exact(self, size: int, timeout_s: float) -> bytes:
        stream, chunks, got = self.process.stdout, [], 0
        while got < size:
            ready, _, _ = select.select([stream], [], [], timeout_s)
            if not ready:
                self.close()
                raise FlowersError(f"the tfjs {self.backend} runner gave no answer in {timeout_s} s")
            chunk = os.read(stream.fileno(), size - got)
            if not chunk:
                raise FlowersError(f"the tfjs {self.backend} runner stopped (node exited "
                                   f"{self.process.wait(5)})")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)


def open_tfjs(path: Path, signature: str | None) -> LoadedModel:
    """Start the node runner on one tfjs backend (signature: "wasm" or "cpu"; None: the first)."""
    backend = signature or BACKENDS[0]
    if backend not in BACKENDS:
        raise FlowersError(f"unknown tfjs backend {backend!r}; choose from {', '.join(BACKENDS)}")
    runner = NodeRunner(path, backend)
    info = runner.info
    names_file = path / "class_names.json"
    names = files.read_json(names_file) if names_file.is_file() else None
    return LoadedModel(
        format="tfjs", runtime=f"tfjs {info['tfjs']} {info['backend']} backend (node {info['node']})",
        image_size=int(info["image_size"]), num_classes=int(info["classes"]), input_name="image",
        output_name="probabilities", predict=runner.predict, handle=runner,
        class_names=names if isinstance(names, list) and len(names) == info["classes"] else None)


TOOLCHAIN = TfjsToolchain()

FORMAT = ExportFormat(
    name="tfjs", title="TensorFlow.js",
    purpose="TensorFlow.js in the browser (a demo page ships beside the model) and in node",
    path="tfjs", suffix="", marker="model.json", order=50, serve_rank=50,
    runtime_modules=(), runtime_packages=(), opener=open_tfjs,
    max_abs_prob_diff=FLOAT32_MAX_ABS_PROB_DIFF,
    converted_from="savedmodel", convert=convert_tfjs, written_with="tensorflowjs_converter",
    toolchain=TOOLCHAIN, optional=True,
    # float16 weights moved ResNet50's logits by up to 6e-3 (issue 36's trial)
    quantizations=("float16",), quantized_max_abs_prob_diff=1e-2,
    # the CPU backend is pure JavaScript: ~11 s per image for ResNet50 at 224 px where WASM takes
    # 0.3 s (2-core AMD EPYC), so it is verified on the first few images only
    signatures=BACKENDS, slow_signatures=("cpu",), cpu_only=True,
    runs_in=f"node: @tensorflow/tfjs {TFJS_VERSION} (+ tfjs-backend-wasm)",
)
