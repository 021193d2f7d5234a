"""The comparison report's statistics: per-backend summaries over seeds, paired tests, the verdict.

Pure functions of numbers and parsed predictions (report.py reads the files). The question they
answer is whether the backends differ on a job by more than training's own seed-to-seed variation:

- summarize: mean, sd (ddof=1), min, max of one metric over a backend's seeds.
- paired_test: two runs scored on the same validation images (predictions.csv): the exact McNemar
  test on the images exactly one of them gets right, their top-1 agreement, the accuracy difference.
- paired_tests: every pair of backends at every seed both have, Holm–Bonferroni corrected as one
  family at FAMILY_ALPHA.
- verdict: "differ" only when a pair's corrected test rejects AND its mean val accuracies differ by
  more than the measured seed-to-seed spread; with fewer than 2 seeds that spread is not measured,
  so the verdict cannot say "differ".
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

FAMILY_ALPHA = 0.05  # family-wise error rate over all paired tests of one report (Holm–Bonferroni)
PREDICTION_COLUMNS = ("index", "item", "label", "predicted", "p_true")
PROBABILITY_SLACK = 1e-5  # float32 rounding of p_true
NO_PREDICTIONS = ("not available: run has no predictions.csv (trained before flowers saved "
                  "per-image predictions)")
SEEDS_HINT = "run more seeds, e.g. `flowers train --seeds 3` under each backend, and compare again"


@dataclass(frozen=True)
class Predictions:
    """One run's predictions.csv: a row per validation image, in the split's stored order."""

    item: tuple[str, ...]
    label: tuple[int, ...]
    predicted: tuple[int, ...]
    p_true: tuple[float, ...]

    @property
    def correct(self) -> list[bool]:
        return [p == t for p, t in zip(self.predicted, self.label, strict=True)]


def parse_predictions(lines: Iterable[str]) -> Predictions:
    """predictions.csv's text (lines) -> Predictions.

    Raises:
        ValueError: a header other than PREDICTION_COLUMNS, no rows, an index out of order, or a
            value that is not a class index / a finite probability; the message says where.
    """
    try:
        return _parse_rows(csv.reader(lines, strict=True))
    except csv.Error as exc:  # an unclosed quote (a file cut short): not a ValueError of its own
        raise ValueError(str(exc)) from None


def _parse_rows(reader: Iterator[list[str]]) -> Predictions:
    header = next(reader, None)
    if header is None or tuple(header) != PREDICTION_COLUMNS:
        raise ValueError(f"header {header!r} is not {','.join(PREDICTION_COLUMNS)}")
    items, labels, predicted, p_true = [], [], [], []
    for position, row in enumerate(reader):
        if len(row) != len(PREDICTION_COLUMNS):
            raise ValueError(f"row {position + 1} has {len(row)} fields, not {len(PREDICTION_COLUMNS)}")
        index, item, label, guess, probability = row
        if _int(index, "index", position) != position:
            raise ValueError(f"row {position + 1}: index {index!r} is not {position} (rows out of order)")
        items.append(item)
        labels.append(_int(label, "label", position))
        predicted.append(_int(guess, "predicted", position))
        p_true.append(_float(probability, position))
    if not labels:
        raise ValueError("no rows")
    return Predictions(tuple(items), tuple(labels), tuple(predicted), tuple(p_true))


def _int(text: str, column: str, position: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"row {position + 1}: {column} {text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"row {position + 1}: {column} {value} is negative")
    return value


def _float(text: str, position: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"row {position + 1}: p_true {text!r} is not a number") from None
    # a float32 softmax can land a rounding step outside [0, 1]: that is still a probability
    if not math.isfinite(value) or not -PROBABILITY_SLACK <= value <= 1 + PROBABILITY_SLACK:
        raise ValueError(f"row {position + 1}: p_true {value} is not a probability")
    return value


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """mean, sd (ddof=1; None with one value), min, max and n of one metric over seeds."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c.

    Under "both models are equally accurate" each discordant image is a fair coin flip, so
    p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)); p = 1 when b + c = 0. Exact
    fractions: the sum of binomial coefficients is far beyond a float's range at n in the thousands.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input's order.

    The i-th smallest of m p-values is multiplied by (m - i) (i from 0), kept at least the
    adjusted value before it (step-down) and at most 1. A test rejects at family-wise level alpha
    when its adjusted p <= alpha; that controls the chance of any false rejection at alpha.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_test(a: Predictions, b: Predictions) -> dict[str, Any]:
    """McNemar, agreement and accuracy difference of two runs on the same validation images.

    Raises:
        ValueError: the two do not list the same images with the same labels (not one split).
    """
    if len(a.label) != len(b.label):
        raise ValueError(f"different numbers of images ({len(a.label)} vs {len(b.label)})")
    for name in ("item", "label"):
        left, right = getattr(a, name), getattr(b, name)
        first = next((i for i, (x, y) in enumerate(zip(left, right, strict=True)) if x != y), None)
        if first is not None:
            raise ValueError(f"different {name} at index {first} ({left[first]!r} vs "
                             f"{right[first]!r}): not scored on the same validation images")
    right_a, right_b = a.correct, b.correct
    n = len(right_a)
    only_a = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    only_b = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    accuracy_a, accuracy_b = sum(right_a) / n, sum(right_b) / n
    return {
        "n": n,
        "b": only_a,
        "c": only_b,
        "agreement": sum(x == y for x, y in zip(a.predicted, b.predicted, strict=True)) / n,
        "accuracy_a": accuracy_a,
        "accuracy_b": accuracy_b,
        "accuracy_difference": accuracy_a - accuracy_b,
        "p_value": mcnemar_exact(only_a, only_b),
    }


