"""No tracked text file names a folder of the machine that wrote it.

Reports, bench and parity results record paths relative to the project root; docs and code use
placeholders. Caught (the patterns are in GENERIC): an absolute home folder (Linux, macOS, root's,
Windows), a temporary folder (Linux and macOS), a folder under /work, and this machine's own home
and project parent. Allowed placeholders: a user name written in angle brackets, `~/`, /path/to/.
"""

import re
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SLASH = "/"  # the patterns are built, so this file does not name what it looks for
GENERIC = re.compile("|".join([
    rf"{SLASH}(?:home|Users){SLASH}[A-Za-z0-9_.-]+{SLASH}", rf"{SLASH}root{SLASH}",
    rf"{SLASH}tmp{SLASH}", rf"{SLASH}var{SLASH}folders{SLASH}", rf"{SLASH}private{SLASH}var{SLASH}",
    rf"(?<![\w.]){SLASH}work{SLASH}", r"[A-Za-z]:\\\\?Users\\\\?[A-Za-z0-9_.-]+",
]))
SKIPPED_SUFFIXES = {".png", ".jpg", ".jpeg", ".keras", ".h5", ".npz", ".onnx", ".tflite", ".pb"}


def tracked_files() -> list[Path]:
    """The files git tracks (a checkout), else every file below the project but generated folders."""
    try:
        listed = subprocess.run(["git", "-C", str(PROJECT_ROOT), "ls-files", "-z"], capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
        return [PROJECT_ROOT / name for name in listed if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".nox", ".venv", "experiments/runs", "exports", "reports", "site"}
        return [p for p in PROJECT_ROOT.rglob("*") if p.is_file()
                and not any(str(p.relative_to(PROJECT_ROOT)).startswith(s) for s in skip)]


def machine_paths(text: str, own: tuple[str, ...]) -> list[str]:
    """The machine paths in text: generic patterns, and any of `own` (this machine's folders)."""
    found = [m.group(0) for m in GENERIC.finditer(text)]
    return found + [folder for folder in own if folder in text]


def this_machines_folders() -> tuple[str, ...]:
    return tuple(f"{folder}{SLASH}" for folder in {str(Path.home()), str(PROJECT_ROOT.parent)}
                 if len(Path(folder).parts) > 1)


def test_no_tracked_text_file_names_a_machine_folder():
    own = this_machines_folders()
    offenders = {}
    for path in tracked_files():
        if path.suffix.lower() in SKIPPED_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits = machine_paths(line, own)
            if hits:
                offenders[f"{path.relative_to(PROJECT_ROOT)}:{number}"] = hits
    assert offenders == {}


def test_machine_paths_are_found_and_placeholders_are_not():
    assert machine_paths(f"images_from: {SLASH}home{SLASH}ana{SLASH}data", ()) == [
        f"{SLASH}home{SLASH}ana{SLASH}"]
    assert machine_paths(f"run {SLASH}tmp{SLASH}pytest-1{SLASH}x", ())
    assert machine_paths(f"cd {SLASH}work{SLASH}main", ())
    assert machine_paths("C:" + "\\Users\\ana\\flowers", ())
    assert machine_paths("on /srv/x", ("/srv/",)) == ["/srv/"]
    for placeholder in (f"{SLASH}home{SLASH}<you>{SLASH}photos", "~/.keras/models", "/path/to/photos",
                        "../shared/data/flowers12", "experiments/runs/smoke"):
        assert machine_paths(placeholder, ()) == [], placeholder
