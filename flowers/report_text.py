"""The report's text files, comparison.md and comparison.csv, from the dict report.py builds.

comparison.md: the header, the results table (a column per backend: mean ± sd over seeds), "what
differs" (the verdict of report_stats.py, the measured seed-to-seed spread, timing rankings by mean,
parity) and the paired tests section. comparison.csv: its columns are listed in report.py's
docstring. Functions of the dict only: nothing here reads a run.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowers import backend, parity, tables
from flowers.report_stats import SEEDS_HINT, format_value

# How each backend's runs were set up, shown at the top of the table when the runs record it.
SETUP_KEYS = (("backbone", "backbone"), ("finetune_epochs", "fine-tuning epochs"),
              ("backend_version", "backend version"), ("data_format", "data format"),
              ("jit_compile", "jit compile"), ("dtype_policy", "dtype policy"),
              ("distribution", "distribution"), ("replicas", "replicas"), ("processes", "processes"))
DISTRIBUTION_KEYS = ("distribution", "replicas", "processes")


def render_markdown(comparison: dict[str, Any]) -> str:
    """comparison.md from a comparison dict (charts listed under comparison["charts"])."""
    columns = comparison["columns"]
    lines = [f"# Backend comparison: {comparison['experiment']}", ""]
    if comparison["mixed"]:
        lines += [f"> **MIXED RUNS (--allow-mixed)**: {'; '.join(comparison['mixed'])}. "
                  "Differences below may come from that, not from the backends.", ""]
    lines += [
        f"Generated {comparison['generated']} by `flowers compare` from "
        f"{sum(len(c['runs']) for c in columns)} complete runs.",
        "",
        f"- **device**: {', '.join(comparison['devices'])}",
        f"- **host**: {_host_summary(columns)}",
        f"- **model**: {_same(columns, 'backbone')} backbone + head"
        + (f", fine-tuned {_same(columns, 'finetune_epochs')} epochs"
           if any(c.get("finetune_epochs") for c in columns) else ", head trained (frozen backbone)"),
        f"- **experiment config hash**: {_hashes(columns)}",
        f"- **versions**: keras {_same(columns, 'keras_version')}, tensorflow (tf.data) "
        f"{_same(columns, 'tensorflow_version')}, python {_same(columns, 'python_version')}; "
        + ", ".join(f"{c['label']} {c['backend_version']}" for c in columns),
        "- **runs** (per backend, by seed): " + "; ".join(
            f"{c['label']}: " + ", ".join(f"seed {r['seed']} `{r['run_id']}`" for r in c["runs"])
            for c in columns),
        "",
        "## Results",
        "",
    ]
    table, footnotes = results_table(comparison)
    lines.append(table)
    lines += [
        "",
        "Each cell: mean ± sd over the backend's seeds (sd with n − 1), n = seeds measured. "
        "↓ lower is better, ↑ higher is better; **bold** = best mean, (1.60×) = mean ÷ best mean. "
        "Accuracy and loss get a best only when the verdict below says the backends differ. "
        "How each figure is measured: `flowers/metrics.py` (docs/training.md, Metrics).",
    ]
    lines += [""] + [f"[{i}] n/a: {reason}" for i, reason in enumerate(footnotes, 1)] if footnotes else []
    lines += ["", "## What differs", ""] + [f"- {line}" for line in comparison["what_differs"]]
    lines += ["", "## Paired tests", ""] + paired_tests_markdown(comparison["paired_tests"])
    lines += ["", "## Charts", ""]
    lines += [f"![{name.removesuffix('.png')}]({name})" for name in comparison.get("charts", [])]
    lines += ["", "## Parity", ""]
    result = comparison["parity"]
    if result is None:
        lines.append("No parity result yet: run `flowers parity` (writes parity.json beside this "
                     "report's folder) and compare again.")
    else:
        outcome = ("all targets met" if result["passed"]
                   else "TARGET MISSED: " + "; ".join(result["failures"]))
        lines += [f"From `parity.json` ({result['created']}): {outcome}.", "",
                  parity.describe(result) + ".", "", parity.format_table(result)]
        lines += [f"\n{note}" for note in parity.notes(result)]
    return "\n".join(lines) + "\n"


def paired_tests_markdown(tests: Mapping[str, Any]) -> list[str]:
    """The "Paired tests" section: how to read it, then a table per pair of backends, a row per seed."""
    lines = [
        "Both runs of a row trained with the same seed and were scored on the same validation "
        "images (`predictions.csv`). b = images only the first backend gets right, c = images only "
        "the second gets right; the exact McNemar test asks whether b and c are too uneven for two "
        "equally accurate models (two-sided binomial on b + c images). Every row is one test, so "
        f"the p-values are corrected together ({tests['correction']}): a row rejects \"equally "
        "accurate\" when its Holm p ≤ α. A rejection alone is not the verdict: the accuracy "
        "difference must also exceed the seed-to-seed spread (What differs). Agreement = the "
        "fraction of images both give the same top-1 class; Δ accuracy = first − second.",
    ]
    pairs = list(dict.fromkeys(tuple(t["backends"]) for t in tests["tests"]))
    if not pairs:
        return [*lines, "", "No pair of backends shares a seed: nothing to test."]
    for first, second in pairs:
        rows, notes = [], []
        for t in (t for t in tests["tests"] if tuple(t["backends"]) == (first, second)):
            if not t["available"]:
                rows.append([t["seed"], *["n/a"] * 6])
                notes.append(f"seed {t['seed']}: {t['reason']}")
                continue
            rejected = " (rejects)" if t["rejected"] else ""
            rows.append([t["seed"], t["b"], t["c"], f"{t['p_value']:.3g}",
                         f"{t['p_holm']:.3g}{rejected}", f"{t['agreement']:.4f}",
                         f"{t['accuracy_difference']:+.4f}"])
        lines += ["", f"### {first} vs {second}", "",
                  tables.markdown_table(["seed", f"b ({first} right, {second} wrong)",
                                         f"c ({first} wrong, {second} right)", "McNemar p",
                                         "Holm p", "agreement", "Δ accuracy"],
                                        rows, align="lrrrrrr")]
        lines += [""] + [f"- {note}" for note in notes] if notes else []
    return lines


def render_table(comparison: dict[str, Any]) -> str:
    """Just the results table of comparison.md (what the CLI prints)."""
    return results_table(comparison)[0]


def results_table(comparison: dict[str, Any]) -> tuple[str, list[str]]:
    """comparison.md's results table: a row per metric, a column per backend; and its footnotes.

    A cell is "mean ± sd (n=3)" over the backend's seeds, "value (n=1, sd n/a)" with one seed. A
    value that was not measured shows "n/a [i]", where footnotes[i - 1] is the reason.
    """
    columns = comparison["columns"]
    labels = [c["label"] for c in columns]
    rows = []
    if comparison["mixed"]:
        for key, title in (("device", "device"), ("config_hash", "config hash")):
            rows.append([f"**{title} (mixed)**", *(str(c[key]) for c in columns)])
    rows.append(["seeds", *(", ".join(str(s) for s in c["seeds"]) for c in columns)])
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
            if row["values"][label] is None:
                reason = row["null_reasons"][label]
                if reason not in footnotes:
                    footnotes.append(reason)
                cells.append(f"n/a [{footnotes.index(reason) + 1}]")
            else:
                cells.append(_cell(row, label))
        rows.append([f"{row['title']} {arrow}", *cells])
    table = tables.markdown_table(["metric", *labels], rows, align="l" + "r" * len(labels))
    return table, footnotes


def _cell(row: Mapping[str, Any], label: str) -> str:
    """"**12.3 ± 0.40** best (n=3)", "15.1 ± 0.20 (n=3, 1.23×)", "0.5000 (n=1, sd n/a)"."""
    stats, decimals = row["stats"][label], row["decimals"]
    shown = format_value(stats["mean"], decimals)
    if stats["sd"] is not None:
        shown += f" ± {format_value(stats['sd'], decimals)}"
    notes = [f"n={stats['n']}"] + (["sd n/a"] if stats["sd"] is None else [])
    if label in row["best"]:
        return f"**{shown}** best ({', '.join(notes)})"
    ratio = row["ratio_to_best"][label]
    return f"{shown} ({', '.join(notes + ([] if ratio is None else [f'{ratio:.2f}×']))})"


def what_differs(comparison: dict[str, Any]) -> list[str]:
    """"What differs": the verdict, the measured spread, timing rankings by mean, and caveats."""
    rows = {row["key"]: row for row in comparison["rows"]}
    columns = comparison["columns"]
    lines = []
    if len(columns) > 1:
        lines.append(comparison["verdict"]["sentence"])
    if len(columns) > 1 or any(len(c["seeds"]) > 1 for c in columns):
        lines.append(_spread_line(comparison["verdict"]["seed_spread"]))
    if len(columns) > 1:
        for key in ("train_images_per_s", "first_epoch_s", "latency_ms.batch1_p50",
                    "latency_ms.batch32_p50", "peak_host_rss_mb", "peak_device_mem_mb"):
            sentence = _ranking(rows[key])
            if sentence:
                lines.append(sentence)
    draws = _random_draws_line(columns)
    if draws:
        lines.append(draws)
    present = {c["backend"] for c in columns}
    missing = [b for b in backend.BACKENDS if b not in present]
    if missing:
        lines.append(f"**Missing backends**: {', '.join(missing)} — no run of "
                     f"{'them' if len(missing) > 1 else 'it'} in this comparison, so nothing here "
                     f"compares against {' or '.join(missing)}. Train "
                     + ("them" if len(missing) > 1 else "it")
                     + f" (`flowers train -e {comparison['experiment']} --backend NAME`) and compare "
                     "again.")
    classes = {c["num_classes"] for c in columns}
    if max(classes) <= 5:
        lines.append(f"Top-5 accuracy is 1 by construction with {max(classes)} classes.")
    if comparison["parity"] is not None:
        lines.append(_parity_line(comparison["parity"], columns))
    if comparison["mixed"]:
        lines.append("**Mixed runs**: " + "; ".join(comparison["mixed"]) + ".")
    if all(len(c["seeds"]) > 1 for c in columns):
        lines.append("Timings are means over each backend's seeds; the ± is their seed-to-seed sd.")
    else:
        lines.append(f"Timings of a backend with one seed are one run: {SEEDS_HINT}.")
    return lines


def _random_draws_line(columns: Sequence[Mapping[str, Any]]) -> str | None:
    """Names the runs whose random draws were the backend's own (docs/comparisons.md, Honest comparisons):
    train.portable_random off (or a run from before it), or random layers it could not make
    portable. None when every run drew alike."""
    own, layers = [], []
    for column in columns:
        for run in column["runs"]:
            draws = run["portable_random"]
            if not draws.get("enabled"):
                own.append(f"{column['backend']} seed {run['seed']}")
            elif draws.get("not_portable"):
                layers.append(f"{column['backend']} seed {run['seed']}: "
                              + ", ".join(draws["not_portable"]))
    parts = []
    if own:
        parts.append("drew their own initial weights and dropout masks (train.portable_random off, "
                     "or trained before it existed): " + "; ".join(own) + ". Their differences mix "
                     "the backend with a different random draw")
    if layers:
        parts.append("trained random layers with the backend's own draws: " + "; ".join(layers))
    return ("**Random draws**: " + ". ".join(parts) + ".") if parts else None


def _spread_line(spread: Mapping[str, Any]) -> str:
    """"**Seed-to-seed spread** of val accuracy, measured: torch 0.0156 (max − min of 3 seeds, sd ...)"."""
    parts = []
    for name, s in spread["by_backend"].items():
        if s["range"] is None:
            parts.append(f"{name} unmeasured (one seed)")
        else:
            parts.append(f"{name} {s['range']:.4f} (max − min of {s['n']} seeds; sd {s['sd']:.4f})")
    return "**Seed-to-seed spread** of val accuracy, as measured: " + "; ".join(parts) + "."


def _parity_line(result: dict[str, Any], columns: list[dict[str, Any]]) -> str:
    worst = max((r["max_abs_prob_diff"] for r in result["results"]), default=0.0)
    drift = ", ".join(f"{r['backend']} {r['max_abs_loss_diff']:.1e}" for r in result["results"])
    return (
        f"**Parity** ({result['created'][:10]}, {result['image_size']} px, "
        f"{', '.join(result['backends'])}): the same weights give max |Δprob| {worst:.1e} "
        f"(target {result['targets']['max_abs_prob_diff']:.0e}) — "
        + ("so the forward pass is the same everywhere and differences in accuracy come "
           "from training." if result["passed"] else "TARGET MISSED: "
           + "; ".join(result["failures"]) + ".")
        + f" {result['train_steps']} training steps from that one init drift by max |Δloss| "
        f"{drift} vs {result['reference']} (see Parity below)."
        + _parity_version_note(result, columns)
    )


def _parity_version_note(result: dict[str, Any], columns: list[dict[str, Any]]) -> str:
    """Says so when parity.json was made with other framework versions than the runs."""
    differ = sorted({f"{c['backend']} {result['runs'][c['backend']]['backend_version']} (runs: "
                     f"{c['backend_version']})" for c in columns if c["backend"] in result["runs"]
                     and result["runs"][c["backend"]].get("backend_version") != c["backend_version"]})
    return f" Note: parity.json was made with other versions: {', '.join(differ)}." if differ else ""


def _ranking(row: dict[str, Any]) -> str | None:
    """"**train throughput** (img/s): best jax 118; torch 0.80×, tensorflow 0.55×" (by mean)."""
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
    return (f"**{row['label']}**: {direction} mean {best} {format_value(measured[best], row['decimals'])}"
            f"{unit}{tied}" + (f"; {rest}" if rest else "") + ".")


def _setup_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "n/a" if value is None else str(value)


def _same(columns: list[dict[str, Any]], key: str) -> str:
    values = sorted({str(c[key]) for c in columns})
    return values[0] if len(values) == 1 else "MIXED " + "/".join(values)


def _hashes(columns: list[dict[str, Any]]) -> str:
    """"3f2a… " with one, "3f2a… (seed 42), 9b1c… (seed 43)" with several: the hash covers the seed."""
    seeds: dict[str, list[str]] = {}
    for column in columns:
        for run in column["runs"]:
            seeds.setdefault(run["config_hash"], [])
            if str(run["seed"]) not in seeds[run["config_hash"]]:
                seeds[run["config_hash"]].append(str(run["seed"]))
    if len(seeds) == 1:
        return next(iter(seeds))
    return ", ".join(f"{h} (seed {', '.join(s)})" for h, s in seeds.items())


def _host_summary(columns: list[dict[str, Any]]) -> str:
    hosts = {(h.get("cpu_model"), h.get("cpu_count"), h.get("ram_gb"))
             for h in (c["host"] or {} for c in columns)}
    return "; ".join(f"{model}, {cores} logical cores, {ram} GiB RAM"
                     for model, cores, ram in sorted(hosts, key=str))


def write_csv(comparison: dict[str, Any], path: Path) -> None:
    """comparison.csv: the columns are documented in the module docstring."""
    run_ids = {(c["backend"], str(r["seed"])): r["run_id"] for c in comparison["columns"]
               for r in c["runs"]}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "unit", "better", "backend", "statistic", "seed", "run_id",
                         "value", "n", "ratio_to_best", "best", "null_reason"])
        for row in comparison["rows"]:
            head = [row["key"], row["unit"], row["better"]]
            for name, stats in row["stats"].items():
                for seed, value in stats["seeds"].items():
                    writer.writerow([*head, name, "value", seed, run_ids[name, seed], _csv(value), "",
                                     "", "", stats["null_reasons"].get(seed, "")])
                ratio = row["ratio_to_best"][name]
                writer.writerow([*head, name, "mean", "", "", _csv(stats["mean"]), stats["n"],
                                 _csv(ratio), int(name in row["best"]),
                                 row["null_reasons"].get(name, "")])
                writer.writerow([*head, name, "sd", "", "", _csv(stats["sd"]), stats["n"], "", "",
                                 "" if stats["sd"] is not None else "sd needs at least 2 seeds"])


def _csv(value: float | None) -> str:
    return "" if value is None else repr(value)
