"""Image folders: one subfolder per class, or train/ beside a validation folder.

scan_folder lists the images, splits them (stratified and seeded, unless the folder has its own
split folders) and checks that every file decodes with the training decoder, so an unreadable file
is skipped and named once, before any training starts.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowers.errors import FlowersError
from flowers.images import image_problem

# Folder names taken as the validation split beside train/, in order of preference: a held-out
# test/ folder is used only when no validation folder exists.
VAL_DIR_NAMES = ("val", "valid", "validation", "dev", "eval", "test")
log = logging.getLogger(__name__)


@dataclass
class FolderListing:
    """A scanned image folder: readable files with labels, and the files that were skipped."""

    class_names: list[str]
    train_files: list[str]
    train_labels: list[int]
    val_files: list[str]
    val_labels: list[int]
    skipped_files: list[str]
    split_dirs: tuple[str, str] | None = None


def scan_folder(root: Path, val_fraction: float, seed: int) -> FolderListing:
    """List a class-per-subfolder image folder and check every file decodes.

    Uses root/train with a validation folder (val, valid, validation, dev, eval, else test) when
    present; otherwise splits each class by val_fraction (stratified, seeded). Unreadable files
    are skipped and listed. A class folder holding subfolders of images is refused: it is almost
    always a split layout whose names were not recognised, which would otherwise train on the
    split names as classes.
    """
    split_dirs = _explicit_split_dirs(root)
    if split_dirs:
        train_dir, val_dir = split_dirs
        class_names = _class_dirs(train_dir)
        extra = sorted(set(_class_dirs(val_dir, required=False)) - set(class_names))
        if extra:
            raise FlowersError(f"{val_dir} has classes missing from {train_dir}: {', '.join(extra)}")
        train_per_class = [_list_files(train_dir / c) for c in class_names]
        val_per_class = [_list_files(val_dir / c) if (val_dir / c).is_dir() else []
                         for c in class_names]
    else:
        class_names = _class_dirs(root)
        train_per_class, val_per_class = [], []
        rng = np.random.default_rng(seed)
        for name in class_names:
            files = _list_files(root / name)
            order = rng.permutation(len(files))
            n_val = int(round(len(files) * val_fraction)) if len(files) > 1 else 0
            val_per_class.append(sorted(files[i] for i in order[:n_val]))
            train_per_class.append(sorted(files[i] for i in order[n_val:]))

    every_file = [f for group in (*train_per_class, *val_per_class) for f in group]
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = dict(zip(every_file, pool.map(image_problem, every_file), strict=True))
    skipped = [str(f) for f, problem in problems.items() if problem]
    if skipped:
        first = "; ".join(f"{f}: {problems[Path(f)]}" for f in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        log.warning("skipped %d unreadable file(s) in %s: %s%s", len(skipped), root, first, more)

    def keep(per_class: list[list[Path]]) -> tuple[list[str], list[int]]:
        pairs = [(str(f), label) for label, files in enumerate(per_class) for f in files
                 if not problems[f]]
        return [p for p, _ in pairs], [label for _, label in pairs]

    train_files, train_labels = keep(train_per_class)
    val_files, val_labels = keep(val_per_class)
    empty = [name for label, name in enumerate(class_names) if label not in set(train_labels)]
    if empty:
        raise FlowersError(f"{root}: no readable training images for class(es) {', '.join(empty)}")
    if not val_files:
        raise FlowersError(f"{root}: no readable validation images (add more images per class "
                           "or a val/ folder)")
    names = (split_dirs[0].name, split_dirs[1].name) if split_dirs else None
    return FolderListing(class_names, train_files, train_labels, val_files, val_labels, skipped,
                         names)


def _explicit_split_dirs(root: Path) -> tuple[Path, Path] | None:
    if not (root / "train").is_dir():
        return None
    for name in VAL_DIR_NAMES:
        if (root / name).is_dir():
            return root / "train", root / name
    return None


def _class_dirs(root: Path, required: bool = True) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if required and not names:
        raise FlowersError(f"{root} has no class subfolders (expected {root}/<class>/<image files>)")
    if required and len(names) < 2:
        raise FlowersError(f"{root} has a single class ({names[0]}); a classifier needs at least 2")
    for name in names:
        nested = sorted(p.name for p in (root / name).iterdir()
                        if p.is_dir() and not p.name.startswith("."))
        if nested:
            shown = ", ".join(nested[:3]) + (", ..." if len(nested) > 3 else "")
            raise FlowersError(
                f"{root / name} holds subfolders ({shown}), so its classes would be folder names; "
                f"expected {root}/<class>/<images>, or train/ beside one of "
                f"{', '.join(VAL_DIR_NAMES)} with <class>/<images> in each")
    return names


def _list_files(folder: Path) -> list[Path]:
    """The files of a class folder; a broken or looping symlink is listed too, so that it is
    skipped with its reason (is_file() alone would drop it without a word)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                  (p.is_file() or (p.is_symlink() and not p.exists())))
