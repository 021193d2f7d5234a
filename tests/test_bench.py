"""flowers bench (tiny configuration), the native twins and the feature-cache mode.

No timing assertions: figures must exist, be positive and be derived from each other correctly.
"""

import json

import pytest

from conftest import BACKENDS, flowers, one_line_error, python, read_json, run_dir_of


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, learnable_set):
    out = tmp_path_factory.mktemp("reports")
    result = flowers("bench", "--image-size", "32", "--batch-size", "4", "--steps", "2",
                     "--rounds", "2", "--warmup", "1", "--e2e-epochs", "2",
                     "--e2e-images-per-class", "2", "--images", str(learnable_set), "--out", str(out),
                     "--image-sizes", "48", "--contention",
                     # torch.compile needs minutes of C++ compilation on 2 cores: not in the suite
                     "--variants", "model.data_format,train.portable_random")
    assert result.returncode == 0, result.stderr[-3000:]
    bench_md = result.stdout.strip().splitlines()[-1]
    folder = out / "bench"
    (device_dir,) = folder.iterdir()
    assert bench_md == str(device_dir / "bench.md")
    return read_json(device_dir / "bench.json"), (device_dir / "bench.md").read_text()


def test_bench_json_is_well_formed(tiny_bench):
    results, _ = tiny_bench
    assert results["device"] == "cpu"
    assert all(f["device"] == "cpu" for f in results["backends"].values())
    assert results["peak"]["fp32_gflops"] > 0 and "FP32 FLOP/cycle" in results["peak"]["method"]
    assert results["peak"]["gemm_gflops_measured"] > 0
    assert set(results["backends"]) == set(BACKENDS)
    for name, f in results["backends"].items():
        for key in ("forward_b1_img_s", "forward_batch_img_s", "train_step_img_s",
                    "train_memory_img_s", "train_tfdata_img_s"):
            stats = f[key]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"], (name, key)
            assert stats["calls"] == 2
        # 0.16 GFLOP per 32 px image: ResNet50's 4.1 GMAC at 224 px scaled by (32/224)^2, plus head
        assert 0.15 < f["gflops_per_image"] < 0.18
        assert f["forward_gflops"] == pytest.approx(
            f["gflops_per_image"] * f["forward_batch_img_s"]["median"])
        assert f["forward_peak_share"] == pytest.approx(
            f["forward_gflops"] / results["peak"]["fp32_gflops"])
        assert f["tfdata_vs_memory"] == pytest.approx(
            f["train_tfdata_img_s"]["median"] / f["train_memory_img_s"]["median"])
        # the layout is varied on torch and jax; TensorFlow's CPU convolutions are channels_last only
        layouts = [v for v in f["variants"] if v.startswith("model.data_format")]
        assert bool(layouts) == (name != "tensorflow"), (name, f["variants"])
        for key, variant in f["variants"].items():
            # the backend's own random draws are timed as a train step, the layout as a forward
            baseline = "train_step" if key == "train.portable_random=false" else "forward_batch"
            assert variant["vs_default"] == pytest.approx(
                variant["median"] / f[f"{baseline}_img_s"]["median"]), (name, key)
        assert "train.portable_random=false" in f["variants"]
        e2e = f["e2e"]
        assert e2e["standard"]["wall_s"] > 0 and e2e["cache"]["wall_s"] > 0
        assert e2e["speedup"] == pytest.approx(e2e["standard"]["wall_s"] / e2e["cache"]["wall_s"])
        assert e2e["cache"]["feature_extraction_s"] > 0
        assert f["peak_host_rss_mb"] > 100
        assert f["peak_device_mem_mb"] is None and f["null_reasons"]["peak_device_mem_mb"]
    for name in ("torch", "tensorflow"):
        f = results["backends"][name]
        assert f["keras_vs_native_forward"] == pytest.approx(
            f["forward_batch_img_s"]["median"] / f["native_forward_img_s"]["median"])
        assert f["keras_vs_native_train"] == pytest.approx(
            f["train_step_img_s"]["median"] / f["native_train_img_s"]["median"])
        assert f["native_differences"]["features_max_rel"] <= 1e-4
    assert results["backends"]["jax"]["keras_vs_native_forward"] is None
    assert "no native baseline" in results["backends"]["jax"]["null_reasons"]["keras_vs_native_forward"]
    targets = {t["target"]: t for t in results["targets"]}
    assert "keras-on-torch forward / native torch" in targets
    bf16 = next(t for name, t in targets.items() if "mixed_bfloat16 / float32" in name)
    assert bf16["met"] is None and "reason" in bf16  # the bf16 variant is not in the tiny run
    assert all(t["met"] in (True, False) for t in targets.values() if t is not bf16)


