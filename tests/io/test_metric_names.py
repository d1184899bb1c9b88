"""MLflow metric sections: every flat name medseg logs gets the section the UI groups it by, and back."""

from __future__ import annotations

import pytest

from medseg.io.metric_names import METRIC_TOKENS, flat_key, flat_metrics, mlflow_key, run_metric
from medseg.metrics.volumetric import METRICS

CASES = [
    ("train_loss", "loss/train"),
    ("val_loss", "loss/val"),
    ("lr", "train/lr"),
    ("time_epoch_s", "train/time_epoch_s"),
    ("val_dice_liver", "val_dice/liver"),
    ("val_dice_left_kidney", "val_dice/left_kidney"),
    ("val_iou_mean", "val_iou/mean"),
    ("val_hd95_spleen", "val_hd95/spleen"),
    ("val_pixel_accuracy", "val/pixel_accuracy"),
    ("val_miou", "val/miou"),
    ("eval_dice_liver_mean", "eval_dice/liver_mean"),
    ("eval_hd95_kidney_n_nan", "eval_hd95/kidney_n_nan"),
    ("eval_volume_abs_error_ml_liver_median", "eval_volume_abs_error_ml/liver_median"),
    ("eval_volume_rel_error_liver_mean", "eval_volume_rel_error/liver_mean"),
    ("eval_compare_dice_liver_mean_diff", "eval_compare_dice/liver_mean_diff"),
    ("eval_per_image_miou_mean", "eval_per_image/miou_mean"),
    ("eval_per_image_dice_mean_mean", "eval_per_image/dice_mean_mean"),
    ("eval_miou", "eval/miou"),
    ("eval_iou_road", "eval_iou/road"),
    ("n_failed", "n_failed"),  # a batch run's counters: no section
    ("val_dice/liver", "val_dice/liver"),  # already sectioned: unchanged
]


@pytest.mark.parametrize(("flat", "sectioned"), CASES)
def test_each_flat_name_gets_its_section_and_comes_back(flat: str, sectioned: str) -> None:
    assert mlflow_key(flat) == sectioned
    if "/" not in flat:
        assert flat_key(sectioned) == flat


def test_every_volumetric_metric_is_a_known_token() -> None:
    """A metric added to medseg.metrics.volumetric without a token would be cut after its first word."""
    assert set(METRICS) == set(METRIC_TOKENS)
    for name in METRICS:
        assert mlflow_key(f"eval_{name}_liver_mean") == f"eval_{name}/liver_mean"


def test_old_and_new_names_are_read_alike() -> None:
    old = {"val_dice_liver": 0.5, "train_loss": 0.9}
    new = {"val_dice/liver": 0.7, "loss/train": 0.3}
    assert flat_metrics(old) == {"val_dice_liver": 0.5, "train_loss": 0.9}
    assert flat_metrics({**old, **new}) == {"val_dice_liver": 0.7, "train_loss": 0.3}  # the sectioned name wins
    assert run_metric(old, "val_dice_liver") == 0.5 and run_metric(new, "val_dice_liver") == 0.7
    assert run_metric(new, "val_iou_liver") is None
