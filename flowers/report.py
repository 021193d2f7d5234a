"""The comparison report: complete runs side by side, written whole to reports/<experiment>/.

    comparison.md     header (device, versions, config hash, date), one table (a row per metric, a
                      column per run, best in bold, ratio to the best), "what differs", charts,
                      the latest parity result
    comparison.csv    the table's numbers, one row per (metric, run), for spreadsheets
    comparison.json   the same numbers plus the header facts and the parity result
    chart_<metric>.png one bar chart per metric (runs side by side)
    learning_curves.png  val accuracy and val loss per epoch, one line per run

Runs that did not do the same job (different config hash) or ran on different hardware are refused
unless allow_mixed, and then the report says so at the top. Runs of different experiments are always
refused. Only files are read: nothing here imports keras or trains.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowers import backend, config, files, parity, runs, tables
from flowers.errors import FlowersError
from flowers.metrics import read_metrics

BACKEND_COLORS = {"torch": "#d62728", "tensorflow": "#ff7f0e", "jax": "#1f77b4"}
NOISE_STANDARD_ERRORS = 2  # "within noise" = spread within 2 standard errors of a difference
# What the accuracy noise figure is and is not (report and comparison.json say it in these words).
NOISE_CAVEAT = (
    "It is a scale, not a significance test: it treats the accuracies as independent samples, "
    "although every run is scored on the same images; models that get the same images right have a "
    "smaller paired noise (McNemar's test on per-image predictions, which runs do not save), so "
    "a spread judged small against it can hide a real difference. Seed-to-seed training "
    "variation is not in it either (one run per backend), and Keras initialises the weights "
    "differently under each backend even with the same seed.")


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
# How each run was set up, shown at the top of the table when the runs record it.
SETUP_KEYS = (("backbone", "backbone"), ("finetune_epochs", "fine-tuning epochs"),
              ("backend_version", "backend version"), ("data_format", "data format"),
              ("jit_compile", "jit compile"), ("dtype_policy", "dtype policy"),
              ("distribution", "distribution"), ("replicas", "replicas"), ("processes", "processes"))
DISTRIBUTION_KEYS = ("distribution", "replicas", "processes")


@dataclass
class Run:
    """A complete run as the report sees it."""

    label: str  # column title: the backend, plus the run id when a backend appears twice
    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]

    @property
    def backend(self) -> str:
        return self.metrics["backend"]


def reports_root(override: str | Path | None = None) -> Path:
    """--out, else $FLOWERS_REPORTS_DIR, else reports/ of this checkout."""
    if override:
        return Path(override)
    env = os.environ.get("FLOWERS_REPORTS_DIR")
    return Path(env) if env else config.PROJECT_ROOT / "reports"


def newest_runs(root: Path, experiment: str) -> tuple[list[Path], list[str]]:
    """The newest complete runs of `experiment` that share one configuration, one per backend.

    A configuration is the runs' settings (config.json, paths compared by place) and their device.
    The one with runs under the most backends wins, then the one with the newest run, so a quick
    `--set` run under one backend does not block the comparison of the full matrix.

    Returns:
        (run directories in the usual backend order, a line for each newer or other-configuration
        run that was left out, naming how its settings differ).

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
    groups: dict[str, dict[str, Path]] = {}  # configuration -> backend -> its newest run
    for backend_name, found in candidates.items():
        for run_dir in found:  # oldest first, so the newest of a configuration stays
            groups.setdefault(_configuration(run_dir), {})[backend_name] = run_dir
    chosen_key = max(groups, key=lambda k: (len(groups[k]), max(p.name for p in groups[k].values())))
    chosen = groups[chosen_key]
    reference = next(iter(chosen.values()))
    left_out = []
    for backend_name, found in candidates.items():
        newest_kept = chosen.get(backend_name)
        for run_dir in found:
            if newest_kept is not None and run_dir.name <= newest_kept.name:
                continue
            how = _how_it_differs(reference, run_dir) or "same settings"
            left_out.append(f"left out {backend_name} {run_dir.name} ({how}): compared the newest "
                            "runs that share one configuration")
    return [chosen[b] for b in backend.BACKENDS if b in chosen], left_out


