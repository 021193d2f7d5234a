"""The export format registry: one module per format, each defining one ExportFormat named FORMAT.

    keras       the run's model.keras, copied; runs under every Keras backend
    savedmodel  TensorFlow SavedModel folder (float32 and uint8 signatures), written under tensorflow
    onnx        model.onnx for onnxruntime, written under torch (else tensorflow + tf2onnx)
    tflite      model.tflite for the LiteRT interpreter, written under tensorflow
    tfjs        TensorFlow.js graph model (+ a demo page), converted from the SavedModel by
                tensorflowjs_converter in its own environment; run in node (CPU and WASM backends)

`flowers export` (which formats exist, who writes them, how each is verified), the manifest (paths,
purposes, package versions), `flowers predict` (which runtime opens a path), `flowers serve` (which
format of a version to serve, whether to pad batches) and `flowers bench-serve` (which runtimes a
version offers) all read REGISTRY; none of them names a format.

Adding a format (tfjs.py was the first one added this way):
  1. write flowers/export/formats/<name>.py defining FORMAT = ExportFormat(name="<name>", ...)
     (the fields are documented in base.py). Import its writer's and runtime's libraries inside
     write() and the opener, never at module level: the registry is read before a backend is chosen.
     Give it a free `order` (where it sits in lists) and `serve_rank` (lower is served first).
     A format made from another one by a tool sets converted_from and convert (and, for tools
     outside flowers' environment, a toolchain; see tfjs.py).
  2. add its test beside the others in tests/unit/test_formats.py (every record is checked there for
     complete fields, unique names and paths; add what is special about yours).
  3. list its writer's and runtime's pip packages in pyproject.toml's export extra.
Nothing else changes: this package finds every module in it by itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping

from flowers.errors import FlowersError
from flowers.export.formats.base import ExportFormat, LoadedModel, Writer

__all__ = ["NAMES", "REGISTRY", "SERVE_PREFERENCE", "ExportFormat", "LoadedModel", "Writer", "get",
           "packages", "parse_names", "table", "tolerance"]

# Modules of this package that define no format.
_NOT_FORMATS = frozenset({"base"})


def _discover() -> dict[str, ExportFormat]:
    """Every format module of this package, name -> its FORMAT, in `order`."""
    found = []
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name in _NOT_FORMATS or module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        record = getattr(module, "FORMAT", None)
        if not isinstance(record, ExportFormat) or record.name != module_info.name:
            raise ImportError(f"{module.__name__} must define FORMAT = ExportFormat(name="
                              f"{module_info.name!r}, ...)")
        found.append(record)
    return {record.name: record for record in sorted(found, key=lambda r: r.order)}


REGISTRY: dict[str, ExportFormat] = _discover()
NAMES: tuple[str, ...] = tuple(REGISTRY)
# What an export version is served from when no --runtime is given: the first of these it holds.
SERVE_PREFERENCE: tuple[str, ...] = tuple(sorted(NAMES, key=lambda n: REGISTRY[n].serve_rank))


def get(name: str) -> ExportFormat:
    """The format called `name`.

    Raises:
        FlowersError: no such format (the message lists the known ones).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise FlowersError(f"unknown export format {name!r}; known formats: "
                           f"{', '.join(NAMES)}") from None


def parse_names(names: Iterable[str]) -> list[str]:
    """Validated format names (stripped, lower case) in registry order, without repeats.

    Raises:
        FlowersError: an unknown name, or none at all.
    """
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        problem = f"unknown format {unknown[0]!r}" if unknown else "no format given"
        raise FlowersError(f"{problem}; choose from {', '.join(NAMES)} (comma-separated)")
    return [n for n in NAMES if n in names]


def packages(*, writers: bool) -> tuple[str, ...]:
    """The pip distributions of every format's runtime (and, with writers=True, of its writers),
    in registry order without repeats: the versions a manifest or a serving benchmark records."""
    found: list[str] = []
    for record in REGISTRY.values():
        found += record.runtime_packages
        if writers:
            found += [p for writer in record.writers for p in writer.packages]
    return tuple(dict.fromkeys(found))


def tolerance(names: Iterable[str], quantize: Mapping[str, str] | None = None
              ) -> float | dict[str, float]:
    """The verification tolerance of these formats: the one they share, or name -> its own when
    they differ (a manifest's "criteria"). quantize: format -> its quantization ("float16"), for
    the formats written quantized, which are held to their quantized limit (ExportFormat.limit)."""
    quantize = quantize or {}
    limits = {name: get(name).limit(quantize.get(name)) for name in names}
    shared = set(limits.values())
    return shared.pop() if len(shared) == 1 else limits


def table() -> list[tuple[str, ...]]:
    """Header and one row per format, in registry order: what `flowers exports formats` prints."""
    rows = [("format", "path", "written by", "runs in", "max |Δprob|", "for")]
    for record in REGISTRY.values():
        writers = " or ".join(f"{w.backend} ({'+'.join(w.modules)})" for w in record.writers)
        if record.converted_from:
            writers = f"{record.written_with}, from {record.converted_from}"
        rows.append((record.name, record.path, writers or "copied from the run",
                     ", ".join(record.runtime_packages) or record.runs_in,
                     f"{record.max_abs_prob_diff:.0e}", record.purpose))
    return rows
