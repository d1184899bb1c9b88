"""Confusion-matrix metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics.confusion import cm_scores, confusion_matrix, dice_per_class, iou_per_class, nanmean, pixel_accuracy

TRUTH = np.array([[0, 0, 1, 1],
                  [0, 2, 1, 255]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 0, 2]])


def test_hand_computed_scores() -> None:
    cm = confusion_matrix(PRED, TRUTH, 4, ignore_index=255)
    # rows truth, cols pred: truth 0 -> pred 0,1,0 ; truth 1 -> 1,1,0 ; truth 2 -> 2 ; void left out
    assert cm.tolist() == [[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert pixel_accuracy(cm) == pytest.approx(5 / 7)
    iou, dice = iou_per_class(cm), dice_per_class(cm)
    assert iou[:3] == pytest.approx([2 / 4, 2 / 4, 1.0]) and math.isnan(iou[3])  # class 3: absent in both
    assert dice[:3] == pytest.approx([4 / 6, 4 / 6, 1.0]) and math.isnan(dice[3])
    assert nanmean(iou) == pytest.approx(2 / 3)


def test_predictions_on_void_pixels_do_not_count() -> None:
    other = PRED.copy()
    other[1, 3] = 0
    assert np.array_equal(confusion_matrix(PRED, TRUTH, 4, 255), confusion_matrix(other, TRUTH, 4, 255))


def test_values_outside_the_classes_are_errors() -> None:
    with pytest.raises(ValueError, match="ground truth has values outside"):
        confusion_matrix(PRED, TRUTH, 4)  # 255 without ignore_index
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(PRED[:, :2], TRUTH, 4, 255)


def test_void_value_of_the_label_map_is_neither_a_row_nor_a_scored_class() -> None:
    # SegNet CamVid style: void is the label map's value 3, just above the classes 0..2 (the network's outputs)
    truth = np.where(TRUTH == 255, 3, TRUTH)
    cm = confusion_matrix(PRED, truth, 3, ignore_index=3)
    assert cm.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]
    scores = cm_scores(cm, {"background": 0, "a": 1, "b": 2})
    assert not [k for k in scores if "void" in k]
    assert scores["miou"] == pytest.approx((2 / 4 + 2 / 4 + 1.0) / 3) and scores["pixel_accuracy"] == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="ground truth has values outside"):
        confusion_matrix(PRED, truth, 3)  # void not declared: it is no class of a 3-output network


def test_nanmean_skips_nan_and_inf() -> None:
    assert nanmean([1.0, float("nan"), 3.0]) == 2.0 and nanmean(np.array([[1.0], [float("inf")]])) == 1.0
    assert math.isnan(nanmean([])) and math.isnan(nanmean([float("nan")] * 3))