def test_bench_sweeps_image_sizes_with_their_own_targets(tiny_bench):
    results, text = tiny_bench
    for name, f in results["backends"].items():
        sizes = f["forward_by_size_img_s"]
        assert list(sizes) == ["32", "48"], name
        assert sizes["32"] == f["forward_batch_img_s"]  # the main size is the batch forward itself
        assert 0 < sizes["48"]["min"] <= sizes["48"]["median"] <= sizes["48"]["max"]
    for size in (32, 48):
        rates = {n: f["forward_by_size_img_s"][str(size)]["median"]
                 for n, f in results["backends"].items()}
        fastest = max(rates, key=rates.get)
        rows = [t for t in results["targets"] if t["target"].endswith(f"/ fastest ({fastest}) at {size} px")]
        assert len(rows) == 2 and all(t["goal"] == 0.6 for t in rows), rows  # small images
        for row in rows:
            name = row["target"].split(" ")[0]
            assert row["value"] == pytest.approx(rates[name] / rates[fastest])
    assert "forward img/s at 48 px, batch 4" in text


def test_bench_contention_reports_each_backends_slowdown(tiny_bench):
    results, text = tiny_bench
    assert results["contention"]["load_processes"] >= 1
    for f in results["backends"].values():
        for task in ("forward_b1", "forward_batch"):
            loaded = f["contended"][f"{task}_img_s"]
            assert loaded["median"] > 0 and loaded["calls"] == 2
            assert f["contended"][f"{task}_slowdown"] == pytest.approx(
                f[f"{task}_img_s"]["median"] / loaded["median"])
    rows = [t for t in results["targets"] if "slowdown under contention" in t["target"]]
    assert len(rows) == 6 and all(t["better"] == "lower" and t["goal"] == 2.0 for t in rows)
    assert "under contention (slowdown)" in text
    # the load is gone: no spinning process of the bench is left
    import psutil
    spinning = [p for p in psutil.process_iter(["cmdline"])
                if "while time.monotonic() < end" in " ".join(p.info["cmdline"] or [])]
    assert spinning == []


def test_bench_reports_the_bf16_peak_or_why_there_is_none(tiny_bench):
    results, text = tiny_bench
    peak = results["peak"]
    assert isinstance(peak["native_bf16"], bool)
    if peak["native_bf16"]:
        assert peak["bf16_gflops"] > peak["fp32_gflops"] and "bf16 FLOP/cycle" in peak["bf16_method"]
        for f in results["backends"].values():  # the feature-cache run again in bf16
            assert f["e2e"]["cache-bf16"]["wall_s"] > 0
            assert f["e2e"]["bf16_accuracy_delta_pp"] == pytest.approx(
                100 * (f["e2e"]["cache-bf16"]["val_accuracy"] - f["e2e"]["cache"]["val_accuracy"]))
    else:
        assert peak["bf16_gflops"] is None and "no native bf16" in peak["bf16_method"]
    assert "bf16 peak: " in text


def test_a_bf16_miss_says_when_the_cpus_bf16_peak_cannot_reach_the_goal(tiny_bench):
    import copy

    from flowers.bench.render import targets_table
    from flowers.bench.targets import evaluate_targets
    from flowers.bench.variants import BF16_VARIANT

    results = copy.deepcopy(tiny_bench[0])
    for f in results["backends"].values():
        f["variants"][BF16_VARIANT] = {"median": 1.0, "vs_default": 1.5}
    fp32 = results["peak"]["fp32_gflops"]
    for ratio, why in ((2.0, "out of reach on this CPU: its bf16 peak"), (16.0, None)):  # AVX512-BF16, AMX
        results["peak"].update(native_bf16=True, bf16_gflops=ratio * fp32)
        targets = evaluate_targets(results)
        (row,) = [t for t in targets if "mixed_bfloat16 / float32" in t["target"]]
        assert row["met"] is False and row["value"] == 1.5, row
        if why:
            assert row["why"].startswith(why) and "2.0× its FP32 peak" in row["why"], row
            assert f"| NO: {row['why']} |" in targets_table(targets)
        else:  # reachable: a plain miss
            assert "why" not in row


def test_bench_markdown_has_every_figure(tiny_bench):
    _, text = tiny_bench
    for row in ("forward img/s, batch 1", "fit img/s, tf.data pipeline", "keras / native",
                "forward GFLOP/s (share of FP32 peak)", "feature-cache speed-up", "## Targets",
                "peak host RSS MiB"):
        assert row in text