def paired_tests(order: Sequence[str], predictions: Mapping[str, Mapping[int, Predictions | str]],
                 alpha: float = FAMILY_ALPHA) -> dict[str, Any]:
    """Every pair of backends (in `order`) at every seed both have, Holm-corrected as one family.

    Args:
        order: the backends, in the report's column order.
        predictions: backend -> seed -> its run's Predictions, or why there are none (a reason).

    Returns:
        {"alpha", "correction", "tests": [...]}: a test per (pair, seed) with "backends" [A, B],
        "seed", "available", "reason" (None when available) and, when available, paired_test's
        figures plus "p_holm" and "rejected".
    """
    tests = []
    for i, first in enumerate(order):
        for second in order[i + 1:]:
            for seed in sorted(set(predictions[first]) & set(predictions[second])):
                tests.append(_one_test(first, second, seed, predictions[first][seed],
                                       predictions[second][seed]))
    available = [t for t in tests if t["available"]]
    for test, adjusted in zip(available, holm_adjust([t["p_value"] for t in available]), strict=True):
        test["p_holm"] = adjusted
        test["rejected"] = adjusted <= alpha
    return {"alpha": alpha,
            "correction": f"Holm–Bonferroni over {_tests(len(available))}, family-wise α = {alpha}",
            "tests": tests}


def _tests(count: int) -> str:
    return "the one available (pair, seed) test" if count == 1 else \
        f"all {count} available (pair, seed) tests"


def _one_test(first: str, second: str, seed: int, a: Predictions | str,
              b: Predictions | str) -> dict[str, Any]:
    test: dict[str, Any] = {"backends": [first, second], "seed": seed, "available": False}
    reasons = [f"{name}: {p}" for name, p in ((first, a), (second, b)) if isinstance(p, str)]
    if reasons:
        return {**test, "reason": "; ".join(reasons)}
    try:
        figures = paired_test(a, b)
    except ValueError as exc:
        return {**test, "reason": f"predictions.csv files do not match: {exc}"}
    return {**test, "available": True, "reason": None, **figures}


def seed_spread(accuracies: Mapping[str, Mapping[int, float]]) -> dict[str, Any]:
    """Val accuracy's measured seed-to-seed variation: per backend, and the largest max − min.

    Returns:
        {"by_backend": {backend: summarize(...) + "range"}, "largest": the largest within-backend
        max − min over backends with at least 2 seeds (None when none has 2: unmeasured),
        "backend": whose range that is}.
    """
    by_backend = {}
    for name, per_seed in accuracies.items():
        summary = summarize([per_seed[s] for s in sorted(per_seed)])
        summary["range"] = summary["max"] - summary["min"] if summary["n"] > 1 else None
        by_backend[name] = summary
    measured = {k: v["range"] for k, v in by_backend.items() if v["range"] is not None}
    widest = max(measured, key=measured.get) if measured else None
    return {"by_backend": by_backend, "largest": measured.get(widest), "backend": widest}


def verdict(accuracies: Mapping[str, Mapping[int, float]], tests: Mapping[str, Any]) -> dict[str, Any]:
    """Do the backends differ on this job? (see the module docstring for the rule)

    Args:
        accuracies: backend -> seed -> val_accuracy (metrics.json), backends in column order.
        tests: paired_tests(...)'s result.

    Returns:
        {"status": "differ" | "indistinguishable", "backends_differ", "reason", "sentence", and
        the figures it quotes: "alpha", "mean_val_accuracy", "seed_spread", "largest_difference",
        "differing_pairs", "rejected_pairs", "smallest_p_holm", "agreement_range",
        "tests_available", "tests_total", "limits"}.
    """
    spread = seed_spread(accuracies)
    means = {name: s["mean"] for name, s in spread["by_backend"].items()}
    available = [t for t in tests["tests"] if t["available"]]
    rejected_pairs = _unique_pairs(t["backends"] for t in available if t["rejected"])
    replicated = {name for name, s in spread["by_backend"].items() if s["n"] > 1}
    judged = [pair for pair in rejected_pairs if set(pair) <= replicated]
    differing = [pair for pair in judged if abs(means[pair[0]] - means[pair[1]]) > spread["largest"]]
    names = list(means)
    gaps = [((a, b), abs(means[a] - means[b])) for i, a in enumerate(names) for b in names[i + 1:]]
    largest = max(gaps, key=lambda g: g[1]) if gaps else None
    smallest = min(available, key=lambda t: t["p_holm"]) if available else None
    agreements = [t["agreement"] for t in available]
    result = {
        "status": "differ" if differing else "indistinguishable",
        "backends_differ": bool(differing),
        "alpha": tests["alpha"],
        "mean_val_accuracy": means,
        "seed_spread": spread,
        "largest_difference": None if largest is None else
        {"backends": list(largest[0]), "value": largest[1]},
        "differing_pairs": [list(p) for p in differing],
        "rejected_pairs": [list(p) for p in rejected_pairs],
        "smallest_p_holm": None if smallest is None else
        {"backends": smallest["backends"], "seed": smallest["seed"], "value": smallest["p_holm"]},
        "agreement_range": [min(agreements), max(agreements)] if agreements else None,
        "tests_available": len(available),
        "tests_total": len(tests["tests"]),
        "limits": _limits(spread, tests, len(names)),
        "reason": _reason(rejected_pairs, judged, differing),
    }
    result["sentence"] = verdict_sentence(result)
    return result


