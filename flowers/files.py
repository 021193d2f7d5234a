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
- no_space: the one-line reason when a write failed because the disk, a quota or the file-size limit
  (ulimit -f) is full, found in the exception or its causes, whichever library raised it (h5py,
  TensorFlow, onnx, numpy, Python itself); write_error adds a read-only file system and a refused
  permission; check_writable refuses an output folder that cannot be written before any work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flowers import faults
from flowers.errors import FlowersError

# Prefix of a directory that is still being written (a run, an export version).
INCOMPLETE_PREFIX = ".incomplete-"


# errno values of a write that found no room: a full disk, a full quota, the file-size limit
_NO_SPACE = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
             errno.EFBIG: "File too large"}
_NO_SPACE_TEXT = re.compile("|".join(map(re.escape, _NO_SPACE.values())), re.IGNORECASE)
_PATH_IN_TEXT = re.compile(r"(?:filename = |file |path )?'(/[^']+)'|\"(/[^\"]+)\"")


def no_space(exc: BaseException) -> str | None:
    """A one-line message when exc (or an exception it came from) is a write that found no room.

    The libraries that write report it differently: Python's OSError carries the errno and the
    file; h5py and TensorFlow put "errno = 28" or "No space left on device" and the file name into
    their message. Returns None for any other exception.
    """
    seen: set[int] = set()
    named = None  # the first file an exception of the chain names (a wrapper may name it)
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        # shutil's copies name the source as filename and the file written as filename2
        path = getattr(exc, "filename2", None) or getattr(exc, "filename", None)
        if not path and (match := _PATH_IN_TEXT.search(text)):
            path = match.group(1) or match.group(2)
        named = named or path
        code = getattr(exc, "errno", None)
        found = _NO_SPACE_TEXT.search(text)
        if code in _NO_SPACE or found:
            reason = _NO_SPACE[code] if code in _NO_SPACE else found.group(0)
            if reason == _NO_SPACE[errno.EFBIG]:
                reason += ": over the file-size limit, ulimit -f"
            where = f" writing {path or named}" if path or named else ""
            return (f"no space left{where} ({reason}); nothing was published: free some space and "
                    "run the command again (an unfinished training run continues with --resume)")
        exc = exc.__cause__ or exc.__context__
    return None


# errno values of a folder that cannot be written at all
_UNWRITABLE = {errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
               errno.EPERM: "Operation not permitted"}


def write_error(exc: BaseException) -> str | None:
    """no_space's line, or one for a write refused by a read-only file system or its permissions
    (an OSError in exc's chain with that errno); None for any other exception."""
    if line := no_space(exc):
        return line
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
            path = exc.filename2 or exc.filename
            what = "cannot write" if exc.errno == errno.EROFS else "no permission for"
            return (f"{what}{f' {path}' if path else ''} ({_UNWRITABLE[exc.errno]}); nothing was "
                    "published: make the folder writable or use another one (an unfinished "
                    "training run continues with --resume)")
        exc = exc.__cause__ or exc.__context__
    return None


def check_writable(folder: Path, option: str) -> None:
    """Raise a one-line FlowersError saying which folder cannot be written and why, and which option
    (e.g. --runs-dir) chooses another, unless a folder can be made in it (or, while it does not exist
    yet, in the nearest folder above it that does). Nothing is left behind: a command refused later
    for another reason has written nothing."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".flowers-write-check-"))
        return
    except OSError as exc:
        reason = _NO_SPACE.get(exc.errno) or exc.strerror or str(exc)
    # raised outside the except block: the OSError is not its context, so the CLI prints this line
    raise FlowersError(f"cannot write to {folder} ({reason}); make it writable or choose another "
                       f"folder with {option}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Name path in an OSError raised inside the block without a file name (a library that writes
    through a file object it opened, as matplotlib's savefig does), so the one line says which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


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
    A process killed with SIGKILL cannot remove its own: the staging directory is locked (flock,
    released when its process ends) while the block runs, and the next staging_dir under the same
    parent and prefix deletes every sibling nobody holds, so stale ones do not pile up.
    """
    _sweep(parent, prefix)
    staging = make_public_dir(parent, prefix)
    held = os.open(staging, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(held)


def _sweep(parent: Path, prefix: str) -> None:
    """Delete parent's prefix* directories left by processes that died (their lock is free)."""
    if not parent.is_dir():
        return
    for stale in parent.glob(f"{glob.escape(prefix)}*"):
        if not stale.is_dir() or stale.is_symlink():
            continue
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(stale, ignore_errors=True)
        except BlockingIOError:
            pass  # another process is building it now
        finally:
            os.close(fd)


def publish_dir(staging: Path, final: Path, replace: bool = False) -> Path:
    """Rename a complete staging directory to final; returns final.

    Without replace, an existing final is never touched: FileExistsError (the caller picks another
    name, as export does for the next version). With replace, an existing final is swapped with
    staging in one atomic rename (renameat2 RENAME_EXCHANGE) and then deleted, so readers, and a
    kill at any moment, see the old directory or the new one, never a mix and never neither.
    """
    faults.point("publish-staged")
    if not replace:
        try:
            staging.rename(final)  # a non-empty final makes rename fail
        except OSError:
            if final.exists():
                raise FileExistsError(final) from None
            raise
        faults.point("publish-done")
        return final
    if final.exists() and _exchange(staging, final):  # one atomic step: staging now holds the old
        faults.point("publish-exchanged")
        shutil.rmtree(staging, ignore_errors=True)
        faults.point("publish-done")
        return final
    old = None
    if final.exists():  # a filesystem without RENAME_EXCHANGE: two renames, a moment with neither
        old = make_public_dir(final.parent, f".{final.name}-old-")
        final.rename(old / final.name)
    staging.rename(final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    faults.point("publish-done")
    return final


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE, glibc 2.28+).

    Python's os module has no such call, so it is reached through libc. False where the C library
    or the filesystem does not have it (the caller falls back to two renames).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


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
