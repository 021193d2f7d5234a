"""bench.md: a header (machine, settings, versions, peak), the figures table and the targets table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowers.bench.variants import variant_baseline
from flowers.tables import markdown_table

Row = tuple[str, list[str]]  # a figure's label and its cell per backend


def markdown(results: dict[str, Any]) -> str:
    """bench.md: the figures table (median, min-max) and the targets, with the method."""
    return "\n".join([header(results), "", figures_table(results), "", "## Targets", "",
                      targets_table(results["targets"]), ""])


def header(results: dict[str, Any]) -> str:
    """Title, backbone and settings, versions, the FP32 peak and the model's GFLOP per image."""
    f, s, peak = results["backends"], results["settings"], results["peak"]
    names = list(f)
    return "\n".join([
        f"# flowers bench — {results['device']} ({results['host']['cpu_model']}, "
        f"{results['host']['cpu_count']} logical cores)",
        "",
        f"{results['created']} · backbone {_backbone(results)} · image {s['image_size']} px · "
        f"batch {s['batch_size']} · "
        f"{s['steps']} timed calls per figure over {s['rounds']} interleaved rounds after "
        f"{s['warmup']} warm-up calls · images: {s['images'] or 'synthetic'}",
        "",
        "Versions: " + "; ".join(
            f"{n} {f[n]['versions']['backend_version']}" for n in names)
        + f"; keras {f[names[0]]['versions']['keras_version']}",
        "",
        f"FP32 peak: {_num(peak.get('fp32_gflops'), '{:.0f}')} GFLOP/s — {peak['method']}"
        + (f"; measured float32 GEMM: {peak['gemm_gflops_measured']} GFLOP/s"
           if "gemm_gflops_measured" in peak else ""),
        f"bf16 peak: {_num(peak.get('bf16_gflops'), '{:.0f}')} GFLOP/s — "
        f"{peak.get('bf16_method', 'not estimated (an older bench.json)')}",
        *([f"Contention: {results['contention']['method']} "
           f"({results['contention']['load_processes']} load processes)"]
          if results.get("contention") else []),
        f"Model: {_backbone(results)} (random weights, frozen) + head, "
        f"{f[names[0]]['gflops_per_image']:.3g} GFLOP per image (forward, counted from the "
        "Keras layers). Figures: median (min-max).",
    ])


def figures_table(results: dict[str, Any]) -> str:
    """One row per figure, one column per backend: the timed figures, then the variants, and the
    memory, contention and end-to-end figures where they were measured."""
    f, s = results["backends"], results["settings"]
    names = list(f)
    rows = [*_timing_rows(f, s, names), *_variant_rows(f, names)]
    if any(f[n].get("memory") for n in names):
        rows += _memory_rows(f, s, names)
    if any(f[n].get("contended") for n in names):
        rows += _contention_rows(f, s, names)
    if any(f[n]["e2e"] for n in names):
        rows += _end_to_end_rows(f, s, names)
    return markdown_table(["figure", *names], ([label, *cells] for label, cells in rows))


def _timing_rows(f: dict[str, Any], s: dict[str, Any], names: list[str]) -> list[Row]:
    """The figures every bench measures (a declarative table: one entry per row)."""
    return [
        ("forward img/s, batch 1", [_rate(f[n].get("forward_b1_img_s")) for n in names]),
        (f"forward img/s, batch {s['batch_size']}",
         [_rate(f[n].get("forward_batch_img_s")) for n in names]),
        *[(f"forward img/s at {size} px, batch {s['batch_size']}",
           [_rate(f[n].get("forward_by_size_img_s", {}).get(size)) for n in names])
          for size in _sweep(f) if len(_sweep(f)) > 1],
        ("forward GFLOP/s (share of FP32 peak)",
         [f"{f[n]['forward_gflops']:.1f} ({_num(f[n]['forward_peak_share'], '{:.0%}')})"
          for n in names]),
        ("mixed_bfloat16 forward share of bf16 peak",
         [_or_missing(f[n], "bf16_peak_share", lambda v: f"{v:.0%}") for n in names]),
        ("train step img/s (train_on_batch, tensors in memory)",
         [_rate(f[n].get("train_step_img_s")) for n in names]),
        ("fit img/s, in-memory arrays", [_rate(f[n].get("train_memory_img_s")) for n in names]),
        ("fit img/s, tf.data pipeline", [_rate(f[n].get("train_tfdata_img_s")) for n in names]),
        ("tf.data / in-memory (fit)", [_num(f[n]["tfdata_vs_memory"]) for n in names]),
        ("native forward img/s", [_or_missing(f[n], "native_forward_img_s", _rate) for n in names]),
        ("native train step img/s", [_or_missing(f[n], "native_train_img_s", _rate) for n in names]),
        ("keras / native, forward", [_or_missing(f[n], "keras_vs_native_forward", _num) for n in names]),
        ("keras / native, train step",
         [_or_missing(f[n], "keras_vs_native_train", _num) for n in names]),
        ("native max |Δprob| / max rel. Δfeatures",
         [(_missing(f[n], "native_differences") if not f[n]["native_differences"] else
           f"{f[n]['native_differences']['probabilities_max_abs']:.1e} / "
           f"{f[n]['native_differences']['features_max_rel']:.1e}") for n in names]),
        ("first forward call s (compile/warm-up)",
         [_num(f[n]["first_call_s"].get("forward_batch"), "{:.1f}") for n in names]),
        ("device", [f[n]["device"] for n in names]),
        ("layout / jit", [f"{f[n]['data_format']} / {'on' if f[n]['jit_compile'] else 'off'}"
                          for n in names]),
    ]


