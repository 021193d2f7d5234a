"""Shared fixtures: the CLI in subprocesses (one backend per process) and runs reused across tests.

Training runs are session-scoped so the smoke, learnable-set and flowers12 runs are made once and
reused by the train, evaluate, export and compare tests; the suite stays minutes long on a 2-core CPU.

Two kinds of image data: the learnable set the suite generates (tests/learnable.py; `learnable_set`),
which every test about mechanics and learning uses, so a plain clone tests them; and real photos
(`flowers12`: $FLOWERS_PHOTOS, else ../shared/data/flowers12, in flowers12's train/ and test/
layout) for the tests whose point is real photos. Without a photo folder those are skipped with one
reason, and under CI=true they fail: CI never skips them silently. Under
pytest-xdist (`nox -s tests` runs two workers, each test file on one worker) a session fixture used by
several files is made once for all workers: the first worker makes it under a file lock, the others
read what it made (`_once`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

import learnable
from flowers import paths
from flowers.errors import FlowersError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The real-photo folder (flowers12's layout: train/ and test/ of 12 species).
FLOWERS12 = paths.photos_dir()  # $FLOWERS_PHOTOS, else ../shared/data/flowers12: flowers' own rule
NO_PHOTOS = "no photo folder: set FLOWERS_PHOTOS or put flowers12 at ../shared/data/flowers12"
BACKENDS = ("torch", "tensorflow", "jax")

# Two xdist workers on a 2-core CPU each start framework processes, and torch's OpenMP pool takes one
# thread per core by default: two such pools oversubscribe the cores and Keras-on-torch collapses
# (two flowers12 torch runs at once took 652 s together with 2 threads each, 170 s with 1 each; the
# same losses to the bit). So each worker's processes get their share of the cores (a user's own
# OMP_NUM_THREADS wins).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """The jax processes of one test session share one persistent XLA compilation cache.

    Dozens of them compile the same smoke model's programs; a cached executable is the same compiled
    code, so the results are bit-identical (measured: smoke val_loss 0.8664 either way) and a jax
    smoke run took 14 s instead of 20.5 s. Every program is cached (jax's defaults skip those that
    compile in under a second, most of them here). A user's own JAX_COMPILATION_CACHE_DIR wins.
    """
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # shared by the workers of this session (see _once)
        os.environ.update(JAX_COMPILATION_CACHE_DIR=str(root / "jax-compilation-cache"),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def flowers(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the flowers CLI in a fresh process (so each gets its own keras backend)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("KERAS_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "flowers.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=PROJECT_ROOT)


def python(code: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh process (for drivers that patch the network or add hooks)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("KERAS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=PROJECT_ROOT)


LAUNCH_TIMEOUT_S = 420


def launch(commands: list[tuple[list[str], dict]], logs: Path, timeout: float = LAUNCH_TIMEOUT_S):
    """Run commands at once, each in its own process group; (returncode, stdout, stderr) each.

    Past `timeout` the test fails and every group still running is SIGKILLed.
    """
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    running = []
    for i, (args, extra) in enumerate(commands):
        out, err = (logs / f"{i}.out").open("w"), (logs / f"{i}.err").open("w")
        running.append(subprocess.Popen(args, stdout=out, stderr=err, cwd=PROJECT_ROOT,
                                        env={**env, "PYTHONWARNINGS": "ignore", **extra},
                                        start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for process in running:
            process.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"processes still running after {timeout:.0f} s (logs: {logs})")
    finally:
        for process in running:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [(p.returncode, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i, p in enumerate(running)]


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    """The run directory `flowers train` printed on its last line (asserting it succeeded)."""
    assert result.returncode == 0, f"flowers failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return Path(result.stdout.strip().splitlines()[-1])


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Assert a user error: non-zero exit, no traceback, exactly one line on stderr; return it."""
    assert result.returncode != 0, f"expected failure, got success:\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def flowers12() -> Path:
    """The real-photo folder; without it the test is skipped (one reason), under CI=true it fails."""
    if not FLOWERS12.is_dir():
        if _in_ci():
            pytest.fail(f"{NO_PHOTOS} (CI=true: real-photo tests must run)", pytrace=False)
        pytest.skip(NO_PHOTOS)
    return FLOWERS12


