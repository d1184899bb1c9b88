"""Property-based tests (hypothesis) of medseg's metric functions, asserting what their docstrings promise.

``medseg.metrics.volumetric``: Dice/IoU/precision/recall in [0, 1], symmetric where they should be, 1 on
identical masks, Dice = 2 IoU / (1 + IoU) and the harmonic mean of precision and recall, the empty-mask
conventions, invariance of voxel counts to permuting voxels; surface distances 0 on identical masks, HD95 <= HD,
ASSD <= HD, NSD in [0, 1] and monotone in the tolerance, invariance to translation and linearity in the spacing.
``medseg.metrics.confusion``: counts, void handling, pooling, and per-class IoU/Dice/mIoU/pixel accuracy agreeing
with the volumetric functions on the one-class masks.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medseg.metrics.confusion import (
    cm_scores,
    confusion_matrix,
    dice_per_class,
    iou_per_class,
)
from medseg.metrics.confusion import (
    pixel_accuracy as cm_pixel_accuracy,
)
from medseg.metrics.volumetric import (
    assd,
    dice,
    hd95,
    iou,
    nsd,
    per_class_metrics,
    pixel_accuracy,
    precision,
    recall,
    surface_distances,
    surface_voxels,
    volume_error,
    volume_ml,
)

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=30, deadline=None)

shapes = st.one_of(st.tuples(st.integers(1, 9), st.integers(1, 9)), st.tuples(*[st.integers(1, 6)] * 3))


@st.composite
def mask_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(pred, truth, spacing): random masks; half the time truth is pred with a few voxels flipped."""
    shape = draw(shapes)
    pred = draw(arrays(np.bool_, shape))
    if draw(st.booleans()):
        flips = draw(arrays(np.bool_, shape, elements=st.sampled_from([False, False, False, True])))
        truth = pred ^ flips
    else:
        truth = draw(arrays(np.bool_, shape))
    spacing = tuple(draw(st.floats(0.3, 4.0)) for _ in shape)
    return pred, truth, spacing


