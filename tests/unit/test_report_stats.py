"""flowers/report_stats.py: the report's statistics as pure functions, in process, in milliseconds."""

import math

import pytest

from flowers.report_stats import (
    FAMILY_ALPHA,
    NO_PREDICTIONS,
    Predictions,
    holm_adjust,
    mcnemar_exact,
    paired_test,
    paired_tests,
    parse_predictions,
    seed_spread,
    summarize,
    verdict,
)

# (b, c) -> two-sided exact McNemar p, by hand: 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)
HAND_COMPUTED = {
    (0, 0): 1.0,
    (1, 0): 1.0,  # 2 * 1/2, capped
    (5, 0): 2 / 32,
    (0, 6): 2 / 64,
    (3, 7): 2 * (1 + 10 + 45 + 120) / 1024,
    (10, 10): 1.0,
    (26, 0): 2 / 2**26,
}


@pytest.mark.parametrize(("b", "c"), sorted(HAND_COMPUTED))
def test_mcnemar_matches_hand_computed_values(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(HAND_COMPUTED[b, c], rel=1e-12)


def test_mcnemar_matches_scipy_binomtest_where_scipy_is_installed():
    scipy_stats = pytest.importorskip("scipy.stats")  # not a dependency: checked where present
    for b, c in [*HAND_COMPUTED, (1, 1), (2, 9), (40, 25), (120, 80), (7, 0), (600, 540)]:
        if b + c == 0:
            continue
        expected = scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300), (b, c)


def test_mcnemar_is_symmetric_exact_for_large_counts_and_refuses_negative_counts():
    assert mcnemar_exact(3, 9) == mcnemar_exact(9, 3)
    # sums of C(3000, k) are beyond a float's range: exact fractions, no OverflowError
    assert mcnemar_exact(3000, 0) == 0.0 and 0 < mcnemar_exact(1400, 1600) < 0.001
    assert mcnemar_exact(1500, 1500) == 1.0
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 2)


def test_holm_adjusts_step_down_in_the_input_order():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> 0.06 (monotone)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([0.02]) == [0.02] and holm_adjust([]) == []


def test_summarize_uses_n_minus_1_and_says_nothing_about_sd_with_one_value():
    summary = summarize([0.5, 0.6, 0.7])
    assert summary["mean"] == pytest.approx(0.6) and summary["sd"] == pytest.approx(0.1)
    assert (summary["min"], summary["max"], summary["n"]) == (0.5, 0.7, 3)
    assert summarize([0.25]) == {"n": 1, "mean": 0.25, "sd": None, "min": 0.25, "max": 0.25}
    assert summarize([])["mean"] is None


def _csv(rows, header="index,item,label,predicted,p_true"):
    return [header + "\n", *(",".join(str(v) for v in row) + "\n" for row in rows)]


def test_parse_predictions_reads_the_columns_and_says_where_a_file_is_wrong():
    parsed = parse_predictions(_csv([(0, "a/1.jpg", 2, 2, 0.9), (1, "b/2.jpg", 0, 1, 0.25)]))
    assert parsed == Predictions(("a/1.jpg", "b/2.jpg"), (2, 0), (2, 1), (0.9, 0.25))
    assert parsed.correct == [True, False]
    # a float32 softmax a rounding step above 1 is still a probability
    assert parse_predictions(_csv([(0, "", 1, 1, 1.0000001)])).p_true == (1.0000001,)
    bad = {
        "header": (_csv([(0, "", 1, 1, 0.5)], header="index,label,predicted"), "header"),
        "order": (_csv([(1, "", 1, 1, 0.5)]), "index '1' is not 0"),
        "label": (_csv([(0, "", "x", 1, 0.5)]), "label 'x' is not an integer"),
        "negative": (_csv([(0, "", 1, -2, 0.5)]), "predicted -2 is negative"),
        "probability": (_csv([(0, "", 1, 1, 1.5)]), "p_true 1.5 is not a probability"),
        "nan": (_csv([(0, "", 1, 1, "nan")]), "is not a probability"),
        "fields": (["index,item,label,predicted,p_true\n", "0,,1\n"], "row 1 has 3 fields"),
        "empty": ([], "header None"),
        "no rows": (_csv([]), "no rows"),
        "binary": (["index,item,label,predicted,p_true\n", "0,,\0\x89,1,0.5\n"], "not an integer"),
        "cut short": (["index,item,label,predicted,p_true\n", '0,"flowers/ro'], "unexpected end"),
    }
    for lines, message in bad.values():
        with pytest.raises(ValueError, match=message):
            parse_predictions(lines)