def _once(tmp_path_factory, name: str, make):
    """The JSON value `make(folder)` returns, made once per test session across xdist workers.

    Every worker of one session shares the parent of its own basetemp; the first to take the lock
    makes the value in a folder there, the others wait for it and read it back.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / f"{name}.json"
    with FileLock(f"{cache}.lock"):
        if cache.is_file():
            return json.loads(cache.read_text())
        folder = root / name
        folder.mkdir(exist_ok=True)
        value = make(folder)
        cache.write_text(json.dumps(value))
        return value


def _train_each_backend(experiment: str, runs: Path, *settings: str) -> dict[str, str]:
    return {b: str(run_dir_of(flowers("train", "-e", experiment, "--backend", b, "--runs-dir",
                                      str(runs), *settings))) for b in BACKENDS}


@pytest.fixture(scope="session")
def learnable_set(tmp_path_factory) -> Path:
    """The generated set (tests/learnable.py): 12 classes, train/ (40 a class) and test/ (15)."""
    return Path(_once(tmp_path_factory, "learnable-set", lambda folder: str(learnable.make(folder))))


def learnable_photos(root: Path, count: int = 3) -> list[Path]:
    """The first `count` JPEG test images of the set's first class (for predict and serve tests)."""
    return sorted((root / "test" / learnable.CLASSES[0]).glob("*.jpg"))[:count]


def experiment_on(name: str, images: Path, folder: Path) -> Path:
    """experiments/NAME.toml with data.source=folder:IMAGES, written as folder/NAME.toml.

    A file, not --set data.source: an experiment file's own folder is checked when it loads, before
    --set applies, and flowers12's ../shared/data/flowers12 may be absent.
    """
    text = (PROJECT_ROOT / "experiments" / f"{name}.toml").read_text()
    text, count = re.subn(r"^source = .*$", f'source = "folder:{images}"', text, flags=re.M)
    assert count == 1, name
    (folder / f"{name}.toml").write_text(text)
    return folder / f"{name}.toml"


@pytest.fixture(scope="session")
def learnable_experiments(tmp_path_factory, learnable_set) -> dict[str, Path]:
    """flowers12.toml and flowers12-custom.toml on the generated set, as files."""
    made = _once(tmp_path_factory, "learnable-experiments", lambda folder: {
        name: str(experiment_on(name, learnable_set, folder)) for name in ("flowers12", "flowers12-custom")})
    return {name: Path(path) for name, path in made.items()}


# The learning runs: the README's custom backbone (experiments/flowers12-custom.toml, a small CNN
# trained whole at 32 px) on the generated set. A random frozen ResNet50 cannot learn it (measured
# 0.08-0.10, chance): on flowers12 it beats chance through the photos' colour, which this set
# withholds. 12 epochs instead of 8: the set has 480 training images, not 720.
LEARNABLE_EPOCHS = 12


@pytest.fixture(scope="session")
def learnable_runs(tmp_path_factory, learnable_experiments) -> dict[str, Path]:
    """One flowers12-custom run per backend on the generated set."""
    made = _once(tmp_path_factory, "learnable-runs", lambda runs: _train_each_backend(
        str(learnable_experiments["flowers12-custom"]), runs, "--set", f"train.epochs={LEARNABLE_EPOCHS}"))
    return {b: Path(run) for b, run in made.items()}


def needs(what: str, found: bool) -> None:
    """Skip the test, naming what is missing; under CI=true fail instead (.ci/run installs it)."""
    if not found:
        if _in_ci():
            pytest.fail(f"{what} is missing under CI=true (.ci/run installs it)")
        pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="session")
