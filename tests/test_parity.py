"""flowers parity: one saved init, the same real photos, every backend in its own process."""

import json
import math

import pytest

from conftest import BACKENDS, flowers, one_line_error, python, read_json
from flowers.parity import TARGET_MAX_ABS_PROB_DIFF, missed_targets


def test_parity_meets_its_targets_on_real_photos(parity_run):
    result, out = parity_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    parity = read_json(out / "parity.json")
    assert result.stdout.strip().splitlines()[-1] == str(out / "parity.json")
    assert "| vs torch | max abs Δprob | top-1 agreement" in result.stdout

    assert parity["backends"] == list(BACKENDS) and parity["reference"] == "torch"
    assert parity["image_size"] == 64 and parity["images_from"].endswith("flowers12")
    assert parity["num_forward_images"] == 24  # two test photos of each of the 12 species
    assert parity["dropout"] == 0 and parity["freeze_backbone"] is True
    assert parity["passed"] is True and parity["failures"] == []
    assert {run["device"] for run in parity["runs"].values()} == {"cpu"}
    assert [r["backend"] for r in parity["results"]] == ["tensorflow", "jax"]
    for row in parity["results"]:
        assert row["max_abs_prob_diff"] <= TARGET_MAX_ABS_PROB_DIFF
        assert row["top1_agreement"] == 1.0
        assert len(row["losses"]) == parity["train_steps"]
        for key in ("max_abs_loss_diff", "max_abs_weight_diff", "weight_drift_vs_update"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row[key])
    # the training really moved the weights, so the drift figures mean something
    losses = parity["reference_losses"]
    assert len(losses) == parity["train_steps"] and losses[-1] < losses[0]


def test_a_missed_target_is_one_line_and_a_nonzero_exit(parity_run, tmp_path):
    """The CLI path when a target is missed, fed a recorded result with a too-large Δprob."""
    _, out = parity_run
    recorded = read_json(out / "parity.json")
    recorded["results"][1]["max_abs_prob_diff"] = 3e-4
    recorded["failures"] = missed_targets(recorded["results"])
    recorded["passed"] = False
    driver = f"""
        import json
        import flowers.parity
        flowers.parity.run_parity = lambda backends, image_size: json.loads({json.dumps(recorded)!r})
        from flowers.cli import main
        main(["parity", "--out", "{tmp_path}"])
    """
    result = python(driver)
    error = one_line_error(result)
    assert error == "error: parity target missed: jax: max |Δprob| 3.0e-04 > 1.0e-04"
    assert "| jax | 3.0e-04 |" in result.stdout and "| no |" in result.stdout
    assert read_json(tmp_path / "parity.json")["passed"] is False


def test_missed_targets_names_each_backend_and_target():
    results = [{"backend": "tensorflow", "max_abs_prob_diff": 1e-6, "top1_agreement": 1.0},
               {"backend": "jax", "max_abs_prob_diff": 2e-3, "top1_agreement": 23 / 24}]
    assert missed_targets(results) == ["jax: max |Δprob| 2.0e-03 > 1.0e-04",
                                       "jax: top-1 agreement 95.8% < 100%"]
    assert missed_targets(results[:1]) == []


@pytest.mark.parametrize("args, message", [
    (["--backends", "torch,mxnet"], "unknown backend 'mxnet'; choose one of torch"),
    (["--backends", "torch"], "parity needs at least two backends"),
    (["--backends", "jax,jax"], "a backend is listed twice"),
    (["--image-size", "16"], "--image-size 16: must be >= 32"),
    (["--image-size", "big"], "'big' is not a valid integer"),
])
def test_parity_rejects(tmp_path, args, message):
    error = one_line_error(flowers("parity", *args, "--out", str(tmp_path)))
    assert message in error
    assert not (tmp_path / "parity.json").exists()
