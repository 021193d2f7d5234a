"""The README's first two lines work on a fresh machine, and .ci/run runs its test line literally."""

import subprocess

from conftest import PROJECT_ROOT


def _first_bash_block() -> list[str]:
    lines = (PROJECT_ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    return lines[start + 1:lines.index("```", start)]


def test_readme_opens_with_the_main_job_and_the_tests_each_bootstrapping_nox():
    main_job, tests = _first_bash_block()
    for line in (main_job, tests):
        # only Python 3.11+ is needed: nox comes from a venv the line makes itself
        assert line.startswith("python3 -m venv .venv && .venv/bin/pip install nox && .venv/bin/nox -s ")
    assert ".venv/bin/nox -s train-torch train-tensorflow" in main_job
    assert tests.split("#")[0].rstrip().endswith(".venv/bin/nox -s tests")
    assert "# the test suite" in tests


def test_ci_runs_the_readmes_test_line_literally():
    printed = subprocess.run(["bash", str(PROJECT_ROOT / ".ci" / "run"), "--print-test-command"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert printed == _first_bash_block()[1].split("#")[0].rstrip()


def test_an_installed_wheel_would_hold_every_subpackage():
    # `pip install .` (not -e) ships what pyproject's package list finds: every folder of flowers/
    # with an __init__.py must be in it, or `flowers bench` / `export` / `parity` fail after install.
    import tomllib

    from setuptools import find_packages

    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(find_packages(str(PROJECT_ROOT), **config["packages"]["find"]))
    on_disk = {".".join(p.parent.relative_to(PROJECT_ROOT).parts)
               for p in (PROJECT_ROOT / "flowers").rglob("__init__.py")}
    assert on_disk <= shipped, f"not in a wheel: {sorted(on_disk - shipped)}"