def _configuration(run_dir: Path) -> str:
    """What must match for two runs to be compared: settings (paths by place) and device."""
    experiment = files.read_json(run_dir / "config.json")["experiment"]
    settings = {k: config.same_place(k, v) for k, v in config.settings(experiment).items()}
    device = device_label(read_metrics(run_dir / "metrics.json"))
    return json.dumps([settings, device], sort_keys=True, default=str)


def _how_it_differs(reference: Path, other: Path) -> str:
    """"train.epochs: 8 vs 1; device: cpu (...) vs NVIDIA L4" (empty when the same)."""
    a = files.read_json(reference / "config.json")["experiment"]
    b = files.read_json(other / "config.json")["experiment"]
    parts = [f"{key}: {left!r} vs {right!r}" for key, left, right in config.differences(a, b)]
    devices = [device_label(read_metrics(p / "metrics.json")) for p in (reference, other)]
    if devices[0] != devices[1]:
        parts.append(f"device: {devices[0]} vs {devices[1]}")
    return "; ".join(parts)


def load_runs(run_dirs: Sequence[str | Path], allow_mixed: bool = False) -> tuple[list[Run], list[str]]:
    """Read and check the runs to compare.

    Args:
        run_dirs: complete run directories (one column each, in this order).
        allow_mixed: accept runs with different config hashes or devices.

    Returns:
        (runs, mixed): mixed lists how the runs differ (empty unless allow_mixed let it through).

    Raises:
        FlowersError: no runs, a run given twice, an incomplete run, a corrupt metrics.json or
            history.csv, runs of different experiments, or mixed runs without allow_mixed.
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

    backends = [m["backend"] for _, m in loaded]
    return [Run(label=m["backend"] if backends.count(m["backend"]) == 1
                else f"{m['backend']} {m['run_id']}",
                run_dir=p, metrics=m, history=_read_history(p / "history.csv"))
            for p, m in loaded], mixed


def build_comparison(run_list: Sequence[Run], mixed: Sequence[str] = (),
                     parity_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (comparison.json is exactly this)."""
    first = run_list[0].metrics
    rows = [_table_row(row, run_list) for row in ROWS]
    rows = [row for row, spec in zip(rows, ROWS, strict=True)
            if not spec.optional or any(v is not None for v in row["values"].values())]
    comparison = {
        "experiment": first["experiment"],
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "mixed": list(mixed),
        "config_hashes": sorted({r.metrics["config_hash"] for r in run_list}),
        "devices": sorted({device_label(r.metrics) for r in run_list}),
        "columns": [_column(r) for r in run_list],
        "rows": rows,
        "accuracy_spread": accuracy_spread(run_list),
        "parity": parity_result,
    }
    comparison["what_differs"] = _what_differs(comparison)
    return comparison


def accuracy_spread(run_list: Sequence[Run]) -> dict[str, Any]:
    """Spread of val accuracy across runs against the sampling noise of accuracy on num_val images.

    Noise: an accuracy p measured on n images has binomial standard error sqrt(p(1-p)/n); the
    difference of two such accuracies has sqrt(2) times that. The spread is "within noise" when it
    is at most NOISE_STANDARD_ERRORS of those. p is the mean accuracy, kept 1/(2n) away from 0 and 1
    so a perfect score does not claim zero noise. See NOISE_CAVEAT for what this is not: the runs
    are scored on the same images (a paired test would need per-image predictions), and
    seed-to-seed training variation is not measured by one run per backend.
    """
    accuracies = {r.label: r.metrics["val_accuracy"] for r in run_list}
    n = min(r.metrics["num_val"] for r in run_list)
    mean = sum(accuracies.values()) / len(accuracies)
    p = min(max(mean, 0.5 / n), 1 - 0.5 / n)
    standard_error = math.sqrt(p * (1 - p) / n)
    noise = NOISE_STANDARD_ERRORS * math.sqrt(2) * standard_error
    lowest = min(accuracies, key=accuracies.get)
    highest = max(accuracies, key=accuracies.get)
    spread = accuracies[highest] - accuracies[lowest]
    return {
        "num_val": n,
        "lowest": {"label": lowest, "val_accuracy": accuracies[lowest]},
        "highest": {"label": highest, "val_accuracy": accuracies[highest]},
        "spread": spread,
        "spread_images": round(spread * n),
        "noise_p": p,
        "standard_error": standard_error,
        "noise_threshold": noise,
        "within_noise": spread <= noise + 1e-12,
        "method": (f"spread <= {NOISE_STANDARD_ERRORS} x sqrt(2) x sqrt(p(1-p)/n), p = mean val "
                   "accuracy, n = num_val: two binomial standard errors of a difference of two "
                   "independent accuracies. " + NOISE_CAVEAT),
    }


