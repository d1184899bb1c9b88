"""Confusion-matrix metrics for semantic segmentation of natural images (pure numpy functions).

Natural-image benchmarks (PASCAL VOC, Cityscapes, CamVid) pool pixels over the whole evaluation set:
one confusion matrix over all images, then per class ``IoU = TP / (TP + FP + FN)`` and
``Dice = 2 TP / (2 TP + FP + FN)``, mIoU the mean IoU over classes, pixel accuracy ``trace / total``.
Pixels whose ground truth is ``ignore_index`` (void) are left out entirely, whatever was predicted there;
void may be a value of the label map (SegNet CamVid's 11) as long as it is above every class, so it is no
row or column of the matrix (``Manifest.class_labels`` gives the classes that are).
A class absent from both prediction and ground truth has IoU = Dice = NaN and is left out of the means.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike


def confusion_matrix(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts, rows = ground truth, columns = prediction.

    Raises ``ValueError`` if shapes differ or a non-void value is outside ``[0, num_classes)``.
    """
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"prediction size {pred.size} does not match ground-truth size {truth.size}")
    if ignore_index is not None:
        keep = truth != ignore_index
        pred, truth = pred[keep], truth[keep]
    for name, arr in (("prediction", pred), ("ground truth", truth)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has values outside [0, {num_classes})")
    flat = truth.astype(np.int64) * num_classes + pred.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def pixel_accuracy(cm: np.ndarray) -> float:
    """Share of (non-void) pixels predicted correctly; NaN without pixels."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """``TP / (TP + FP + FN)`` per class; NaN where the class is in neither prediction nor truth."""
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def dice_per_class(cm: np.ndarray) -> np.ndarray:
    """``2 TP / (2 TP + FP + FN)`` per class; NaN where the class is in neither prediction nor truth."""
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def nanmean(values: ArrayLike) -> float:
    """Mean of the finite values; NaN if there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def cm_scores(cm: np.ndarray, labels: Mapping[str, int], prefix: str = "") -> dict[str, float]:
    """Pixel accuracy, per-class IoU / Dice by name, mIoU (also ``iou_mean``) and mean Dice of one matrix.

    The one scoring of confusion matrices: training-time validation (``val_`` prefix), ``medseg evaluate``
    on images and its MLflow metrics all use it.
    """
    iou, dice = iou_per_class(cm), dice_per_class(cm)
    out = {f"{prefix}pixel_accuracy": pixel_accuracy(cm)}
    for name, value in labels.items():
        out[f"{prefix}dice_{name}"] = float(dice[value])
        out[f"{prefix}iou_{name}"] = float(iou[value])
    idx = list(labels.values())
    out[f"{prefix}miou"] = out[f"{prefix}iou_mean"] = nanmean(iou[idx])
    out[f"{prefix}dice_mean"] = nanmean(dice[idx])
    return out
