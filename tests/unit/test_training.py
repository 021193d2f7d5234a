"""flowers.training's keras-free decisions, in-process: which phases a (resumed) run trains, from
where, in which fit() segments, with which callbacks; finetune.unfreeze; model.backbone resolved once."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

import flowers.training
from flowers import backbones, config
from flowers.errors import FlowersError
from flowers.training.plan import FRESH, Phase, Segment, phases, plan, unfreeze_from, validates_every_epoch


def _experiment(*overrides: str) -> config.Experiment:
    return config.load_experiment("smoke", ["train.epochs=3", *overrides])


FINETUNE = ("finetune.epochs=2", "finetune.learning_rate=1e-5")


def test_phases_number_epochs_continuously_with_each_phase_s_learning_rate():
    assert phases(_experiment()) == [Phase("head", 0, 3, 1e-4)]
    assert phases(_experiment(*FINETUNE)) == [Phase("head", 0, 3, 1e-4), Phase("finetune", 3, 5, 1e-5)]


def test_a_fresh_run_trains_every_phase_in_one_segment_each():
    runs = plan(_experiment(*FINETUNE), FRESH)
    assert [r.phase.name for r in runs] == ["head", "finetune"]
    assert [r.segments() for r in runs] == [[Segment(0, 3, 0, FRESH)], [Segment(3, 5, 0, FRESH)]]
    head, finetune = runs
    assert head.saves_boundary_weights and not finetune.saves_boundary_weights
    # the head phase runs in this process: fine-tuning goes on from the model it leaves
    assert not finetune.from_boundary_weights


def test_a_run_without_fine_tuning_saves_no_boundary_weights():
    (head,) = plan(_experiment(), FRESH)
    assert not head.saves_boundary_weights and not head.caches_features


def test_a_run_resumed_after_an_epoch_restores_that_epoch_s_checkpoint():
    (head,) = plan(_experiment(), (2, 0))
    assert head.restore == (2, 0) and head.begin == 2
    assert head.segments() == [Segment(2, 3, 0, (2, 0))]


def test_a_run_resumed_inside_an_epoch_fits_the_steps_left_first():
    (head,) = plan(_experiment(), (1, 3))
    assert head.segments() == [Segment(1, 2, 3, (1, 3)), Segment(2, 3, 0, FRESH)]
    (head,) = plan(_experiment(), (2, 3))  # inside the last epoch: one segment
    assert head.segments() == [Segment(2, 3, 3, (2, 3))]


def test_a_run_resumed_between_the_phases_fine_tunes_from_the_boundary_weights():
    (finetune,) = plan(_experiment(*FINETUNE), (3, 0))
    assert finetune.phase.name == "finetune" and finetune.restore == FRESH
    assert finetune.from_boundary_weights
    assert finetune.segments() == [Segment(3, 5, 0, FRESH)]


def test_a_run_resumed_inside_fine_tuning_restores_its_checkpoint_not_the_boundary_weights():
    (finetune,) = plan(_experiment(*FINETUNE), (4, 2))
    assert finetune.restore == (4, 2) and not finetune.from_boundary_weights
    assert finetune.segments() == [Segment(4, 5, 2, (4, 2))]


def test_a_phase_early_stopping_ended_is_not_trained_again():
    (finetune,) = plan(_experiment(*FINETUNE), (2, 0), stopped={"head"})
    assert finetune.phase.name == "finetune" and finetune.from_boundary_weights
    assert plan(_experiment(*FINETUNE), (4, 0), stopped={"finetune"}) == []


def test_nothing_is_left_to_train_after_the_last_epoch():
    assert plan(_experiment(*FINETUNE), (5, 0)) == []
    assert plan(_experiment(), (3, 0)) == []


def test_only_the_head_phase_trains_on_cached_features():
    head, finetune = plan(_experiment("train.cache_features=true", *FINETUNE), FRESH)
    assert head.caches_features and not finetune.caches_features


@pytest.mark.parametrize(("drop_remainder", "num_val", "expected"),
                         [(False, 10, True), (True, 10, False), (True, 32, True)])
def test_per_epoch_validation_needs_one_whole_batch_when_batches_are_whole(drop_remainder, num_val,
                                                                           expected):
    splits = SimpleNamespace(drop_remainder=drop_remainder, num_val=num_val, batch_size=32)
    assert validates_every_epoch(splits) is expected


LAYERS = ["conv1_pad", "conv1_conv", "conv1_bn", "conv5_block1_1_conv", "conv5_block1_1_bn", "post"]


@pytest.mark.parametrize(("which", "first"), [("all", 0), ("2", 4), ("6", 0), ("conv5", 3),
                                              ("conv1_bn", 2), (" post ", 5)])
def test_unfreeze_selects_from_the_first_matching_layer(which, first):
    assert unfreeze_from(LAYERS, which, "resnet50") == first


def test_unfreeze_refuses_more_layers_than_the_backbone_has():
    with pytest.raises(FlowersError, match=r"^finetune.unfreeze=7: resnet50 has only 6 layers$"):
        unfreeze_from(LAYERS, "7", "resnet50")


def test_unfreeze_refuses_an_unknown_layer_with_the_close_names():
    with pytest.raises(FlowersError) as error:
        unfreeze_from(LAYERS, "conv1_cnv", "resnet50")
    assert str(error.value) == ("finetune.unfreeze='conv1_cnv': no layer of resnet50 is named or starts "
                                "with that; close: conv1_conv, conv1_bn, conv1_pad (first layers: "
                                "conv1_pad, conv1_conv, conv1_bn, last: post)")


def test_model_backbone_is_resolved_once_per_config(monkeypatch):
    calls = []
    resolve = backbones.resolve
    monkeypatch.setattr(backbones, "resolve", lambda name: calls.append(name) or resolve(name))
    experiment = config.load_experiment("smoke", ["train.epochs=1", "data.image_size=64"])
    assert experiment.model.backbone_spec is experiment.model.backbone_spec
    config.validate(experiment)
    assert calls == ["ResNet50"]  # validated three times, resolved once
    changed = dataclasses.replace(experiment.model, backbone="MobileNetV3Small")
    assert changed.backbone_spec.name == "MobileNetV3Small" and calls == ["ResNet50", "MobileNetV3Small"]


def test_the_resolved_spec_is_not_part_of_the_saved_settings():
    experiment = _experiment()
    before = (experiment.config_hash(), experiment.to_dict())
    assert experiment.model.backbone_spec.kind == "application"
    assert (experiment.config_hash(), experiment.to_dict()) == before
    assert "backbone_spec" not in experiment.to_dict()["model"]


@pytest.mark.parametrize(("override", "message"), [
    ("model.backbone=Resnet50", "model.backbone='Resnet50': not a keras.applications backbone; "
                                "did you mean ResNet50"),
    ("model.backbone=Xception", "data.image_size=32: Xception needs images of at least 71 px"),
    ("model.backbone=a.b:c-d", "model.backbone='a.b:c-d': a custom backbone is 'package.module:function'"),
])
def test_validation_refuses_a_bad_backbone_as_before(override, message):
    with pytest.raises(FlowersError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        config.load_experiment("smoke", [override])


def _module_imports(path: Path) -> set[str]:
    """The modules `path` imports when it is imported (not those under `if TYPE_CHECKING:`)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_package_and_its_plan_import_no_framework():
    """`import flowers.training` and the plan come before the backend is chosen (keras after it)."""
    folder = Path(flowers.training.__file__).parent
    for name in ("__init__.py", "plan.py"):
        flowers_modules = {m for m in _module_imports(folder / name) if m.startswith("flowers")}
        assert flowers_modules <= {"flowers.config", "flowers.errors"}, name
        assert not {"keras", "numpy", "tensorflow", "torch", "jax"} & _module_imports(folder / name)