def write_report(comparison: dict[str, Any], run_list: Sequence[Run], out_root: Path) -> Path:
    """Write the report into out_root/<experiment>/, replacing any previous one whole.

    Everything is written into a staging directory beside it first (files.staging_dir) and swapped
    in whole (files.publish_dir), so a failure or a kill leaves the previous report (or nothing
    where there was none) or the new one, never a partial one.

    Returns:
        The report directory.
    """
    final = out_root / comparison["experiment"]
    with files.staging_dir(out_root, f".{final.name}-") as staging:
        comparison["charts"] = _write_charts(comparison, run_list, staging)
        files.write_text(staging / "comparison.md", render_markdown(comparison))
        files.write_json(staging / "comparison.json", comparison)
        _write_csv(comparison, staging / "comparison.csv")
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


def render_markdown(comparison: dict[str, Any]) -> str:
    """comparison.md from a comparison dict (charts listed under comparison["charts"])."""
    columns = comparison["columns"]
    lines = [f"# Backend comparison: {comparison['experiment']}", ""]
    if comparison["mixed"]:
        lines += [f"> **MIXED RUNS (--allow-mixed)**: {'; '.join(comparison['mixed'])}. "
                  "Differences below may come from that, not from the backends.", ""]
    lines += [
        f"Generated {comparison['generated']} by `flowers compare` from {len(columns)} complete "
        "runs.",
        "",
        f"- **device**: {', '.join(comparison['devices'])}",
        f"- **host**: {_host_summary(columns)}",
        f"- **model**: {_same(columns, 'backbone')} backbone + head"
        + (f", fine-tuned {_same(columns, 'finetune_epochs')} epochs"
           if any(c.get("finetune_epochs") for c in columns) else ", head trained (frozen backbone)"),
        f"- **experiment config hash**: {', '.join(comparison['config_hashes'])}",
        f"- **versions**: keras {_same(columns, 'keras_version')}, tensorflow (tf.data) "
        f"{_same(columns, 'tensorflow_version')}, python {_same(columns, 'python_version')}; "
        + ", ".join(f"{c['label']} {c['backend_version']}" for c in columns),
        "- **runs**: " + ", ".join(f"{c['label']} `{c['run_id']}`" for c in columns),
        "",
        "## Results",
        "",
    ]
    table, footnotes = results_table(comparison)
    lines.append(table)
    lines += [
        "",
        "↓ lower is better, ↑ higher is better; **bold** = best; (1.60×) = value ÷ best. "
        "How each figure is measured: `flowers/metrics.py` (README, Metrics).",
    ]
    lines += [""] + [f"[{i}] n/a: {reason}" for i, reason in enumerate(footnotes, 1)] if footnotes else []
    lines += ["", "## What differs", ""] + [f"- {line}" for line in comparison["what_differs"]]
    lines += ["", "## Charts", ""]
    lines += [f"![{name.removesuffix('.png')}]({name})" for name in comparison.get("charts", [])]
    lines += ["", "## Parity", ""]
    result = comparison["parity"]
    if result is None:
        lines.append("No parity result yet: run `flowers parity` (writes parity.json beside this "
                     "report's folder) and compare again.")
    else:
        verdict = ("all targets met" if result["passed"]
                   else "TARGET MISSED: " + "; ".join(result["failures"]))
        lines += [f"From `parity.json` ({result['created']}): {verdict}.", "",
                  parity.describe(result) + ".", "", parity.format_table(result)]
        lines += [f"\n{note}" for note in parity.notes(result)]
    return "\n".join(lines) + "\n"


