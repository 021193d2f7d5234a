"""flowers.graph_memory: eager torch frees each activation after its last use, computing the same values.

The memory itself is a `flowers bench --memory` figure (no timing or memory goal is asserted here):
the bench test runs that mode in a tiny configuration and checks its figures are consistent.
"""

import json

import pytest

from conftest import flowers, python, read_json

DRIVER = """
    import json, sys
    import numpy as np
    from flowers import backend, config
    backend.select("torch")
    import keras
    from keras.src.ops import function
    from flowers.model import build_model, compile_model, with_probabilities
    keras.utils.set_random_seed(0)
    exp = config.from_dict({"data": {"image_size": 32},
                            "model": {"weights": "none", "backbone": "BACKBONE", "dropout": 0.0}})
    model = build_model(exp.model, 32, 5)
    x = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    y = np.arange(6) % 5
    probs = np.asarray(with_probabilities(model).predict_on_batch(x))
    compile_model(model, 1e-3, 5)
    loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
    after = np.asarray(model.predict_on_batch(x))
    np.savez(sys.argv[1], probs=probs, after=after, loss=loss)
    print(json.dumps(bool(getattr(function.Function._run_through_graph, "_flowers_frees", False))))
"""


@pytest.mark.parametrize("backbone", ["ResNet50", "MobileNetV3Small"])
def test_freeing_intermediates_computes_the_same_values(tmp_path, backbone):
    """Predictions, a training step's loss and the trained predictions: bit for bit with and without."""
    arrays = {}
    for setting in ("1", "0"):
        out = tmp_path / f"{setting}.npz"
        code = DRIVER.replace("BACKBONE", backbone).replace("sys.argv[1]", repr(str(out)))
        result = python(code, env={"FLOWERS_FREE_INTERMEDIATES": setting})
        assert result.returncode == 0, result.stderr[-3000:]
        installed = json.loads(result.stdout.strip().splitlines()[-1])
        assert installed is (setting == "1")
        arrays[setting] = dict(__import__("numpy").load(out))
    import numpy as np

    for key in ("probs", "loss", "after"):
        assert np.array_equal(arrays["1"][key], arrays["0"][key]), key


def test_another_keras_version_keeps_keras_own_method_with_one_warning():
    result = python("""
        import keras
        from keras.src.ops import function
        original = function.Function._run_through_graph
        keras.version = lambda: "3.99.0"
        from flowers import graph_memory
        print(graph_memory.install(), function.Function._run_through_graph is original)
    """, env={"KERAS_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "keras 3.99.0" in warnings[0], result.stderr
    assert "FLOWERS_FREE_INTERMEDIATES=0" in warnings[0]


def test_bench_memory_reports_each_tasks_peak_and_the_ratio_to_native(tmp_path, learnable_set):
    result = flowers("bench", "--backends", "torch", "--image-size", "32", "--batch-size", "4",
                     "--steps", "1", "--rounds", "1", "--warmup", "1", "--e2e-epochs", "0",
                     "--variants", "none", "--memory", "--images", str(learnable_set),
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (device_dir,) = (tmp_path / "bench").iterdir()
    f = read_json(device_dir / "bench.json")["backends"]["torch"]
    memory = f["memory"]
    assert set(memory) == {"forward_batch", "train_step", "native_forward", "native_train"}
    for task, entry in memory.items():
        assert 100 < entry["after_build_rss_mb"] <= entry["peak_rss_mb"], (task, entry)
        assert entry["peak_device_mem_mb"] is None and entry["device_null_reason"]
    for task, native_task in (("forward_batch", "native_forward"), ("train_step", "native_train")):
        assert f[f"keras_vs_native_{task}_rss"] == pytest.approx(
            memory[task]["peak_rss_mb"] / memory[native_task]["peak_rss_mb"])
    targets = {t["target"]: t for t in read_json(device_dir / "bench.json")["targets"]}
    row = targets["keras-on-torch forward peak RSS / native torch"]
    assert row["goal"] == 1.3 and row["better"] == "lower" and row["met"] in (True, False)
    assert "peak RSS MiB, native forward (after build)" in (device_dir / "bench.md").read_text()
