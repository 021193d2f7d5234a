"""Tool environments: programs flowers runs that cannot live in its own Python environment.

- PythonEnv: a virtualenv of pinned requirements, e.g. the TF.js converter, which needs
  tensorflow 2.19 (and tf_keras, jax, TF Decision Forests) beside flowers' tensorflow 2.21.
- NodeEnv: a node package whose package.json and package-lock.json ship inside flowers, installed
  with `npm ci` (exactly the locked versions). flowers' own node scripts stay in the package and
  load these modules through FLOWERS_NODE_ENV (see flowers/export/formats/_tfjs/modules.mjs).

Both are created on first use under paths.tools_dir() (the user's cache folder, shared by every
checkout and workspace) and reused. Each is built in a staging folder and renamed into place only
when complete (files.staging_dir / publish_dir), so a killed or offline install leaves nothing that
looks ready; a folder's name carries a hash of what it installs, so a changed pin builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowers import files, paths, processes
from flowers.errors import FlowersError

READY = "flowers-ready.json"  # written last: a folder without it was never finished
PIP_TIMEOUT_S = 1800
NPM_TIMEOUT_S = 900

Step = Callable[[str], None]


def _key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:12]


def _build(folder: Path, fill: Callable[[Path], dict]) -> Path:
    """Build `folder` in a staging folder beside it with fill(staging) and publish it; returns it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with files.staging_dir(folder.parent, prefix=f".incomplete-{folder.name}-") as staging:
        facts = fill(staging)
        files.write_json(staging / READY, facts)
        try:
            files.publish_dir(staging, folder)
        except FileExistsError:
            pass  # another process finished the same environment first: use theirs
    return folder


@dataclass(frozen=True)
class PythonEnv:
    """A virtualenv of pinned requirements, made with this Python's venv and pip."""

    name: str
    requirements: tuple[str, ...]
    what: str  # what it is for, in messages: "the TF.js converter"

    def folder(self) -> Path:
        return paths.tools_dir() / f"{self.name}-py{sys.version_info[0]}{sys.version_info[1]}-" \
                                   f"{_key(*self.requirements)}"

    def ready(self) -> bool:
        return (self.folder() / READY).is_file()

    def python(self) -> Path:
        """Its interpreter. Run tools as `python -m` or `python -c`: the console scripts pip wrote
        name the staging folder the environment was built in."""
        return self.folder() / "bin" / "python"

    def ensure(self, step: Step) -> Path:
        """The environment's folder, created first if needed (minutes, once).

        Raises:
            FlowersError: venv or pip failed (offline, no space): pip's own error line.
        """
        if self.ready():
            return self.folder()
        step(f"creating the environment of {self.what} in {self.folder()} (first use only): "
             f"pip install {' '.join(self.requirements)}")

        def fill(staging: Path) -> dict:
            processes.run_tool([sys.executable, "-m", "venv", str(staging)], 300)
            try:
                processes.run_tool([str(staging / "bin" / "python"), "-m", "pip", "install",
                                    "--quiet", *self.requirements], PIP_TIMEOUT_S)
            except FlowersError as exc:
                raise FlowersError(f"cannot create the environment of {self.what} ({exc}); it needs "
                                   "the Python package index once (then it is reused)") from None
            return {"requirements": list(self.requirements), "python": sys.version.split()[0]}

        return _build(self.folder(), fill)


@dataclass(frozen=True)
class NodeEnv:
    """node_modules of a package.json + package-lock.json that ship inside flowers (`npm ci`)."""

    name: str
    source: Path  # the folder holding package.json and package-lock.json
    what: str
    min_node: int = 18

    def problem(self) -> str | None:
        """Why node scripts cannot run here (node or npm missing or too old), else None. Fast."""
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            return (f"{self.what} needs Node.js {self.min_node} or newer with npm, which "
                    f"{'is' if node is None and npm is None else 'are'} not installed "
                    "(https://nodejs.org, or your system's nodejs and npm packages)")
        version = node_version()
        match = re.match(r"v?(\d+)", version)
        major = int(match.group(1)) if match else 0  # "" (node gave no version): too old
        if major < self.min_node:
            return f"{self.what} needs Node.js {self.min_node} or newer; {node} is {version}"
        return None

    def folder(self) -> Path:
        lock = (self.source / "package-lock.json").read_bytes()
        return paths.tools_dir() / f"{self.name}-{_key(lock)}"

    def ready(self) -> bool:
        return self.problem() is None and (self.folder() / READY).is_file()

    def package_version(self, package: str) -> str:
        """The installed version of one of its packages (from the lockfile)."""
        lock = json.loads((self.source / "package-lock.json").read_text())
        return lock["packages"][f"node_modules/{package}"]["version"]

    def ensure(self, step: Step) -> Path:
        """The folder holding node_modules, installed first if needed (`npm ci`, once).

        Raises:
            FlowersError: no usable node/npm, or npm failed (offline): npm's error line.
        """
        problem = self.problem()
        if problem:
            raise FlowersError(problem)
        if self.ready():
            return self.folder()
        step(f"installing {self.what}'s node packages in {self.folder()} (first use only): npm ci")

        def fill(staging: Path) -> dict:
            for name in ("package.json", "package-lock.json"):
                shutil.copyfile(self.source / name, staging / name)
            try:
                processes.run_tool(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts",
                                    "--loglevel=error"], NPM_TIMEOUT_S, cwd=staging)
            except FlowersError as exc:
                raise FlowersError(f"cannot install the node packages of {self.what} ({exc}); "
                                   "`npm ci` needs the npm registry once (then they are reused)"
                                   ) from None
            return {"node": node_version()}

        return _build(self.folder(), fill)


def node_version() -> str:
    """`node --version` ("v20.20.2"), or "" when node is missing."""
    try:
        return processes.run_command(["node", "--version"], timeout_s=30)
    except FlowersError:
        return ""