def render_table(comparison: dict[str, Any]) -> str:
    """Just the results table of comparison.md (what the CLI prints)."""
    return results_table(comparison)[0]


def results_table(comparison: dict[str, Any]) -> tuple[str, list[str]]:
    """comparison.md's results table: a row per metric, a column per run; and its footnotes.

    A value that was not measured shows "n/a [i]", where footnotes[i - 1] is the reason.
    """
    columns = comparison["columns"]
    labels = [c["label"] for c in columns]
    rows = []
    if comparison["mixed"]:
        for key, title in (("device", "device"), ("config_hash", "config hash")):
            rows.append([f"**{title} (mixed)**", *(str(c[key]) for c in columns)])
    for key, title in SETUP_KEYS:
        if key in DISTRIBUTION_KEYS and all(c.get("distribution") in (None, "none") for c in columns):
            continue  # no run was data-parallel: nothing to show
        if any(c.get(key) is not None for c in columns):
            rows.append([title, *(_setup_value(c.get(key)) for c in columns)])
    footnotes: list[str] = []
    for row in comparison["rows"]:
        arrow = "↓" if row["better"] == "lower" else "↑"
        cells = []
        for label in labels:
            value = row["values"][label]
            if value is None:
                reason = row["null_reasons"][label]
                if reason not in footnotes:
                    footnotes.append(reason)
                cells.append(f"n/a [{footnotes.index(reason) + 1}]")
            elif label in row["best"]:
                cells.append(f"**{_format(value, row['decimals'])}** best")
            else:
                ratio = row["ratio_to_best"][label]
                cells.append(_format(value, row["decimals"])
                             + ("" if ratio is None else f" ({ratio:.2f}×)"))
        rows.append([f"{row['title']} {arrow}", *cells])
    table = tables.markdown_table(["metric", *labels], rows, align="l" + "r" * len(labels))
    return table, footnotes


