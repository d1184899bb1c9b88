"""The Trainer (``medseg.engine.trainer``): options that change what a run does (class-balanced patches, early
stopping, time budget, gradient accumulation), each on the real Trainer and the tiny phantom (CPU, no tracking),
and the start-up check that the patch fits the network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.kinds import train_transforms
from medseg.engine.train_data import case_dicts as _case_dicts
from medseg.engine.trainer import Trainer
from medseg.errors import ConfigError
from medseg.io.manifest import load_manifest

TINY = ["data.patch_size=[16, 16, 8]", "model.params.channels=[4, 8, 16]", "model.params.strides=[2, 2]",
        "tracking.backend=none", "train.device=cpu", "data.augment=false", "train.hd95_every=0", "train.overlay_cases=0"]


def _cfg(manifest: Path, tmp_path: Path, *extra: str):
    return load_config("phantom_unet3d", [*TINY, f"data.manifest={manifest}", f"train.output_dir={tmp_path}",
                                          "train.run_name=t", *extra])


@pytest.mark.parametrize(("ratios", "organ"), [([0, 0, 0, 1], 3), ([0, 0, 1, 0], 2)])
def test_class_ratios_centre_patches_on_the_requested_organ(tiny_phantom: Path, tmp_path: Path, ratios: list[int],
                                                            organ: int) -> None:
    cfg = _cfg(tiny_phantom, tmp_path, f"data.class_ratios={ratios}", "data.samples_per_volume=8")
    m = load_manifest(tiny_phantom)
    tf = train_transforms(cfg, m.num_classes)
    tf.set_random_state(seed=0)
    patches = [p for case in _case_dicts(m, "train") for p in tf(case)]
    assert len(patches) == 8 * len(m.split("train"))
    # Every patch contains the small organ it was asked for; plain random 16x16x8 crops mostly would not.
    assert all((np.asarray(p["label"]) == organ).any() for p in patches)
    cfg_bg = _cfg(tiny_phantom, tmp_path, "data.class_ratios=[1, 0, 0, 0]", "data.samples_per_volume=8")
    tf_bg = train_transforms(cfg_bg, m.num_classes)
    tf_bg.set_random_state(seed=0)
    bg = [p for case in _case_dicts(m, "train") for p in tf_bg(case)]
    assert np.mean([(np.asarray(p["label"]) == organ).any() for p in bg]) < 0.9


def test_class_ratios_length_must_match_classes(tiny_phantom: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_phantom, tmp_path, "data.class_ratios=[1, 1]")
    with pytest.raises(ValueError, match="class_ratios has 2 values for 4 classes"):
        train_transforms(cfg, 4)


def test_early_stopping_stops_when_val_stops_improving(tiny_phantom: Path, tmp_path: Path) -> None:
    # A learning rate of ~0 keeps the model (and its val Dice) where it started: no round improves on the first.
    cfg = _cfg(tiny_phantom, tmp_path, "train.epochs=6", "train.val_every=1", "train.early_stopping_patience=2",
               "optimizer.lr=1e-12")
    result = Trainer(cfg, load_manifest(tiny_phantom)).fit()
    assert result.epochs_run == 3 and result.best_epoch == 0


def test_time_budget_ends_the_run_after_the_epoch_in_progress(tiny_phantom: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_phantom, tmp_path, "train.epochs=20", "train.val_every=20", "train.max_minutes=0.0001")
    result = Trainer(cfg, load_manifest(tiny_phantom)).fit()
    assert result.epochs_run == 1
    assert (tmp_path / "t" / "checkpoints" / "last.pt").is_file()  # resumable from where the budget stopped it
    assert (tmp_path / "t" / "model" / "model.pt").is_file()  # and a model exists (validated on stopping)


def test_time_budget_schedule_anneals_the_lr_within_the_budget(tiny_phantom: Path, tmp_path: Path) -> None:
    # 1000 epochs planned, 9 seconds of budget: the epoch-span poly would still be at ~99.9 % of the base LR when
    # the budget stops the run; the time-budget span follows the clock and ends low.
    cfg = _cfg(tiny_phantom, tmp_path, "train.epochs=1000", "train.val_every=1000", "train.max_minutes=0.15",
               "optimizer.schedule_span=time_budget", "optimizer.lr=0.01")
    trainer = Trainer(cfg, load_manifest(tiny_phantom))
    result = trainer.fit()
    assert 2 <= result.epochs_run < 1000
    lrs = [float(r["lr"]) for r in trainer.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0] == 0.01
    final = trainer.optimizer.param_groups[0]["lr"]  # the LR the next epoch would use
    spent = min(1.0, trainer.budget_spent)  # the last epoch may end past the budget (> 1); the schedule clamps it
    assert final < 0.01 * (1 - spent) ** 0.9 + 1e-9 and final < 0.01 * 0.5
    assert trainer.budget_spent > 0.5


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_gradient_accumulation_steps_the_optimizer_every_k_batches(tiny_phantom: Path, tmp_path: Path,
                                                                   accumulation: int) -> None:
    cfg = _cfg(tiny_phantom, tmp_path, "train.epochs=1", "data.batch_size=1", "data.samples_per_volume=2",
               f"train.grad_accumulation={accumulation}")
    trainer = Trainer(cfg, load_manifest(tiny_phantom))
    trainer.fit()
    batches = len(trainer.train_loader)
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {-(-batches // accumulation)}  # ceil: a last partial group still steps


def test_model_package_carries_the_dataset_plans(phantom_copy: Path, tmp_path: Path) -> None:
    import json

    from medseg.planning.volumes import plan_dataset, plans_path_for

    plan_dataset(phantom_copy)  # writes <manifest>.plans.json beside the manifest, where training looks for it
    plans = json.loads(plans_path_for(phantom_copy).read_text())
    cfg = _cfg(phantom_copy, tmp_path, "train.epochs=1")
    Trainer(cfg, load_manifest(phantom_copy)).fit()
    package = tmp_path / "t" / "model"
    assert json.loads((package / "plans.json").read_text()) == plans
    assert json.loads((package / "metadata.json").read_text())["plans"] == "plans.json"


def test_patch_that_does_not_fit_the_network_is_a_config_error(tiny_phantom: Path, tmp_path: Path) -> None:
    cfg = load_config("vnet_dice_focal", [f"data.manifest={tiny_phantom}", f"train.output_dir={tmp_path}",
                                          "data.patch_size=[24, 24, 16]", "tracking.backend=none"])
    trainer = Trainer(cfg, load_manifest(tiny_phantom))
    with pytest.raises(ConfigError, match=r"data.patch_size \[24, 24, 16\] does not fit model 'vnet'"):
        trainer._model()
