"""Folder scanning, splitting and synthetic images (in-process, no keras)."""

import shutil

import numpy as np
import pytest

from flowers import config
from flowers.data import synthetic_images
from flowers.errors import FlowersError
from flowers.folders import scan_folder
from flowers.images import decode_image_bytes, load_image_files


def _photo_folder(tmp_path, images, classes=3, per_class=5):
    """A small one-level class folder of JPEG files from the generated set (tests/learnable.py)."""
    root = tmp_path / "photos"
    for species in sorted(p.name for p in (images / "train").iterdir())[:classes]:
        (root / species).mkdir(parents=True)
        for photo in sorted((images / "train" / species).glob("*.jpg"))[:per_class]:
            shutil.copy(photo, root / species / photo.name)
    return root


def test_explicit_train_test_folders(learnable_set):
    listing = scan_folder(learnable_set, 0.2, seed=0)
    assert len(listing.class_names) == 12
    assert (len(listing.train_files), len(listing.val_files)) == (480, 180)
    assert listing.skipped_files == []
    assert all("/train/" in f for f in listing.train_files)


def test_single_folder_split_is_stratified_and_seeded(tmp_path, learnable_set):
    root = _photo_folder(tmp_path, learnable_set, classes=3, per_class=10)
    a = scan_folder(root, 0.2, seed=1)
    b = scan_folder(root, 0.2, seed=1)
    c = scan_folder(root, 0.2, seed=2)
    assert a.val_files == b.val_files and a.val_files != c.val_files
    assert np.bincount(a.val_labels).tolist() == [2, 2, 2]
    assert not set(a.train_files) & set(a.val_files)


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path, learnable_set, caplog):
    root = _photo_folder(tmp_path, learnable_set)
    first_class = sorted(root.iterdir())[0]
    (first_class / "notes.txt").write_text("not an image")
    good = sorted(first_class.glob("*.jpg"))[0].read_bytes()
    (first_class / "truncated.jpg").write_bytes(good[: len(good) // 3])
    listing = scan_folder(root, 0.2, seed=0)
    assert sorted(p.rsplit("/", 1)[1] for p in listing.skipped_files) == ["notes.txt", "truncated.jpg"]
    assert len(listing.train_files) + len(listing.val_files) == 15
    assert "skipped 2 unreadable file(s)" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.parametrize("layout, message", [
    ("empty", "has no class subfolders"),
    ("one_class", "has a single class"),
    ("all_corrupt", "no readable training images for class(es) b"),
])
def test_unusable_folders(tmp_path, learnable_set, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    photo = next((learnable_set / "train").rglob("*.jpg"))
    if layout in ("one_class", "all_corrupt"):
        (root / "a").mkdir()
        for i in range(3):
            shutil.copy(photo, root / "a" / f"{i}.jpg")
    if layout == "all_corrupt":
        (root / "b").mkdir()
        (root / "b" / "x.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(FlowersError) as info:
        scan_folder(root, 0.2, seed=0)
    assert message in str(info.value)


def test_synthetic_images_are_seeded_and_balanced():
    cfg = config.load_experiment("smoke").data
    (x, y), (xv, yv), names = synthetic_images(cfg, seed=3)
    (x2, _), _, _ = synthetic_images(cfg, seed=3)
    assert x.dtype == np.uint8 and x.shape == (cfg.synthetic_train_images, 32, 32, 3)
    assert np.array_equal(x, x2)
    assert len(names) == cfg.synthetic_classes
    assert np.bincount(y).min() == np.bincount(y).max()
    assert len(xv) == cfg.synthetic_val_images


def test_train_valid_layout_uses_the_species_as_classes(tmp_path, learnable_set):
    """train/ + valid/ (a common download layout) once became a two-class problem."""
    root = tmp_path / "downloaded"
    for split, source in (("train", "train"), ("valid", "test")):
        for species in sorted(p.name for p in (learnable_set / source).iterdir())[:3]:
            (root / split / species).mkdir(parents=True)
            for photo in sorted((learnable_set / source / species).iterdir())[:4]:
                shutil.copy(photo, root / split / species / photo.name)
    listing = scan_folder(root, 0.2, seed=0)
    assert listing.class_names == sorted(p.name for p in (learnable_set / "train").iterdir())[:3]
    assert listing.split_dirs == ("train", "valid")
    assert (len(listing.train_files), len(listing.val_files)) == (12, 12)


def test_class_folders_with_subfolders_are_refused(tmp_path, learnable_set):
    root = _photo_folder(tmp_path / "a", learnable_set)
    nested = tmp_path / "nested"
    (nested / "training").mkdir(parents=True)
    shutil.move(str(root), str(nested / "training" / "photos"))
    (nested / "other").mkdir()
    with pytest.raises(FlowersError) as info:
        scan_folder(nested, 0.2, seed=0)
    assert "holds subfolders (photos)" in str(info.value)


def _bmp_twins(folder, image):
    """The same picture as a BMP and as a PNG (lossless both)."""
    image.save(folder / "picture.bmp")
    image.save(folder / "picture.png")
    return folder / "picture.bmp", folder / "picture.png"


@pytest.mark.parametrize("mode", ["P", "1", "L", "RGBA"])
def test_every_bmp_mode_decodes_to_the_pixels_of_its_png_twin(tmp_path, learnable_set, mode):
    """Palette BMPs came out as palette indices and 1-bit BMPs failed mid-epoch under tf.io."""
    from PIL import Image

    photo = Image.open(next((learnable_set / "train").rglob("*.jpg"))).convert("RGB")
    picture = photo.convert(mode) if mode != "P" else photo.quantize(64)
    bmp, png = _bmp_twins(tmp_path, picture)
    expected = np.asarray(picture.convert("RGB"))
    assert np.array_equal(decode_image_bytes(bmp.read_bytes()), expected)
    assert np.array_equal(decode_image_bytes(png.read_bytes()), expected)
    assert np.array_equal(load_image_files([bmp], 64), load_image_files([png], 64))


def test_webp_photos_are_read_not_skipped(tmp_path, learnable_set):
    from PIL import Image

    root = _photo_folder(tmp_path, learnable_set, classes=2, per_class=5)
    for jpg in root.rglob("*.jpg"):
        Image.open(jpg).save(jpg.with_suffix(".webp"), lossless=True)
        jpg.unlink()
    listing = scan_folder(root, 0.2, seed=0)
    assert listing.skipped_files == [] and len(listing.train_files) + len(listing.val_files) == 10


def _png_header_only(width, height):
    """A few hundred bytes of PNG whose header declares width x height RGB pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_hostile_files_in_a_class_folder_are_skipped_not_crashed_on(tmp_path, learnable_set, caplog):
    from PIL import Image

    root = _photo_folder(tmp_path, learnable_set)
    first_class = sorted(root.iterdir())[0]
    (first_class / "bomb.png").write_bytes(_png_header_only(30000, 30000))  # 900 Mpixel claim
    (first_class / "fake.jpg").write_text("GIF89a? no: plain text named like a JPEG")
    (first_class / "empty.jpg").write_bytes(b"")
    (first_class / "loop.jpg").symlink_to(first_class / "loop.jpg")  # a symlink to itself
    Image.new("RGB", (1, 1), (200, 10, 10)).save(first_class / "tiny.png")  # 1 x 1: a real photo
    listing = scan_folder(root, 0.2, seed=0)
    skipped = sorted(p.rsplit("/", 1)[1] for p in listing.skipped_files)
    assert skipped == ["bomb.png", "empty.jpg", "fake.jpg", "loop.jpg"]
    assert len(listing.train_files) + len(listing.val_files) == 16  # 15 photos + the 1 x 1 one
    assert "bomb.png" in caplog.text


def test_a_photo_without_read_permission_is_skipped_with_its_reason(tmp_path, learnable_set):
    """chmod 000 on one photo. Root reads it anyway (CAP_DAC_OVERRIDE), so as root the scan runs
    without that capability and CAP_DAC_READ_SEARCH (setpriv --bounding-set), as a user would."""
    import os
    import subprocess
    import sys
    import textwrap

    root = _photo_folder(tmp_path, learnable_set)
    photo = sorted(sorted(root.iterdir())[0].iterdir())[0]
    photo.chmod(0)
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    code = textwrap.dedent(f"""
        from pathlib import Path
        from flowers.folders import scan_folder
        listing = scan_folder(Path("{root}"), 0.2, seed=0)
        print(len(listing.train_files) + len(listing.val_files))
        print(*listing.skipped_files, sep=chr(10))
    """)
    result = subprocess.run([*as_user, sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    kept, skipped = result.stdout.strip().splitlines()
    assert kept == "14"  # the other 14 photos
    assert skipped == str(photo)
    assert f"{photo}: unreadable (Permission denied)" in result.stderr  # the warning says why
