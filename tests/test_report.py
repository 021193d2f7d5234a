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
    settings = read_json(other / "config.json")
    settings["experiment"]["train"]["epochs"] = 1
    (other / "config.json").write_text(json.dumps(settings))
    args = ["compare", str(smoke_runs["torch"]), str(other), "--out", str(tmp_path / "out")]
    error = one_line_error(flowers(*args))
    torch_id = read_json(smoke_runs["torch"] / "metrics.json")["run_id"]
    jax_id = read_json(other / "metrics.json")["run_id"]
    assert (f"runs are not comparable: different settings (train.epochs: 2 (torch {torch_id}) vs "
            f"1 (jax {jax_id}))") in error and "--allow-mixed" in error
    assert not (tmp_path / "out").exists()

    result = flowers(*args, "--allow-mixed")
    assert result.returncode == 0, result.stderr[-3000:]
    md = (tmp_path / "out" / "smoke" / "comparison.md").read_text()
    assert "**MIXED RUNS (--allow-mixed)**: different settings (train.epochs: 2" in md
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


# --- Generated run directories: the choice of runs and the report's wording, in a second each ---

def _generated_run(root, backend, run_id, overrides=(), device="cpu", val_accuracy=0.5):
    """A complete run directory with a metrics.json of the real schema (nothing trained)."""
    from flowers import config, files
    from flowers.metrics import build_metrics

    experiment = config.load_experiment("smoke", overrides)
    run = root / "smoke" / backend / run_id
    run.mkdir(parents=True)
    files.write_json(run / "config.json", {"run_id": run_id, "backend": backend,
                                           "experiment": experiment.to_dict()})
    epochs = experiment.train.epochs
    values = {
        "experiment": "smoke", "backend": backend, "backend_version": "1.0", "keras_version": "3",
        "tensorflow_version": "2", "python_version": "3.11", "device": device,
        "host": {"cpu_model": "Test CPU", "cpu_count": 2, "ram_gb": 8.0, "platform": "test"},
        "config_hash": experiment.config_hash(), "run_id": run_id, "created": "2026-01-01T00:00:00",
        "resumed": False, "num_train": 128, "num_val": 64, "num_classes": 4, "skipped_files": 0,
        "data_cached": True, "backbone": "ResNet50", "data_format": "channels_last", "jit_compile": False,
        "dtype_policy": "float32", "distribution": "none", "replicas": 1, "processes": 1,
        "epochs": epochs, "finetune_epochs": 0, "phase_times_s": {"head": 10.0},
        "early_stopping": None, "feature_extraction_s": None,
        "train_time_s": 10.0, "epoch_times_s": [5.0] + [1.0] * (epochs - 1), "first_epoch_s": 5.0,
        "warmup_epochs": [0], "train_images_per_s": 128.0 if epochs > 1 else None,
        "peak_host_rss_mb": 900.0, "peak_device_mem_mb": None, "eval_time_s": 0.5,
        "latency_ms": {"batch1_p50": 20.0, "batch1_p95": 25.0, "batch32_p50": 200.0,
                       "batch32_p95": 210.0},
        "val_loss": 1.0, "val_accuracy": val_accuracy, "val_top5_accuracy": 1.0,
    }
    reasons = {"peak_device_mem_mb": "no framework allocator on CPU",
               "feature_extraction_s": "train.cache_features is off",
               "early_stopping": "train.early_stopping_patience is 0 (off)"}
    if epochs == 1:
        reasons["train_images_per_s"] = "needs at least 2 epochs"
    files.write_json(run / "metrics.json", build_metrics(values, reasons))
    (run / "history.csv").write_text("epoch,val_accuracy,val_loss\n"
                                     + "".join(f"{e},{val_accuracy},1.0\n" for e in range(epochs)))
    (run / "model.keras").write_bytes(b"")
    return run


