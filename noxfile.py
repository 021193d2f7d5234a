"""nox sessions, named after what a person wants done; each installs only what it needs.

    nox -s train-torch train-tensorflow            # the reference job (EXPERIMENT=baseline default)
    nox -s train-jax -- --experiment smoke         # arguments after -- go to `flowers train`
    nox -s train-torch -- --cpu                    # force CPU builds (--gpu forces CUDA builds)
    nox -s tests                                   # the test suite, both tiers (what .ci/run runs)
    nox -s unit                                    # the fast tier only: tests/unit, in-process
    nox -s train-torch train-tensorflow train-jax compare -- --experiment smoke   # matrix + report
    nox -s train-torch train-tensorflow train-jax compare -- -e flowers12 --seeds 3   # 3 seeds each,
                                                   # then the paired report (docs/comparisons.md)
    nox -s compare -- --experiment smoke           # report from the runs already there
    nox -s parity -- --image-size 64               # same weights, same photos, every backend
    nox -s bench -- --backends torch,tensorflow    # speed and memory vs native code and the CPU peak
    nox -s export -- RUN_DIR                       # keras, SavedModel, ONNX, LiteRT; verified
    nox -s docs                                    # the documentation site, strictly, into site/

A session installs CUDA builds when nvidia-smi reports a GPU, CPU builds otherwise. TensorFlow is in
every training session because tf.data feeds every backend; the torch and jax sessions get its CPU
build so it never competes with them for the GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

BACKENDS = ("torch", "tensorflow", "jax")
# The pyproject extra of each backend's GPU build (torch's default PyPI wheel is a CUDA build).
GPU_EXTRAS = {"torch": "torch", "tensorflow": "tensorflow-gpu", "jax": "jax-gpu"}


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return result.returncode == 0 and "GPU" in result.stdout


def split_device_args(posargs: list[str]) -> tuple[bool, list[str]]:
    """(use_gpu, remaining args): --gpu / --cpu override nvidia-smi detection."""
    rest = [a for a in posargs if a not in ("--cpu", "--gpu")]
    if "--gpu" in posargs:
        return True, rest
    if "--cpu" in posargs:
        return False, rest
    return has_nvidia_gpu(), rest


def install_backend(session: nox.Session, backend: str, gpu: bool, extras: str = "") -> None:
    """Install flowers with one backend's stack: CUDA builds when gpu, CPU builds otherwise."""
    tensorflow_gpu = gpu and backend == "tensorflow"
    # tensorflow and tensorflow-cpu install the same module: never leave both in a reused venv.
    other_tf = "tensorflow-cpu" if tensorflow_gpu else "tensorflow"
    session.run("python", "-m", "pip", "uninstall", "--yes", "--quiet", other_tf, silent=True)
    extra_list = ",".join(e for e in (GPU_EXTRAS[backend] if gpu else backend, extras) if e)
    session.install("-e", f".[{extra_list}]")
    session.log(f"{backend}: {'CUDA' if gpu else 'CPU'} builds installed")


def tracking_extra() -> str:
    """The `track` extra when FLOWERS_TRACK asks for MLflow (`FLOWERS_TRACK=mlflow nox -s train-torch`)."""
    return "track" if "mlflow" in os.environ.get("FLOWERS_TRACK", "").lower() else ""


def train_session(backend: str):
    def session_fn(session: nox.Session) -> None:
        gpu, args = split_device_args(list(session.posargs))
        install_backend(session, backend, gpu, tracking_extra())
        if not {"--experiment", "-e"} & set(args):
            args = ["--experiment", os.environ.get("EXPERIMENT", "baseline"), *args]
        session.run("flowers", "train", "--backend", backend, *args)

    session_fn.__doc__ = f"Train an experiment under the {backend} backend (posargs: flowers train)."
    return session_fn


for _backend in BACKENDS:
    nox.session(name=f"train-{_backend}")(train_session(_backend))


# `flowers train` options that mean nothing to `flowers compare` (option -> takes a value): dropped
# so that one set of posargs can drive `nox -s train-torch train-jax compare -- ...`.
TRAIN_ONLY_OPTIONS = {"--set": True, "--resume": False, "--backend": True, "--cpu": False,
                      "--gpu": False, "--distribute": True, "--seeds": True}


