"""Files that are complete or absent: the one home of atomic writes and published directories.

Everything flowers writes for someone else to read (run directories, export versions, reports,
parity.json, bench results, progress.json and the per-epoch bookkeeping) goes through here:

- write_json / write_text: written to a temporary name in the same folder, flushed and fsync-ed,
  then renamed over the target with os.replace, so a kill mid-write leaves the old file or the new
  one, never a half-written one.
- staging_dir / publish_dir: a directory is built under a dot-name beside its final place
  (`.incomplete-<id>` for runs and export versions) and renamed into place only when complete.
- make_public_dir: the staging directory gets the umask's normal permissions (tempfile.mkdtemp would
  make it 0o700, unreadable by a model server or a colleague once published).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flowers.errors import FlowersError

# Prefix of a directory that is still being written (a run, an export version).
INCOMPLETE_PREFIX = ".incomplete-"


def read_json(path: str | Path) -> Any:
    """The JSON in path; a one-line FlowersError when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlowersError(f"{path}: unreadable JSON ({exc})") from None


def write_json(path: str | Path, data: Any) -> None:
    """Replace path with data as indented JSON, atomically (see the module docstring)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Replace path with text atomically: temporary file, flush, fsync, os.replace."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as f:
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            Path(f.name).unlink(missing_ok=True)
            raise
    # NamedTemporaryFile creates 0o600; a published file gets the umask's normal permissions.
    os.chmod(f.name, 0o666 & ~_umask())
    os.replace(f.name, path)


def write_files(folder: str | Path, files: Mapping[str, str]) -> None:
    """Write each name -> text into folder (created if needed), each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_text(folder / name, text)


def make_public_dir(parent: Path, prefix: str) -> Path:
    """Create a new, uniquely named directory parent/<prefix><random> with normal permissions."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str = INCOMPLETE_PREFIX) -> Iterator[Path]:
    """A new staging directory under parent, removed with everything in it if the block fails.

    The block publishes it (publish_dir) when it is complete; a published directory is kept.
    """
    staging = make_public_dir(parent, prefix)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_dir(staging: Path, final: Path, replace: bool = False) -> Path:
    """Rename a complete staging directory to final; returns final.

    Without replace, an existing final is never touched: FileExistsError (the caller picks another
    name, as export does for the next version). With replace, an existing final is swapped out
    whole and then deleted, so readers see the old directory or the new one, never a mix.
    """
    if not replace:
        try:
            staging.rename(final)  # a non-empty final makes rename fail
        except OSError:
            if final.exists():
                raise FileExistsError(final) from None
            raise
        return final
    old = None
    if final.exists():
        old = make_public_dir(final.parent, f".{final.name}-old-")
        final.rename(old / final.name)
    staging.rename(final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def final_name(path: Path) -> str:
    """The published name of a staging directory `.incomplete-<id>`: `<id>`."""
    return path.name.removeprefix(INCOMPLETE_PREFIX)


def is_incomplete(path: Path) -> bool:
    return path.name.startswith(INCOMPLETE_PREFIX)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