def test_compare_prefers_the_newest_runs_that_share_one_configuration(tmp_path):
    """One quick --set run under torch must not block the comparison of the full matrix."""
    from flowers import report

    matrix = {b: _generated_run(tmp_path, b, f"20260101-00000{i}-aaaa")
              for i, b in enumerate(BACKENDS)}
    quick = _generated_run(tmp_path, "torch", "20260102-000000-bbbb", ["train.epochs=1"])
    chosen, left_out = report.newest_runs(tmp_path, "smoke")
    assert chosen == [matrix[b] for b in BACKENDS]
    assert left_out == [f"left out torch {quick.name} (train.epochs: 2 vs 1): compared the newest "
                        "runs that share one configuration"]

    # the CLI prints the same line before the table, and the report folder is readable by all
    out = tmp_path / "reports"
    result = flowers("compare", "-e", "smoke", "--runs-dir", str(tmp_path), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == left_out[0]
    assert result.stdout.strip().splitlines()[-1] == str(out / "smoke" / "comparison.md")
    assert (out / "smoke").stat().st_mode & 0o777 == 0o777 & ~_umask()

    # a newer full matrix of the quick configuration wins: most backends first, then the newest
    newer = {b: _generated_run(tmp_path, b, f"20260103-00000{i}-cccc", ["train.epochs=1"])
             for i, b in enumerate(BACKENDS)}
    chosen, left_out = report.newest_runs(tmp_path, "smoke")
    assert chosen == [newer[b] for b in BACKENDS] and left_out == []


def test_runs_on_another_device_are_not_mixed_in(tmp_path):
    from flowers import report

    cpu = {b: _generated_run(tmp_path, b, f"20260101-00000{i}-aaaa") for i, b in enumerate(BACKENDS)}
    gpu = _generated_run(tmp_path, "jax", "20260102-000000-dddd", device="NVIDIA L4")
    chosen, left_out = report.newest_runs(tmp_path, "smoke")
    assert chosen == [cpu[b] for b in BACKENDS]
    assert left_out == [f"left out jax {gpu.name} (device: cpu (Test CPU, 2 logical cores) vs "
                        "NVIDIA L4): compared the newest runs that share one configuration"]


def test_a_single_run_comparison_names_the_missing_backends(tmp_path):
    from flowers import report

    run = _generated_run(tmp_path, "torch", "20260101-000000-aaaa")
    _, comparison = report.compare([run], tmp_path / "reports")
    md = (tmp_path / "reports" / "smoke" / "comparison.md").read_text()
    assert "**Missing backends**: tensorflow, jax — no run of them in this comparison" in md
    assert comparison["what_differs"][0].startswith("**Missing backends**")


def test_throughput_says_it_excludes_the_first_epoch(tmp_path):
    from flowers import report

    runs_ = [_generated_run(tmp_path, b, f"20260101-00000{i}-aaaa") for i, b in enumerate(BACKENDS)]
    _, comparison = report.compare(runs_, tmp_path / "reports")
    row = next(r for r in comparison["rows"] if r["key"] == "train_images_per_s")
    assert row["title"] == "train throughput, first epoch excluded (img/s)"
    assert row["note"] == "first epoch excluded"  # also the chart's title (_write_charts)
    md = (tmp_path / "reports" / "smoke" / "comparison.md").read_text()
    assert "| train throughput, first epoch excluded (img/s) ↑ |" in md


def test_noise_text_gives_the_formula_its_value_uses_and_what_it_is_not(tmp_path):
    from flowers import report

    accuracies = {"torch": 0.5, "tensorflow": 0.5625, "jax": 0.625}
    runs_ = [_generated_run(tmp_path, b, f"20260101-00000{i}-aaaa", val_accuracy=accuracies[b])
             for i, b in enumerate(BACKENDS)]
    _, comparison = report.compare(runs_, tmp_path / "reports")
    spread = comparison["accuracy_spread"]
    p, n = spread["noise_p"], 64
    assert p == pytest.approx(0.5625)
    assert spread["noise_threshold"] == pytest.approx(2 * 2 ** 0.5 * (p * (1 - p) / n) ** 0.5)
    accuracy_line = comparison["what_differs"][0]
    assert "= 2·√2·√(p(1−p)/n) with p = 0.5625 (mean accuracy) = " \
        f"{spread['noise_threshold']:.4f}" in accuracy_line
    assert "not a significance test" in accuracy_line and "same images" in accuracy_line
    assert "McNemar" in spread["method"]


def _umask():
    import os

    current = os.umask(0)
    os.umask(current)
    return current