def _mixed(loaded: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """How the runs differ: each differing setting, and the device, with the runs that have each value."""
    names = [f"{m['backend']} {m['run_id']}" for _, m in loaded]
    experiments = [files.read_json(p / "config.json")["experiment"] for p, _ in loaded]
    flat = [config.settings(e) for e in experiments]
    differing = {key for e in experiments[1:] for key, _, _ in config.differences(experiments[0], e)}
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


def _read_history(path: Path) -> list[dict[str, float | str]]:
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


def _table_row(row: Row, run_list: Sequence[Run]) -> dict[str, Any]:
    values, reasons = {}, {}
    for run in run_list:
        values[run.label], reason = _value(run.metrics, row.key)
        if reason:
            reasons[run.label] = reason
    measured = {k: v for k, v in values.items() if v is not None}
    best_value = (min if row.better == "lower" else max)(measured.values()) if measured else None
    return {
        "key": row.key,
        "label": row.label,
        "note": row.note,
        "title": row.title,
        "unit": row.unit,
        "better": row.better,
        "decimals": row.decimals,
        "values": values,
        "null_reasons": reasons,
        "best": [k for k, v in measured.items() if v == best_value],
        "ratio_to_best": {k: (v / best_value if best_value else None) if v is not None else None
                          for k, v in values.items()},
    }


def _column(run: Run) -> dict[str, Any]:
    m = run.metrics
    return {
        "label": run.label,
        "backend": m["backend"],
        "run_id": m["run_id"],
        "run_dir": str(run.run_dir),
        "created": m["created"],
        "device": device_label(m),
        "host": m["host"],
        "config_hash": m["config_hash"],
        "backend_version": m["backend_version"],
        "keras_version": m["keras_version"],
        "tensorflow_version": m["tensorflow_version"],
        "python_version": m["python_version"],
        **{key: m.get(key) for key, _ in SETUP_KEYS if key != "backend_version"},
        "num_train": m["num_train"],
        "num_val": m["num_val"],
        "num_classes": m["num_classes"],
        "epochs": m["epochs"],
    }


def _what_differs(comparison: dict[str, Any]) -> list[str]:
    rows = {row["key"]: row for row in comparison["rows"]}
    spread = comparison["accuracy_spread"]
    n = spread["num_val"]
    lines = []
    if len(comparison["columns"]) > 1:
        verdict = "within noise" if spread["within_noise"] else "**larger than noise**"
        lines.append(
            f"**Accuracy**: val accuracy ranges from {spread['lowest']['val_accuracy']:.4f} "
            f"({spread['lowest']['label']}) to {spread['highest']['val_accuracy']:.4f} "
            f"({spread['highest']['label']}), a spread of {spread['spread']:.4f} "
            f"({spread['spread_images']} of {n} images). Noise = {NOISE_STANDARD_ERRORS} "
            f"binomial standard errors of a difference of two independent accuracies on {n} images "
            f"= {NOISE_STANDARD_ERRORS}·√2·√(p(1−p)/n) with p = {spread['noise_p']:.4f} (mean "
            f"accuracy) = {spread['noise_threshold']:.4f}: {verdict}. " + NOISE_CAVEAT
        )
        for key in ("val_loss", "train_images_per_s", "first_epoch_s", "latency_ms.batch1_p50",
                    "latency_ms.batch32_p50", "peak_host_rss_mb", "peak_device_mem_mb"):
            sentence = _ranking(rows[key])
            if sentence:
                lines.append(sentence)
    present = {c["backend"] for c in comparison["columns"]}
    missing = [b for b in backend.BACKENDS if b not in present]
    if missing:
        lines.append(f"**Missing backends**: {', '.join(missing)} — no run of "
                     f"{'them' if len(missing) > 1 else 'it'} in this comparison, so nothing here "
                     f"compares against {' or '.join(missing)}. Train "
                     + ("them" if len(missing) > 1 else "it")
                     + f" (`flowers train -e {comparison['experiment']} --backend NAME`) and compare "
                     "again.")
    classes = {c["num_classes"] for c in comparison["columns"]}
    if max(classes) <= 5:
        lines.append(f"Top-5 accuracy is 1 by construction with {max(classes)} classes.")
    result = comparison["parity"]
    if result is not None:
        worst = max((r["max_abs_prob_diff"] for r in result["results"]), default=0.0)
        drift = ", ".join(f"{r['backend']} {r['max_abs_loss_diff']:.1e}" for r in result["results"])
        lines.append(
            f"**Parity** ({result['created'][:10]}, {result['image_size']} px, "
            f"{', '.join(result['backends'])}): the same weights give max |Δprob| {worst:.1e} "
            f"(target {result['targets']['max_abs_prob_diff']:.0e}) — "
            + ("so the forward pass is the same everywhere and differences in accuracy come "
               "from training." if result["passed"] else "TARGET MISSED: "
               + "; ".join(result["failures"]) + ".")
            + f" {result['train_steps']} training steps from that one init drift by max |Δloss| "
            f"{drift} vs {result['reference']} (see Parity below)."
            + _parity_version_note(result, comparison["columns"])
        )
    if comparison["mixed"]:
        lines.append("**Mixed runs**: " + "; ".join(comparison["mixed"]) + ".")
    lines.append("Timings are one run each; rerun the matrix to see run-to-run variation.")
    return lines


def _parity_version_note(result: dict[str, Any], columns: list[dict[str, Any]]) -> str:
    """Says so when parity.json was made with other framework versions than the runs."""
    differ = sorted({f"{c['backend']} {result['runs'][c['backend']]['backend_version']} (runs: "
                     f"{c['backend_version']})" for c in columns if c["backend"] in result["runs"]
                     and result["runs"][c["backend"]].get("backend_version") != c["backend_version"]})
    return f" Note: parity.json was made with other versions: {', '.join(differ)}." if differ else ""


def _ranking(row: dict[str, Any]) -> str | None:
    """"**train throughput** (img/s): best jax 118; torch 0.80×, tensorflow 0.55×"."""
    measured = {k: v for k, v in row["values"].items() if v is not None}
    if len(measured) < 2 or not row["best"]:
        return None
    best = row["best"][0]
    others = sorted((k for k in measured if k not in row["best"]),
                    key=lambda k: row["ratio_to_best"][k] or 0, reverse=row["better"] == "higher")
    rest = ", ".join(f"{k} {row['ratio_to_best'][k]:.2f}×" for k in others
                     if row["ratio_to_best"][k] is not None)
    unit = f" {row['unit']}" if row["unit"] else ""
    direction = "lowest" if row["better"] == "lower" else "highest"
    tied = " (tied: " + ", ".join(row["best"][1:]) + ")" if len(row["best"]) > 1 else ""
    return (f"**{row['label']}**: {direction} {best} {_format(measured[best], row['decimals'])}"
            f"{unit}{tied}" + (f"; {rest}" if rest else "") + ".")


def _write_csv(comparison: dict[str, Any], path: Path) -> None:
    runs_by_label = {c["label"]: c for c in comparison["columns"]}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "unit", "better", "column", "backend", "run_id", "value",
                         "ratio_to_best", "best", "null_reason"])
        for row in comparison["rows"]:
            for label, value in row["values"].items():
                ratio = row["ratio_to_best"][label]
                writer.writerow([row["key"], row["unit"], row["better"], label,
                                 runs_by_label[label]["backend"], runs_by_label[label]["run_id"],
                                 "" if value is None else repr(value),
                                 "" if ratio is None else repr(ratio),
                                 int(label in row["best"]), row["null_reasons"].get(label, "")])