def _predictions(labels, predicted, items=None):
    items = items or [f"img{i}.jpg" for i in range(len(labels))]
    return Predictions(tuple(items), tuple(labels), tuple(predicted), tuple(0.5 for _ in labels))


def _pair(n, both_right, only_a, only_b, same_wrong=True):
    """Two runs on n images (label 0): both right, only A right (b), only B right (c), both wrong.

    Both wrong with the same class when same_wrong, else with different classes (agreement drops).
    """
    wrong = n - both_right - only_a - only_b
    a = [0] * both_right + [0] * only_a + [1] * only_b + [1] * wrong
    b = [0] * both_right + [1] * only_a + [0] * only_b + [1 if same_wrong else 2] * wrong
    return _predictions([0] * n, a), _predictions([0] * n, b)


def test_paired_test_counts_discordant_images_agreement_and_difference():
    a, b = _pair(20, both_right=10, only_a=5, only_b=1, same_wrong=False)
    result = paired_test(a, b)
    assert (result["n"], result["b"], result["c"]) == (20, 5, 1)
    assert result["accuracy_a"] == 0.75 and result["accuracy_b"] == 0.55
    assert result["accuracy_difference"] == pytest.approx(0.2)
    assert result["agreement"] == pytest.approx(10 / 20)  # 10 both right; the discordant and wrong differ
    assert result["p_value"] == pytest.approx(2 * (1 + 6) / 64)


