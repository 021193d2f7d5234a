"""The comparison report: complete runs side by side, written whole to reports/<experiment>/.

Each backend may have several runs, one per seed (`flowers train --seeds N`); the seed is the
replication axis, so a backend's column shows the mean ± sd over its seeds, and whether backends
differ is decided by paired tests on the same validation images against the measured seed-to-seed
spread (report_stats.py), not by one run each.

    comparison.md     header (device, versions, config hash, runs per backend with seeds, date),
                      one table (a row per metric, a column per backend: mean ± sd and n seeds),
                      "what differs" with the verdict, the paired tests, charts, the latest parity
                      (report_text.py)
    comparison.csv    the table's numbers, for spreadsheets: one row per (metric, backend, seed)
                      with statistic "value", plus a "mean" and an "sd" row per (metric, backend).
                      Columns: metric (metrics.json key), unit, better ("lower"/"higher"), backend,
                      statistic ("value" | "mean" | "sd"), seed and run_id (value rows only), value
                      (empty when null), n (seeds measured; mean and sd rows), ratio_to_best and
                      best (mean rows: value ÷ the best mean, and 1 for the bold best; empty / 0
                      where no best is shown), null_reason (why value is empty)
    comparison.json   everything above plus per-seed values, the paired tests, the verdict and the
                      parity result (run directories relative to the runs root)
    chart_<metric>.png one bar chart per metric (report_charts.py)
    learning_curves.png  val accuracy and val loss per epoch (report_charts.py)

Runs that did not do the same job (settings other than train.seed, or the device) are refused
unless allow_mixed, and then the report says so at the top. Runs of different experiments are always
refused. Only files are read: nothing here imports keras or trains.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowers import backend, config, files, parity, runs
from flowers.errors import FlowersError
from flowers.metrics import read_metrics
from flowers.report_charts import write_charts
from flowers.report_stats import (
    NO_PREDICTIONS,
    Predictions,
    paired_tests,
    parse_predictions,
    summarize,
    verdict,
)
from flowers.report_text import SETUP_KEYS, render_markdown, what_differs, write_csv
from flowers.report_text import render_table as render_table  # what the CLI prints

SEED_KEY = "train.seed"  # the replication axis: runs that differ only in it do the same job
# Quality rows get a "best" only when the verdict says the backends differ; timing rows by mean.
QUALITY_KEYS = ("val_loss", "val_accuracy", "val_top5_accuracy")


@dataclass(frozen=True)
class Row:
    """One metric of the table: where it is in metrics.json and which direction is better."""

    key: str  # metrics.json key; "latency_ms.batch1_p50" reaches into latency_ms
    label: str
    unit: str
    better: str  # "lower" | "higher"
    decimals: int | None = None  # None: 3 significant figures, roughly
    optional: bool = False  # left out of the report when no run measured it
    note: str = ""  # what a reader must know to read the figure (table label and chart title)

    @property
    def title(self) -> str:
        label = f"{self.label}, {self.note}" if self.note else self.label
        return f"{label} ({self.unit})" if self.unit else label


ROWS = (
    Row("train_time_s", "train time", "s", "lower"),
    Row("feature_extraction_s", "feature extraction", "s", "lower", optional=True),
    # A backend that compiles longer can win on train time and lose on throughput: say why.
    Row("train_images_per_s", "train throughput", "img/s", "higher",
        note="first epoch excluded"),
    Row("first_epoch_s", "first epoch, incl. compile", "s", "lower"),
    Row("peak_host_rss_mb", "peak host RSS", "MiB", "lower"),
    Row("peak_device_mem_mb", "peak device memory", "MiB", "lower"),
    Row("eval_time_s", "eval time", "s", "lower"),
    Row("latency_ms.batch1_p50", "latency batch 1 p50", "ms", "lower"),
    Row("latency_ms.batch1_p95", "latency batch 1 p95", "ms", "lower"),
    Row("latency_ms.batch32_p50", "latency batch 32 p50", "ms", "lower"),
    Row("latency_ms.batch32_p95", "latency batch 32 p95", "ms", "lower"),
    Row("val_loss", "val loss", "", "lower", decimals=4),
    Row("val_accuracy", "val accuracy", "", "higher", decimals=4),
    Row("val_top5_accuracy", "val top-5 accuracy", "", "higher", decimals=4),
)


@dataclass
class Run:
    """A complete run as the report sees it."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seed: int
    predictions: Predictions | str  # or why the run has none usable

    @property
    def backend(self) -> str:
        return self.metrics["backend"]


