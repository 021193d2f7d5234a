"""What `flowers serve` serves and how: one frozen ServeSettings, checked in a second.

resolve_target() turns what a user typed (an export version directory or a model path, --runtime,
--backend) into the model file and runtime to load, without importing any framework, so every
startup mistake is one line before a port is bound or a model is loaded. The settings travel to
uvicorn worker processes as JSON in an environment variable (each worker loads its own model).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from flowers import backend
from flowers.errors import FlowersError
from flowers.export import formats, runtimes
from flowers.export.runtimes import MANIFEST

# Vertex AI custom-container variables (Vertex AI docs: custom container requirements).
PORT_ENV, HEALTH_ROUTE_ENV, PREDICT_ROUTE_ENV = "AIP_HTTP_PORT", "AIP_HEALTH_ROUTE", "AIP_PREDICT_ROUTE"
DEFAULT_PORT = 8080
DEFAULT_HEALTH_ROUTE, DEFAULT_PREDICT_ROUTE = "/health", "/predict"
# Vertex AI's online prediction request limit.
DEFAULT_MAX_BODY_MB = 1.5
SETTINGS_ENV = "FLOWERS_SERVE_SETTINGS"


@dataclass(frozen=True)
class ServeTarget:
    """The model to load: its path, format, the Keras backend (for .keras) and its public name."""

    model_path: str
    format: str
    backend: str  # the Keras backend for .keras; tensorflow otherwise (it resizes the images)
    name: str  # the TF Serving model name: the experiment
    version: int


@dataclass(frozen=True)
class ServeSettings:
    """Everything a server process needs; JSON-serialisable for the worker processes."""

    target: ServeTarget
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 128
    max_instances: int = 64
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1_000_000)
    health_route: str = DEFAULT_HEALTH_ROUTE
    predict_route: str = DEFAULT_PREDICT_ROUTE
    # Set by flowers.serve.server: where a worker reports a model that failed to load, and the
    # process to stop then (the uvicorn supervisor, or the only process).
    failure_file: str = ""
    supervisor_pid: int = 0

    def __post_init__(self) -> None:
        checks = ((self.max_batch >= 1, f"--max-batch must be at least 1, not {self.max_batch}"),
                  (0 <= self.max_wait_ms <= 10_000,
                   f"--max-wait-ms must be between 0 and 10000, not {self.max_wait_ms}"),
                  (self.max_queue >= 1, f"--max-queue must be at least 1, not {self.max_queue}"),
                  (self.max_instances >= 1,
                   f"--max-instances must be at least 1, not {self.max_instances}"),
                  (self.max_body_bytes >= 1000,
                   f"--max-body-mb must be at least 0.001, not {self.max_body_bytes / 1e6}"))
        for ok, message in checks:
            if not ok:
                raise FlowersError(message)
        for option, route in (("health", self.health_route), ("predict", self.predict_route)):
            # Vertex AI's own default routes are /v1/endpoints/<id>/deployedModels/<id>[:predict].
            if (not route.startswith("/") or route in ("/", "/metrics", "/v2")
                    or route.startswith(("/v1/models/", "/v2/"))):
                raise FlowersError(f"the {option} route must start with / and not clash with /, "
                                   f"/v1/models/, /v2 or /metrics, not {route!r}")
        if self.health_route == self.predict_route:
            raise FlowersError(f"the health and predict routes are both {self.health_route!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        raw = json.loads(text)
        return cls(**{**raw, "target": ServeTarget(**raw["target"])})


def routes_from_env() -> tuple[str, str]:
    """The (health, predict) routes: $AIP_HEALTH_ROUTE and $AIP_PREDICT_ROUTE or the defaults."""
    return (os.environ.get(HEALTH_ROUTE_ENV) or DEFAULT_HEALTH_ROUTE,
            os.environ.get(PREDICT_ROUTE_ENV) or DEFAULT_PREDICT_ROUTE)


def port_from_env() -> int:
    text = os.environ.get(PORT_ENV) or str(DEFAULT_PORT)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise FlowersError(f"{PORT_ENV}={text!r} is not a port number (1..65535)")
    return int(text)


def resolve_target(path: str | Path, runtime: str | None, backend_name: str | None,
                   default_backend: str) -> ServeTarget:
    """The model file and runtime to serve, from an export version directory or a model path.

    Args:
        path: exports/<experiment>/v<N> (served by --runtime, else the first of
            formats.SERVE_PREFERENCE it holds), or a model file or SavedModel directory.
        runtime: a registered format name; None picks as above.
        backend_name: the Keras backend for .keras files (None: default_backend).
        default_backend: $KERAS_BACKEND or tensorflow, as the CLI resolves it.

    Raises:
        FlowersError: missing path, unknown runtime, a runtime the version lacks, --backend for a
            non-keras runtime, or a runtime / backend that is not installed.
    """
    path = Path(path)
    if runtime is not None and runtime not in formats.REGISTRY:
        raise FlowersError(f"unknown runtime {runtime!r}; choose one of {', '.join(formats.NAMES)}")
    if not path.exists():
        raise FlowersError(f"export not found: {path}")
    manifest_file = path / MANIFEST
    if path.is_dir() and manifest_file.is_file():  # an export version
        manifest = _read_manifest(manifest_file)
        present = [f for f in formats.SERVE_PREFERENCE if (path / formats.get(f).path).exists()]
        if not present:
            raise FlowersError(f"{path} holds no model file "
                               f"({', '.join(r.path for r in formats.REGISTRY.values())})")
        if runtime is not None and runtime not in present:
            raise FlowersError(f"{path} has no {runtime} export (it has {', '.join(present)})")
        fmt = runtime or present[0]
        model_path = path / formats.get(fmt).path
        name, version = str(manifest.get("experiment") or path.parent.name), _version(manifest, path)
    else:
        fmt = runtimes.format_of(path)
        if runtime is not None and runtime != fmt:
            raise FlowersError(f"{path} is a {fmt} model; --runtime {runtime} needs an export "
                               "version directory or a model of that format")
        model_path = path
        name, version = _name_of_model(path)
    record = formats.get(fmt)
    if backend_name and not record.keras_backends:
        raise FlowersError(f"--backend applies to the keras runtime only; {fmt} runs in its own runtime")
    runtimes.require(record.runtime_modules, f"serving {fmt} models")
    chosen = backend.check_name(backend_name or default_backend) if record.keras_backends else "tensorflow"
    backend.check_installed(chosen)
    return ServeTarget(model_path=str(model_path.resolve()), format=fmt, backend=chosen, name=name,
                       version=version)


def _read_manifest(path: Path) -> dict:
    from flowers.files import read_json

    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise FlowersError(f"{path}: not an export manifest")
    return manifest


def _version(manifest: dict, version_dir: Path) -> int:
    version = manifest.get("version")
    if isinstance(version, int):
        return version
    digits = version_dir.name.removeprefix("v")
    return int(digits) if digits.isdigit() else 1


def _name_of_model(path: Path) -> tuple[str, int]:
    """(name, version) of a bare model path: its export manifest, else its run, else the file."""
    folder = path.parent
    if (folder / MANIFEST).is_file():
        manifest = _read_manifest(folder / MANIFEST)
        return str(manifest.get("experiment") or folder.parent.name), _version(manifest, folder)
    run_config = folder / "config.json"
    if run_config.is_file():
        from flowers.files import read_json

        raw = read_json(run_config)
        experiment = raw.get("experiment") if isinstance(raw, dict) else None
        if isinstance(experiment, dict) and experiment.get("name"):
            return str(experiment["name"]), 1
    return path.stem, 1