def test_paired_test_refuses_runs_not_scored_on_the_same_images():
    a = _predictions([0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="different numbers of images"):
        paired_test(a, _predictions([0, 1], [0, 1]))
    with pytest.raises(ValueError, match="different label at index 1"):
        paired_test(a, _predictions([0, 2, 2], [0, 1, 2]))
    with pytest.raises(ValueError, match="different item at index 0"):
        paired_test(a, _predictions([0, 1, 2], [0, 1, 2], items=["x", "img1.jpg", "img2.jpg"]))


def test_paired_tests_cover_every_pair_at_shared_seeds_and_holm_correct_them_as_one_family():
    same = _pair(64, both_right=40, only_a=2, only_b=2)
    far = _pair(64, both_right=30, only_a=25, only_b=0)
    predictions = {
        "torch": {0: same[0], 1: same[0], 2: far[0]},
        "jax": {0: same[1], 1: NO_PREDICTIONS, 2: far[1]},
        "tensorflow": {5: same[0]},  # shares no seed: no test
    }
    result = paired_tests(["torch", "jax", "tensorflow"], predictions)
    assert result["alpha"] == FAMILY_ALPHA and "Holm–Bonferroni over all 2" in result["correction"]
    assert [(t["backends"], t["seed"], t["available"]) for t in result["tests"]] == [
        (["torch", "jax"], 0, True), (["torch", "jax"], 1, False), (["torch", "jax"], 2, True)]
    unavailable = result["tests"][1]
    assert unavailable["reason"] == f"jax: {NO_PREDICTIONS}" and "p_holm" not in unavailable
    first, last = result["tests"][0], result["tests"][2]
    assert first["p_value"] == 1.0 and first["p_holm"] == 1.0 and not first["rejected"]
    assert last["p_holm"] == pytest.approx(2 * last["p_value"]) and last["rejected"]

    mismatched = paired_tests(["torch", "jax"], {"torch": {0: same[0]},
                                                 "jax": {0: _predictions([1] * 64, [1] * 64)}})
    (test,) = mismatched["tests"]
    assert not test["available"] and test["reason"].startswith("predictions.csv files do not match: "
                                                               "different label at index 0")


def _verdict(accuracies, pairs):
    """verdict() from backend -> [accuracy per seed] and backend pair -> [(a, b) Predictions per seed]."""
    per_seed = {name: dict(enumerate(values)) for name, values in accuracies.items()}
    predictions = {name: {} for name in accuracies}
    for (first, second), seeds in pairs.items():
        for seed, (a, b) in enumerate(seeds):
            predictions[first][seed], predictions[second][seed] = a, b
    return verdict(per_seed, paired_tests(list(accuracies), predictions))


def test_verdict_differ_needs_a_rejection_and_a_gap_beyond_the_seed_spread():
    far = _pair(64, both_right=30, only_a=25, only_b=0)
    result = _verdict({"torch": [0.86, 0.85, 0.87], "jax": [0.47, 0.46, 0.48]},
                      {("torch", "jax"): [far] * 3})
    assert result["status"] == "differ" and result["backends_differ"] is True
    assert result["differing_pairs"] == [["torch", "jax"]]
    assert result["seed_spread"]["largest"] == pytest.approx(0.02)
    assert result["seed_spread"]["by_backend"]["torch"]["sd"] == pytest.approx(0.01)
    assert result["sentence"].startswith("**Verdict: backends differ on this job** (torch vs jax:")
    assert "seed-to-seed spread" in result["sentence"] and "α = 0.05" in result["sentence"]
    assert result["limits"] == []


def test_verdict_is_indistinguishable_when_the_test_rejects_but_the_gap_is_within_the_spread():
    far = _pair(64, both_right=30, only_a=25, only_b=0)
    result = _verdict({"torch": [0.70, 0.80, 0.60], "jax": [0.65, 0.72, 0.66]},
                      {("torch", "jax"): [far] * 3})
    assert result["status"] == "indistinguishable" and result["rejected_pairs"] == [["torch", "jax"]]
    assert result["differing_pairs"] == []
    assert "differ by no more than the seed-to-seed spread" in result["reason"]
    assert result["seed_spread"]["largest"] == pytest.approx(0.2)
    assert result["seed_spread"]["backend"] == "torch"


def test_verdict_is_indistinguishable_with_figures_when_no_test_rejects():
    same = _pair(64, both_right=40, only_a=2, only_b=3)
    result = _verdict({"torch": [0.66, 0.67, 0.65], "tensorflow": [0.67, 0.66, 0.68],
                       "jax": [0.66, 0.66, 0.67]},
                      {("torch", "tensorflow"): [same] * 3, ("jax", "tensorflow"): [same] * 3})
    assert result["status"] == "indistinguishable" and result["reason"] == (
        "no pair's corrected paired test rejects")
    sentence = result["sentence"]
    assert sentence.startswith("**Verdict: indistinguishable on this job**")
    for figure in ("mean val accuracy torch 0.6600", "largest difference", "seed-to-seed spread",
                   "smallest Holm-corrected McNemar p 1", "top-1 agreement"):
        assert figure in sentence, figure
    # torch and jax hold the same predictions (agreement 1); each against tensorflow: 59 of 64
    assert result["agreement_range"] == [59 / 64, 1.0] and result["tests_available"] == 9


def test_one_seed_can_never_say_differ_and_asks_for_more_seeds():
    far = _pair(64, both_right=30, only_a=25, only_b=0)
    result = _verdict({"torch": [0.86], "jax": [0.47]}, {("torch", "jax"): [far]})
    assert result["status"] == "indistinguishable" and result["rejected_pairs"] == [["torch", "jax"]]
    assert result["seed_spread"]["largest"] is None
    assert "with one seed the seed-to-seed spread is unmeasured" in result["reason"]
    assert any("--seeds 3" in line for line in result["limits"])
    assert "unmeasured" in result["sentence"] and "--seeds 3" in result["sentence"]


def test_verdict_without_predictions_says_why_no_paired_test_ran():
    per_seed = {"torch": {0: 0.5, 1: 0.6}, "jax": {0: 0.55, 1: 0.5}}
    tests = paired_tests(["torch", "jax"], {"torch": {0: NO_PREDICTIONS, 1: NO_PREDICTIONS},
                                            "jax": {0: NO_PREDICTIONS, 1: NO_PREDICTIONS}})
    result = verdict(per_seed, tests)
    assert result["status"] == "indistinguishable" and result["tests_available"] == 0
    assert result["smallest_p_holm"] is None and result["agreement_range"] is None
    assert any("paired tests not available for 2 of 2" in line and NO_PREDICTIONS in line
               for line in result["limits"])


def test_seed_spread_is_measured_per_backend():
    spread = seed_spread({"torch": {0: 0.5, 1: 0.75}, "jax": {0: 0.6}})
    assert spread["by_backend"]["torch"]["range"] == 0.25
    assert spread["by_backend"]["torch"]["sd"] == pytest.approx(math.sqrt(2) * 0.125)
    assert spread["by_backend"]["jax"]["range"] is None
    assert (spread["largest"], spread["backend"]) == (0.25, "torch")