def run_seed(run_dir: Path, metrics: Mapping[str, Any] | None = None) -> int:
    """The seed a run trained with: config.json's train.seed, else metrics.json's seed.

    config.json records every run's settings (older runs' metrics.json has no seed); a config.json
    without train.seed is from before the key existed and ran with its default.
    """
    experiment = files.read_json(run_dir / "config.json").get("experiment", {})
    train = experiment.get("train", {})
    if "seed" in train:
        return int(train["seed"])
    if metrics is not None and metrics.get("seed") is not None:
        return int(metrics["seed"])
    return int(config.settings(experiment)[SEED_KEY])


def newest_runs(root: Path, experiment: str) -> tuple[list[Path], list[str]]:
    """The newest complete runs of `experiment` that share one configuration: per backend, the
    newest of each seed.

    A configuration is the runs' settings but train.seed (config.json, paths compared by place) and
    their device. The one with runs under the most backends wins, then the one with the newest run,
    so a quick `--set` run under one backend does not block the comparison of the full matrix.

    Returns:
        (run directories in the usual backend order, then by seed; a line for each newer or
        other-configuration run that was left out, naming how its settings differ).

    Raises:
        FlowersError: unknown experiment (no file and no runs), or no complete run of it under root.
    """
    name = Path(experiment).stem if experiment.endswith(".toml") else experiment
    candidates = {b: runs.complete_runs(root, name, b) for b in backend.BACKENDS}
    if not any(candidates.values()):
        if name not in config.list_experiments():
            raise config.unknown_experiment(name)
        with_runs = sorted({p.parent.parent.name for p in runs.complete_runs(root)})
        have = f"experiments with runs there: {', '.join(with_runs)}" if with_runs else "none there"
        raise FlowersError(f"no complete runs of experiment {name!r} under {root} ({have}); train "
                           f"first, e.g. nox -s train-torch train-tensorflow train-jax -- "
                           f"--experiment {name}")
    groups: dict[str, dict[str, dict[int, Path]]] = {}  # configuration -> backend -> seed -> newest
    for backend_name, found in candidates.items():
        for run_dir in found:  # oldest first, so the newest of a configuration and seed stays
            by_seed = groups.setdefault(_configuration(run_dir), {}).setdefault(backend_name, {})
            by_seed[run_seed(run_dir)] = run_dir

    def newest(key: str) -> str:
        return max(p.name for by_seed in groups[key].values() for p in by_seed.values())

    chosen = groups[max(groups, key=lambda k: (len(groups[k]), newest(k)))]
    reference = next(iter(next(iter(chosen.values())).values()))
    left_out = []
    for backend_name, found in candidates.items():
        newest_kept = max((p.name for p in chosen.get(backend_name, {}).values()), default=None)
        for run_dir in found:
            if newest_kept is not None and run_dir.name <= newest_kept:
                continue
            how = _how_it_differs(reference, run_dir) or "same settings"
            left_out.append(f"left out {backend_name} {run_dir.name} ({how}): compared the newest "
                            "runs that share one configuration")
    return [chosen[b][s] for b in backend.BACKENDS if b in chosen for s in sorted(chosen[b])], left_out


def _configuration(run_dir: Path) -> str:
    """What must match for two runs to be compared: settings but the seed (paths by place), device."""
    experiment = files.read_json(run_dir / "config.json")["experiment"]
    settings = {k: config.same_place(k, v) for k, v in config.settings(experiment).items()
                if k != SEED_KEY}
    device = device_label(read_metrics(run_dir / "metrics.json"))
    return json.dumps([settings, device], sort_keys=True, default=str)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """config.differences without the seed (the replication axis, never a difference of job)."""
    return [d for d in config.differences(a, b) if d[0] != SEED_KEY]


