"""Validation scoring (``medseg.engine.validation``): per-organ Dice / IoU / HD95 of volumes averaged over cases,
pooled confusion-matrix scores of 2D images, and the ``validate`` loop with a network whose output is known."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.config import InferenceConfig
from medseg.engine.validation import CM_KEY, SCORERS, CaseInference, OrganScorer, PixelScorer, validate
from medseg.runtime.device import Precision

ORGANS = {"a": 1, "b": 2}  # volumes: organs only, background is not scored


class FirstLogitMean(torch.nn.Module):
    """A loss with a hand-known value: the mean of the class-0 logit."""

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return logits[:, 0].mean()


def _logits(pred: np.ndarray, num_classes: int) -> torch.Tensor:
    """(1, C, ...) logits whose argmax is ``pred`` (class-0 logit 0 where ``pred`` is 0)."""
    onehot = np.stack([(pred == c) for c in range(num_classes)]).astype(np.float32)
    return torch.from_numpy(onehot)[None]


def _volume_item(case: str, truth: np.ndarray, spacing=(1.0, 2.0, 3.0), index: int = 0) -> dict[str, Any]:
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(truth.astype(np.float32))[None], affine=affine)
    return {"id": case, "image": image, "label": torch.from_numpy(truth)[None], "index": index}


def _case_one() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((6, 6, 4), np.uint8)
    pred = np.zeros_like(truth)
    truth[1:3, 1:3, 1] = 1  # a: 4 voxels
    pred[1:3, 1:4, 1] = 1  # 6 voxels, 4 of them right: Dice 8/10, IoU 4/6; 2 voxels 1 step (2 mm) along y
    truth[3:5, 3:5, 1:3] = 2  # b: 8 voxels over 2 slices
    pred[3:5, 3:5, 1] = 2  # the first slice only: Dice 8/12, IoU 4/8; 4 truth voxels 1 slice (3 mm) away
    return truth, pred


def test_organ_scorer_by_hand() -> None:
    truth, pred = _case_one()
    scorer = OrganScorer(ORGANS, 3, FirstLogitMean(), with_hd95=True)
    row, (img, t, p) = scorer.score(_volume_item("c1", truth), _logits(pred, 3), torch.from_numpy(truth)[None, None])
    assert row["case"] == "c1" and row["val_loss"] == pytest.approx((truth.size - 6 - 4) / truth.size)
    assert row["dice_a"] == pytest.approx(0.8) and row["iou_a"] == pytest.approx(4 / 6)
    assert row["dice_b"] == pytest.approx(8 / 12) and row["iou_b"] == pytest.approx(0.5)
    assert row["hd95_a"] == pytest.approx(2.0) and row["hd95_b"] == pytest.approx(3.0)  # spacing from the affine
    assert np.array_equal(t, truth[..., 1]) and np.array_equal(p, pred[..., 1])  # the slice with most truth
    assert "hd95_a" not in OrganScorer(ORGANS, 3, FirstLogitMean()).score(
        _volume_item("c1", truth), _logits(pred, 3), torch.from_numpy(truth)[None, None])[0]


def test_organ_summary_is_the_mean_over_cases_then_over_organs() -> None:
    truth, pred = _case_one()
    scorer = SCORERS.get("volume")(ORGANS, 3, FirstLogitMean())
    assert isinstance(scorer, OrganScorer)
    rows = [scorer.score(_volume_item("c1", truth), _logits(pred, 3), torch.from_numpy(truth)[None, None])[0],
            scorer.score(_volume_item("c2", truth), _logits(truth, 3), torch.from_numpy(truth)[None, None])[0]]
    assert rows[1]["dice_a"] == rows[1]["iou_b"] == 1.0
    s = scorer.summary(rows)
    assert s["val_dice_a"] == pytest.approx(0.9) and s["val_dice_b"] == pytest.approx(5 / 6)
    assert s["val_dice_mean"] == pytest.approx((0.9 + 5 / 6) / 2)
    assert s["val_iou_a"] == pytest.approx(5 / 6) and s["val_iou_b"] == pytest.approx(0.75)
    assert s["val_iou_mean"] == pytest.approx((5 / 6 + 0.75) / 2)
    assert s["val_loss"] == pytest.approx(np.mean([r["val_loss"] for r in rows]))
    assert scorer.summary([]) == {}


def _image_item(case: str, truth: np.ndarray) -> dict[str, Any]:
    return {"id": case, "image": torch.zeros(3, *truth.shape), "label": torch.from_numpy(truth)[None], "index": 0}


def test_pixel_summary_pools_pixels_over_images_not_a_mean_of_images() -> None:
    classes = {"background": 0, "fg": 1}
    scorer = SCORERS.get("image2d")(classes, 2, FirstLogitMean(), ignore_index=255)
    assert isinstance(scorer, PixelScorer)
    t1 = np.ones((2, 2), np.int64)  # all foreground, predicted right: fg IoU 1, background absent (NaN)
    t2 = np.zeros((4, 5), np.int64)
    t2[:2, :4] = 1  # 8 fg pixels, 8 background
    t2[:, 4] = 255  # a void column: left out, whatever is predicted there
    p2 = np.zeros_like(t2)
    p2[0, :4] = 1  # 4 of the 8 fg pixels found; p2[:, 4] = 1 below is void
    p2[:, 4] = 1
    rows = [scorer.score(_image_item("i1", t1), _logits(t1, 2), torch.from_numpy(t1)[None, None])[0],
            scorer.score(_image_item("i2", t2), _logits(p2, 2), torch.from_numpy(t2)[None, None])[0]]
    assert rows[0]["iou_fg"] == 1.0 and np.isnan(rows[0]["iou_background"]) and rows[0]["pixel_accuracy"] == 1.0
    assert rows[1]["iou_fg"] == pytest.approx(0.5) and rows[1]["iou_background"] == pytest.approx(8 / 12)
    assert rows[1]["pixel_accuracy"] == pytest.approx(12 / 16)
    assert rows[1][CM_KEY].tolist() == [[8, 0], [4, 4]]  # rows truth, columns prediction; void not counted
    s = scorer.summary(rows)
    # pooled: fg TP 4+4, FN 4, FP 0 -> IoU 8/12 (the mean of the images' would be 0.75); 16 of 20 pixels right
    assert s["val_iou_fg"] == pytest.approx(8 / 12) and s["val_dice_fg"] == pytest.approx(16 / 20)
    assert s["val_pixel_accuracy"] == pytest.approx(16 / 20)  # (1 + 12/16) / 2 = 0.875 per image
    assert s["val_iou_background"] == pytest.approx(8 / 12) and s["val_miou"] == pytest.approx(8 / 12)
    assert s["val_dice_mean"] == pytest.approx((16 / 20 + 16 / 20) / 2)


def _threshold_net() -> torch.nn.Module:
    """Fixed 1x1x1 convolution: class-0 logit 0.5, class-1 logit = the image (so class 1 where image > 0.5)."""
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.5, 0.0]))
    return conv


def test_validate_scores_every_case_with_a_fixed_network() -> None:
    net = _threshold_net()
    run = CaseInference(net, net, (4, 4, 4), InferenceConfig(), torch.device("cpu"), Precision(None, False), 2)
    truth = np.zeros((8, 8, 4), np.uint8)
    truth[2:6, 2:6, 1:3] = 1  # 32 voxels
    c1 = _volume_item("c1", truth, index=0)
    c1["image"][0, 6, 6, 1] = 1.0  # one bright voxel outside the organ: a false positive
    c2 = _volume_item("c2", truth, index=1)
    c2["image"][0, 2, 2, 1] = 0.0  # one organ voxel dark: a false negative
    result = validate(run, [c1, c2], OrganScorer({"organ": 1}, 2, FirstLogitMean()), n_views=1)
    assert [r["case"] for r in result.rows] == ["c1", "c2"]
    assert result.rows[0]["dice_organ"] == pytest.approx(64 / 65) and result.rows[0]["iou_organ"] == pytest.approx(32 / 33)
    assert result.rows[1]["dice_organ"] == pytest.approx(62 / 63) and result.rows[1]["iou_organ"] == pytest.approx(31 / 32)
    assert result.rows[0]["val_loss"] == pytest.approx(0.5)  # blending constant logits keeps them
    assert result.summary["val_dice_organ"] == pytest.approx((64 / 65 + 62 / 63) / 2)
    assert [v[0] for v in result.views] == [0]  # only cases with index < n_views
    assert not net.training


def test_validate_keeps_views_of_the_worst_cases_worst_first() -> None:
    net = _threshold_net()
    run = CaseInference(net, net, (4, 4, 4), InferenceConfig(), torch.device("cpu"), Precision(None, False), 2)
    truth = np.zeros((8, 8, 4), np.uint8)
    truth[2:6, 2:6, 1:3] = 1  # 32 voxels
    cases = []
    for index, dark in enumerate((0, 6, 2, 12, 1)):  # organ voxels darkened per case: false negatives
        item = _volume_item(f"c{index}", truth, index=index)
        rows, cols = np.unravel_index(np.arange(dark), (4, 4))
        item["image"][0, 2 + rows, 2 + cols, 1] = 0.0
        cases.append(item)
    result = validate(run, cases, OrganScorer({"organ": 1}, 2, FirstLogitMean()), n_views=2)
    assert [v[0] for v in result.views] == [0, 1]  # the first two of the split
    assert [w[0] for w in result.worst] == [3, 1]  # 12 then 6 voxels missed
    assert result.worst[0][1] == pytest.approx(result.rows[3]["dice_organ"]) and result.worst[0][1] < result.worst[1][1]
    assert int(result.worst[0][4].sum()) < int(result.worst[1][4].sum())  # each view is its own case's prediction
    assert validate(run, cases, OrganScorer({"organ": 1}, 2, FirstLogitMean())).worst == []


def test_validate_drops_the_confusion_matrix_from_image_rows() -> None:
    net = torch.nn.Conv2d(3, 2, kernel_size=1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([0.0, 1.0]))  # every pixel class 1
    run = CaseInference(net, net, (4, 4), InferenceConfig(), torch.device("cpu"), Precision(None, False), 2)
    truth = np.zeros((4, 4), np.int64)
    truth[:, :2] = 1
    result = validate(run, [_image_item("i1", truth)], PixelScorer({"bg": 0, "fg": 1}, 2, FirstLogitMean()))
    assert CM_KEY not in result.rows[0]
    assert result.summary["val_pixel_accuracy"] == pytest.approx(0.5) and result.summary["val_iou_fg"] == pytest.approx(0.5)
    assert result.summary["val_iou_bg"] == 0.0 and result.views == []
