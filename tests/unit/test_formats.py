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
    assert formats.NAMES == ("keras", "savedmodel", "onnx", "tflite")
    assert formats.SERVE_PREFERENCE == ("onnx", "savedmodel", "tflite", "keras")


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_every_record_is_complete(record: ExportFormat):
    assert record.name.isidentifier() and record.name == record.name.lower()
    assert "-" not in record.name  # bench-serve's runtime names are <format>-<backend>
    for text in (record.title, record.purpose, record.path):
        assert text and text == text.strip() and "\n" not in text
    assert "/" not in record.path and record.path != runtimes.MANIFEST
    assert record.runtime_modules and record.runtime_packages
    assert all(m.isidentifier() for m in record.runtime_modules)
    assert all(p == p.lower() and "_" not in p for p in record.runtime_packages)  # pip spelling
    assert callable(record.opener)
    assert 0 < record.max_abs_prob_diff <= 1e-3
    # Written formats name their writer and its API; the one without writers is copied.
    assert bool(record.writers) == (record.write is not None) == bool(record.written_with)
    for writer in record.writers:
        assert writer.backend in ("torch", "tensorflow", "jax") and writer.modules
        assert writer.packages


@pytest.mark.parametrize("field", ["name", "path", "suffix", "order", "serve_rank"])
def test_no_two_formats_share(field):
    values = [getattr(r, field) for r in RECORDS if getattr(r, field) != ""]
    assert len(values) == len(set(values)), field


def test_only_the_source_format_is_copied_and_runs_under_keras_backends():
    from flowers.export.run import SOURCE_FORMAT

    assert [r.name for r in RECORDS if not r.writers] == [SOURCE_FORMAT]
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
        formats.get("tfjs")
    assert str(error.value) == ("unknown export format 'tfjs'; known formats: "
                                "keras, savedmodel, onnx, tflite")


def test_format_lists_are_parsed_into_registry_order():
    assert formats.parse_names([" TFLite", "keras", "onnx", "keras", ""]) == ["keras", "onnx", "tflite"]
    from flowers.export.run import parse_formats

    assert parse_formats("onnx,savedmodel") == ["savedmodel", "onnx"]
    with pytest.raises(FlowersError, match=r"^unknown format 'pt'; choose from keras, savedmodel, "
                                           r"onnx, tflite \(comma-separated\)$"):
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
            f"{tmp_path / name}: unknown model type; expected a .keras, .onnx or .tflite file or a "
            "SavedModel directory (one with saved_model.pb)")


def test_tolerance_is_shared_or_per_format(monkeypatch):
    assert formats.tolerance(formats.NAMES) == 1e-4
    monkeypatch.setitem(REGISTRY, "onnx", dataclasses.replace(REGISTRY["onnx"], max_abs_prob_diff=1e-3))
    assert formats.tolerance(["keras", "onnx"]) == {"keras": 1e-4, "onnx": 1e-3}
    assert formats.tolerance(["keras", "tflite"]) == 1e-4


def test_a_record_must_be_written_or_copied_and_found_by_suffix_or_marker():
    record = REGISTRY["onnx"]
    with pytest.raises(ValueError, match="writers and write go together"):
        dataclasses.replace(record, write=None)
    with pytest.raises(ValueError, match="suffix or a folder marker"):
        dataclasses.replace(record, marker="model.pb")


def test_savedmodel_is_verified_through_both_signatures():
    from flowers.export.formats import savedmodel

    assert REGISTRY["savedmodel"].signatures == (savedmodel.FLOAT_SIGNATURE, savedmodel.UINT8_SIGNATURE)
    assert [r.name for r in RECORDS if r.signatures] == ["savedmodel"]


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
    monkeypatch.setattr(backend, "installed_versions",
                        lambda: {"torch": "2", "tensorflow": None, "jax": "0.4"})
    monkeypatch.setattr(runtimes, "missing_modules", lambda modules: [])
    assert bench.runtime_choices(tmp_path) == ["onnx", "savedmodel", "tflite", "keras-torch", "keras-jax"]
    monkeypatch.setattr(runtimes, "missing_modules",
                        lambda modules: [m for m in modules if m == "onnxruntime"])
    (tmp_path / "model.tflite").unlink()
    assert bench.runtime_choices(tmp_path) == ["savedmodel", "keras-torch", "keras-jax"]


def test_serve_names_the_registered_runtimes(tmp_path):
    from flowers.serve.settings import resolve_target

    with pytest.raises(FlowersError, match=r"^unknown runtime 'pytorch'; choose one of keras, "
                                           r"savedmodel, onnx, tflite$"):
        resolve_target(tmp_path, "pytorch", None, "tensorflow")
    (tmp_path / runtimes.MANIFEST).write_text("{}")
    with pytest.raises(FlowersError, match=r"holds no model file \(model.keras, savedmodel, "
                                           r"model.onnx, model.tflite\)$"):
        resolve_target(tmp_path, None, None, "tensorflow")


def test_the_formats_table_has_a_row_per_format():
    header, *rows = formats.table()
    assert len(header) == 6 and all(len(row) == len(header) for row in rows)
    assert [row[0] for row in rows] == list(formats.NAMES)
    assert rows[0][2] == "copied from the run"
    assert dict((row[0], row[2]) for row in rows)["onnx"] == "torch (torch+onnx) or tensorflow (tf2onnx+onnx)"