def _how_it_differs(reference: Path, other: Path) -> str:
    """"train.epochs: 8 vs 1; device: cpu (...) vs NVIDIA L4" (empty when the same)."""
    a = files.read_json(reference / "config.json")["experiment"]
    b = files.read_json(other / "config.json")["experiment"]
    parts = [f"{key}: {left!r} vs {right!r}" for key, left, right in _differences(a, b)]
    devices = [device_label(read_metrics(p / "metrics.json")) for p in (reference, other)]
    if devices[0] != devices[1]:
        parts.append(f"device: {devices[0]} vs {devices[1]}")
    return "; ".join(parts)


def load_runs(run_dirs: Sequence[str | Path], allow_mixed: bool = False) -> tuple[list[Run], list[str]]:
    """Read and check the runs to compare.

    Args:
        run_dirs: complete run directories; at most one per backend and seed. Backends keep the
            order in which they first appear; a backend's runs are ordered by seed.
        allow_mixed: accept runs with different settings (but the seed) or devices.

    Returns:
        (runs, mixed): mixed lists how the runs differ (empty unless allow_mixed let it through).

    Raises:
        FlowersError: no runs, a run given twice, two runs of one backend and seed, an incomplete
            run, a corrupt metrics.json or history.csv, runs of different experiments, or mixed runs
            without allow_mixed.
    """
    if not run_dirs:
        raise FlowersError("no runs to compare: give --experiment NAME or RUN_DIR arguments")
    paths = [runs.check_complete(p) for p in run_dirs]
    resolved = [p.resolve() for p in paths]
    repeated = sorted({str(p) for p in paths if resolved.count(p.resolve()) > 1})
    if repeated:
        raise FlowersError(f"run given more than once: {', '.join(repeated)}")
    loaded = [(p, read_metrics(p / "metrics.json")) for p in paths]

    experiments = {m["experiment"] for _, m in loaded}
    if len(experiments) > 1:
        which = ", ".join(f"{p} is {m['experiment']!r}" for p, m in loaded)
        raise FlowersError(f"runs of different experiments cannot be compared ({which}); "
                           "compare runs of one experiment")
    mixed = _mixed(loaded)
    if mixed and not allow_mixed:
        raise FlowersError(f"runs are not comparable: {'; '.join(mixed)}; pass --allow-mixed to "
                           "compare them anyway (the report will say so)")
    run_list = [Run(run_dir=p, metrics=m, history=read_history(p / "history.csv"),
                    seed=run_seed(p, m), predictions=_read_predictions(p, m)) for p, m in loaded]
    seen: dict[tuple[str, int], Run] = {}
    for run in run_list:
        twin = seen.setdefault((run.backend, run.seed), run)
        if twin is not run:
            raise FlowersError(f"two runs of {run.backend} with seed {run.seed} ({twin.run_dir}, "
                               f"{run.run_dir}): give one run per backend and seed")
    order = list(dict.fromkeys(r.backend for r in run_list))
    return sorted(run_list, key=lambda r: (order.index(r.backend), r.seed)), mixed


