"""The record every export format defines, and the model object every format's opener returns.

Nothing here imports an ML framework: a format's writer and opener import their runtime inside the
function, so reading the registry (`flowers export --formats`, `flowers serve --runtime`) costs
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Every format is float32: each must agree with the reference (model.keras under the backend that
# trained it) within this on every probability.
FLOAT32_MAX_ABS_PROB_DIFF = 1e-4


@dataclass
class LoadedModel:
    """A model opened in its runtime; predict() maps float32 images 0..255 to probabilities."""

    format: str
    runtime: str  # what runs it, with its version, e.g. "onnxruntime 1.32.0"
    image_size: int
    num_classes: int
    input_name: str
    output_name: str
    predict: Callable[[np.ndarray], np.ndarray]
    handle: Any  # the runtime's own object: keras.Model, SavedModel, InferenceSession, Interpreter
    class_names: list[str] | None = None  # only .keras files carry them


# opener(path, signature) -> LoadedModel. signature: one of the format's `signatures`, or None for
# its first (formats without signatures ignore it).
Opener = Callable[[Path, str | None], LoadedModel]
# write(model, path): writes a loaded keras.Model to path, in the process of the writer's backend.
Write = Callable[[Any, Path], None]


class Toolchain(Protocol):
    """Programs a format needs that live outside flowers' environment (TF.js: a converter in its own
    virtualenv, node packages), created on first use and reused."""

    def problem(self) -> str | None:
        """What flowers cannot fix itself (e.g. no Node.js), as one line, else None. Fast."""

    def ready(self) -> bool:
        """Everything is installed: the format can be written and run now."""

    def prepare(self, step: Callable[[str], None]) -> None:
        """Install what is missing (minutes, once); FlowersError with one line if it cannot."""

    def versions(self) -> dict[str, str]:
        """Versions for the manifest: tool or package name -> version."""


@dataclass(frozen=True)
class Conversion:
    """What a converted format's convert() gets besides its source and target paths."""

    class_names: list[str]
    quantize: str | None  # one of the format's `quantizations`, or None for float32
    step: Callable[[str], None]  # prints a line before a slow step


# convert(source path, target path, conversion) -> "written_by" line for the manifest.
Convert = Callable[[Path, Path, Conversion], str]


@dataclass(frozen=True)
class Writer:
    """One way to write a format: the Keras backend whose process runs it, and what it imports."""

    backend: str  # the Keras backend selected in the writing process
    modules: tuple[str, ...]  # modules the writer imports (checked before an export starts)
    packages: tuple[str, ...]  # pip distributions whose versions the manifest records


@dataclass(frozen=True)
class ExportFormat:
    """One export format: where it lives in a version, who writes it, what runs it, how it is checked.

    A record is the whole truth about its format: export, verification, `flowers predict`, serving
    and bench-serve read these fields and never branch on a format's name.
    """

    name: str  # what users type: --formats, --runtime, manifest keys
    title: str  # how prose names it ("SavedModel", "ONNX")
    purpose: str  # what it is for, one line (the manifest's "targets")
    path: str  # its file, or folder, inside an export version
    suffix: str  # the file suffix that identifies a model path; "" for a folder format
    marker: str  # for a folder format, the file that identifies one ("saved_model.pb"); else ""
    order: int  # position in every list of formats (--formats, manifests, results)
    serve_rank: int  # lower is served first from a version holding several formats
    runtime_modules: tuple[str, ...]  # modules its runtime imports (checked before it is opened)
    runtime_packages: tuple[str, ...]  # pip distributions of its runtime (manifest, bench-serve)
    opener: Opener  # opens a file of this format in its runtime
    max_abs_prob_diff: float  # verification tolerance against the reference probabilities
    writers: tuple[Writer, ...] = ()  # best first; none: copied from the run (model.keras)
    write: Write | None = None  # writes it from a loaded keras.Model (None: copied)
    written_with: str = ""  # the Keras API that writes it, for the manifest's "written_by"
    signatures: tuple[str, ...] = ()  # entry points verification runs one by one; () for one
    # signatures too slow for every verification image (tfjs' pure-JS CPU backend: ~11 s per 224 px
    # ResNet50 image): verified on the first few only (flowers.export.run.SLOW_RUNTIME_IMAGES)
    slow_signatures: tuple[str, ...] = ()
    keras_backends: bool = False  # runs under a Keras backend the user picks (--backend)
    pads_batches: bool = False  # compiles or allocates per batch size: serve pads to a few sizes
    cpu_only: bool = False  # its runtime runs on the CPU whatever device the backend sees
    # A format made from another one by a tool (TF.js from the SavedModel): the source format is
    # written first (into scratch space when it was not asked for), then convert() runs in the
    # exporting process.
    converted_from: str = ""
    convert: Convert | None = None
    toolchain: Toolchain | None = None  # what it needs outside flowers' environment
    optional: bool = False  # in the default set only when its toolchain is ready
    quantizations: tuple[str, ...] = ()  # weight quantizations convert() offers ("float16")
    quantized_max_abs_prob_diff: float = 0.0  # the tolerance of a quantized export
    runs_in: str = ""  # what runs it, for a runtime outside Python (runtime_packages is then empty)

    def __post_init__(self) -> None:
        if bool(self.writers) != (self.write is not None):
            raise ValueError(f"export format {self.name!r}: writers and write go together")
        if bool(self.suffix) == bool(self.marker):
            raise ValueError(f"export format {self.name!r}: give a file suffix or a folder marker")
        if bool(self.converted_from) != (self.convert is not None):
            raise ValueError(f"export format {self.name!r}: converted_from and convert go together")
        if self.quantizations and not self.quantized_max_abs_prob_diff:
            raise ValueError(f"export format {self.name!r}: give the quantized tolerance")

    def is_copied(self) -> bool:
        """The source format: copied from the run, neither written nor converted."""
        return not self.writers and not self.converted_from

    def available_by_default(self) -> bool:
        """In `flowers export`'s default set: always, or for an optional one, once it is ready."""
        return not self.optional or (self.toolchain is not None and self.toolchain.ready())

    def limit(self, quantize: str | None) -> float:
        """The verification tolerance of an export written with this quantization (None: float32)."""
        return self.quantized_max_abs_prob_diff if quantize else self.max_abs_prob_diff

    def recognizes(self, path: Path) -> bool:
        """Whether an existing path is a model of this format (by suffix, or by its marker file)."""
        if self.marker:
            return path.is_dir() and (path / self.marker).is_file()
        return path.is_file() and path.suffix.lower() == self.suffix


def input_spec(model: Any, dtype: str) -> Any:
    """A writer's input: dynamic batch, the model's image size, named like its input ("image")."""
    import keras

    return keras.InputSpec(shape=(None, *model.input_shape[1:]), dtype=dtype,
                           name=model.inputs[0].name)
