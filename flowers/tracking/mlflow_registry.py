"""`flowers export --track mlflow`: the export as a new version of a registered model.

The registered model is named after the experiment; each `flowers export` adds a version:
- the model is a pyfunc (pyfunc_model.py) over the export's model.keras (or, when the export has no
  .keras format, its source run's model.keras): RGB images in, probabilities out, loadable with
  mlflow.pyfunc.load_model("models:/<experiment>/<version>"). It has no MLflow signature on
  purpose: a tensor signature takes one dtype, and the pyfunc takes uint8 and float images alike
  and refuses a wrong shape in one line; the version's description states the contract;
- it is logged by an MLflow run "export-v<N>" (tag flowers.kind=export) that also holds manifest.json
  and is linked to the source run's MLflow run when it was tracked (flowers.source_mlflow_run);
- the version's tags: flowers.export_version, flowers.source_run, flowers.training_backend,
  flowers.config_hash, flowers.val_accuracy, flowers.verified (all formats passed), one
  verification.<format> per format (top-1 agreement and max |Δprob| against Keras), and
  flowers.manifest (manifest.json without its config and files tables, which the run keeps whole).

A registry that does not answer fails the command in one line, after the export is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flowers
from flowers import host
from flowers.errors import FlowersError
from flowers.tracking import mlflow_client
from flowers.tracking.mlflow_run import saved_run

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# What loading the pyfunc imports (the flowers package travels with it as code).
REQUIREMENTS = ("keras", "tensorflow-cpu", "numpy", "pillow", "h5py", "psutil", "click", "platformdirs")
MAX_TAG_CHARS = 5000


def register_export(version_dir: Path, manifest: Mapping[str, Any]) -> tuple[str, str]:
    """Register version_dir as a new version of the model named after its experiment.

    Returns:
        (registered model name, its new version).

    Raises:
        FlowersError: no .keras file to register, or MLflow failed (the export is complete anyway).
    """
    keras_file = _keras_file(version_dir, manifest)
    try:
        client = mlflow_client.client()  # also sets flowers' MLflow defaults for the fluent API below
        import mlflow

        experiment_id = mlflow_client.experiment_id(client, manifest["experiment"])
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"export-v{manifest['version']}",
                              tags=_run_tags(manifest)):
            mlflow.log_artifact(str(version_dir / "manifest.json"))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_FILE), artifacts={"model": str(keras_file)},
                code_paths=[str(Path(flowers.__file__).parent)], pip_requirements=_requirements(),
                registered_model_name=manifest["experiment"])
        version = str(info.registered_model_version)
        client.update_model_version(manifest["experiment"], version, description=_description(manifest))
        for key, value in version_tags(manifest).items():
            client.set_model_version_tag(manifest["experiment"], version, key, value)
    except FlowersError:
        raise
    except Exception as exc:  # MLflow's and the network's errors
        raise FlowersError(f"the export is written to {version_dir}, but registering it in MLflow at "
                           f"{mlflow_client.tracking_uri()} failed ({mlflow_client.reason(exc)})") from None
    return manifest["experiment"], version


def version_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The model version's tags: the export version, its source, its verification figures."""
    verification = manifest["verification"]
    tags = {"flowers.export_version": f"v{manifest['version']}", "flowers.source_run": manifest["run_id"],
            "flowers.training_backend": manifest["training_backend"],
            "flowers.config_hash": manifest["config_hash"],
            "flowers.val_accuracy": f"{manifest['val_metrics']['val_accuracy']:.4f}",
            "flowers.verified": str(verification["passed"]).lower()}
    for result in verification["results"]:
        tags[f"verification.{result['format']}"] = (
            f"{result['runtime']}: top-1 agreement {result['top1_agreement']:.1%}, max |Δprob| "
            f"{result['max_abs_prob_diff']:.1e} (limit {result['limit']:.0e}), "
            + ("passed" if result["passed"] else "FAILED"))
    summary = {k: v for k, v in manifest.items() if k not in ("config", "files")}
    tags["flowers.manifest"] = json.dumps(summary, separators=(",", ":"))[:MAX_TAG_CHARS]
    return tags


def _keras_file(version_dir: Path, manifest: Mapping[str, Any]) -> Path:
    for candidate in (version_dir / "model.keras", Path(manifest["source_run"]) / "model.keras"):
        if candidate.is_file():
            return candidate
    raise FlowersError(f"--track mlflow registers the model.keras of {version_dir} or of its source "
                       f"run {manifest['source_run']}, and neither has one: export with --formats "
                       "keras,... to register it")


def _run_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    tags = {"flowers.kind": "export", "experiment": manifest["experiment"],
            "backend": manifest["training_backend"], "flowers.export_version": f"v{manifest['version']}"}
    source = Path(manifest["source_run"])
    if source.is_dir() and (source_run := saved_run(source).get("run_id")):
        tags["flowers.source_mlflow_run"] = source_run
    return tags


def _description(manifest: Mapping[str, Any]) -> str:
    """What the pyfunc takes and returns (it has no MLflow signature: see the module docstring)."""
    side = manifest["input"]["shape"][1]
    return (f"flowers export v{manifest['version']} of {manifest['experiment']} (run {manifest['run_id']}, "
            f"trained under {manifest['training_backend']}). mlflow.pyfunc predict(): RGB images "
            f"(N, {side}, {side}, 3), values 0..255, uint8 or float -> softmax probabilities "
            f"(N, {len(manifest['class_names'])}) float32 in this class order: "
            + ", ".join(manifest["class_names"]))[:MAX_TAG_CHARS]


def _requirements() -> list[str]:
    found = {name: host.package_version(name) for name in REQUIREMENTS}
    return [f"{name}=={version}" for name, version in found.items() if version]

