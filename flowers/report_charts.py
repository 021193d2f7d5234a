"""The comparison report's charts, drawn from the comparison dict and the runs' histories.

    chart_<metric>.png   a bar per backend at its mean over seeds, each seed a dot, sd as an error
                         bar; "(best)" where the table bolds a best (report.py decides)
    learning_curves.png  val accuracy and val loss per epoch: each seed a thin line, the backend's
                         mean over seeds a thick one

matplotlib's Figure API only (no pyplot: no global figure state; the Agg canvas, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowers import files
from flowers.report_stats import format_value

BACKEND_COLORS = {"torch": "#d62728", "tensorflow": "#ff7f0e", "jax": "#1f77b4"}
BAR_CHART_SIZE_IN = (6.4, 3.6)  # at 100 dpi: 640 x 360 px
CURVES_SIZE_IN = (9.6, 3.8)  # at 100 dpi: 960 x 380 px
CURVES = (("val_accuracy", "val accuracy"), ("val_loss", "val loss"))


def write_charts(comparison: Mapping[str, Any],
                 histories: Mapping[str, Sequence[list[dict[str, Any]]]], folder: Path) -> list[str]:
    """One bar chart per metric with a measured value, and the learning curves; their file names.

    Args:
        comparison: report.build_comparison's dict (columns, rows, devices).
        histories: backend -> its runs' history.csv rows, one list per seed.
    """
    subtitle = f"{comparison['experiment']} · {', '.join(comparison['devices'])}"
    names = []
    for row in comparison["rows"]:
        if all(v is None for v in row["values"].values()):
            continue
        name = f"chart_{row['key'].replace('.', '_')}.png"
        _bar_chart(row, [c["backend"] for c in comparison["columns"]], subtitle, folder / name)
        names.append(name)
    learning_curves(histories, subtitle, folder / "learning_curves.png")
    return [*names, "learning_curves.png"]


def _color(backend_name: str) -> str:
    return BACKEND_COLORS.get(backend_name, "#7f7f7f")


def _bar_chart(row: Mapping[str, Any], labels: list[str], subtitle: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=BAR_CHART_SIZE_IN, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    means = [row["values"][label] for label in labels]
    heights = [0.0 if v is None else v for v in means]
    errors = [row["stats"][label]["sd"] or 0.0 for label in labels]
    bars = ax.bar(labels, heights, color=[_color(label) for label in labels], alpha=0.75,
                  yerr=errors, capsize=4, error_kw={"elinewidth": 1, "ecolor": "#333333"})
    tops = []
    for position, label in enumerate(labels):
        seeds = [v for v in row["stats"][label]["seeds"].values() if v is not None]
        # a small fixed offset per seed, so that equal values stay visible as separate dots
        offsets = [(i - (len(seeds) - 1) / 2) * 0.08 for i in range(len(seeds))]
        ax.scatter([position + o for o in offsets], seeds, color="black", s=12, zorder=3)
        tops.append(max([*seeds, heights[position] + errors[position]]))
    for bar, label, mean, top in zip(bars, labels, means, tops, strict=True):
        text = "n/a" if mean is None else format_value(mean, row["decimals"])
        if label in row["best"]:
            text += " (best)"
        # above the highest seed and the whisker, so that neither hides the figure
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 3), textcoords="offset points")
    ax.set_ylim(0, max(tops) * 1.18 or 1)
    ax.set_ylabel(row["unit"] or row["label"])
    better = "lower is better" if row["better"] == "lower" else "higher is better"
    label = row["label"] + (f", {row['note']}" if row.get("note") else "")
    ax.set_title(f"{label} ({better}); bar = mean, dots = seeds, whisker = sd\n{subtitle}",
                 fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    with files.writing(path):
        fig.savefig(path)


def learning_curves(histories: Mapping[str, Sequence[list[dict[str, Any]]]], subtitle: str,
                     path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=CURVES_SIZE_IN, dpi=100, layout="constrained")
    for index, (key, title) in enumerate(CURVES):
        ax = fig.add_subplot(1, 2, index + 1)
        for backend_name, seeds in histories.items():
            color = _color(backend_name)
            for history in seeds:
                ax.plot([int(r["epoch"]) + 1 for r in history], [r[key] for r in history],
                        color=color, linewidth=0.8, alpha=0.45)
            epochs, means = mean_curve(seeds, key)
            ax.plot(epochs, means, color=color, linewidth=2.5, marker="o", markersize=4,
                    label=f"{backend_name} (mean of {len(seeds)})")
        ax.set_xlabel("epoch")
        ax.set_title(f"{title} (thin: each seed, thick: mean)", fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=9)
    fig.suptitle(f"learning curves — {subtitle}", fontsize=10)
    with files.writing(path):
        fig.savefig(path)


def mean_curve(histories: Sequence[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    """(epochs from 1, the mean of `key` over the seeds that reached each epoch).

    Seeds can stop at different epochs (early stopping), so each epoch averages those that have it.
    """
    by_epoch: dict[int, list[float]] = {}
    for history in histories:
        for row in history:
            by_epoch.setdefault(int(row["epoch"]) + 1, []).append(float(row[key]))
    epochs = sorted(by_epoch)
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
