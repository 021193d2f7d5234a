"""The export format registry (flowers.export.formats): every record complete and consistent, and
what export, predict, serve and bench-serve read from it. In-process, no framework is loaded.

A new format gets its own test here (see test_<name>_...) besides passing the checks every record
passes (the tests parametrized over REGISTRY).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from flowers.errors import FlowersError
from flowers.export import formats, runtimes
from flowers.export.formats import REGISTRY, ExportFormat, Writer

FORMATS_DIR = Path(formats.__file__).parent
# Libraries a format may import only inside its writer or opener (the registry is read first).
HEAVY = {"keras", "tensorflow", "torch", "jax", "onnx", "onnxruntime", "tf2onnx", "ai_edge_litert",
         "flowers.model"}
RECORDS = list(REGISTRY.values())


def test_the_registry_holds_every_format_module_in_order():
    modules = sorted(p.stem for p in FORMATS_DIR.glob("*.py") if p.stem not in ("__init__", "base"))
    assert sorted(REGISTRY) == modules
    # The order users have seen in --formats, manifests and results since the first export.
    assert formats.NAMES == ("keras", "savedmodel", "onnx", "tflite", "tfjs")
    assert formats.SERVE_PREFERENCE == ("onnx", "savedmodel", "tflite", "keras", "tfjs")


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_every_record_is_complete(record: ExportFormat):
    assert record.name.isidentifier() and record.name == record.name.lower()
    assert "-" not in record.name  # bench-serve's runtime names are <format>-<backend>
    for text in (record.title, record.purpose, record.path):
        assert text and text == text.strip() and "\n" not in text
    assert "/" not in record.path and record.path != runtimes.MANIFEST
    # A runtime in Python names its modules and pip packages; one outside (node) says what it is.
    assert bool(record.runtime_modules) == bool(record.runtime_packages) != bool(record.runs_in)
    assert all(m.isidentifier() for m in record.runtime_modules)
    assert all(p == p.lower() and "_" not in p for p in record.runtime_packages)  # pip spelling
    assert callable(record.opener)
    assert 0 < record.max_abs_prob_diff <= 1e-3
    # Written formats name their writer and its API, converted ones their tool; one is copied.
    assert bool(record.writers) == (record.write is not None)
    assert bool(record.written_with) == (not record.is_copied())
    assert not (record.writers and record.converted_from)
    for writer in record.writers:
        assert writer.backend in ("torch", "tensorflow", "jax") and writer.modules
        assert writer.packages


@pytest.mark.parametrize("field", ["name", "path", "suffix", "order", "serve_rank"])
def test_no_two_formats_share(field):
    values = [getattr(r, field) for r in RECORDS if getattr(r, field) != ""]
    assert len(values) == len(set(values)), field


def test_only_the_source_format_is_copied_and_runs_under_keras_backends():
    from flowers.export.run import SOURCE_FORMAT

    assert [r.name for r in RECORDS if r.is_copied()] == [SOURCE_FORMAT]
    assert [r.name for r in RECORDS if r.keras_backends] == [SOURCE_FORMAT]


@pytest.mark.parametrize("path", sorted(FORMATS_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_formats_import_their_runtime_only_inside_functions(path: Path):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        heavy = [n for n in names if n in HEAVY or n.split(".")[0] in HEAVY]
        assert not heavy, f"{path.name} imports {heavy} at module level"


def test_an_unknown_format_is_one_line_naming_the_known_ones():
    assert formats.get("onnx") is REGISTRY["onnx"]
    with pytest.raises(FlowersError) as error:
        formats.get("coreml")
    assert str(error.value) == ("unknown export format 'coreml'; known formats: "
                                "keras, savedmodel, onnx, tflite, tfjs")


def test_format_lists_are_parsed_into_registry_order():
    assert formats.parse_names([" TFLite", "keras", "onnx", "keras", ""]) == ["keras", "onnx", "tflite"]
    from flowers.export.request import parse_formats

    assert parse_formats("onnx,savedmodel") == ["savedmodel", "onnx"]
    with pytest.raises(FlowersError, match=r"^unknown format 'pt'; choose from keras, savedmodel, "
                                           r"onnx, tflite, tfjs \(comma-separated\)$"):
        parse_formats("onnx,pt")
    with pytest.raises(FlowersError, match="^no format given;"):
        parse_formats(" , ")


def test_the_manifest_records_every_runtime_and_writer_package():
    from flowers.export.run import PACKAGES

    # The distributions manifests have recorded since the first export, each once.
    assert len(PACKAGES) == len(set(PACKAGES))
    assert set(PACKAGES) == {"keras", "tensorflow", "tensorflow-cpu", "torch", "jax", "jaxlib",
                             "numpy", "onnx", "onnxruntime", "tf2onnx", "onnxscript", "ai-edge-litert"}
    for record in RECORDS:
        assert set(record.runtime_packages) <= set(PACKAGES), record.name
        assert {p for w in record.writers for p in w.packages} <= set(PACKAGES), record.name


def test_bench_serve_records_every_runtime_package_and_no_writer():
    from flowers.serve.bench import PACKAGES

    assert PACKAGES == ("keras", "tensorflow-cpu", "tensorflow", "torch", "jax", "onnxruntime",
                        "ai-edge-litert", "fastapi", "uvicorn", "starlette", "prometheus-client",
                        "aiohttp", "pillow", "numpy")
    assert set(formats.packages(writers=False)) <= set(PACKAGES)
    assert {"onnx", "tf2onnx", "onnxscript"}.isdisjoint(PACKAGES)


def test_packages_come_from_the_records(monkeypatch):
    extra = dataclasses.replace(REGISTRY["tflite"], name="extra", runtime_packages=("extra-rt",),
                                writers=(Writer("tensorflow", ("extra",), ("extra-writer",)),))
    monkeypatch.setitem(REGISTRY, "extra", extra)
    assert formats.packages(writers=False)[-1] == "extra-rt"
    assert formats.packages(writers=True)[-2:] == ("extra-rt", "extra-writer")
    assert "extra-writer" not in formats.packages(writers=False)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_a_file_named_as_in_a_version_is_recognized_as_its_format(record: ExportFormat, tmp_path):
    path = tmp_path / record.path
    if record.marker:
        path.mkdir()
        (path / record.marker).write_bytes(b"")
    else:
        path.write_bytes(b"")
    assert runtimes.format_of(path) == record.name
    others = [r.name for r in RECORDS if r is not record and r.recognizes(path)]
    assert others == []


def test_an_unknown_model_path_lists_what_a_model_can_be(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for name in ("model.pt", "empty"):
        with pytest.raises(FlowersError) as error:
            runtimes.format_of(tmp_path / name)
        assert str(error.value) == (
            f"{tmp_path / name}: unknown model type; expected a .keras, .onnx or .tflite file, a "
            "SavedModel directory (one with saved_model.pb) or a TensorFlow.js directory (one with "
            "model.json)")


def test_tolerance_is_shared_or_per_format(monkeypatch):
    assert formats.tolerance(formats.NAMES) == 1e-4
    monkeypatch.setitem(REGISTRY, "onnx", dataclasses.replace(REGISTRY["onnx"], max_abs_prob_diff=1e-3))
    assert formats.tolerance(["keras", "onnx"]) == {"keras": 1e-4, "onnx": 1e-3}
    assert formats.tolerance(["keras", "tflite"]) == 1e-4
    # A quantized format is held to its quantized limit; the same format unquantized is not.
    assert formats.tolerance(["keras", "tfjs"], {"tfjs": "float16"}) == {"keras": 1e-4, "tfjs": 1e-2}
    assert formats.tolerance(["tfjs"], {"tfjs": "float16"}) == 1e-2
    assert formats.tolerance(["keras", "tfjs"], {}) == 1e-4


def test_a_record_must_be_written_or_copied_and_found_by_suffix_or_marker():
    record = REGISTRY["onnx"]
    with pytest.raises(ValueError, match="writers and write go together"):
        dataclasses.replace(record, write=None)
    with pytest.raises(ValueError, match="suffix or a folder marker"):
        dataclasses.replace(record, marker="model.pb")


def test_savedmodel_is_verified_through_both_signatures():
    from flowers.export.formats import savedmodel

    assert REGISTRY["savedmodel"].signatures == (savedmodel.FLOAT_SIGNATURE, savedmodel.UINT8_SIGNATURE)
    assert [r.name for r in RECORDS if r.signatures] == ["savedmodel", "tfjs"]


def test_onnx_is_written_by_torch_first_then_tensorflow():
    assert [w.backend for w in REGISTRY["onnx"].writers] == ["torch", "tensorflow"]


def test_serving_pads_batches_for_keras_and_tflite_only():
    from flowers.serve.service import ModelService
    from flowers.serve.settings import ServeTarget

    padded = [name for name in formats.NAMES
              if ModelService(ServeTarget("m", name, "tensorflow", "flowers", 1), 8).pads]
    assert padded == ["keras", "tflite"]


def test_bench_serve_offers_the_version_s_formats_in_serving_preference(monkeypatch, tmp_path):
    from flowers import backend
    from flowers.serve import bench

    for record in RECORDS:
        (tmp_path / record.path).write_bytes(b"")
    monkeypatch.setattr(REGISTRY["tfjs"].toolchain, "ready", lambda: False)  # no node packages
    monkeypatch.setattr(backend, "installed_versions",
                        lambda: {"torch": "2", "tensorflow": None, "jax": "0.4"})
    monkeypatch.setattr(runtimes, "missing_modules", lambda modules: [])
    assert bench.runtime_choices(tmp_path) == ["onnx", "savedmodel", "tflite", "keras-torch", "keras-jax"]
    monkeypatch.setattr(runtimes, "missing_modules",
                        lambda modules: [m for m in modules if m == "onnxruntime"])
    (tmp_path / "model.tflite").unlink()
    assert bench.runtime_choices(tmp_path) == ["savedmodel", "keras-torch", "keras-jax"]
    monkeypatch.setattr(REGISTRY["tfjs"].toolchain, "ready", lambda: True)
    assert bench.runtime_choices(tmp_path)[-1] == "tfjs"


def test_serve_names_the_registered_runtimes(tmp_path):
    from flowers.serve.settings import resolve_target

    with pytest.raises(FlowersError, match=r"^unknown runtime 'pytorch'; choose one of keras, "
                                           r"savedmodel, onnx, tflite, tfjs$"):
        resolve_target(tmp_path, "pytorch", None, "tensorflow")
    (tmp_path / runtimes.MANIFEST).write_text("{}")
    with pytest.raises(FlowersError, match=r"holds no model file \(model.keras, savedmodel, "
                                           r"model.onnx, model.tflite, tfjs\)$"):
        resolve_target(tmp_path, None, None, "tensorflow")


def test_the_formats_table_has_a_row_per_format():
    header, *rows = formats.table()
    assert len(header) == 6 and all(len(row) == len(header) for row in rows)
    assert [row[0] for row in rows] == list(formats.NAMES)
    assert rows[0][2] == "copied from the run"
    assert dict((row[0], row[2]) for row in rows)["onnx"] == "torch (torch+onnx) or tensorflow (tf2onnx+onnx)"


def _fused(name: str, inputs: list[str], ops: list[str], op: str = "_FusedConv2D") -> dict:
    import base64

    return {"name": name, "op": op, "input": inputs,
            "attr": {"T": {"type": "DT_FLOAT"}, "strides": {"list": {"i": ["1", "1", "1", "1"]}},
                     "num_args": {"i": "1"}, "epsilon": {"f": 0},
                     "leakyrelu_alpha": {"f": 0.2},
                     "fused_ops": {"list": {"s": [base64.b64encode(o.encode()).decode() for o in ops]}}}}


def test_tfjs_model_json_is_made_runnable_on_the_wasm_backend():
    """WASM's fused convolutions take a rank-1 bias only: a [1,1,1,C] constant is squeezed, any
    other bias (a residual tensor, a rank-0 constant) is split into the ops the fused one computes."""
    from flowers.export.formats.tfjs import for_every_backend

    weights = [{"name": "b4", "shape": [1, 1, 1, 8], "dtype": "float32"},
               {"name": "b1", "shape": [8], "dtype": "float32"},
               {"name": "b0", "shape": [], "dtype": "float32"}]
    nodes = [_fused("squeezed", ["x", "w", "b4"], ["BiasAdd", "Relu"]),
             _fused("plain", ["x", "w", "b1"], ["BiasAdd"]),
             _fused("residual", ["x", "w", "other/conv", "^control"], ["BiasAdd", "Relu"]),
             _fused("scalar", ["x", "w", "b0"], ["BiasAdd"], op="FusedDepthwiseConv2dNative"),
             _fused("leaky", ["x", "w", "other/conv"], ["BiasAdd", "LeakyRelu"]),
             {"name": "other/conv", "op": "Conv2D", "input": ["x", "w"], "attr": {}}]
    model = {"format": "graph-model", "modelTopology": {"node": nodes},
             "weightsManifest": [{"paths": ["group1-shard1of1.bin"], "weights": weights}]}
    fixed = for_every_backend(model)
    assert [w["shape"] for w in fixed["weightsManifest"][0]["weights"]] == [[8], [8], []]
    by_name = {n["name"]: n for n in fixed["modelTopology"]["node"]}
    assert by_name["squeezed"] is nodes[0] and by_name["plain"] is nodes[1]  # already runnable
    conv, add, relu = by_name["residual/flowers_conv"], by_name["residual/flowers_bias"], by_name["residual"]
    assert (conv["op"], conv["input"]) == ("Conv2D", ["x", "w", "^control"])
    assert "fused_ops" not in conv["attr"] and conv["attr"]["strides"] == nodes[2]["attr"]["strides"]
    assert (add["op"], add["input"]) == ("AddV2", ["residual/flowers_conv", "other/conv"])
    assert (relu["op"], relu["input"]) == ("Relu", ["residual/flowers_bias"])
    assert by_name["scalar/flowers_conv"]["op"] == "DepthwiseConv2dNative"
    assert (by_name["scalar"]["op"], by_name["scalar"]["input"]) == ("AddV2", ["scalar/flowers_conv", "b0"])
    assert by_name["leaky"]["op"] == "LeakyRelu" and by_name["leaky"]["attr"]["alpha"] == {"f": 0.2}
    assert model["modelTopology"]["node"] is nodes and len(nodes) == 6  # its node list is kept


def test_tfjs_is_in_the_default_set_only_once_its_tools_are_ready(monkeypatch):
    from flowers.export.request import default_formats

    toolchain = REGISTRY["tfjs"].toolchain
    monkeypatch.setattr(toolchain, "ready", lambda: False)
    assert default_formats() == ["keras", "savedmodel", "onnx", "tflite"]
    monkeypatch.setattr(toolchain, "ready", lambda: True)
    assert default_formats() == list(formats.NAMES)


def test_tfjs_quantization_is_checked_and_has_its_own_limit():
    from flowers.export.request import parse_quantize

    record = REGISTRY["tfjs"]
    assert record.converted_from == "savedmodel" and record.limit(None) == 1e-4
    assert record.limit("float16") == 1e-2
    assert parse_quantize({"tfjs": "float16"}, ["keras", "tfjs"]) == {"tfjs": "float16"}
    with pytest.raises(FlowersError, match=r"^tfjs cannot be quantized to 'int8' \(offered: float16\)$"):
        parse_quantize({"tfjs": "int8"}, ["tfjs"])
    with pytest.raises(FlowersError, match=r"^onnx cannot be quantized to 'float16' \(offered: none\)$"):
        parse_quantize({"onnx": "float16"}, ["onnx"])
    with pytest.raises(FlowersError, match="^quantizing tfjs needs tfjs among the formats"):
        parse_quantize({"tfjs": "float16"}, ["keras"])


def test_the_tfjs_tools_are_pinned_and_kept_in_the_tools_folder(monkeypatch, tmp_path):
    import json

    from flowers.export.formats import tfjs

    monkeypatch.setenv("FLOWERS_TOOLS_DIR", str(tmp_path))
    assert tfjs.CONVERTER.requirements == ("tensorflowjs==4.22.0", "ydf<0.16")
    assert tfjs.CONVERTER.folder().parent == tmp_path == tfjs.NODE.folder().parent
    assert not tfjs.TOOLCHAIN.ready()
    package = json.loads((tfjs.SUPPORT / "package.json").read_text())
    lock = json.loads((tfjs.SUPPORT / "package-lock.json").read_text())
    for name in ("@tensorflow/tfjs", "@tensorflow/tfjs-backend-wasm"):
        locked = lock["packages"][f"node_modules/{name}"]["version"]
        assert package["dependencies"][name] == locked == "4.22.0"
    assert tfjs.NODE.package_version("@tensorflow/tfjs") == tfjs.TFJS_VERSION


def test_tfjs_conversion_asks_once_for_each_tool_it_uses(monkeypatch, tmp_path):
    """prepare_toolchains already made the tools: convert_tfjs asks for the node packages and the
    converter's python once each (both return at once when ready) and prepares nothing again."""
    from flowers.export.formats import tfjs
    from flowers.export.formats.base import Conversion

    asked = []

    class Tool:
        def __init__(self, name):
            self.name = name

        def ensure(self, step):
            asked.append(self.name)
            return tmp_path / self.name

        def python(self):
            return tmp_path / self.name / "bin" / "python"

    def stop(command, *args, **kwargs):
        raise FlowersError(f"stopped before {command[0]}")

    monkeypatch.setattr(tfjs, "NODE", Tool("node"))
    monkeypatch.setattr(tfjs, "CONVERTER", Tool("converter"))
    monkeypatch.setattr(tfjs.TOOLCHAIN, "prepare", lambda step: asked.append("prepare"))
    monkeypatch.setattr(tfjs.processes, "run_tool", stop)
    with pytest.raises(FlowersError, match=f"^stopped before {tmp_path / 'converter/bin/python'}$"):
        tfjs.convert_tfjs(tmp_path / "savedmodel", tmp_path / "tfjs", Conversion([], None, print))
    assert asked == ["node", "converter"]


