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
from flowers.report import QUALITY_KEYS, ROWS
from flowers.report_stats import NO_PREDICTIONS

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
    if (source / "predictions.csv").is_file():
        shutil.copy(source / "predictions.csv", run / "predictions.csv")
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
def smoke_report(smoke_runs, tmp_path_factory):
    """`flowers compare --experiment smoke` (no parity.json: that needs real photos, see below)."""
    root = _linked_runs_root(tmp_path_factory.mktemp("runs"), smoke_runs.values())
    out = tmp_path_factory.mktemp("reports")
    result = flowers("compare", "--experiment", "smoke", "--runs-dir", str(root), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "smoke", result


def test_markdown_has_header_every_row_and_every_backend(smoke_report, smoke_runs):
    report, result = smoke_report
    assert result.stdout.strip().splitlines()[-1] == str(report / "comparison.md")
    md = (report / "comparison.md").read_text()
    assert "**Random draws**" not in md  # portable initial weights and dropout masks everywhere
    metrics = {b: read_json(smoke_runs[b] / "metrics.json") for b in BACKENDS}
    torch = metrics["torch"]

    assert "| metric | torch | tensorflow | jax |" in md
    assert f"**device**: cpu ({torch['host']['cpu_model']}" in md
    assert f"**experiment config hash**: {torch['config_hash']}" in md
    assert f"keras {torch['keras_version']}" in md and "Generated 20" in md
    for backend, m in metrics.items():
        assert f"{backend} {m['backend_version']}" in md and m["run_id"] in md
    assert "| seeds | 42 | 42 | 42 |" in md  # one column per backend, its seeds listed
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for row in ROWS:
        if row.optional:
            continue
        line = next((ln for ln in table if ln.startswith(f"| {row.title} ")), None)
        assert line, f"no row for {row.title}"
        assert line.count("|") == 5
        if "n/a [" in line:
            continue
        assert line.count("(n=1, sd n/a") == 3  # one seed each: the value, and no sd
        if row.key in QUALITY_KEYS:
            # one seed per backend cannot say they differ, so no accuracy or loss is "best"
            assert "best" not in line and "×" not in line
        else:  # a timing's best is by mean, the others get their ratio to it
            assert "** best" in line and line.count("×)") == 3 - line.count("best")
    # peak device memory is n/a on CPU, with the reason given once under the table
    assert "| peak device memory (MiB) ↓ | n/a [1] | n/a [1] | n/a [1] |" in md
    assert f"[1] n/a: {torch['null_reasons']['peak_device_mem_mb']}" in md
    assert "## What differs" in md and "**Verdict: indistinguishable on this job**" in md
    assert "unmeasured for torch, tensorflow, jax (one seed)" in md and "--seeds 3" in md
    assert "**Seed-to-seed spread** of val accuracy, as measured: torch unmeasured (one seed)" in md
    # old runs have no predictions.csv, new ones do: either way the section says which
    assert "## Paired tests" in md and "### torch vs tensorflow" in md and "### tensorflow vs jax" in md
    tests = read_json(report / "comparison.json")["paired_tests"]["tests"]
    assert len(tests) == 3 and all(t["available"] or NO_PREDICTIONS in t["reason"] for t in tests)
    assert "## Parity" in md and "No parity result yet" in md  # its own test has one (below)
    # the CLI prints the same table
    assert "| metric | torch | tensorflow | jax |" in result.stdout


def test_the_report_embeds_the_latest_parity_result(smoke_runs, parity_run, tmp_path):
    """parity.json beside the reports (real photos: skipped without them, a failure under CI)."""
    root = _linked_runs_root(tmp_path / "runs", smoke_runs.values())
    shutil.copy(parity_run[1] / "parity.json", tmp_path / "parity.json")
    result = flowers("compare", "--experiment", "smoke", "--runs-dir", str(root), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = read_json(tmp_path / "smoke" / "comparison.json")
    assert comparison["parity"]["passed"] is True
    md = (tmp_path / "smoke" / "comparison.md").read_text()
    assert "## Parity" in md and "| vs torch | max abs Δprob |" in md and "No parity result yet" not in md


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
        csv_rows = {(r["metric"], r["backend"], r["statistic"]): r for r in csv.DictReader(f)}
    json_rows = {r["key"]: r for r in comparison["rows"]}
    assert [c["backend"] for c in comparison["columns"]] == list(BACKENDS)
    assert comparison["mixed"] == []
    text = (report / "comparison.json").read_text()
    for backend in BACKENDS:
        metrics = read_json(smoke_runs[backend] / "metrics.json")
        column = next(c for c in comparison["columns"] if c["backend"] == backend)
        (run,) = column["runs"]
        assert run["run_id"] == metrics["run_id"] == csv_rows["val_loss", backend, "value"]["run_id"]
        assert column["seeds"] == [42] and run["seed"] == 42
        # where the run is, relative to the runs root: no folder of this machine
        assert run["run_dir"] == f"smoke/{backend}/{metrics['run_id']}"
        assert str(smoke_runs[backend]) not in text
        for row in ROWS:
            if row.optional and row.key not in json_rows:
                continue
            expected = _metric(metrics, row.key)
            value, mean, sd = (csv_rows[row.key, backend, s] for s in ("value", "mean", "sd"))
            stats = json_rows[row.key]["stats"][backend]
            assert value["seed"] == "42" and mean["n"] == sd["n"] == ("0" if expected is None else "1")
            assert sd["value"] == "" and sd["null_reason"] == "sd needs at least 2 seeds"
            if expected is None:
                reason = metrics["null_reasons"][row.key]
                assert value["value"] == mean["value"] == "" and value["null_reason"] == reason
                assert json_rows[row.key]["values"][backend] is None and stats["mean"] is None
                assert json_rows[row.key]["null_reasons"][backend] == reason == stats["null_reasons"]["42"]
            else:
                assert float(value["value"]) == float(mean["value"]) == expected, (row.key, backend)
                assert json_rows[row.key]["values"][backend] == stats["min"] == stats["max"] == expected
                assert stats["seeds"] == {"42": expected} and stats["sd"] is None

    # quality rows name no best with one seed; a timing row's best is by mean
    accuracy = json_rows["val_accuracy"]
    assert accuracy["best"] == [] and set(accuracy["ratio_to_best"].values()) == {None}
    rss, best = json_rows["peak_host_rss_mb"], min(json_rows["peak_host_rss_mb"]["values"].values())
    assert rss["best"] == [b for b, v in rss["values"].items() if v == best]
    for backend, value in rss["values"].items():
        assert rss["ratio_to_best"][backend] == pytest.approx(value / best)
        assert float(csv_rows["peak_host_rss_mb", backend, "mean"]["ratio_to_best"]) == pytest.approx(
            value / best)
    judged = comparison["verdict"]
    assert judged["status"] == "indistinguishable" and judged["seed_spread"]["largest"] is None
    assert judged["mean_val_accuracy"] == accuracy["values"] and judged["backends_differ"] is False


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
    torch_again = _fake_run(tmp_path, smoke_runs["torch"], "torch-again")
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
        ([str(smoke_runs["torch"]), str(torch_again)], "two runs of torch with seed 42"),
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

    monkeypatch.setattr(report, "write_csv", broken)
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
        # newer keys (build_metrics keeps only the schema's: older or newer schema, both work)
        "seed": experiment.train.seed, "portable_random": {"enabled": True},
        "deterministic": {"requested": False, "applied": None},
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
    assert row["note"] == "first epoch excluded"  # also the chart's title (report_charts.py)
    md = (tmp_path / "reports" / "smoke" / "comparison.md").read_text()
    assert "| train throughput, first epoch excluded (img/s) ↑ |" in md


def test_each_seed_is_kept_and_a_differing_seed_is_not_a_different_configuration(tmp_path):
    from flowers import report

    old = _generated_run(tmp_path, "torch", "20260101-000000-aaaa")  # seed 42, replaced below
    seeds = {(b, seed): _generated_run(tmp_path, b, f"20260102-00000{i}-{seed}", [f"train.seed={seed}"])
             for i, b in enumerate(BACKENDS) for seed in (43, 42)}
    quick = _generated_run(tmp_path, "jax", "20260103-000000-bbbb", ["train.epochs=1", "train.seed=7"])
    chosen, left_out = report.newest_runs(tmp_path, "smoke")
    # per backend the newest run of each seed, by backend then seed; the older seed-42 run is replaced
    assert chosen == [seeds[b, seed] for b in BACKENDS for seed in (42, 43)] and old not in chosen
    # the seed is the replication axis: not named as a difference
    assert left_out == [f"left out jax {quick.name} (train.epochs: 2 vs 1): compared the newest "
                        "runs that share one configuration"]
    _, comparison = report.compare(chosen, tmp_path / "reports")
    assert comparison["mixed"] == []
    assert [c["seeds"] for c in comparison["columns"]] == [[42, 43]] * 3
    md = (tmp_path / "reports" / "smoke" / "comparison.md").read_text()
    assert "torch: seed 42 `20260102-000000-42`, seed 43 `20260102-000000-43`" in md
    assert f"**experiment config hash**: {read_json(chosen[0] / 'metrics.json')['config_hash']} " \
        "(seed 42)" in md
    # generated runs have no predictions.csv: every paired test says why, and nothing fails
    assert all(t["reason"] == f"torch: {NO_PREDICTIONS}; tensorflow: {NO_PREDICTIONS}"
               for t in comparison["paired_tests"]["tests"] if t["backends"] == ["torch", "tensorflow"])
    assert "- seed 43: torch: not available: run has no predictions.csv" in md


def test_runs_from_before_seeds_and_predictions_are_still_compared(tmp_path):
    """metrics.json without seed (and the other newer keys), no predictions.csv: seed from config.json."""
    from flowers import report

    runs_ = [_generated_run(tmp_path, b, f"20260101-00000{i}-aaaa") for i, b in enumerate(BACKENDS)]
    for run in runs_:
        metrics = {k: v for k, v in read_json(run / "metrics.json").items()
                   if k not in ("seed", "portable_random", "deterministic")}
        (run / "metrics.json").write_text(json.dumps(metrics))
    assert [report.run_seed(run) for run in runs_] == [42] * 3
    _, comparison = report.compare(runs_, tmp_path / "reports")
    assert [c["seeds"] for c in comparison["columns"]] == [[42]] * 3
    assert {t["reason"].split("; ")[0] for t in comparison["paired_tests"]["tests"]} == {
        f"torch: {NO_PREDICTIONS}", f"tensorflow: {NO_PREDICTIONS}"}
    # their random draws were each backend's own: the report says so, naming each run
    draws = next(line for line in comparison["what_differs"] if line.startswith("**Random draws**"))
    assert "torch seed 42; tensorflow seed 42; jax seed 42" in draws


# --- Several seeds per backend from the smoke runs, with predictions.csv whose outcome is known ---

def _seeded_run(root, source, seed, correct, predictions_text=None):
    """Smoke run `source` as seed `seed`: predictions.csv gets the first `correct` images right (and
    so does val_accuracy), or is predictions_text, or is absent when both are None."""
    metrics = read_json(source / "metrics.json")
    run_id = f"20260201-0000{seed:02d}-{metrics['backend'][:4]}"
    run = root / "smoke" / metrics["backend"] / run_id
    run.mkdir(parents=True)
    shutil.copy(source / "history.csv", run / "history.csv")
    (run / "model.keras").symlink_to(source / "model.keras")
    settings = {**read_json(source / "config.json"), "run_id": run_id}
    settings["experiment"]["train"]["seed"] = seed
    (run / "config.json").write_text(json.dumps(settings))
    n, classes = metrics["num_val"], metrics["num_classes"]
    if correct is not None:
        metrics["val_accuracy"] = correct / n
        rows = [f"{i},img{i:03d}.png,{i % classes},{(i + (i >= correct)) % classes},0.5\n"
                for i in range(n)]
        predictions_text = "index,item,label,predicted,p_true\n" + "".join(rows)
    if predictions_text is not None:
        (run / "predictions.csv").write_text(predictions_text)
    metrics.update(run_id=run_id, seed=seed)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


# Images each backend gets right per seed (of the smoke runs' 64): close together, or one far behind.
SEEDED_CASES = {
    "indistinguishable": {"torch": (40, 42, 41), "tensorflow": (41, 40, 42), "jax": (42, 41, 40)},
    "differ": {"torch": (56, 57, 55), "tensorflow": (56, 55, 57), "jax": (30, 31, 29)},
}


@pytest.mark.parametrize("case", sorted(SEEDED_CASES))
def test_three_seeds_per_backend_give_a_verdict_from_paired_tests(case, smoke_runs, tmp_path):
    counts = SEEDED_CASES[case]
    root, out = tmp_path / "runs", tmp_path / "reports"
    for backend in BACKENDS:
        for seed, correct in enumerate(counts[backend]):
            _seeded_run(root, smoke_runs[backend], seed, correct)
    result = flowers("compare", "-e", "smoke", "--runs-dir", str(root), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = read_json(out / "smoke" / "comparison.json")
    md = (out / "smoke" / "comparison.md").read_text()
    judged, tests, n = comparison["verdict"], comparison["paired_tests"]["tests"], 64
    assert [c["seeds"] for c in comparison["columns"]] == [[0, 1, 2]] * 3
    assert len(tests) == 9 and all(t["available"] for t in tests)  # 3 pairs x 3 seeds
    assert judged["seed_spread"]["largest"] == pytest.approx(2 / n)  # every backend: max - min = 2
    accuracy = next(r for r in comparison["rows"] if r["key"] == "val_accuracy")
    assert accuracy["stats"]["torch"]["seeds"] == {str(s): c / n for s, c in enumerate(counts["torch"])}
    assert accuracy["stats"]["torch"]["sd"] == pytest.approx(1 / n)
    assert "| val accuracy ↑ |" in md and "± 0.0156 (n=3" in md
    for test in tests:
        a, b = test["backends"]
        first, second = counts[a][test["seed"]], counts[b][test["seed"]]
        # the first `correct` images right: the better of two gets the difference right alone
        assert (test["b"], test["c"]) == (max(first - second, 0), max(second - first, 0))
        assert test["accuracy_difference"] == pytest.approx((first - second) / n)
    if case == "indistinguishable":
        assert judged["status"] == "indistinguishable" and judged["rejected_pairs"] == []
        assert all(t["p_holm"] == 1.0 for t in tests) and accuracy["best"] == []
        assert "**Verdict: indistinguishable on this job** (no pair's corrected paired test rejects)" in md
    else:
        assert judged["status"] == "differ"
        assert judged["differing_pairs"] == [["torch", "jax"], ["tensorflow", "jax"]]
        jax_tests = [t for t in tests if "jax" in t["backends"]]
        assert all(t["rejected"] and t["p_holm"] < 1e-5 for t in jax_tests)
        assert not any(t["rejected"] for t in tests if t not in jax_tests)
        # now, and only now, accuracy has a best (torch and tensorflow tie on the mean)
        assert accuracy["best"] == ["torch", "tensorflow"]
        assert "**Verdict: backends differ on this job** (torch vs jax; tensorflow vs jax:" in md
        assert "| 0 | 26 | 0 | " in md  # torch vs jax, seed 0: b = 26, c = 0
    assert "Holm–Bonferroni over all 9 available (pair, seed) tests, family-wise α = 0.05" in md


def test_bad_predictions_files_give_reasons_not_crashes(smoke_runs, tmp_path):
    root, out = tmp_path / "runs", tmp_path / "reports"
    for seed in range(4):
        _seeded_run(root, smoke_runs["torch"], seed, 40 + seed)
    source = smoke_runs["jax"]
    _seeded_run(root, source, 0, None)  # no predictions.csv: an old run
    _seeded_run(root, source, 1, None, predictions_text="index,item,label\n\x00\x89PNG")
    shifted = "index,item,label,predicted,p_true\n" + "".join(
        f"{i},img{i:03d}.png,{(i + 1) % 4},0,0.5\n" for i in range(64))
    _seeded_run(root, source, 2, None, predictions_text=shifted)  # other labels: another split
    _seeded_run(root, source, 3, None, predictions_text="index,item,label,predicted,p_true\n0,a,1,1,0.5\n")
    result = flowers("compare", "-e", "smoke", "--runs-dir", str(root), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = read_json(out / "smoke" / "comparison.json")
    reasons = {t["seed"]: t["reason"] for t in comparison["paired_tests"]["tests"]}
    assert reasons[0] == f"jax: {NO_PREDICTIONS}"
    assert reasons[1].startswith("jax: unreadable predictions.csv of run 20260201-000001-jax (header")
    assert reasons[2] == ("predictions.csv files do not match: different label at index 0 (0 vs 1): "
                          "not scored on the same validation images")
    assert reasons[3] == ("jax: predictions.csv of run 20260201-000003-jax has 1 rows, its "
                          "metrics.json num_val is 64")
    judged, md = comparison["verdict"], (out / "smoke" / "comparison.md").read_text()
    assert judged["status"] == "indistinguishable" and judged["tests_available"] == 0
    assert "paired tests not available for 4 of 4" in judged["sentence"]
    assert f"- seed 0: jax: {NO_PREDICTIONS}" in md and "| 2 | n/a |" in md


def _umask():
    import os

    current = os.umask(0)
    os.umask(current)
    return current