def _hd(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """The (100th percentile) Hausdorff distance from the directed surface distances."""
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    return float(max(d_pt.max(), d_tp.max()))


@FAST
@given(mask_pairs())
def test_overlap_metrics_bounds_symmetry_and_relations(pair: tuple) -> None:
    pred, truth, _ = pair
    d, j, p, r = dice(pred, truth), iou(pred, truth), precision(pred, truth), recall(pred, truth)
    for v in (d, j, p, r):
        assert 0.0 <= v <= 1.0
    assert d == dice(truth, pred) and j == iou(truth, pred)
    assert p == recall(truth, pred) and r == precision(truth, pred)
    assert math.isclose(d, 2 * j / (1 + j), rel_tol=1e-12, abs_tol=1e-15) and j <= d
    if pred.any() and truth.any():
        assert math.isclose(d, 2 * p * r / (p + r), rel_tol=1e-12) if p + r > 0 else d == 0.0
    elif pred.any() != truth.any():  # exactly one empty
        assert d == j == p == r == 0.0
    else:
        assert d == j == p == r == 1.0


@FAST
@given(mask_pairs())
def test_identical_masks_score_perfectly(pair: tuple) -> None:
    mask, _, spacing = pair
    assert dice(mask, mask) == iou(mask, mask) == precision(mask, mask) == recall(mask, mask) == 1.0
    assert pixel_accuracy(mask.astype(int), mask.astype(int)) == 1.0
    d_pt, d_tp = surface_distances(mask, mask, spacing)
    assert np.all(d_pt == 0) and np.all(d_tp == 0) and d_pt.size == np.count_nonzero(surface_voxels(mask))
    assert nsd(mask, mask, spacing, 0.0) == 1.0
    assert volume_error(mask, mask, spacing) == (0.0, 0.0)
    if mask.any():
        assert hd95(mask, mask, spacing) == 0.0 and assd(mask, mask, spacing) == 0.0
    else:
        assert math.isnan(hd95(mask, mask, spacing)) and math.isnan(assd(mask, mask, spacing))


@FAST
@given(mask_pairs(), st.randoms(use_true_random=False))
def test_voxel_count_metrics_are_invariant_to_permuting_voxels(pair: tuple, rnd) -> None:
    pred, truth, spacing = pair
    perm = np.array(rnd.sample(range(pred.size), pred.size), dtype=int)
    pp, tp = pred.ravel()[perm].reshape(pred.shape), truth.ravel()[perm].reshape(truth.shape)
    for f in (dice, iou, precision, recall):
        assert f(pp, tp) == f(pred, truth)
    assert pixel_accuracy(pp.astype(int), tp.astype(int)) == pixel_accuracy(pred.astype(int), truth.astype(int))
    assert volume_ml(pp, spacing) == volume_ml(pred, spacing)
    assert np.array_equal(volume_error(pp, tp, spacing), volume_error(pred, truth, spacing), equal_nan=True)


@FAST
@given(mask_pairs())
def test_volumes(pair: tuple) -> None:
    pred, truth, spacing = pair
    assert math.isclose(volume_ml(pred, spacing), np.count_nonzero(pred) * np.prod(spacing) / 1000, rel_tol=1e-12)
    abs_ml, rel = volume_error(pred, truth, spacing)
    assert abs_ml == volume_error(truth, pred, spacing)[0] >= 0.0
    vt = volume_ml(truth, spacing)
    if vt > 0:
        assert math.isclose(rel, abs_ml / vt, rel_tol=1e-12)
    else:
        assert rel == 0.0 if not pred.any() else math.isnan(rel)


@SLOW
@given(mask_pairs(), st.floats(0.0, 10.0), st.floats(0.0, 10.0))
def test_surface_distance_metrics(pair: tuple, tol_a: float, tol_b: float) -> None:
    pred, truth, spacing = pair
    h95, h95_swapped, a = hd95(pred, truth, spacing), hd95(truth, pred, spacing), assd(pred, truth, spacing)
    lo, hi = sorted((tol_a, tol_b))
    if not (pred.any() and truth.any()):
        assert math.isnan(h95) and math.isnan(a)
        assert nsd(pred, truth, spacing, lo) == (1.0 if pred.any() == truth.any() else 0.0)
        return
    hd = _hd(pred, truth, spacing)
    assert 0.0 <= h95 <= hd + 1e-12 and 0.0 <= a <= hd + 1e-12
    assert h95 == h95_swapped and math.isclose(a, assd(truth, pred, spacing), rel_tol=1e-12)
    n_lo, n_hi = nsd(pred, truth, spacing, lo), nsd(pred, truth, spacing, hi)
    assert 0.0 <= n_lo <= n_hi <= 1.0 and n_hi == nsd(truth, pred, spacing, hi)
    assert nsd(pred, truth, spacing, hd) == 1.0
    same_surface = np.array_equal(surface_voxels(pred), surface_voxels(truth))
    assert (hd == 0.0) == same_surface


@SLOW
@given(mask_pairs(), st.tuples(*[st.integers(0, 4)] * 3), st.floats(0.25, 8.0))
def test_surface_distances_under_translation_and_scaling(pair: tuple, offset: tuple, scale: float) -> None:
    """Embedding both masks at an offset in a larger empty array changes nothing (outside the array is
    background); multiplying the spacing by ``scale`` multiplies every distance by it."""
    pred, truth, spacing = pair
    pad = [(o, 4 - o) for o in offset[: pred.ndim]]
    big_p, big_t = np.pad(pred, pad), np.pad(truth, pad)
    scaled = tuple(s * scale for s in spacing)
    for a, b in zip(surface_distances(pred, truth, spacing), surface_distances(big_p, big_t, spacing)):
        assert np.allclose(np.sort(a), np.sort(b), rtol=1e-12)
    for a, b in zip(surface_distances(pred, truth, spacing), surface_distances(pred, truth, scaled)):
        assert np.allclose(np.sort(a) * scale, np.sort(b), rtol=1e-9)
    if pred.any() and truth.any():
        assert math.isclose(hd95(big_p, big_t, spacing), hd95(pred, truth, spacing), rel_tol=1e-12)
        assert math.isclose(hd95(pred, truth, scaled), scale * hd95(pred, truth, spacing), rel_tol=1e-9)


@st.composite
def label_maps(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int | None]:
    """(pred, truth, num_classes, ignore_index): void (if any) is the value num_classes, above every class."""
    shape = draw(shapes)
    k = draw(st.integers(2, 5))
    ignore = draw(st.sampled_from([None, k]))
    top = k if ignore is None else k + 1  # exclusive; void pixels may hold any prediction, void included
    truth = draw(arrays(np.int64, shape, elements=st.integers(0, top - 1)))
    pred = draw(arrays(np.int64, shape, elements=st.integers(0, k - 1)))
    if ignore is not None:
        pred = np.where(truth == ignore, draw(arrays(np.int64, shape, elements=st.integers(0, k))), pred)
    return pred, truth, k, ignore


@FAST
@given(label_maps())
def test_confusion_matrix_counts_and_void(maps: tuple) -> None:
    pred, truth, k, ignore = maps
    cm = confusion_matrix(pred, truth, k, ignore)
    keep = truth != ignore if ignore is not None else np.ones(truth.shape, bool)
    assert cm.shape == (k, k) and cm.dtype == np.int64 and cm.sum() == np.count_nonzero(keep)
    assert np.array_equal(cm.sum(1), np.bincount(truth[keep], minlength=k)[:k])
    assert np.array_equal(cm.sum(0), np.bincount(pred[keep], minlength=k)[:k])
    if ignore is not None:  # what was predicted on void pixels never counts
        other = np.where(keep, pred, (pred + 1) % (k + 1))
        assert np.array_equal(confusion_matrix(other, truth, k, ignore), cm)
    half = truth.size // 2  # pooling over images = summing their matrices
    p1, p2, t1, t2 = pred.ravel()[:half], pred.ravel()[half:], truth.ravel()[:half], truth.ravel()[half:]
    assert np.array_equal(confusion_matrix(p1, t1, k, ignore) + confusion_matrix(p2, t2, k, ignore), cm)


@FAST
@given(label_maps())
def test_confusion_scores_agree_with_volumetric_metrics(maps: tuple) -> None:
    pred, truth, k, ignore = maps
    keep = truth != ignore if ignore is not None else np.ones(truth.shape, bool)
    cm = confusion_matrix(pred, truth, k, ignore)
    ious, dices = iou_per_class(cm), dice_per_class(cm)
    present = []
    for c in range(k):
        p, t = (pred == c) & keep, (truth == c) & keep
        if p.any() or t.any():
            present.append(c)
            assert math.isclose(ious[c], iou(p, t), rel_tol=1e-12) and math.isclose(dices[c], dice(p, t), rel_tol=1e-12)
            assert math.isclose(dices[c], 2 * ious[c] / (1 + ious[c]), rel_tol=1e-12, abs_tol=1e-15)
        else:  # absent from both: NaN here (volumetric.iou/dice give 1.0 by their own convention)
            assert math.isnan(ious[c]) and math.isnan(dices[c]) and iou(p, t) == 1.0
    scores = cm_scores(cm, {f"c{c}": c for c in range(k)})
    if present:
        assert math.isclose(
            scores["miou"],
            float(np.mean([iou((pred == c) & keep, (truth == c) & keep) for c in present])),
            rel_tol=1e-12,
        )
        assert scores["miou"] == scores["iou_mean"] and 0.0 <= scores["miou"] <= scores["dice_mean"] <= 1.0
        assert math.isclose(cm_pixel_accuracy(cm), pixel_accuracy(pred[keep], truth[keep]), rel_tol=1e-12)
    else:
        assert math.isnan(scores["miou"]) and math.isnan(cm_pixel_accuracy(cm))


@FAST
@given(label_maps(), st.randoms(use_true_random=False))
def test_confusion_matrix_is_invariant_to_permuting_pixels(maps: tuple, rnd) -> None:
    pred, truth, k, ignore = maps
    perm = np.array(rnd.sample(range(pred.size), pred.size), dtype=int)
    cm = confusion_matrix(pred.ravel()[perm], truth.ravel()[perm], k, ignore)
    assert np.array_equal(cm, confusion_matrix(pred, truth, k, ignore))


@SLOW
@given(label_maps())
def test_per_class_metrics_equal_the_single_metrics(maps: tuple) -> None:
    pred, truth, k, _ = maps
    truth = np.minimum(truth, k - 1)  # per_class_metrics has no void
    spacing = (0.5,) * pred.ndim
    label_map = {"background": 0, **{f"c{c}": c for c in range(1, k)}}
    names = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "volume_abs_error_ml")
    got = per_class_metrics(pred, truth, label_map, spacing, names, tolerance_mm=1.0)
    assert set(got) == set(label_map) - {"background"}
    for c in range(1, k):
        p, t = pred == c, truth == c
        want = {
            "dice": dice(p, t),
            "iou": iou(p, t),
            "precision": precision(p, t),
            "recall": recall(p, t),
            "hd95": hd95(p, t, spacing),
            "assd": assd(p, t, spacing),
            "nsd": nsd(p, t, spacing, 1.0),
            "volume_abs_error_ml": volume_error(p, t, spacing)[0],
        }
        assert np.array_equal([got[f"c{c}"][m] for m in names], [want[m] for m in names], equal_nan=True)