def _read_predictions(run_dir: Path, metrics: Mapping[str, Any]) -> Predictions | str:
    """The run's predictions.csv, or why it cannot be used (no file: a run from before it existed)."""
    path = run_dir / runs.PREDICTIONS_FILE
    if not path.is_file():
        return NO_PREDICTIONS
    try:
        with path.open(newline="", encoding="utf-8") as f:
            predictions = parse_predictions(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"unreadable predictions.csv of run {metrics['run_id']} ({exc})"
    if len(predictions.label) != metrics["num_val"]:
        return (f"predictions.csv of run {metrics['run_id']} has {len(predictions.label)} rows, "
                f"its metrics.json num_val is {metrics['num_val']}")
    return predictions


def build_comparison(run_list: Sequence[Run], mixed: Sequence[str] = (),
                     parity_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (comparison.json is exactly this)."""
    by_backend = _by_backend(run_list)
    accuracies = {name: {r.seed: r.metrics["val_accuracy"] for r in group
                         if r.metrics["val_accuracy"] is not None}
                  for name, group in by_backend.items()}
    tests = paired_tests(list(by_backend), {name: {r.seed: r.predictions for r in group}
                                            for name, group in by_backend.items()})
    judged = verdict({k: v for k, v in accuracies.items() if v}, tests)
    rows = [_table_row(spec, by_backend, judged["backends_differ"]) for spec in ROWS]
    rows = [row for row, spec in zip(rows, ROWS, strict=True)
            if not spec.optional or any(v is not None for v in row["values"].values())]
    comparison = {
        "experiment": run_list[0].metrics["experiment"],
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "mixed": list(mixed),
        "config_hashes": sorted({r.metrics["config_hash"] for r in run_list}),
        "devices": sorted({device_label(r.metrics) for r in run_list}),
        "columns": [_column(name, group) for name, group in by_backend.items()],
        "rows": rows,
        "paired_tests": tests,
        "verdict": judged,
        "parity": parity_result,
    }
    comparison["what_differs"] = what_differs(comparison)
    return comparison


def _by_backend(run_list: Sequence[Run]) -> dict[str, list[Run]]:
    """backend -> its runs by seed, backends in the order they first appear."""
    grouped: dict[str, list[Run]] = {}
    for run in run_list:
        grouped.setdefault(run.backend, []).append(run)
    return {name: sorted(group, key=lambda r: r.seed) for name, group in grouped.items()}


def write_report(comparison: dict[str, Any], run_list: Sequence[Run], out_root: Path) -> Path:
    """Write the report into out_root/<experiment>/, replacing any previous one whole.

    Everything is written into a staging directory beside it first (files.staging_dir) and swapped
    in whole (files.publish_dir), so a failure or a kill leaves the previous report (or nothing
    where there was none) or the new one, never a partial one.

    Returns:
        The report directory.
    """
    final = out_root / comparison["experiment"]
    histories = {name: [r.history for r in group] for name, group in _by_backend(run_list).items()}
    with files.staging_dir(out_root, f".{final.name}-") as staging:
        comparison["charts"] = write_charts(comparison, histories, staging)
        files.write_text(staging / "comparison.md", render_markdown(comparison))
        files.write_json(staging / "comparison.json", comparison)
        write_csv(comparison, staging / "comparison.csv")
        return files.publish_dir(staging, final, replace=True)


def compare(run_dirs: Sequence[str | Path], out_root: Path,
            allow_mixed: bool = False) -> tuple[Path, dict[str, Any]]:
    """Check the runs, build the comparison (with out_root/parity.json if present), write it.

    Returns:
        (the report directory out_root/<experiment>/, the comparison dict).
    """
    run_list, mixed = load_runs(run_dirs, allow_mixed)
    parity_result = parity.read_parity(out_root / parity.PARITY_FILE)
    comparison = build_comparison(run_list, mixed, parity_result)
    return write_report(comparison, run_list, out_root), comparison


def device_label(metrics: dict[str, Any]) -> str:
    """What a run's timings depend on: the GPU, or the CPU model and core count."""
    if metrics["device"] != "cpu":
        return metrics["device"]
    host = metrics["host"] or {}
    return f"cpu ({host.get('cpu_model', '?')}, {host.get('cpu_count', '?')} logical cores)"


def _mixed(loaded: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """How the runs differ: each differing setting but the seed, and the device, with the runs that
    have each value."""
    names = [f"{m['backend']} {m['run_id']}" for _, m in loaded]
    experiments = [files.read_json(p / "config.json")["experiment"] for p, _ in loaded]
    flat = [config.settings(e) for e in experiments]
    differing = {key for e in experiments[1:] for key, _, _ in _differences(experiments[0], e)}
    reasons = [f"different settings ({key}: "
               + _grouped([(n, repr(f[key]), config.same_place(key, f[key]))
                           for n, f in zip(names, flat, strict=True)]) + ")"
               for key in flat[0] if key in differing]
    devices = [device_label(m) for _, m in loaded]
    if len(set(devices)) > 1:
        reasons.append("different devices ("
                       + _grouped([(n, d, d) for n, d in zip(names, devices, strict=True)]) + ")")
    return reasons


def _grouped(values: list[tuple[str, str, Any]]) -> str:
    """[(run, value as shown, value compared)] -> "8 (torch 2026..., tensorflow 2026...) vs 1 (jax ...)"."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for run, shown, compared in values:
        groups.setdefault(json.dumps(compared, default=str), (shown, []))[1].append(run)
    return " vs ".join(f"{shown} ({', '.join(runs_with)})" for shown, runs_with in groups.values())


def read_history(path: Path) -> list[dict[str, float | str]]:
    """history.csv's rows: every column a number but `phase` ("head" / "finetune")."""
    try:
        with path.open(newline="") as f:
            rows = [{k: v if k == "phase" else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except (OSError, ValueError, TypeError) as exc:
        raise FlowersError(f"{path}: unreadable history.csv ({exc})") from None
    if not rows or not {"epoch", "val_accuracy", "val_loss"} <= set(rows[0]):
        raise FlowersError(f"{path}: history.csv lacks epoch, val_accuracy or val_loss rows")
    return rows


def _value(metrics: dict[str, Any], key: str) -> tuple[float | None, str | None]:
    top, _, sub = key.partition(".")
    value = metrics.get(top)
    if sub and isinstance(value, dict):
        value = value.get(sub)
    if value is None:
        reasons = metrics.get("null_reasons", {})
        return None, reasons.get(key) or reasons.get(top) or "not measured"
    return float(value), None


def _table_row(spec: Row, by_backend: Mapping[str, Sequence[Run]], backends_differ: bool) -> dict[str, Any]:
    """One metric: per backend the mean (values), mean/sd/min/max/n and per-seed values (stats)."""
    values, reasons, stats = {}, {}, {}
    for name, group in by_backend.items():
        per_seed, null_seeds = {}, {}
        for run in group:
            per_seed[str(run.seed)], reason = _value(run.metrics, spec.key)
            if reason:
                null_seeds[str(run.seed)] = reason
        summary = summarize([v for v in per_seed.values() if v is not None])
        stats[name] = {**summary, "seeds": per_seed, "null_reasons": null_seeds}
        values[name] = summary["mean"]
        if summary["mean"] is None:
            reasons[name] = next(iter(null_seeds.values()))
    measured = {k: v for k, v in values.items() if v is not None}
    # Which accuracy is "best" is a claim only the verdict may make; a timing's best is its mean.
    ranked = measured if backends_differ or spec.key not in QUALITY_KEYS else {}
    best_value = (min if spec.better == "lower" else max)(ranked.values()) if ranked else None
    return {
        "key": spec.key,
        "label": spec.label,
        "note": spec.note,
        "title": spec.title,
        "unit": spec.unit,
        "better": spec.better,
        "decimals": spec.decimals,
        "values": values,
        "stats": stats,
        "null_reasons": reasons,
        "best": [k for k, v in ranked.items() if v == best_value],
        "ratio_to_best": {k: (v / best_value if best_value else None)
                          if v is not None and best_value is not None else None
                          for k, v in values.items()},
    }


def _column(name: str, group: Sequence[Run]) -> dict[str, Any]:
    """A backend's column: its runs by seed, and the facts they share (MIXED a/b where not)."""
    def one(key: str) -> Any:
        values = list(dict.fromkeys(json.dumps(r.metrics.get(key), default=str) for r in group))
        return group[0].metrics.get(key) if len(values) == 1 else \
            "MIXED " + "/".join(str(json.loads(v)) for v in values)

    return {
        "label": name,
        "backend": name,
        "seeds": [r.seed for r in group],
        "runs": [{"seed": r.seed, "run_id": r.metrics["run_id"],
                  # relative to the runs root: no folder of the machine that wrote it
                  "run_dir": "/".join(r.run_dir.parts[-3:]),
                  "created": r.metrics["created"], "config_hash": r.metrics["config_hash"],
                  "portable_random": r.metrics.get("portable_random") or {"enabled": False},
                  "predictions": isinstance(r.predictions, Predictions),
                  "predictions_reason": None if isinstance(r.predictions, Predictions)
                  else r.predictions} for r in group],
        "device": "/".join(dict.fromkeys(device_label(r.metrics) for r in group)),
        "host": group[0].metrics["host"],
        "config_hash": "/".join(dict.fromkeys(r.metrics["config_hash"] for r in group)),
        **{key: one(key) for key in ("backend_version", "keras_version", "tensorflow_version",
                                     "python_version", *(k for k, _ in SETUP_KEYS))},
        **{key: group[0].metrics[key] for key in ("num_train", "num_val", "num_classes", "epochs")},
    }
