"""flowers compare: the report from the smoke runs of every backend, and every bad input.

The smoke runs are the session's (fixture smoke_runs); the runs a test needs are linked into its
own runs root, so other tests' runs never change which run is "newest".
"""

import csv
import json
import shutil

import pytest
from PIL import Image

from conftest import BACKENDS, flowers, one_line_error, read_json
from flowers.report import ROWS

BAR_CHART_PX = (640, 360)
CURVES_PX = (960, 380)


def _linked_runs_root(root, run_dirs):
    """A runs root holding links to existing run directories (no 100 MB model copies)."""
    for run in run_dirs:
        target = root / run.parent.parent.name / run.parent.name / run.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(run, target_is_directory=True)
    return root


def _fake_run(tmp_path, source, name, edit_metrics=None, metrics_text=None):
    """A run directory like `source` with an edited (or replaced) metrics.json."""
    run = tmp_path / name
    run.mkdir(parents=True)
    for file in ("config.json", "history.csv", "class_names.json"):
        shutil.copy(source / file, run / file)
    (run / "model.keras").symlink_to(source / "model.keras")
    metrics = read_json(source / "metrics.json")
    if edit_metrics:
        edit_metrics(metrics)
    (run / "metrics.json").write_text(metrics_text or json.dumps(metrics))
    return run


def _metric(metrics, key):
    top, _, sub = key.partition(".")
    return metrics[top][sub] if sub else metrics[top]


def _report_files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))