def tfjs_tools(tmp_path_factory) -> dict:
    """The TF.js converter's virtualenv and node packages, made once per machine (minutes, and the
    package registries, the first time; flowers.toolenvs keeps them in the user's cache folder)."""
    needs("Node.js with npm", bool(shutil.which("node") and shutil.which("npm")))

    def make(folder):
        done = python("""
            import json
            from flowers.export.formats import tfjs
            tfjs.TOOLCHAIN.prepare(print)
            print(json.dumps({"node_env": str(tfjs.NODE.folder())}))
        """, timeout=2400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return _once(tmp_path_factory, "tfjs-tools", make)


@pytest.fixture(scope="session")
def serve_clients(tmp_path_factory) -> Path:
    """The python of a virtualenv holding pyproject's `serve-clients` extra (kserve, tritonclient,
    Google's aiplatform): the clients' own pins clash with the server's stack (kserve holds
    protobuf and psutil back), so they get their own environment, made once per machine with
    flowers.toolenvs like the TF.js converter's (a minute, and the package index, the first time)."""
    from importlib.metadata import requires

    from flowers import toolenvs

    pins = tuple(r.split(";")[0].strip() for r in requires("flowers") or []
                 if re.search(r"""extra\s*==\s*["']serve-clients["']""", r))
    assert pins, "pyproject.toml has no serve-clients extra"
    env = toolenvs.PythonEnv("serve-clients", pins, "the serving clients")

    def make(folder) -> str:
        try:
            return str(env.ensure(print))
        except FlowersError as exc:  # offline: pip's own line
            return f"error: {exc}"

    made = _once(tmp_path_factory, "serve-clients", make)
    needs(f"the serving clients' virtualenv ({made})", not made.startswith("error: "))
    return env.python()


@contextlib.contextmanager
def served(*args: str, log: Path, wait: bool = True, env: dict | None = None,
           start_timeout_s: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """`flowers serve ARGS` on a free loopback port: (base URL, process); stopped on exit."""
    from flowers.serve.bench import free_port, stop, wait_until_ready

    port = free_port()
    command = [sys.executable, "-m", "flowers.cli", "serve", *args, "--host", "127.0.0.1",
               "--port", str(port)]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        if wait:
            try:
                wait_until_ready(url, process, start_timeout_s)
            except Exception:
                pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        yield url, process
    finally:
        if process.poll() is None:
            stop(process)


@contextlib.contextmanager
def mlflow_server(folder: Path, start_timeout_s: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` on a free loopback port, its runs in folder/mlflow.db and its artifacts
    uploaded over HTTP into folder/artifacts: (URL, process); its process group killed on exit."""
    from flowers.serve.bench import free_port, wait_until_ready

    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    with open(folder / "mlflow-server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(url, process, start_timeout_s)  # GET /health until 200, as for flowers serve
        except FlowersError:
            pytest.fail(f"mlflow server did not start:\n{(folder / 'mlflow-server.log').read_text()[-3000:]}")
        yield url, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def served_version(smoke_runs, tmp_path_factory) -> Path:
    """The torch smoke run exported to ONNX (the default runtime of a version), for the servers;
    also registered with --track mlflow in the SQLite store registry_store() names (one export
    serves both: tests/test_tracking.py reads the registered version)."""
    return Path(_once(tmp_path_factory, "served-version", lambda out: str(run_dir_of(
        flowers("export", str(smoke_runs["torch"]), "--formats", "onnx", "--out", str(out),
                "--track", "mlflow", env=registry_store(out, create=True))))))


def registry_store(out: Path, create: bool = False) -> dict[str, str]:
    """MLFLOW_TRACKING_URI of the SQLite store beside the exports under `out`; `create` makes its
    experiment "smoke" keep artifacts there too (not in ./mlruns of the project)."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    if create:
        import mlflow

        mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment(
            "smoke", artifact_location=(out / "mlartifacts").as_uri())
    return env


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> dict[str, Path]:
    """One smoke run per backend (synthetic images, 32 px, 2 epochs)."""
    made = _once(tmp_path_factory, "smoke-runs", lambda runs: _train_each_backend("smoke", runs))
    return {b: Path(run) for b, run in made.items()}


@pytest.fixture(scope="session")
def flowers12_runs(tmp_path_factory, flowers12) -> dict[str, Path]:
    """One run per backend of experiments/flowers12.toml (real photos, random weights, 32 px).

    With train.cache_features: the same math and result as the standard run (tests/test_bench.py
    proves it; measured here: torch val_accuracy 0.2958, val_loss 2.2478 either way), in 66 s for
    the three backends instead of about 250 s.
    """
    made = _once(tmp_path_factory, "flowers12-runs", lambda runs: _train_each_backend(
        str(experiment_on("flowers12", flowers12, runs)), runs, "--set", "train.cache_features=true"))
    return {b: Path(run) for b, run in made.items()}


@pytest.fixture(scope="session")
def parity_run(tmp_path_factory, flowers12) -> tuple[subprocess.CompletedProcess, Path]:
    """`flowers parity` under every backend on real flowers12 photos at 64 px: (result, out dir)."""
    def make(out: Path) -> dict:
        result = flowers("parity", "--image-size", "64", "--out", str(out))
        return {"args": result.args, "returncode": result.returncode, "stdout": result.stdout,
                "stderr": result.stderr, "out": str(out)}

    made = _once(tmp_path_factory, "parity-run", make)
    result = subprocess.CompletedProcess(made["args"], made["returncode"], made["stdout"], made["stderr"])
    return result, Path(made["out"])


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# ---- reports/faults.json: every fault a test tries, with its outcome ----------------------------
# A test records a row (fault_row(...)) and fills in what happened; the row travels with the test's
# report (user_properties, which xdist sends to the controller), and the session's end writes every
# row with the test's own result into reports/faults.json and faults.md ($FLOWERS_REPORTS_DIR).
_fault_rows: list[dict] = []


@pytest.fixture
def fault_row(request):
    """fault_row(kind=..., backend=..., fault=...) -> the row; set row["outcome"] and row["identical"]."""
    def record(**fields) -> dict:
        row = {"kind": fields.pop("kind"), "backend": fields.pop("backend", None),
               "fault": fields.pop("fault"), "outcome": None, "identical": None,
               "traceback": None, **fields}
        request.node.user_properties.append(("fault_row", row))
        return row
    return record


def pytest_runtest_logreport(report):
    if os.environ.get("PYTEST_XDIST_WORKER") or report.when != "call":
        return
    for key, row in report.user_properties:
        if key == "fault_row":
            _fault_rows.append({**row, "test": report.nodeid, "passed": report.passed})


def pytest_sessionfinish(session):
    if os.environ.get("PYTEST_XDIST_WORKER") or not _fault_rows:
        return
    from flowers import files, host

    rows = sorted(_fault_rows, key=lambda r: (r["kind"], r["test"]))
    summary = {"rows": len(rows), "passed": sum(r["passed"] for r in rows),
               "tracebacks": sum(bool(r["traceback"]) for r in rows),
               "identical": sum(r["identical"] is True for r in rows),
               "not_identical": sum(r["identical"] is False for r in rows)}
    report = {"host": host.host_info(), "summary": summary, "rows": rows}
    table = ["| kind | backend | fault | outcome | resumed == uninterrupted | test |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        identical = {True: "yes", False: "**no**", None: "n/a"}[r["identical"]]
        outcome = r["outcome"] if r["passed"] else f"**test failed** ({r['outcome']})"
        test = r["test"].split("::", 1)[1] if "::" in r["test"] else r["test"]
        table.append(f"| {r['kind']} | {r['backend'] or '-'} | `{r['fault']}` | {outcome} | {identical} "
                     f"| `{test}` |")
    markdown = ("# Fault report\n\nWritten by the test suite (tests/conftest.py). "
                f"{summary['passed']} of {summary['rows']} faults survived, "
                f"{summary['tracebacks']} tracebacks.\n\n" + "\n".join(table) + "\n")
    root = Path(os.environ.get("FLOWERS_REPORTS_DIR") or PROJECT_ROOT / "reports")
    files.write_files(root, {"faults.json": json.dumps(report, indent=2) + "\n", "faults.md": markdown})