def test_bench_another_backbone_has_no_native_figures_and_says_why(tmp_path, learnable_set):
    """--backbone reaches every measured model; the ResNet50-only native twins are n/a with the reason."""
    result = flowers("bench", "--backends", "tensorflow", "--backbone", "MobileNetV3Small",
                     "--image-size", "32", "--batch-size", "4", "--steps", "1", "--rounds", "1",
                     "--warmup", "1", "--e2e-epochs", "0", "--variants", "none",
                     "--images", str(learnable_set), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (device_dir,) = (tmp_path / "bench").iterdir()
    results, text = read_json(device_dir / "bench.json"), (device_dir / "bench.md").read_text()
    assert results["backbone"] == results["settings"]["backbone"] == "MobileNetV3Small"
    f = results["backends"]["tensorflow"]
    for key in ("forward_b1_img_s", "forward_batch_img_s", "train_step_img_s"):
        assert f[key]["median"] > 0, key
    # MobileNetV3Small's 0.06 GMAC at 224 px scaled by (32/224)^2: about 0.002 GFLOP + the head
    assert 0.001 < f["gflops_per_image"] < 0.01
    for key in ("native_forward_img_s", "keras_vs_native_forward", "keras_vs_native_train",
                "native_differences"):
        assert f[key] is None and f["null_reasons"][key] == "native twins are ResNet50-only", key
    native_targets = [t for t in results["targets"] if "native" in t["target"]]
    assert len(native_targets) == 2 and all(t["met"] is None for t in native_targets)
    assert "backbone MobileNetV3Small" in text and "Model: MobileNetV3Small" in text
    assert "n/a: native twins are ResNet50-only" in text


def test_bench_refuses_a_bad_backbone_before_starting_workers():
    error = one_line_error(flowers("bench", "--backends", "tensorflow", "--backbone", "NoSuchNet"))
    assert "--backbone='NoSuchNet'" in error
    error = one_line_error(flowers("bench", "--backends", "tensorflow", "--backbone", "Xception",
                                   "--image-size", "64"))
    assert "--image-size=64" in error and "71 px" in error


@pytest.mark.parametrize("sizes, message", [
    ("32,big", "--image-sizes: 'big' is not a whole number (e.g. 32,64,224)"),
    ("16", "--image-sizes: 16 is below 32"),
    ("64", "--image-sizes: 64: Xception needs images of at least 71 px"),
])
def test_bench_refuses_bad_image_sizes_before_starting_workers(sizes, message, tmp_path):
    error = one_line_error(flowers("bench", "--backends", "tensorflow", "--backbone", "Xception",
                                   "--image-size", "96", "--image-sizes", sizes,
                                   "--out", str(tmp_path)))
    assert message in error, error
    assert not (tmp_path / "bench").exists()


def test_layout_variants_are_skipped_for_a_channels_last_only_backbone():
    from flowers.bench.run import BenchSettings, variant_plan

    custom = BenchSettings(backbone="experiments.custom_backbone:small_cnn")
    measured, skipped = variant_plan("jax", custom)
    assert measured == ["train.dtype_policy=mixed_bfloat16", "model.fold_batchnorm=false",
                        "train.portable_random=false"]
    assert "channels_last only" in skipped["model.data_format=channels_first"]
    assert "model.data_format=channels_last" in variant_plan("torch", custom)[1]
    assert variant_plan("jax", BenchSettings())[1] == {}


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_native_twin_is_the_same_network(backend, learnable_set):
    """The plain PyTorch / tf.function model reproduces the Keras model on photo-like images."""
    driver = f"""
        import json
        import numpy as np
        from flowers import backend, config
        from flowers.images import load_image_files
        backend.select("{backend}")
        import keras
        from flowers.bench import native
        from flowers.model import build_model
        keras.utils.set_random_seed(1)
        # one photo of each of four classes: the predictions must vary across the images
        test = __import__("pathlib").Path("{learnable_set}/test")
        images = load_image_files([sorted(c.glob("*.jpg"))[0] for c in sorted(test.iterdir())[:4]],
                                  64).astype("float32")
        out = {{}}
        for fmt in ("channels_last", "channels_first") if "{backend}" == "torch" else ("channels_last",):
            cfg = config.load_experiment("smoke", ["model.data_format=" + fmt]).model
            model = build_model(cfg, 64, 12)
            # shrink the output layer so probabilities are not saturated at 0/1 (random weights)
            layer = model.get_layer("logits")
            layer.set_weights([w * 1e-3 for w in layer.get_weights()])
            twin = getattr(native, "{backend}_native")(model, 1e-3)
            out[fmt] = native.differences(model, twin, images)
            probabilities = twin.forward(images)
            out[fmt]["spread"] = float(probabilities.max() - probabilities.min())
            out[fmt]["loss"] = twin.train_step(images, np.arange(4))
        print(json.dumps(out))
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    for fmt, diff in json.loads(result.stdout.strip().splitlines()[-1]).items():
        assert diff["spread"] > 1e-3, "probabilities saturated: the comparison would be vacuous"
        assert diff["probabilities_max_abs"] <= 1e-4, (fmt, diff)
        assert diff["features_max_rel"] <= 1e-4, (fmt, diff)
        assert diff["loss"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_cache_head_equals_full_model(backend, learnable_experiments):
    """head(features(x)) == model(x) for the same weights, and cached features match per image."""
    driver = f"""
        import json
        import numpy as np
        from flowers import backend, config, data
        backend.select("{backend}")
        import keras
        from flowers.model import build_model, feature_extractor, head
        from flowers.training.phases import cached_feature_data
        exp = config.load_experiment("{learnable_experiments['flowers12']}",
                                     ["data.image_size=32", "train.cache_features=true"])
        splits = data.load(exp.data, exp.train.batch_size, seed=0)
        model = build_model(exp.model, 32, 12)
        images, labels = (t.numpy() for t in next(iter(splits.val)))
        full = np.asarray(model.predict_on_batch(images))
        split = np.asarray(head(model).predict_on_batch(
            np.asarray(feature_extractor(model).predict_on_batch(images))))
        head_model, train_features, val_features = cached_feature_data(model, splits, exp)
        cached_x, cached_y = (t.numpy() for t in next(iter(val_features)))
        print(json.dumps({{
            "max_abs": float(np.max(np.abs(full - split))),
            "cached_max_abs": float(np.max(np.abs(
                np.asarray(head_model.predict_on_batch(cached_x)) - full))),
            "labels_equal": bool((cached_y == labels).all()),
            "train_batches": int(sum(1 for _ in train_features)),
            "epochs": exp.train.epochs,
        }}))
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["max_abs"] <= 1e-6 and out["cached_max_abs"] <= 1e-5, out
    # every epoch of the run, each in its own order: epochs x ceil(480 / 32) batches
    assert out["labels_equal"] and out["train_batches"] == out["epochs"] * -(-480 // 32)


@pytest.mark.parametrize("backbone", ["ResNet50", "EfficientNetV2B0"])
def test_feature_cache_training_matches_standard_training(tmp_path, backbone):
    """Same seed, batches and dropout masks: a cached-feature run ends where a standard one does.

    EfficientNetV2B0 has Dropout layers inside its backbone (stochastic depth): a frozen backbone
    must run them in inference mode under fit, as the cache does (flowers.model.InferenceMode).
    """
    runs = {}
    for cache in ("false", "true"):
        runs[cache] = read_json(run_dir_of(flowers(
            "train", "-e", "smoke", "--backend", "tensorflow", "--runs-dir", str(tmp_path / cache),
            "--set", f"train.cache_features={cache}", "--set", f"model.backbone={backbone}"))
            / "metrics.json")
    assert runs["true"]["val_accuracy"] == pytest.approx(runs["false"]["val_accuracy"], abs=1e-6)
    assert runs["true"]["val_loss"] == pytest.approx(runs["false"]["val_loss"], rel=1e-4)
    assert runs["true"]["feature_extraction_s"] > 0
    assert runs["false"]["feature_extraction_s"] is None
    assert runs["false"]["null_reasons"]["feature_extraction_s"] == "train.cache_features is off"


@pytest.mark.parametrize("cache", ["true", "false"])
def test_eval_time_is_measured_after_a_warm_up_in_both_modes(tmp_path, cache):
    """The full model's timed evaluate follows an untimed one-batch evaluate in both modes.

    In feature-cache runs the full model is first run at evaluation, so its timing once included
    tracing (1.87 vs 0.32 s for the same model); which calls happen is asserted, not their speed.
    """
    driver = f"""
        import json
        from pathlib import Path
        from flowers import backend, config
        backend.select("tensorflow")
        import keras
        from flowers.training.loop import train
        calls = []
        evaluate = keras.Model.evaluate
        def logged(self, x=None, *args, **kwargs):
            calls.append([self.name, int(x.cardinality())])
            return evaluate(self, x, *args, **kwargs)
        keras.Model.evaluate = logged
        exp = config.load_experiment("smoke", ["train.epochs=1", "train.cache_features={cache}"])
        train(exp, "tensorflow", Path("{tmp_path}"))
        print(json.dumps(calls))
    """
    result = python(driver)
    assert result.returncode == 0, result.stderr[-2000:]
    calls = json.loads(result.stdout.strip().splitlines()[-1])
    full_model = [batches for name, batches in calls if name == "flowers_resnet50"]
    assert full_model[-2:] == [1, 2], calls  # warm-up batch, then the timed 64 images (2 batches)


@pytest.mark.parametrize("name, key, tflops", [
    # names exactly as nvidia-smi --query-gpu=name prints them
    ("NVIDIA L4", "L4", 30.3),
    ("NVIDIA L40", "L40", 90.5),
    ("NVIDIA L40S", "L40S", 91.6),
    ("NVIDIA H100 NVL", "H100 NVL", 60.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 51.0),
    ("NVIDIA H100 80GB HBM3", "H100 80GB HBM3", 67.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 19.5),
    ("NVIDIA A10", "A10", 31.2),
    ("Tesla V100-SXM2-16GB", "V100 SXM2", 15.7),
    ("NVIDIA H200", "H200", 67.0),
])
def test_gpu_peak_matches_whole_words_longest_first(name, key, tflops):
    """Substring matching once gave the L40 the L4's figure and the H100 NVL the PCIe one."""
    from flowers.bench import hardware

    peak = hardware.gpu_peak(name)
    assert peak["fp32_gflops"] == tflops * 1000
    assert f"figure for {key}: {tflops} TFLOP/s" in peak["method"]


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA B200", "NVIDIA L"])
def test_an_unknown_gpu_gets_no_peak_rather_than_a_neighbours(name):
    from flowers.bench import hardware

    peak = hardware.gpu_peak(name)
    assert peak["fp32_gflops"] is None and name in peak["method"]


def test_cpu_peak_counts_physical_cores_and_says_when_fma_units_are_assumed(monkeypatch):
    import psutil

    from flowers.bench import hardware

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    monkeypatch.setattr(hardware, "_max_clock_mhz", lambda info: (2000.0, "test clock"))
    intel_avx512 = {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "106",
                    "flags": "fma avx avx2 avx512f"}
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: intel_avx512)
    peak = hardware.cpu_peak()
    # 8 physical cores (not 16 hyper-threads) x 2 GHz x 64 FLOP/cycle
    assert peak["fp32_gflops"] == 8 * 2.0 * 64
    assert peak["method"].startswith("8 physical cores x 2000 MHz")
    assert peak["fma_units_assumed"] is True and "ASSUMED" in peak["method"]

    zen3 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1", "flags": "fma avx avx2"}
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: zen3)
    peak = hardware.cpu_peak()
    assert peak["fp32_gflops"] == 8 * 2.0 * 32
    assert peak["fma_units_assumed"] is False and "ASSUMED" not in peak["method"]
    assert peak["native_bf16"] is False and peak["bf16_gflops"] is None
    assert "no native bf16" in peak["bf16_method"]

    for flags, per_cycle in (("avx512f avx512_bf16", 128), ("avx512f avx512_bf16 amx_bf16", 1024)):
        monkeypatch.setattr(hardware, "_cpuinfo", lambda flags=flags: {**intel_avx512, "flags": flags})
        peak = hardware.cpu_peak()
        assert peak["native_bf16"] is True and peak["bf16_gflops"] == 8 * 2.0 * per_cycle


@pytest.mark.parametrize("env, expected", [
    ({}, "30000"),                               # on by default for torch
    ({"FLOWERS_OPENMP_SPIN": "0"}, None),        # switched off: libgomp's own default
    ({"GOMP_SPINCOUNT": "7"}, "7"),              # the user's own setting wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
])
def test_torch_openmp_spin_is_bounded_before_torch_loads(env, expected):
    """backend.select("torch") sets GOMP_SPINCOUNT (read once, when torch loads libgomp), and a
    bench worker's torch sees it; tensorflow and jax processes are left alone."""
    driver = """
        import json, os, sys
        from flowers import backend
        assert "torch" not in sys.modules
        backend.select("torch")
        import keras
        keras.ops.convert_to_tensor([1.0])
        print(json.dumps([os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules]))
    """
    result = python(driver, env={"FLOWERS_OPENMP_SPIN": "1", **env})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [expected, True]
    other = python("""
        import os
        from flowers import backend
        backend.select("tensorflow")
        print(os.environ.get("GOMP_SPINCOUNT"))
    """)
    assert other.stdout.strip().splitlines()[-1] == "None"