@pytest.mark.parametrize("version, problem", [
    ("v20.20.2", None), ("21.0.0", None),
    ("v16.3.0", "T needs Node.js 18 or newer; /bin/node is v16.3.0"),
    ("", "T needs Node.js 18 or newer; /bin/node is "),
])
def test_node_older_than_the_minimum_or_without_a_version_is_a_problem(monkeypatch, tmp_path,
                                                                        version, problem):
    from flowers import toolenvs

    monkeypatch.setattr(toolenvs.shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(toolenvs, "node_version", lambda: version)
    assert toolenvs.NodeEnv("t", tmp_path, "T").problem() == problem


def test_a_format_whose_tools_cannot_be_made_is_left_out_with_one_line(monkeypatch, tmp_path):
    """No Node.js (or an offline first use): TF.js is dropped with one warning line, the other
    formats are still written and the manifest lists why ("skipped"); nothing else left: an error."""
    from flowers.export.formats import tfjs
    from flowers.export.request import ExportRequest, prepare_toolchains

    monkeypatch.setattr(tfjs.TOOLCHAIN, "problem", lambda: "TF.js needs Node.js 18 or newer with npm, "
                                                      "which are not installed")
    request = ExportRequest(tmp_path, None, {}, ["savedmodel", "tfjs"], {"savedmodel": "tensorflow"},
                            {"tfjs": "float16"})
    lines = []
    kept = prepare_toolchains(request, lines.append)
    assert kept.formats == ["savedmodel"] and kept.quantize == {}
    assert kept.skipped == {"tfjs": "TF.js needs Node.js 18 or newer with npm, which are not installed"}
    assert lines == ["warning: tfjs is not written: TF.js needs Node.js 18 or newer with npm, which "
                     "are not installed"]
    with pytest.raises(FlowersError, match="^tfjs cannot be written: TF.js needs Node.js 18"):
        prepare_toolchains(dataclasses.replace(request, formats=["tfjs"]), lines.append)

    def offline(step):
        raise FlowersError("cannot create the environment of the TF.js converter (pip failed)")

    monkeypatch.setattr(tfjs.TOOLCHAIN, "problem", lambda: None)
    monkeypatch.setattr(tfjs.TOOLCHAIN, "prepare", offline)
    assert prepare_toolchains(request, lines.append).skipped == {
        "tfjs": "cannot create the environment of the TF.js converter (pip failed)"}
