"""flowers.files, workers, tables: files are complete or absent; a child's failure is one line."""

import json
import os

import h5py
import pytest

from conftest import python
from flowers import files, tables, workers
from flowers.errors import FlowersError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    files.write_json(path, {"epoch": 1})

    def killed(fd):
        raise KeyboardInterrupt  # as if the process were interrupted mid-write

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(path, {"epoch": 2})
    assert files.read_json(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_unreadable_json_is_one_line(tmp_path):
    (tmp_path / "metrics.json").write_text('{"val_accuracy": 0.')
    with pytest.raises(FlowersError, match=r"metrics.json: unreadable JSON \(") as error:
        files.read_json(tmp_path / "metrics.json")
    assert "\n" not in str(error.value)


def test_a_staging_dir_is_removed_when_its_block_fails_and_published_whole(tmp_path):
    with pytest.raises(RuntimeError), files.staging_dir(tmp_path) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []

    with files.staging_dir(tmp_path) as staging:
        (staging / "report.md").write_text("new")
        final = files.publish_dir(staging, tmp_path / "v1")
    assert [p.name for p in tmp_path.iterdir()] == ["v1"] and (final / "report.md").read_text() == "new"
    # an existing, non-empty directory is never replaced unless asked to
    with files.staging_dir(tmp_path) as staging:
        (staging / "report.md").write_text("newer")
        with pytest.raises(FileExistsError):
            files.publish_dir(staging, tmp_path / "v1")
        files.publish_dir(staging, tmp_path / "v1", replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]
    assert (tmp_path / "v1" / "report.md").read_text() == "newer"


def test_a_childs_error_line_reaches_the_user_and_a_crash_names_its_last_line():
    stderr = "I0000 some C++ log\nerror: no flowers12 photos in /x\n"
    assert workers.failure("parity", "jax", 1, stderr) == "parity under jax failed: no flowers12 photos in /x"
    traceback = ("Traceback (most recent call last):\n  File \"w.py\", line 3\n"
                 "ValueError: shapes differ\nW0000 teardown chatter\n")
    assert workers.failure("writing onnx", "torch", 1, traceback) == (
        "writing onnx under torch crashed (exit status 1): ValueError: shapes differ")
    assert workers.failure("bench", "tensorflow", -9, "") == (
        "bench under tensorflow crashed (exit status -9): no output")


def test_markdown_table_aligns_and_checks_its_shape():
    assert tables.markdown_table(["metric", "torch"], [["accuracy", "0.91"]], align="lr") == (
        "| metric | torch |\n| --- | ---: |\n| accuracy | 0.91 |")
    with pytest.raises(ValueError):
        tables.markdown_table(["a", "b"], [["only one cell"]])


def test_a_resume_restores_the_newest_complete_state_only(tmp_path):
    """A staging directory or a state directory without its metadata is never restored from; a
    state inside an epoch (train.checkpoint_every_steps) comes after its epoch's start."""
    backup = tmp_path / "backup"
    for name, metadata in (("epoch-2", {"epoch": 2}), ("epoch-2-step-3", {"epoch": 2, "batch": 3}),
                           ("epoch-3", None), ("epoch-3-step-1", None),
                           (".incomplete-ab", {"epoch": 4})):
        (backup / name).mkdir(parents=True)
        if metadata:
            (backup / name / "training_metadata.json").write_text(json.dumps(metadata))
            h5py.File(backup / name / "latest.weights.h5", "w").close()
    result = python(f"""
        from pathlib import Path
        from flowers import backend
        backend.select("tensorflow")
        from flowers.checkpoint import latest_state, restored_position
        print(latest_state(Path("{backup}")).name, *restored_position(Path("{backup}")),
              *restored_position(Path("{tmp_path}/none")))
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["epoch-2-step-3", "2", "3", "0", "0"]