def _reason(rejected: list[tuple[str, str]], judged: list[tuple[str, str]],
            differing: list[tuple[str, str]]) -> str:
    """Why the verdict is what it is, in words."""
    def names(pairs: list[tuple[str, str]]) -> str:
        return "; ".join(" vs ".join(p) for p in pairs)

    if differing:
        return (f"{names(differing)}: the corrected paired test rejects and the mean val accuracies "
                "differ by more than the seed-to-seed spread")
    if not rejected:
        return "no pair's corrected paired test rejects"
    unjudged = [p for p in rejected if p not in judged]
    parts = []
    if judged:
        parts.append(f"{names(judged)}: the corrected paired test rejects, but the mean val "
                     "accuracies differ by no more than the seed-to-seed spread")
    if unjudged:
        parts.append(f"{names(unjudged)}: the corrected paired test rejects, but with one seed the "
                     "seed-to-seed spread is unmeasured")
    return "; ".join(parts)


def _unique_pairs(pairs: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((p[0], p[1]) for p in pairs))


def _limits(spread: Mapping[str, Any], tests: Mapping[str, Any], backends: int) -> list[str]:
    """What keeps this comparison from saying "differ" whatever the data (empty when nothing does)."""
    if backends < 2:
        return ["one backend: nothing to compare it with"]
    limits = []
    single = [name for name, s in spread["by_backend"].items() if s["n"] < 2]
    if single:
        limits.append(f"the seed-to-seed spread is unmeasured for {', '.join(single)} (one seed), "
                      f"so no pair with {'it' if len(single) == 1 else 'them'} can be said to "
                      f"differ: {SEEDS_HINT}")
    missing = sorted({t["reason"] for t in tests["tests"] if not t["available"]})
    if not tests["tests"]:
        limits.append("no seed is shared by two backends, so no paired test was possible")
    elif missing:
        limits.append("paired tests not available for "
                      f"{len(tests['tests']) - sum(t['available'] for t in tests['tests'])} of "
                      f"{len(tests['tests'])} (pair, seed): " + "; ".join(missing))
    return limits


def verdict_sentence(v: Mapping[str, Any]) -> str:
    """The verdict as one markdown paragraph with the figures it rests on."""
    spread = v["seed_spread"]
    means = ", ".join(f"{k} {m:.4f}" for k, m in v["mean_val_accuracy"].items())
    figures = [f"mean val accuracy {means}"]
    if v["largest_difference"]:
        pair = v["largest_difference"]
        figures.append(f"largest difference {pair['value']:.4f} ({' vs '.join(pair['backends'])})")
    figures.append("seed-to-seed spread (largest max − min of val accuracy within one backend) "
                   + ("unmeasured" if spread["largest"] is None
                      else f"{spread['largest']:.4f} ({spread['backend']})"))
    if v["smallest_p_holm"]:
        best = v["smallest_p_holm"]
        figures.append(f"smallest Holm-corrected McNemar p {best['value']:.3g} "
                       f"({' vs '.join(best['backends'])}, seed {best['seed']}; "
                       f"of {_tests(v['tests_available'])}, family-wise α = {v['alpha']})")
    if v["agreement_range"]:
        low, high = v["agreement_range"]
        figures.append(f"top-1 agreement {low:.4f}–{high:.4f}")
    head = ("**Verdict: backends differ on this job**" if v["backends_differ"]
            else "**Verdict: indistinguishable on this job**") + f" ({v['reason']})."
    limits = "".join(f" Limit: {line}." for line in v["limits"])
    return f"{head} Figures: {'; '.join(figures)}.{limits}"


def format_value(value: float, decimals: int | None) -> str:
    """A figure as the report shows it: `decimals` places, else about 3 significant figures."""
    if decimals is not None:
        return f"{value:.{decimals}f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}"