def _variant_rows(f: dict[str, Any], names: list[str]) -> list[Row]:
    """One row per variant any backend measured or skipped: its rate and its ratio to the default."""
    rows = []
    for variant in sorted({v for n in names for v in (*f[n]["variants"], *_skipped(f[n]))}):
        kind = "train step" if variant_baseline(variant) == "train_step" else "forward"
        rows.append((f"{kind} img/s with {variant} (× default)",
                     [(f"{_rate(f[n]['variants'][variant])} "
                       f"({f[n]['variants'][variant]['vs_default']:.2f}×)"
                       if variant in f[n]["variants"] else
                       f"skipped: {_skipped(f[n])[variant]}" if variant in _skipped(f[n]) else "—")
                      for n in names]))
    return rows


def _memory_rows(f: dict[str, Any], s: dict[str, Any], names: list[str]) -> list[Row]:
    """Peak RSS per task (--memory), and Keras' over the native twin's."""
    rows = []
    for task, label in (("forward_batch", f"forward, batch {s['batch_size']}"),
                        ("train_step", "train step"), ("native_forward", "native forward"),
                        ("native_train", "native train step")):
        rows.append((f"peak RSS MiB, {label} (after build)", [_memory(f[n], task) for n in names]))
    for task, label in (("forward_batch", "forward"), ("train_step", "train step")):
        rows.append((f"keras / native peak RSS, {label}",
                     [_or_missing(f[n], f"keras_vs_native_{task}_rss", _num) for n in names]))
    return rows


def _contention_rows(f: dict[str, Any], s: dict[str, Any], names: list[str]) -> list[Row]:
    """The forward rates timed again under --contention, with their slowdown."""
    return [(f"forward img/s, {label}, under contention (slowdown)",
             [f"{_rate(f[n]['contended'][f'{task}_img_s'])} "
              f"({f[n]['contended'][f'{task}_slowdown']:.2f}×)" for n in names])
            for task, label in (("forward_b1", "batch 1"), ("forward_batch", f"batch {s['batch_size']}"))]


def _end_to_end_rows(f: dict[str, Any], s: dict[str, Any], names: list[str]) -> list[Row]:
    """The end-to-end runs (standard, feature cache, its bf16 run where made) and their memory."""
    e = {n: f[n]["e2e"] for n in names}
    return [
        (f"end-to-end s, standard ({s['e2e_epochs']} epochs; val acc)",
         [f"{e[n]['standard']['wall_s']:.1f} ({e[n]['standard']['val_accuracy']:.3f})"
          for n in names]),
        ("end-to-end s, train.cache_features (val acc)",
         [f"{e[n]['cache']['wall_s']:.1f} ({e[n]['cache']['val_accuracy']:.3f})" for n in names]),
        ("feature-cache speed-up", [f"{e[n]['speedup']:.1f}×" for n in names]),
        *([("end-to-end s, train.cache_features in mixed_bfloat16 (val acc)",
            [f"{e[n]['cache-bf16']['wall_s']:.1f} ({e[n]['cache-bf16']['val_accuracy']:.3f})"
             for n in names])] if all("cache-bf16" in e[n] for n in names) else []),
        ("peak host RSS MiB (standard run)", [f"{f[n]['peak_host_rss_mb']:.0f}" for n in names]),
        ("peak device memory MiB", [_num(f[n]["peak_device_mem_mb"], "{:.0f}") for n in names]),
    ]


def targets_table(targets: list[dict[str, Any]]) -> str:
    """Each target with its goal, the measured value and whether it is met."""
    return markdown_table(["target", "goal", "measured", "met"], (
        [t["target"], f"{'≥' if t['better'] == 'higher' else '≤'} {t['goal']}",
         f"n/a: {t['reason']}" if t.get("reason") else _num(t["value"]),
         "n/a" if t["met"] is None else ("yes" if t["met"] else
                                         f"NO: {t['why']}" if t.get("why") else "NO")]
        for t in targets))


def _backbone(results: dict[str, Any]) -> str:
    return results.get("backbone", "ResNet50")  # bench.json files from before --backbone: ResNet50


def _sweep(figures: dict[str, Any]) -> list[str]:
    """The image sides of --image-sizes (bench.json keys), ascending; [] for older files."""
    return sorted({size for f in figures.values() for size in f.get("forward_by_size_img_s", {})},
                  key=int)


def _skipped(figures: dict[str, Any]) -> dict[str, str]:
    return figures.get("variants_skipped", {})


def _or_missing(figures: dict[str, Any], key: str, show: Callable[[Any], str]) -> str:
    """show(figure), or _missing() when the figure was not measured."""
    return _missing(figures, key) if figures.get(key) is None else show(figures[key])


def _missing(figures: dict[str, Any], key: str) -> str:
    """An unmeasured figure: "n/a", with the reason bench.json records for it."""
    reason = figures.get("null_reasons", {}).get(key)
    return f"n/a: {reason}" if reason else "n/a"


def _memory(figures: dict[str, Any], task: str) -> str:
    entry = (figures.get("memory") or {}).get(task)
    if not entry:
        return "n/a"
    device = (f"; device {entry['peak_device_mem_mb']:.0f}"
              if entry.get("peak_device_mem_mb") is not None else "")
    return f"{entry['peak_rss_mb']:.0f} ({entry['after_build_rss_mb']:.0f}{device})"


def _rate(entry: dict | None) -> str:
    return "n/a" if not entry else f"{entry['median']:.1f} ({entry['min']:.1f}-{entry['max']:.1f})"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)
