"""The fine-tuning phase ([finetune]): what it unfreezes, what it leaves alone, and resuming inside it.

Smoke model (random ResNet50) at 32 px on a few synthetic images, under tensorflow (the quickest
on a 2-core CPU); the phase logic is backend-independent Keras code.
"""

import json
import signal

import pytest

from conftest import flowers, one_line_error, python, read_json, run_dir_of

TINY = ["data.synthetic_train_images=16", "data.synthetic_val_images=8", "train.batch_size=8",
        "train.latency_repeats=1"]


@pytest.mark.slow
def test_finetune_changes_the_unfrozen_layers_and_only_those(tmp_path):
    # One head epoch, then one fine-tuning epoch unfreezing ResNet50's last stage (conv5). A
    # callback snapshots every weight when each phase starts; the saved model is compared with the
    # snapshot taken when fine-tuning started.
    result = python(f"""
        import json
        from pathlib import Path
        import numpy as np
        from flowers import backend
        backend.select("tensorflow")
        import keras
        from flowers.config import load_experiment
        from flowers.model import backbone_of, load_model
        from flowers.training.loop import train

        snapshots = []
        class Snapshot(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                if len(self.model.layers) > 4:  # the full model (phase 2), not a feature-cache head
                    backbone = backbone_of(self.model)
                    snapshots.append({{(l.name, i): np.array(w) for l in backbone.layers
                                      for i, w in enumerate(l.get_weights())}})

        exp = load_experiment("smoke", {TINY + ["train.epochs=1", "finetune.epochs=1",
                                                "finetune.unfreeze=conv5"]!r})
        run = train(exp, "tensorflow", Path({str(tmp_path)!r}), callbacks=[Snapshot()])
        model, _ = load_model(run / "model.keras")
        backbone = backbone_of(model)
        before = snapshots[-1]
        changed, same, bn_changed = [], [], []
        for layer in backbone.layers:
            for i, w in enumerate(layer.get_weights()):
                equal = np.array_equal(before[(layer.name, i)], np.array(w))
                if isinstance(layer, keras.layers.BatchNormalization):
                    if not equal:
                        bn_changed.append(layer.name)
                elif layer.name.startswith("conv5") and i == 0:
                    (same if equal else changed).append(layer.name)
                elif not layer.name.startswith("conv5"):
                    (same if equal else changed).append("FROZEN " + layer.name)
        print(json.dumps({{"run": str(run), "changed": changed, "same": same,
                           "bn_changed": bn_changed}}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    frozen_changed = [n for n in found["changed"] if n.startswith("FROZEN")]
    assert not frozen_changed, frozen_changed  # every layer before conv5 is bit-identical
    assert not found["bn_changed"], found["bn_changed"]  # BatchNorm: weights and moving statistics
    unfrozen_kernels_changed = [n for n in found["changed"] if n.startswith("conv5")]
    assert len(unfrozen_kernels_changed) >= 9, found  # conv5's convolution kernels were trained
    assert not [n for n in found["same"] if n.startswith("conv5")], found["same"]

    from pathlib import Path
    run = Path(found["run"])
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].endswith(",phase") and history[1].endswith(",head") and \
        history[2].endswith(",finetune"), history
    metrics = read_json(run / "metrics.json")
    assert (metrics["epochs"], metrics["finetune_epochs"]) == (2, 1)
    assert set(metrics["phase_times_s"]) == {"head", "finetune"}
    assert all(t > 0 for t in metrics["phase_times_s"].values())


@pytest.mark.slow
@pytest.mark.parametrize(("killed_after", "extra"), [
    (2, []),                              # inside fine-tuning: its own checkpoint
    (1, ["train.cache_features=true"]),   # between the phases, head trained on cached features
], ids=["mid-finetune", "between-phases-feature-cache"])
def test_a_run_killed_during_finetuning_resumes_in_finetuning(tmp_path, killed_after, extra):
    args = ["train", "-e", "smoke", "--backend", "tensorflow", "--runs-dir", str(tmp_path),
            *[a for s in TINY + ["train.epochs=1", "finetune.epochs=2", "finetune.unfreeze=4",
                                 *extra] for a in ("--set", s)]]
    killed = flowers(*args, env={"FLOWERS_FAULT": f"checkpoint-published:{killed_after}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = flowers("train", "-e", "smoke", "--backend", "tensorflow", "--resume",
                      "--runs-dir", str(tmp_path))
    run = run_dir_of(resumed)
    assert f"resume: {killed_after} of 3 epochs done" in resumed.stdout
    assert "head epoch" not in resumed.stdout.split("resume:")[1]  # the head phase is not re-run
    phases = [line.rsplit(",", 1)[1] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert phases == ["head", "finetune", "finetune"]
    metrics = read_json(run / "metrics.json")
    assert metrics["resumed"] is True and metrics["epochs"] == 3


@pytest.mark.parametrize(("unfreeze", "message"), [
    ("conv9", "finetune.unfreeze='conv9': no layer of resnet50 is named or starts with that"),
    ("100000", "finetune.unfreeze=100000: resnet50 has only"),
])
def test_unfreeze_that_names_nothing_is_refused_before_the_run_directory(tmp_path, unfreeze, message):
    error = one_line_error(flowers(
        "train", "-e", "smoke", "--backend", "tensorflow", "--runs-dir", str(tmp_path),
        *[a for s in TINY + ["finetune.epochs=1", f"finetune.unfreeze={unfreeze}"]
          for a in ("--set", s)]))
    assert message in error
    assert not list(tmp_path.rglob("config.json"))  # no run directory was started


@pytest.mark.parametrize(("setting", "message"), [
    ("finetune.learning_rate=0", "finetune.learning_rate=0.0: must be > 0"),
    ("finetune.epochs=-1", "finetune.epochs=-1: must be >= 0"),
    ("finetune.unfreeze=0", "finetune.unfreeze='0': a number of layers must be >= 1"),
    ("train.lr_schedule=linear", "train.lr_schedule='linear': must be one of constant, cosine"),
    ("finetune.epoch=1", "unknown key finetune.epoch"),
])
def test_bad_finetune_settings(setting, message):
    error = one_line_error(flowers("train", "-e", "smoke", "--backend", "tensorflow", "--set", setting))
    assert message in error


def test_finetuning_a_backbone_that_is_not_frozen_is_refused():
    error = one_line_error(flowers("train", "-e", "smoke", "--backend", "tensorflow",
                                   "--set", "finetune.epochs=1", "--set", "model.freeze_backbone=false"))
    assert "finetune.epochs > 0 needs model.freeze_backbone=true" in error