def compare_args(posargs: list[str]) -> list[str]:
    """posargs for `flowers compare`: train-only options dropped, --experiment defaulted."""
    args, rest = [], list(posargs)
    while rest:
        arg = rest.pop(0)
        name = arg.split("=", 1)[0]
        if name in TRAIN_ONLY_OPTIONS:
            if TRAIN_ONLY_OPTIONS[name] and "=" not in arg and rest:
                rest.pop(0)
            continue
        args.append(arg)
    run_dirs = [a for i, a in enumerate(args) if not a.startswith("-")
                and (i == 0 or args[i - 1] not in ("--experiment", "-e", "--runs-dir", "--out"))]
    if not {"--experiment", "-e"} & {a.split("=", 1)[0] for a in args} and not run_dirs:
        args = ["--experiment", os.environ.get("EXPERIMENT", "baseline"), *args]
    return args


@nox.session
def compare(session: nox.Session) -> None:
    """Report on the newest run of each backend (posargs: flowers compare); never trains."""
    # reading runs and drawing charts needs no backend
    session.install("-e", f".[{tracking_extra()}]" if tracking_extra() else ".")
    session.run("flowers", "compare", *compare_args(list(session.posargs)))


@nox.session
def parity(session: nox.Session) -> None:
    """Same weights, same real photos under every backend (posargs: flowers parity)."""
    gpu, args = split_device_args(list(session.posargs))
    # On a GPU, torch's default wheel and jax[cuda12] use it; TensorFlow stays the CPU build the
    # torch and jax extras bring (parity.json records each backend's device).
    session.install("-e", f".[torch,{GPU_EXTRAS['jax'] if gpu else 'jax'}]")
    session.run("flowers", "parity", *args)


@nox.session
def bench(session: nox.Session) -> None:
    """Every backend against native PyTorch/TensorFlow and the hardware (posargs: flowers bench)."""
    gpu, args = split_device_args(list(session.posargs))
    # One environment holds all three backends so one invocation interleaves them. On a GPU torch's
    # default wheel and jax[cuda12] use it; TensorFlow stays the CPU build (bench.json and bench.md
    # record each backend's device).
    session.install("-e", f".[torch,{GPU_EXTRAS['jax'] if gpu else 'jax'}]")
    session.run("flowers", "bench", *args)


@nox.session
def export(session: nox.Session) -> None:
    """Export a run to every format, verified in each runtime (posargs: flowers export)."""
    # All three backends: each re-runs model.keras for verification and torch writes ONNX. The
    # checks run on the CPU (flowers/export.py), so CPU builds are enough on any machine.
    session.install("-e", ".[torch,jax,export]")
    session.run("flowers", "export", *session.posargs)


@nox.session
def serve(session: nox.Session) -> None:
    """Every runtime of an export version behind the server, under load (posargs: flowers bench-serve)."""
    # CPU builds of every backend and runtime: bench-serve serves each one in turn.
    session.install("-e", ".[torch,jax,export,serve]")
    session.run("flowers", "bench-serve", *session.posargs)


@nox.session
def unit(session: nox.Session) -> None:
    """The fast tier (tests/unit): pure functions in one process, no training, under 2 minutes."""
    # TensorFlow's CPU build only: the image resize that payload parsing shares with training is a
    # TensorFlow op. No other backend, so a unit test that needs one fails here.
    session.install("-e", ".[tensorflow]", "pytest>=8", "filelock>=3.12")
    session.run("pytest", "tests/unit", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Lint, then both tiers: tests/unit and the CLI tests (all three backends, CPU builds)."""
    session.install("-e", ".[test]")
    # KerasHub for tests/test_hub.py, without its tensorflow-text requirement: that pulls the full
    # `tensorflow` over tensorflow-cpu (same module folder), and image backbones never import it.
    session.install("--no-deps", "keras-hub==0.32.0")
    session.install("absl-py", "numpy", "packaging", "regex", "rich", "kagglehub!=1.0.1",
                    "kagglesdk==0.1.28", "sentencepiece", "tokenizers")  # its other requirements
    session.run("ruff", "check", ".")
    # Two workers, each test file on one of them (its module fixtures are made once): most tests
    # wait on subprocesses that import a framework or compile a graph on one core, so two at once
    # take ~0.7 of the serial time on a 2-core CPU. `-- -n 0` runs them serially.
    session.run("pytest", "-n", "2", "--dist", "loadfile", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ (posargs: mkdocs build); a broken link fails it."""
    # `-e .` because mkdocs-click imports the CLI and the settings hook reads flowers.config; neither
    # imports a backend, so no framework is installed.
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs,
                env={"NO_MKDOCS_2_WARNING": "1"})
