"""flowers bench's and parity's pure logic, in-process (no framework, no worker, no training): the
figures derived from timed samples, the targets, the bench.md tables, parity's photo layout and
comparison, the cluster read from the environment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowers.bench import render, run, targets
from flowers.bench.variants import BF16_VARIANT
from flowers.distribute import cluster
from flowers.errors import FlowersError
from flowers.parity import check

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example-report"


def _example() -> dict:
    return json.loads((EXAMPLE / "bench.json").read_text())


# ------------------------------------------------------------------------------------ targets


def test_target_row_meets_a_goal_from_the_better_side_and_says_why_only_for_a_miss():
    assert targets.target_row("t", 1.0, 1.0)["met"] is True  # the goal itself is met
    assert targets.target_row("t", 0.9, 1.0)["met"] is False
    assert targets.target_row("t", 1.1, 1.0, better="lower")["met"] is False
    assert targets.target_row("t", 0.9, 1.0, better="lower", why="w")["met"] is True
    assert "why" not in targets.target_row("t", 0.9, 1.0, better="lower", why="w")
    assert targets.target_row("t", 0.9, 1.0, why="w")["why"] == "w"
    missing = targets.target_row("t", None, 1.0, reason="not measured", why="w")
    assert missing["met"] is None and missing["reason"] == "not measured" and "why" not in missing
    assert "reason" not in targets.target_row("t", 2.0, 1.0, reason="not measured")


def test_forward_targets_compare_each_backend_with_the_fastest_with_a_smaller_goal_for_small_images():
    figures = {name: {"forward_batch_img_s": {"median": rate},
                      "forward_by_size_img_s": {"64": {"median": rate}, "224": {"median": 2 * rate}}}
               for name, rate in (("torch", 50.0), ("jax", 100.0))}
    figures["torch"]["forward_by_size_img_s"]["224"] = {"median": 400.0}  # torch fastest at 224
    small, large = targets._forward_targets(figures, 64)
    assert small["target"] == "torch forward / fastest (jax) at 64 px"
    assert (small["value"], small["goal"], small["met"]) == (
        0.5, targets.TARGETS["forward_vs_fastest_small"], False)
    assert large["target"] == "jax forward / fastest (torch) at 224 px"
    assert (large["value"], large["goal"]) == (0.5, targets.TARGETS["forward_vs_fastest"])


def test_contention_targets_compare_a_slowdown_with_the_smallest_of_the_others():
    def contended(b1: float, batch: float) -> dict:
        return {"contended": {"forward_b1_slowdown": b1, "forward_batch_slowdown": batch}}

    assert targets._contention_targets({"torch": contended(3.0, 3.0)}) == []  # nothing to compare with
    rows = targets._contention_targets({"torch": contended(6.0, 1.0), "jax": contended(2.0, 1.5),
                                        "tensorflow": {"contended": None}})
    assert [(r["value"], r["met"]) for r in rows] == [(3.0, False), (1 / 3, True), (1 / 1.5, True),
                                                       (1.5, True)]
    assert rows[0]["target"].startswith("torch: forward batch 1 slowdown under contention (6.00×)")


def test_a_cpu_without_native_bf16_reports_the_bf16_target_as_skipped_not_missed():
    results = _example()
    fastest = max(results["backends"], key=lambda n: results["backends"][n]["forward_batch_img_s"]["median"])
    results["backends"][fastest]["variants"][BF16_VARIANT] = {"median": 1.0, "vs_default": 0.4}
    results["peak"].update(native_bf16=False, bf16_method="emulated")
    (row,) = [r for r in targets.evaluate_targets(results) if "mixed_bfloat16 / float32" in r["target"]]
    assert (row["value"], row["met"], row["reason"]) == (0.4, None, "skipped: emulated")


def test_the_example_reports_targets_are_those_its_bench_json_records():
    results = _example()
    assert targets.evaluate_targets(results) == results["targets"]


# ------------------------------------------------------------------------------------ figures


def _samples(*tasks: str, seconds: float = 0.5) -> dict[str, dict]:
    return {task: {"samples_s": [seconds, 2 * seconds], "images_per_call": 4} for task in tasks}


def test_summary_is_images_per_second_of_each_call():
    assert run.summary([0.5, 1.0, 2.0], 4) == {"median": 4.0, "min": 2.0, "max": 8.0, "calls": 3}


def test_unmeasured_figures_are_null_with_their_reason():
    settings = run.BenchSettings(backends=("jax",), image_size=64, variants=(), e2e_epochs=0)
    ready = {"versions": {}, "device": "cpu", "data_format": "channels_last", "jit_compile": True,
             "gflops_per_image": 2.0}
    peak = {"method": "no FP32 peak known", "fp32_gflops": None, "bf16_method": "emulated"}
    figures = run._backend_figures("jax", settings, ready, _samples(*run.KERAS_TASKS), None, peak)
    assert figures["forward_gflops"] == 2.0 * 6.0  # 4 images in 0.5 and 1.0 s: median 6 img/s
    assert figures["tfdata_vs_memory"] == 1.0
    reasons = figures["null_reasons"]
    for key in ("forward_peak_share", "native_forward_img_s", "bf16_peak_share", "e2e", "contended",
                "memory"):
        assert figures[key] is None and reasons[key], key
    assert reasons["native_forward_img_s"].startswith("no native baseline for this backend")
    assert reasons["contended"] == "not measured (--contention off)"
    assert BF16_VARIANT in reasons["bf16_peak_share"]
    assert list(figures)[-1] == "null_reasons"
    assert figures["forward_by_size_img_s"] == {"64": figures["forward_batch_img_s"]}


def test_derived_figures_are_ratios_of_the_medians():
    settings = run.BenchSettings(backends=("torch",), image_size=64, image_sizes=(32,),
                                 variants=("train.dtype_policy",), contention=True, e2e_epochs=1,
                                 memory=True)
    samples = {**_samples(*run.KERAS_TASKS, *run.NATIVE_TASKS),
               **_samples("forward_size:32", f"variant:{BF16_VARIANT}", seconds=0.25),
               **_samples("contended:forward_b1", "contended:forward_batch", seconds=1.0)}
    ready = {"versions": {}, "device": "cpu", "data_format": "channels_first", "jit_compile": False,
             "gflops_per_image": 1.0}
    run_figures = {"wall_s": 10.0, "val_accuracy": 0.5, "peak_host_rss_mb": 900.0,
                   "peak_device_mem_mb": None, "null_reasons": {"peak_device_mem_mb": "a CPU"}}
    e2e = {"standard": run_figures, "cache": {**run_figures, "wall_s": 2.0, "val_accuracy": 0.51}}
    memory = {task: {"peak_rss_mb": rss} for task, rss in (("forward_batch", 600.0), ("train_step", 800.0),
                                                             ("native_forward", 400.0))}
    peak = {"method": "m", "fp32_gflops": 24.0, "bf16_gflops": 48.0}
    figures = run._backend_figures("torch", settings, ready, samples, e2e, peak, memory)
    assert figures["forward_peak_share"] == 0.25
    assert figures["keras_vs_native_forward"] == 1.0
    assert figures["variants"][BF16_VARIANT]["vs_default"] == 2.0
    assert figures["bf16_peak_share"] == 12.0 / 48.0
    assert figures["forward_by_size_img_s"]["32"]["median"] == 12.0
    assert figures["contended"]["forward_b1_slowdown"] == 2.0
    assert figures["e2e"]["speedup"] == 5.0 and figures["e2e"]["accuracy_delta_pp"] == pytest.approx(1.0)
    assert figures["keras_vs_native_forward_batch_rss"] == 1.5
    assert figures["keras_vs_native_train_step_rss"] is None  # no native_train memory run
    assert set(figures["null_reasons"]) == {"peak_device_mem_mb", "keras_vs_native_train_step_rss"}


# ------------------------------------------------------------------------------------ bench.md


def test_the_example_bench_md_is_what_its_bench_json_renders():
    assert render.markdown(_example()) == (EXAMPLE / "bench.md").read_text()


def test_variant_rows_show_each_backends_ratio_or_why_it_was_skipped():
    f = {"torch": {"variants": {"a=1": {"median": 2.0, "min": 1.0, "max": 3.0, "vs_default": 1.25}}},
         "jax": {"variants": {}, "variants_skipped": {"a=1": "not for jax"}},
         "tensorflow": {"variants": {}}}
    assert render._variant_rows(f, ["torch", "jax", "tensorflow"]) == [
        ("forward img/s with a=1 (× default)", ["2.0 (1.0-3.0) (1.25×)", "skipped: not for jax", "—"])]


def test_the_bf16_end_to_end_row_appears_only_when_every_backend_has_that_run():
    one = {"wall_s": 1.0, "val_accuracy": 0.5}
    f = {name: {"e2e": {"standard": one, "cache": one, "speedup": 1.0, **extra},
                "peak_host_rss_mb": 1.0, "peak_device_mem_mb": None}
         for name, extra in (("torch", {"cache-bf16": one}), ("jax", {}))}
    labels = [label for label, _ in render._end_to_end_rows(f, {"e2e_epochs": 2}, ["torch", "jax"])]
    assert not any("mixed_bfloat16" in label for label in labels)
    f["jax"]["e2e"]["cache-bf16"] = one
    labels = [label for label, _ in render._end_to_end_rows(f, {"e2e_epochs": 2}, ["torch", "jax"])]
    assert "end-to-end s, train.cache_features in mixed_bfloat16 (val acc)" in labels


def test_targets_table_says_na_with_the_reason_and_why_a_target_is_missed():
    table = render.targets_table([
        targets.target_row("a", 2.0, 1.0), targets.target_row("b", None, 1.0, reason="off"),
        targets.target_row("c", 2.0, 1.0, better="lower", why="too slow")])
    assert "| a | ≥ 1.0 | 2.00 | yes |" in table
    assert "| b | ≥ 1.0 | n/a: off | n/a |" in table
    assert "| c | ≤ 1.0 | 2.00 | NO: too slow |" in table


# ------------------------------------------------------------------------------------ parity


def test_step_batches_take_the_i_th_photo_of_every_class():
    files = check._per_class(["a0", "b0", "a1", "b1", "a2", "b2"], [0, 1, 0, 1, 0, 1], 2, 2)
    assert files == ["a0", "a1", "b0", "b1"]
    assert check.step_batches(files, 2, steps=2) == [["a0", "b0"], ["a1", "b1"]]


def test_compare_measures_differences_against_the_reference():
    ref = {"probs": np.array([[0.9, 0.1], [0.4, 0.6]]), "losses": np.array([1.0, 0.5]),
           "init_000": np.zeros(2), "trained_000": np.array([3.0, 4.0])}
    other = {**ref, "probs": np.array([[0.8, 0.2], [0.6, 0.4]]), "losses": np.array([1.0, 0.75]),
             "trained_000": np.array([3.0, 4.5])}
    row = check._compare("jax", other, ref)
    assert row["max_abs_prob_diff"] == pytest.approx(0.2)
    assert row["top1_agreement"] == 0.5
    assert row["max_abs_loss_diff"] == 0.25
    assert row["max_abs_weight_diff"] == 0.5
    assert row["weight_drift_vs_update"] == pytest.approx(0.5 / 5.0)  # ||diff|| / ||trained - init||
    assert check._compare("jax", {**ref, "trained_000": np.zeros(2)},
                          {**ref, "trained_000": np.zeros(2)})["weight_drift_vs_update"] is None


def test_a_difference_at_the_target_passes_and_just_above_fails():
    at = {"backend": "jax", "max_abs_prob_diff": check.TARGET_MAX_ABS_PROB_DIFF, "top1_agreement": 1.0,
          "max_abs_loss_diff": check.TARGET_MAX_ABS_LOSS_DIFF}
    assert check.missed_targets([at]) == []
    above = {**at, "max_abs_loss_diff": 1.5 * check.TARGET_MAX_ABS_LOSS_DIFF, "top1_agreement": 0.95}
    assert check.missed_targets([above]) == ["jax: top-1 agreement 95.0% < 100%",
                                             "jax: max |Δloss| 1.5e-04 > 1.0e-04"]
    for key in ("max_abs_prob_diff", "max_abs_loss_diff"):  # NaN never passes
        assert len(check.missed_targets([{**at, key: float("nan")}])) == 1, key


# ------------------------------------------------------------------------------------ distribute


def test_a_cluster_variable_that_is_not_a_whole_number_is_named():
    assert cluster.whole_number({"RANK": "3"}, "RANK", "0") == 3
    assert cluster.whole_number({}, "RANK", "0") == 0
    with pytest.raises(FlowersError, match="RANK='x': must be a whole number"):
        cluster.whole_number({"RANK": "x"}, "RANK", "0")


def test_check_request_refuses_what_no_engine_can_do():
    two = cluster.Cluster(2, 0, "h:1", source="torchrun")
    with pytest.raises(FlowersError, match="train.distribution is 'none'"):
        cluster.check_request("none", "torch", 8, two)
    with pytest.raises(FlowersError, match="tensorflow data-parallel runs on one host only"):
        cluster.check_request("data_parallel", "tensorflow", 8, two)
    with pytest.raises(FlowersError, match="does not divide by the 2 processes"):
        cluster.check_request("data_parallel", "torch", 7, two)
    assert cluster.check_request("data_parallel", "jax", 8, two) is two