def _write_charts(comparison: dict[str, Any], run_list: Sequence[Run], folder: Path) -> list[str]:
    """One bar chart per metric with a measured value, and the learning curves; file names."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas

    subtitle = f"{comparison['experiment']} · {', '.join(comparison['devices'])}"
    labels = [c["label"] for c in comparison["columns"]]
    colors = [BACKEND_COLORS.get(c["backend"], "#7f7f7f") for c in comparison["columns"]]
    names = []
    for row in comparison["rows"]:
        values = [row["values"][label] for label in labels]
        if all(v is None for v in values):
            continue
        fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(labels, heights, color=colors)
        for bar, label, value in zip(bars, labels, values, strict=True):
            text = "n/a" if value is None else _format(value, row["decimals"])
            if label in row["best"]:
                text += " (best)"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_ylim(0, max(heights) * 1.18 or 1)
        ax.set_ylabel(row["unit"] or row["label"])
        better = "lower is better" if row["better"] == "lower" else "higher is better"
        label = row["label"] + (f", {row['note']}" if row.get("note") else "")
        ax.set_title(f"{label} ({better})\n{subtitle}", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        name = f"chart_{row['key'].replace('.', '_')}.png"
        with files.writing(folder / name):
            fig.savefig(folder / name)
        names.append(name)

    fig = Figure(figsize=(9.6, 3.8), dpi=100, layout="constrained")
    for index, (key, title) in enumerate((("val_accuracy", "val accuracy"),
                                          ("val_loss", "val loss"))):
        ax = fig.add_subplot(1, 2, index + 1)
        for run, color in zip(run_list, colors, strict=True):
            epochs = [int(r["epoch"]) + 1 for r in run.history]
            ax.plot(epochs, [r[key] for r in run.history], marker="o", color=color,
                    label=run.label)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=9)
    fig.suptitle(f"learning curves — {subtitle}", fontsize=10)
    with files.writing(folder / "learning_curves.png"):
        fig.savefig(folder / "learning_curves.png")
    return [*names, "learning_curves.png"]


def _format(value: float, decimals: int | None) -> str:
    if decimals is not None:
        return f"{value:.{decimals}f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}"


def _setup_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "n/a" if value is None else str(value)


def _same(columns: list[dict[str, Any]], key: str) -> str:
    values = sorted({str(c[key]) for c in columns})
    return values[0] if len(values) == 1 else "MIXED " + "/".join(values)


def _host_summary(columns: list[dict[str, Any]]) -> str:
    hosts = {(h.get("cpu_model"), h.get("cpu_count"), h.get("ram_gb"))
             for h in (c["host"] or {} for c in columns)}
    return "; ".join(f"{model}, {cores} logical cores, {ram} GiB RAM"
                     for model, cores, ram in sorted(hosts, key=str))
