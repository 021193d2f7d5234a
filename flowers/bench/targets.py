"""The project's performance targets, and how the figures of a bench.json meet them.

evaluate_targets reads only the results dict run_bench writes (its "backends", "settings" and
"peak"), so a target can be re-checked on any bench.json.
"""

from __future__ import annotations

from typing import Any

from flowers.bench.variants import BF16_VARIANT

TARGETS = {
    "keras_vs_native_torch": 0.9, "keras_vs_native_tensorflow": 0.95, "tfdata_vs_memory": 0.95,
    "forward_vs_fastest": 0.8, "forward_vs_fastest_small": 0.6, "fastest_peak_share": 0.6,
    "cache_speedup": 5.0, "cache_accuracy_pp": 1.0, "contention_slowdown_vs_others": 2.0,
    "bf16_vs_fp32": 3.0, "bf16_accuracy_pp": 1.0, "keras_vs_native_torch_memory": 1.3,
}

# Below this side the forward-vs-fastest goal is forward_vs_fastest_small: per-call overheads
# (Python, kernel launches, layout copies) weigh more where each convolution has little work.
SMALL_IMAGE_BELOW = 224


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each performance target of the project with its measured value and whether it is met."""
    figures = results["backends"]
    fastest = max(figures, key=lambda n: figures[n]["forward_batch_img_s"]["median"])
    return [*_native_targets(figures), *_pipeline_targets(figures),
            *_forward_targets(figures, results["settings"]["image_size"]),
            *_contention_targets(figures), *_memory_targets(figures),
            *_peak_targets(figures, fastest, results["peak"]), *_end_to_end_targets(figures)]


def target_row(name: str, value: float | None, goal: float, better: str = "higher",
               reason: str | None = None, why: str | None = None) -> dict[str, Any]:
    """One target of bench.json: met when value is at least (better "higher") or at most ("lower")
    the goal, None without a value. reason: why there is no value; why: what makes a miss a miss,
    where it is computable."""
    met = None if value is None else (value >= goal if better == "higher" else value <= goal)
    return {"target": name, "value": value, "goal": goal, "better": better, "met": met,
            **({"reason": reason} if value is None and reason else {}),
            **({"why": why} if met is False and why else {})}


def _native_targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Keras over its native twin, forward and train step (n/a with the reason where unmeasured:
    another --backbone than the twins')."""
    rows = []
    for name in ("torch", "tensorflow"):
        if name in figures:
            f, goal = figures[name], TARGETS[f"keras_vs_native_{name}"]
            for label, key in (("forward", "keras_vs_native_forward"),
                               ("train step", "keras_vs_native_train")):
                rows.append(target_row(f"keras-on-{name} {label} / native {name}", f[key], goal,
                                       reason=f["null_reasons"].get(key)))
    return rows


def _pipeline_targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    return [target_row(f"{name}: tf.data-fed / in-memory train step", f["tfdata_vs_memory"],
                       TARGETS["tfdata_vs_memory"]) for name, f in figures.items()]


def _forward_targets(figures: dict[str, Any], main_size: int) -> list[dict[str, Any]]:
    """Every backend's forward rate against the fastest one's, at each image side measured (a
    smaller goal below SMALL_IMAGE_BELOW)."""
    rows = []
    for size in sorted({int(s) for f in figures.values() for s in f.get("forward_by_size_img_s", {})}
                       | {main_size}):
        rate = {name: (f["forward_by_size_img_s"][str(size)] if "forward_by_size_img_s" in f
                       else f["forward_batch_img_s"])["median"] for name, f in figures.items()}
        best = max(rate, key=rate.get)
        goal = TARGETS["forward_vs_fastest" if size >= SMALL_IMAGE_BELOW else
                       "forward_vs_fastest_small"]
        rows += [target_row(f"{name} forward / fastest ({best}) at {size} px", rate[name] / rate[best],
                            goal) for name in figures if name != best]
    return rows


def _contention_targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Each backend's slowdown under contention against the smallest of the others' (two or more
    backends measured under --contention)."""
    contended = {name: f["contended"] for name, f in figures.items() if f.get("contended")}
    if len(contended) <= 1:
        return []
    rows = []
    for task, label in (("forward_b1", "batch 1"), ("forward_batch", "batch N")):
        slow = {name: c[f"{task}_slowdown"] for name, c in contended.items()}
        for name in slow:
            others = min(v for n, v in slow.items() if n != name)
            rows.append(target_row(
                f"{name}: forward {label} slowdown under contention ({slow[name]:.2f}×) / "
                f"the others' smallest ({others:.2f}×)", slow[name] / others,
                TARGETS["contention_slowdown_vs_others"], better="lower"))
    return rows


def _memory_targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Keras-on-torch's peak RSS over native torch's (--memory)."""
    if "torch" not in figures or not figures["torch"].get("memory"):
        return []
    f = figures["torch"]
    rows = []
    for task, label in (("forward_batch", "forward"), ("train_step", "train step")):
        key = f"keras_vs_native_{task}_rss"
        rows.append(target_row(f"keras-on-torch {label} peak RSS / native torch", f[key],
                               TARGETS["keras_vs_native_torch_memory"], better="lower",
                               reason=f["null_reasons"].get(key)))
    return rows


def _peak_targets(figures: dict[str, Any], fastest: str, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """The fastest backend's share of the FP32 peak, and its mixed_bfloat16 speed-up where bf16 is
    native (emulated bf16 is several times slower: reported among the variants, not a target)."""
    rows = [target_row(f"fastest ({fastest}) forward share of FP32 peak",
                       figures[fastest]["forward_peak_share"], TARGETS["fastest_peak_share"])]
    bf16 = figures[fastest]["variants"].get(BF16_VARIANT)
    label = f"fastest ({fastest}) forward, mixed_bfloat16 / float32"
    if not peak.get("native_bf16"):
        return [*rows, {"target": label, "value": bf16 and bf16["vs_default"],
                        "goal": TARGETS["bf16_vs_fp32"], "better": "higher", "met": None,
                        "reason": f"skipped: {peak['bf16_method']}"}]
    ceiling = peak["bf16_gflops"] / peak["fp32_gflops"]
    return [*rows, target_row(
        label, bf16 and bf16["vs_default"], TARGETS["bf16_vs_fp32"],
        reason=f"the {BF16_VARIANT} variant was not measured (--variants)",
        why=(f"out of reach on this CPU: its bf16 peak ({peak['bf16_gflops']:.0f} GFLOP/s) is "
             f"{ceiling:.1f}× its FP32 peak" if ceiling < TARGETS["bf16_vs_fp32"] else None))]


def _end_to_end_targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """bf16's accuracy cost, then the feature cache's speed-up and accuracy cost, per backend."""
    rows = [target_row(f"{name}: |mixed_bfloat16 - float32| feature-cache val accuracy (pp)",
                       abs(f["e2e"]["bf16_accuracy_delta_pp"]), TARGETS["bf16_accuracy_pp"],
                       better="lower")
            for name, f in figures.items() if f["e2e"] and "bf16_accuracy_delta_pp" in f["e2e"]]
    for name, f in figures.items():
        if f["e2e"]:
            rows.append(target_row(f"{name}: feature-cache end-to-end speed-up", f["e2e"]["speedup"],
                                   TARGETS["cache_speedup"]))
            rows.append(target_row(f"{name}: |feature-cache - standard| val accuracy (pp)",
                                   abs(f["e2e"]["accuracy_delta_pp"]), TARGETS["cache_accuracy_pp"],
                                   better="lower"))
    return rows
