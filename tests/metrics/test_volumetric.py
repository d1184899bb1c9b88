"""Tests for medseg.metrics.volumetric: hand-computed cases, analytic distances, MONAI agreement, edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    DiceMetric,
    compute_average_surface_distance,
    compute_hausdorff_distance,
    compute_surface_dice,
)
from scipy import ndimage

from medseg.metrics.volumetric import (
    METRICS,
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


def box(shape: tuple[int, ...], *ranges: tuple[int, int]) -> np.ndarray:
    """Boolean array of ``shape`` that is True on the half-open box ``ranges``."""
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(a, b) for a, b in ranges)] = True
    return out


def ball(shape: tuple[int, ...], center: tuple[float, ...], radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``center`` (voxel coordinates), in mm."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, spacing))
    return d2 <= radius_mm**2


def blob(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random smooth blob(s): thresholded smoothed noise."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.52


# ----------------------------------------------------------------------------------------------- overlap


def test_overlap_metrics_on_half_overlapping_cubes() -> None:
    pred = box((10, 10, 10), (2, 6), (2, 6), (2, 6))  # 64 voxels
    truth = box((10, 10, 10), (4, 8), (2, 6), (2, 6))  # 64 voxels, 32 shared
    assert dice(pred, truth) == pytest.approx(2 * 32 / 128)
    assert iou(pred, truth) == pytest.approx(32 / 96)
    assert precision(pred, truth) == pytest.approx(0.5)
    assert recall(pred, truth) == pytest.approx(0.5)


def test_precision_and_recall_differ_when_prediction_contains_truth() -> None:
    pred = box((8, 8, 8), (0, 4), (0, 4), (0, 4))  # 64
    truth = box((8, 8, 8), (0, 4), (0, 4), (0, 2))  # 32, inside pred
    assert precision(pred, truth) == pytest.approx(0.5)
    assert recall(pred, truth) == pytest.approx(1.0)
    assert dice(pred, truth) == pytest.approx(64 / 96)


def test_pixel_accuracy_counts_background_too() -> None:
    pred = np.array([[0, 1, 2], [2, 2, 0]])
    truth = np.array([[0, 1, 1], [2, 0, 0]])
    assert pixel_accuracy(pred, truth) == pytest.approx(4 / 6)


def test_dice_matches_monai_dice_metric_on_random_blobs() -> None:
    for seed in range(3):
        p, t = blob((24, 24, 16), seed), blob((24, 24, 16), seed + 50)
        ref = DiceMetric(include_background=True)(
            torch.from_numpy(p[None, None].astype(np.float32)), torch.from_numpy(t[None, None].astype(np.float32))
        )
        assert dice(p, t) == pytest.approx(ref.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- volume


def test_volume_ml_uses_voxel_volume() -> None:
    mask = box((10, 10, 10), (0, 4), (0, 4), (0, 4))  # 64 voxels
    assert volume_ml(mask, (0.5, 0.5, 2.0)) == pytest.approx(64 * 0.5 / 1000)
    assert volume_ml(mask[0], (0.5, 2.0)) == pytest.approx(16 * 1.0 / 1000)  # 2D: one 1 mm slice


def test_volume_error_absolute_and_relative() -> None:
    truth = box((10, 10, 10), (0, 4), (0, 4), (0, 4))  # 64 voxels -> 0.128 ml at 2 mm^3
    pred = box((10, 10, 10), (0, 4), (0, 4), (0, 5))  # 80 voxels -> 0.160 ml
    abs_ml, rel = volume_error(pred, truth, (1.0, 1.0, 2.0))
    assert abs_ml == pytest.approx(0.032)
    assert rel == pytest.approx(0.25)
    assert volume_error(truth, pred, (1.0, 1.0, 2.0))[1] == pytest.approx(16 / 80)  # unsigned


# ----------------------------------------------------------------------------------------------- surfaces


def test_surface_is_face_connected_erosion_unless_full_connectivity_asked() -> None:
    square = box((7, 7), (1, 6), (1, 6))
    square[1, 1] = False  # notch a corner: (2, 2) now touches background only diagonally
    face = surface_voxels(square)
    full = surface_voxels(square, connectivity=2)
    assert not face[2, 2] and full[2, 2]
    assert full.sum() == face.sum() + 1
    assert surface_voxels(box((5, 5, 5), (2, 3), (2, 3), (2, 3))).sum() == 1  # a voxel is its own surface


def test_disjoint_two_voxel_cubes_shifted_along_the_3mm_axis() -> None:
    # Two 2x2x2 cubes, k voxels apart along axis 2. Every voxel is a surface voxel. From each cube, the
    # near face is (k-1) voxels from the other cube's near face, the far face k voxels: distances are
    # four of (k-1) and four of k per direction. HD95 = k (both top values are k), ASSD = k - 0.5.
    k, spacing = 3, (1.0, 1.0, 3.0)
    truth = box((6, 6, 12), (2, 4), (2, 4), (2, 4))
    pred = box((6, 6, 12), (2, 4), (2, 4), (2 + k, 4 + k))
    assert hd95(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(k)
    assert assd(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(k - 0.5)
    assert hd95(pred, truth, spacing) == pytest.approx(3.0 * k)
    assert assd(pred, truth, spacing) == pytest.approx(3.0 * (k - 0.5))
    # the same shift along a 1 mm axis is unaffected by the 3 mm spacing of another axis
    pred_y = box((6, 12, 6), (2, 4), (2 + k, 4 + k), (2, 4))
    truth_y = box((6, 12, 6), (2, 4), (2, 4), (2, 4))
    assert hd95(pred_y, truth_y, (1.0, 1.0, 3.0)) == pytest.approx(k)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_shifted_cube_hd95_is_the_shift_in_mm(k: int) -> None:
    # Translating the pred surface back by k maps it onto the truth surface, so no distance exceeds the
    # shift; the pred's far face (n^2 of n^3-(n-2)^3 surface voxels, > 5%) is exactly the shift away.
    n, spacing = 6, (0.7, 1.0, 2.5)
    truth = box((16, 16, 16), (3, 3 + n), (3, 3 + n), (3, 3 + n))
    for axis in range(3):
        pred = np.roll(truth, k, axis=axis)
        d_pt, d_tp = surface_distances(pred, truth, spacing)
        assert d_pt.max() == pytest.approx(k * spacing[axis])
        assert hd95(pred, truth, spacing) == pytest.approx(k * spacing[axis])


def test_nested_cubes_hd95_is_max_of_directed_percentiles_not_pooled() -> None:
    # Inner cube of side n inside an outer cube of side n + 2. Inner surface (6n^2-12n+8 voxels) is 1 from
    # the outer surface. Outer surface: 6n^2 face voxels at 1, 12n edge voxels at sqrt(2), 8 corners at
    # sqrt(3) from the inner surface.
    n = 4
    outer = box((10, 10, 10), (2, 4 + n), (2, 4 + n), (2, 4 + n))
    inner = box((10, 10, 10), (3, 3 + n), (3, 3 + n), (3, 3 + n))
    n_in, n_face, n_edge, n_corner = 6 * n**2 - 12 * n + 8, 6 * n**2, 12 * n, 8
    outer_d = np.sort(np.r_[np.ones(n_face), np.full(n_edge, math.sqrt(2)), np.full(n_corner, math.sqrt(3))])
    directed = np.percentile(outer_d, 95)  # 1.414 + 0.45 * (1.732 - 1.414) ~ 1.557
    pooled = np.percentile(np.r_[np.ones(n_in), outer_d], 95)  # sqrt(2)
    assert directed == pytest.approx(math.sqrt(2) + 0.45 * (math.sqrt(3) - math.sqrt(2)))
    assert hd95(inner, outer, (1, 1, 1)) == pytest.approx(directed)
    assert hd95(inner, outer, (1, 1, 1)) != pytest.approx(pooled)
    total = n_in + n_face + n_edge + n_corner
    expected_assd = (n_in + n_face + n_edge * math.sqrt(2) + n_corner * math.sqrt(3)) / total
    assert assd(inner, outer, (1, 1, 1)) == pytest.approx(expected_assd)
    assert nsd(inner, outer, (1, 1, 1), tolerance_mm=1.0) == pytest.approx((n_in + n_face) / total)
    assert nsd(inner, outer, (1, 1, 1), tolerance_mm=1.5) == pytest.approx((n_in + n_face + n_edge) / total)
    assert nsd(inner, outer, (1, 1, 1), tolerance_mm=1.8) == pytest.approx(1.0)


def test_concentric_spheres_in_mm_with_anisotropic_spacing() -> None:
    # Balls of radius 8 mm and 11 mm about the same point, on a (1, 1, 2) mm grid: surfaces are ~3 mm
    # apart. Counting in voxels along the 2 mm axis would give about half that there.
    spacing = (1.0, 1.0, 2.0)
    shape, centre = (30, 30, 15), (15.0, 15.0, 7.0)
    small, large = ball(shape, centre, 8.0, spacing), ball(shape, centre, 11.0, spacing)
    assert hd95(small, large, spacing) == pytest.approx(3.0, abs=1.0)
    assert assd(small, large, spacing) == pytest.approx(3.0, abs=0.6)
    assert dice(small, large) == pytest.approx(2 * 8**3 / (8**3 + 11**3), abs=0.03)
    assert volume_ml(large, spacing) == pytest.approx(4 / 3 * math.pi * 11**3 / 1000, rel=0.05)
    assert nsd(small, large, spacing, tolerance_mm=1.0) < 0.2 < 0.95 < nsd(small, large, spacing, tolerance_mm=4.5)


def test_surface_distances_equal_distance_transform_of_the_other_surface() -> None:
    # The KD-tree distances are those of distance_transform_edt(~surface, sampling=spacing) read at the
    # other mask's surface voxels.
    p, t = blob((22, 20, 12), 5), blob((22, 20, 12), 6)
    spacing = (0.7, 1.3, 3.0)
    d_pt, d_tp = surface_distances(p, t, spacing)
    sp_, st_ = surface_voxels(p), surface_voxels(t)
    np.testing.assert_allclose(d_pt, ndimage.distance_transform_edt(~st_, sampling=spacing)[sp_], rtol=1e-12)
    np.testing.assert_allclose(d_tp, ndimage.distance_transform_edt(~sp_, sampling=spacing)[st_], rtol=1e-12)


def test_cropping_to_the_union_is_exact() -> None:
    # Masks touching the array border, and the same masks padded with background, give the same numbers:
    # the surface treats beyond-the-border as background, and the crop keeps every surface voxel.
    p, t = blob((20, 18, 12), 1), blob((20, 18, 12), 2)
    assert p[0].any() or p[-1].any()
    pad = ((5, 7), (3, 9), (4, 2))
    pp, tp = np.pad(p, pad), np.pad(t, pad)
    spacing = (0.8, 1.2, 2.5)
    for fn in (hd95, assd):
        assert fn(pp, tp, spacing) == pytest.approx(fn(p, t, spacing), rel=1e-12)
    assert nsd(pp, tp, spacing, 2.0) == pytest.approx(nsd(p, t, spacing, 2.0), rel=1e-12)


@pytest.mark.parametrize(
    ("shape", "spacing"), [((28, 26, 14), (0.8, 1.1, 3.0)), ((48, 40), (0.5, 1.5)), ((20, 20, 20), (1.0, 1.0, 1.0))]
)
def test_surface_metrics_match_monai_on_random_blobs(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    # Same conventions as MONAI (face-connected erosion edges, exact Euclidean distances, HD95 = max of the
    # directed percentiles, pooled ASSD, per-voxel NSD); MONAI computes in float32, hence rel=1e-5.
    for seed in range(2):
        p, t = blob(shape, 10 + seed), blob(shape, 20 + seed)
        pt = torch.from_numpy(p[None, None].astype(np.float32))
        tt = torch.from_numpy(t[None, None].astype(np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_hd = compute_hausdorff_distance(pt, tt, include_background=True, percentile=95, spacing=spacing)
            ref_asd = compute_average_surface_distance(pt, tt, include_background=True, symmetric=True, spacing=spacing)
            ref_nsd = compute_surface_dice(pt, tt, [2.0], include_background=True, spacing=spacing)
        assert hd95(p, t, spacing) == pytest.approx(ref_hd.item(), rel=1e-5)
        assert assd(p, t, spacing) == pytest.approx(ref_asd.item(), rel=1e-5)
        assert nsd(p, t, spacing, 2.0) == pytest.approx(ref_nsd.item(), rel=1e-5)


def test_single_voxel_masks() -> None:
    spacing = (1.0, 1.0, 2.5)
    pred = box((5, 5, 8), (2, 3), (2, 3), (2, 3))
    truth = box((5, 5, 8), (2, 3), (2, 3), (5, 6))
    assert dice(pred, truth) == 0.0
    assert hd95(pred, truth, spacing) == pytest.approx(7.5)
    assert assd(pred, truth, spacing) == pytest.approx(7.5)
    assert nsd(pred, truth, spacing, tolerance_mm=7.5) == 1.0
    assert nsd(pred, truth, spacing, tolerance_mm=7.4) == 0.0
    assert hd95(pred, pred, spacing) == 0.0


def test_2d_square_shift() -> None:
    truth = box((12, 12), (2, 7), (2, 7))
    pred = box((12, 12), (2, 7), (4, 9))
    assert dice(pred, truth) == pytest.approx(2 * 15 / 50)
    assert hd95(pred, truth, (0.5, 2.0)) == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------------- edge cases


def test_both_empty() -> None:
    empty = np.zeros((6, 6, 6), dtype=bool)
    spacing = (1.0, 1.0, 1.0)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert precision(empty, empty) == 1.0 and recall(empty, empty) == 1.0
    assert math.isnan(hd95(empty, empty, spacing)) and math.isnan(assd(empty, empty, spacing))
    assert nsd(empty, empty, spacing, 2.0) == 1.0
    assert volume_error(empty, empty, spacing) == (0.0, 0.0)


@pytest.mark.parametrize("pred_empty", [True, False])
def test_exactly_one_empty(pred_empty: bool) -> None:
    mask = box((6, 6, 6), (1, 4), (1, 4), (1, 4))
    empty = np.zeros_like(mask)
    pred, truth = (empty, mask) if pred_empty else (mask, empty)
    spacing = (1.0, 1.0, 1.0)
    assert dice(pred, truth) == 0.0 and iou(pred, truth) == 0.0
    assert precision(pred, truth) == 0.0 and recall(pred, truth) == 0.0
    assert math.isnan(hd95(pred, truth, spacing)) and math.isnan(assd(pred, truth, spacing))
    assert nsd(pred, truth, spacing, 2.0) == 0.0
    abs_ml, rel = volume_error(pred, truth, spacing)
    assert abs_ml == pytest.approx(27 / 1000)
    if pred_empty:
        assert rel == pytest.approx(1.0)
    else:
        assert math.isnan(rel)  # relative to an empty truth: undefined


def test_shape_and_spacing_errors() -> None:
    a, b = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, b)
    with pytest.raises(ValueError, match="shape"):
        hd95(a, b, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        volume_ml(a, (1, 0, 1))


# ----------------------------------------------------------------------------------------------- per class


def test_per_class_metrics() -> None:
    label_map = {"background": 0, "liver": 1, "tumor": 2, "vessel": 3}
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[1:9, 1:9, 1:9] = 1
    truth[3:5, 3:5, 3:5] = 2
    pred = truth.copy()
    pred[3:5, 3:5, 3:5] = 1  # tumour missed, absorbed into liver
    pred[9, 1:9, 1:9] = 1  # liver one slice too thick
    spacing = (1.0, 1.0, 2.0)
    out = per_class_metrics(pred, truth, label_map, spacing, metrics=tuple(METRICS), tolerance_mm=1.0)
    assert set(out) == {"liver", "tumor", "vessel"}
    liver_p, liver_t = pred == 1, truth == 1
    for name, fn in {"dice": dice, "iou": iou, "precision": precision, "recall": recall}.items():
        assert out["liver"][name] == pytest.approx(fn(liver_p, liver_t))
    assert out["liver"]["hd95"] == pytest.approx(hd95(liver_p, liver_t, spacing))
    assert out["liver"]["nsd"] == pytest.approx(nsd(liver_p, liver_t, spacing, 1.0))
    assert out["liver"]["volume_pred_ml"] == pytest.approx((512 + 64) * 2 / 1000)
    assert out["liver"]["volume_truth_ml"] == pytest.approx((512 - 8) * 2 / 1000)
    assert out["liver"]["volume_abs_error_ml"] == pytest.approx(72 * 2 / 1000)
    assert out["tumor"]["dice"] == 0.0 and math.isnan(out["tumor"]["hd95"]) and out["tumor"]["nsd"] == 0.0
    assert out["vessel"]["dice"] == 1.0 and math.isnan(out["vessel"]["assd"]) and out["vessel"]["nsd"] == 1.0
    assert per_class_metrics(pred, truth, label_map, spacing)["liver"].keys() == {"dice", "iou"}


def test_per_class_metrics_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        per_class_metrics(np.zeros((3, 3)), np.zeros((3, 4)), {"a": 1}, (1, 1))
    with pytest.raises(KeyError, match="valid names"):
        per_class_metrics(np.zeros((3, 3)), np.zeros((3, 3)), {"a": 1}, (1, 1), metrics=("dsc",))