@pytest.fixture(scope="module")
def smoke_report(smoke_runs, parity_run, tmp_path_factory):
    """`flowers compare --experiment smoke` with the latest parity.json beside the report."""
    root = _linked_runs_root(tmp_path_factory.mktemp("runs"), smoke_runs.values())
    out = tmp_path_factory.mktemp("reports")
    shutil.copy(parity_run[1] / "parity.json", out / "parity.json")
    result = flowers("compare", "--experiment", "smoke", "--runs-dir", str(root), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "smoke", result


def test_markdown_has_header_every_row_and_every_backend(smoke_report, smoke_runs):
    report, result = smoke_report
    assert result.stdout.strip().splitlines()[-1] == str(report / "comparison.md")
    md = (report / "comparison.md").read_text()
    metrics = {b: read_json(smoke_runs[b] / "metrics.json") for b in BACKENDS}
    torch = metrics["torch"]

    assert "| metric | torch | tensorflow | jax |" in md
    assert f"**device**: cpu ({torch['host']['cpu_model']}" in md
    assert f"**experiment config hash**: {torch['config_hash']}" in md
    assert f"keras {torch['keras_version']}" in md and "Generated 20" in md
    for backend, m in metrics.items():
        assert f"{backend} {m['backend_version']}" in md and m["run_id"] in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for row in ROWS:
        if row.optional:
            continue
        line = next((ln for ln in table if ln.startswith(f"| {row.title} ")), None)
        assert line, f"no row for {row.title}"
        assert line.count("|") == 5
        # every measured row marks its best and gives the others' ratio to it
        assert "n/a" in line or ("** best" in line and (line.count("×)") == 3 - line.count("best")))
    # peak device memory is n/a on CPU, with the reason given once under the table
    assert "| peak device memory (MiB) ↓ | n/a [1] | n/a [1] | n/a [1] |" in md
    assert f"[1] n/a: {torch['null_reasons']['peak_device_mem_mb']}" in md
    assert "## What differs" in md and "**Accuracy**: val accuracy ranges from" in md
    assert ("within noise" in md) != ("larger than noise" in md)
    assert "## Parity" in md and "| vs torch | max abs Δprob |" in md
    # the CLI prints the same table
    assert "| metric | torch | tensorflow | jax |" in result.stdout


def test_charts_are_real_pngs(smoke_report):
    report, _ = smoke_report
    comparison = read_json(report / "comparison.json")
    md = (report / "comparison.md").read_text()
    charts = comparison["charts"]
    # one bar chart per measured metric (peak device memory is not measured on CPU) + the curves
    measured = [r for r in comparison["rows"] if any(v is not None for v in r["values"].values())]
    assert len(charts) == len(measured) + 1 and "learning_curves.png" in charts
    assert "chart_peak_device_mem_mb.png" not in charts
    for name in charts:
        assert f"]({name})" in md
        with Image.open(report / name) as image:
            image.verify()
        with Image.open(report / name) as image:
            assert image.format == "PNG"
            assert image.size == (CURVES_PX if name == "learning_curves.png" else BAR_CHART_PX)
            # not a blank canvas: bars/lines in more than a handful of colours
            assert len(image.convert("RGB").getcolors(maxcolors=100_000)) > 20


def test_csv_and_json_agree_with_metrics_json(smoke_report, smoke_runs):
    report, _ = smoke_report
    comparison = read_json(report / "comparison.json")
    with (report / "comparison.csv").open(newline="") as f:
        csv_rows = {(r["metric"], r["backend"]): r for r in csv.DictReader(f)}
    json_rows = {r["key"]: r for r in comparison["rows"]}
    assert [c["backend"] for c in comparison["columns"]] == list(BACKENDS)
    assert comparison["mixed"] == [] and comparison["parity"]["passed"] is True

    for backend in BACKENDS:
        metrics = read_json(smoke_runs[backend] / "metrics.json")
        column = next(c for c in comparison["columns"] if c["backend"] == backend)
        assert column["run_id"] == metrics["run_id"] == csv_rows["val_loss", backend]["run_id"]
        for row in ROWS:
            if row.optional and row.key not in json_rows:
                continue
            expected = _metric(metrics, row.key)
            from_csv = csv_rows[row.key, backend]
            if expected is None:
                reason = metrics["null_reasons"][row.key]
                assert from_csv["value"] == "" and from_csv["null_reason"] == reason
                assert json_rows[row.key]["values"][backend] is None
                assert json_rows[row.key]["null_reasons"][backend] == reason
            else:
                assert float(from_csv["value"]) == expected, (row.key, backend)
                assert json_rows[row.key]["values"][backend] == expected

    accuracy = json_rows["val_accuracy"]
    best = max(accuracy["values"].values())
    assert accuracy["best"] == [b for b, v in accuracy["values"].items() if v == best]
    for backend, value in accuracy["values"].items():
        assert accuracy["ratio_to_best"][backend] == pytest.approx(value / best)
        assert float(csv_rows["val_accuracy", backend]["ratio_to_best"]) == pytest.approx(value / best)
    spread = comparison["accuracy_spread"]
    assert spread["num_val"] == 64
    assert spread["spread"] == pytest.approx(best - min(accuracy["values"].values()))


def test_explicit_run_dirs_keep_their_order(smoke_runs, tmp_path):
    order = ["jax", "torch"]
    result = flowers("compare", *(str(smoke_runs[b]) for b in order), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = read_json(tmp_path / "smoke" / "comparison.json")
    assert [c["backend"] for c in comparison["columns"]] == order
    assert comparison["parity"] is None
    assert "No parity result yet" in (tmp_path / "smoke" / "comparison.md").read_text()


def test_mixed_configs_are_refused_unless_allowed(smoke_runs, tmp_path):
    other = _fake_run(tmp_path, smoke_runs["jax"], "jax-other",
                      lambda m: m.update(config_hash="0123456789ab"))
    args = ["compare", str(smoke_runs["torch"]), str(other), "--out", str(tmp_path / "out")]
    error = one_line_error(flowers(*args))
    assert "runs are not comparable: different config hashes" in error and "--allow-mixed" in error
    assert not (tmp_path / "out").exists()

    result = flowers(*args, "--allow-mixed")
    assert result.returncode == 0, result.stderr[-3000:]
    md = (tmp_path / "out" / "smoke" / "comparison.md").read_text()
    assert "**MIXED RUNS (--allow-mixed)**: different config hashes" in md
    assert "| **config hash (mixed)** |" in md and "0123456789ab" in md
    assert read_json(tmp_path / "out" / "smoke" / "comparison.json")["mixed"]


def test_bad_input_gives_one_line_and_no_report(smoke_runs, tmp_path):
    out = tmp_path / "out"
    flowers12_like = _fake_run(tmp_path, smoke_runs["tensorflow"], "other-experiment",
                               lambda m: m.update(experiment="flowers12"))
    corrupt = _fake_run(tmp_path, smoke_runs["jax"], "corrupt", metrics_text='{"backend": "ja')
    incomplete = _fake_run(tmp_path, smoke_runs["jax"], "incomplete")
    (incomplete / "metrics.json").unlink()
    empty_root = tmp_path / "empty-runs"
    empty_root.mkdir()
    cases = [
        (["--experiment", "smoke", "--runs-dir", str(empty_root)],
         f"no complete runs of experiment 'smoke' under {empty_root}"),
        ([str(smoke_runs["torch"]), str(flowers12_like)],
         "runs of different experiments cannot be compared"),
        ([str(smoke_runs["torch"]), str(corrupt)], f"{corrupt / 'metrics.json'}: unreadable"),
        ([str(smoke_runs["torch"]), str(incomplete)], "is not a complete run directory (missing"),
        ([str(tmp_path / "missing")], "run directory not found"),
        ([str(smoke_runs["torch"]), str(smoke_runs["torch"])], "run given more than once"),
        ([str(smoke_runs["torch"]), "--experiment", "smoke"], "not both"),
        ([], "nothing to compare"),
    ]
    for args, message in cases:
        error = one_line_error(flowers("compare", *args, "--out", str(out)))
        assert message in error, (args, error)
        assert not out.exists() or _report_files(out) == [], (args, _report_files(out))


def test_a_failed_write_keeps_the_previous_report(smoke_runs, tmp_path, monkeypatch):
    from flowers import report

    first, _ = report.compare([smoke_runs["torch"], smoke_runs["jax"]], tmp_path)
    before = {name: (first / name).read_bytes() for name in _report_files(first)}

    def broken(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(report, "_write_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        report.compare([smoke_runs["tensorflow"], smoke_runs["jax"]], tmp_path)
    assert _report_files(tmp_path) == ["smoke", *(f"smoke/{n}" for n in before)]
    assert {name: (first / name).read_bytes() for name in before} == before
