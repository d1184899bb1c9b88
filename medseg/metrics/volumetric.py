"""Segmentation metrics as pure functions: numpy masks (+ voxel spacing in mm) in, floats out.

Masks are read as boolean (non-zero = foreground); label maps are integer arrays. Every function takes
2D or 3D arrays; ``spacing`` has one entry per array axis, in millimetres, in the same axis order as the
array. Shapes must match (``ValueError`` otherwise).

Surface conventions (chosen to match MONAI 1.6 ``monai.metrics`` so results can be checked against it):

* The surface of a mask is ``mask XOR binary_erosion(mask)`` with scipy's default structuring element
  (face connectivity: 4 in 2D, 6 in 3D) and background beyond the array border. This is what MONAI's
  ``get_mask_edges`` and MedPy do. It gives a thin surface; full-connectivity erosion would add the
  voxels that touch the background only across an edge or a corner (see ``surface_voxels``).
* Distances are exact Euclidean distances in mm between surface-voxel centres, from each surface voxel of
  one mask to the nearest surface voxel of the other (the values ``distance_transform_edt(~surface,
  sampling=spacing)`` gives there; computed with a KD-tree, see ``surface_distances``).
* HD95 is ``max(p95(pred -> truth), p95(truth -> pred))``: the larger of the two directed 95th
  percentiles (linear interpolation), as MONAI's ``compute_hausdorff_distance(percentile=95)`` and
  DeepMind's ``surface-distance`` compute it. It is *not* the 95th percentile of the pooled distances.
* ASSD is the mean of the pooled distances of both directions (MONAI ``symmetric=True``).
* NSD (Nikolov et al., 2021) is the fraction of surface voxels of both masks that lie within
  ``tolerance_mm`` (inclusive) of the other surface, counted per voxel (MONAI ``use_subvoxels=False``).

Empty masks:

* both empty: Dice = IoU = precision = recall = 1.0, NSD = 1.0, HD95 = ASSD = NaN, volume errors 0.0;
* exactly one empty: Dice = IoU = precision = recall = 0.0, NSD = 0.0, HD95 = ASSD = NaN.

Undefined distances are NaN, not inf, so that inf never enters an average; callers count them separately
(``medseg.metrics.stats.summarize`` reports ``n_nan``). This differs on purpose from MONAI, which gives
inf for HD95/ASSD with one empty mask and NaN for NSD with both empty, and from nnU-Net v2, which gives
Dice NaN when both are empty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np
from scipy import ndimage
from scipy.spatial import KDTree

# Distances and surfaces are computed here with scipy rather than by calling MONAI: MONAI's functions want
# torch tensors with batch/channel axes, warn on empty masks and return inf where we want NaN. The tests
# check these functions against MONAI on random blobs.

__all__ = [
    "METRICS",
    "assd",
    "dice",
    "hd95",
    "iou",
    "nsd",
    "per_class_metrics",
    "pixel_accuracy",
    "precision",
    "recall",
    "surface_distances",
    "surface_voxels",
    "volume_error",
    "volume_ml",
]


# --------------------------------------------------------------------------------------------------
# validation


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both masks as boolean arrays; raise ``ValueError`` if their shapes differ."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground-truth shape {truth.shape}")
    return pred.astype(bool, copy=False), truth.astype(bool, copy=False)


def _check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    """Return ``spacing`` as a float array; raise ``ValueError`` unless it has ``ndim`` positive entries."""
    out = np.asarray(spacing, dtype=float).reshape(-1)
    if out.size != ndim or not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm, one per array axis), got {list(spacing)}")
    return out


# --------------------------------------------------------------------------------------------------
# overlap metrics


def _confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """True positives, false positives and false negatives (voxel counts) of two boolean masks."""
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def _ratio(num: int, den: int) -> float:
    """``num / den``, with 0/0 (both masks empty) defined as 1.0."""
    return 1.0 if den == 0 else num / den


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|P∩T| / (|P| + |T|)`` of two masks.

    Both empty: 1.0. Exactly one empty: 0.0.
    """
    tp, fp, fn = _confusion(*_check_pair(pred, truth))
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard index) ``|P∩T| / |P∪T|`` of two masks.

    Both empty: 1.0. Exactly one empty: 0.0.
    """
    tp, fp, fn = _confusion(*_check_pair(pred, truth))
    return _ratio(tp, tp + fp + fn)


def precision(pred: np.ndarray, truth: np.ndarray) -> float:
    """Voxel precision (positive predictive value) ``|P∩T| / |P|``.

    Both empty: 1.0. Exactly one empty: 0.0 (including an empty prediction, where the ratio is 0/0: an
    empty prediction of a present structure is scored as wrong, like Dice).
    """
    p, t = _check_pair(pred, truth)
    tp, fp, _ = _confusion(p, t)
    if p.any() != t.any():
        return 0.0
    return _ratio(tp, tp + fp)


def recall(pred: np.ndarray, truth: np.ndarray) -> float:
    """Voxel recall (sensitivity) ``|P∩T| / |T|``.

    Both empty: 1.0. Exactly one empty: 0.0 (including an empty ground truth, where the ratio is 0/0).
    """
    p, t = _check_pair(pred, truth)
    tp, _, fn = _confusion(p, t)
    if p.any() != t.any():
        return 0.0
    return _ratio(tp, tp + fn)


def pixel_accuracy(pred_labels: np.ndarray, truth_labels: np.ndarray) -> float:
    """Fraction of voxels whose predicted label equals the true label (background included).

    Returns NaN for zero-size arrays. Raises ``ValueError`` if the shapes differ.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} does not match ground-truth shape {truth_labels.shape}")
    if pred_labels.size == 0:
        return float("nan")
    return float(np.count_nonzero(pred_labels == truth_labels) / pred_labels.size)


# --------------------------------------------------------------------------------------------------
# volumes


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a mask in millilitres: voxel count x voxel volume (mm^3) / 1000.

    A 2D mask is treated as one slice 1 mm thick, so the result is its area in mm^2 / 1000.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    sp = _check_spacing(spacing, mask.ndim)
    return float(np.count_nonzero(mask) * np.prod(sp) / 1000.0)


def volume_error(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Absolute volume error in ml and relative volume error, both unsigned.

    Returns ``(|Vp - Vt|, |Vp - Vt| / Vt)``. Both empty: ``(0.0, 0.0)``. Empty ground truth with a
    non-empty prediction: the relative error is NaN (undefined; not inf, so it is never averaged).
    """
    p, t = _check_pair(pred, truth)
    vp, vt = volume_ml(p, spacing), volume_ml(t, spacing)
    abs_ml = abs(vp - vt)
    if vt == 0.0:
        return abs_ml, 0.0 if vp == 0.0 else float("nan")
    return abs_ml, abs_ml / vt


# --------------------------------------------------------------------------------------------------
# surfaces and surface distances


def surface_voxels(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Boolean surface of a mask: ``mask XOR binary_erosion(mask)``, background beyond the border.

    ``connectivity=1`` (the default, used by every distance metric here, as in MONAI and MedPy) erodes with
    the face-neighbour structure, so a voxel is on the surface if one of its 4 (2D) / 6 (3D) face
    neighbours is background. ``connectivity=mask.ndim`` uses the full 8 / 26 neighbourhood and also
    marks voxels that touch the background only across an edge or corner (a thicker surface).
    A single-voxel mask is its own surface.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _union_bbox(pred: np.ndarray, truth: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of ``pred | truth`` grown by ``margin`` voxels and clipped to the array."""
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, pred.shape))


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(pred surface -> truth surface, truth surface -> pred surface)``.

    Each array has one entry per surface voxel of the first mask: the Euclidean distance (honouring
    anisotropic ``spacing``) from its centre to the nearest surface-voxel centre of the other mask.
    Both empty: two empty arrays. Exactly one empty: the non-empty side's distances are ``inf`` and the
    other array is empty (the metric functions turn this into NaN / 0.0).
    """
    p, t = _check_pair(pred, truth)
    sp = _check_spacing(spacing, p.ndim)
    if not p.any() and not t.any():
        return np.zeros(0), np.zeros(0)
    # Crop to the union's bounding box before finding surfaces, so the erosion never runs over a whole
    # large volume for a small structure. Exact: outside the box is background, as is scipy's border
    # (border_value=0). The 1-voxel margin mirrors MONAI's get_mask_edges crop.
    box = _union_bbox(p, t)
    p_surf, t_surf = surface_voxels(p[box]), surface_voxels(t[box])
    if not p_surf.any() or not t_surf.any():
        return np.full(np.count_nonzero(p_surf), np.inf), np.full(np.count_nonzero(t_surf), np.inf)
    # Nearest-surface-voxel distances with a KD-tree over the surface voxels' mm coordinates, as MONAI does
    # on CPU. This gives exactly the values of distance_transform_edt(~surface, sampling=spacing) read at
    # the other surface (a test checks this), but its cost follows the number of surface voxels, not the box
    # volume. Measured on a 256x256x200 volume (2 shared cores): an organ filling it, HD95 in ~0.5 s
    # instead of ~3 s with the two transforms; a small structure plus stray false-positive voxels in far
    # corners (the box is then the whole volume) ~0.2 s instead of ~2 s.
    p_idx, t_idx = np.argwhere(p_surf), np.argwhere(t_surf)
    return _nearest_mm(p_idx, t_idx, sp), _nearest_mm(t_idx, p_idx, sp)


def _nearest_mm(src: np.ndarray, dst: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel index in ``src`` to the nearest voxel index in ``dst``."""
    _, nearest = KDTree(dst * spacing, leafsize=32).query(src * spacing, k=1)
    # Recompute from the integer index offsets: the KD-tree's distances from absolute mm coordinates carry
    # rounding that depends on where the crop box starts, which could flip an NSD `distance <= tolerance`
    # test for distances that lie exactly on the tolerance (common on a regular grid).
    return np.sqrt(np.sum(((src - dst[nearest]) * spacing) ** 2, axis=1))


def _hd95_from(d_pt: np.ndarray, d_tp: np.ndarray) -> float:
    if d_pt.size == 0 or d_tp.size == 0 or np.isinf(d_pt).any() or np.isinf(d_tp).any():
        return float("nan")
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _assd_from(d_pt: np.ndarray, d_tp: np.ndarray) -> float:
    if d_pt.size == 0 or d_tp.size == 0 or np.isinf(d_pt).any() or np.isinf(d_tp).any():
        return float("nan")
    return float(np.concatenate([d_pt, d_tp]).mean())


def _nsd_from(d_pt: np.ndarray, d_tp: np.ndarray, tolerance_mm: float) -> float:
    if tolerance_mm < 0 or not np.isfinite(tolerance_mm):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    total = d_pt.size + d_tp.size
    if total == 0:
        return 1.0
    return float((np.count_nonzero(d_pt <= tolerance_mm) + np.count_nonzero(d_tp <= tolerance_mm)) / total)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm: the larger of the two directed 95th percentiles.

    Matches MONAI ``compute_hausdorff_distance(percentile=95)``. NaN if either mask is empty.
    """
    return _hd95_from(*surface_distances(pred, truth, spacing))


def assd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm: mean of both directions' distances pooled.

    Matches MONAI ``compute_average_surface_distance(symmetric=True)``. NaN if either mask is empty.
    """
    return _assd_from(*surface_distances(pred, truth, spacing))


def nsd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalized surface Dice (Nikolov et al.) at ``tolerance_mm``, in [0, 1].

    ``(#pred surface voxels within tol of truth surface + #truth surface voxels within tol of pred surface)
    / (#pred surface voxels + #truth surface voxels)``, counting voxels (MONAI ``compute_surface_dice`` with
    ``use_subvoxels=False``). Both empty: 1.0 (MONAI gives NaN). Exactly one empty: 0.0.
    """
    return _nsd_from(*surface_distances(pred, truth, spacing), tolerance_mm)


# --------------------------------------------------------------------------------------------------
# per-class evaluation


class _Pair:
    """One class's prediction/truth masks; computes the surface distances once, on first use."""

    def __init__(self, pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> None:
        self.pred, self.truth, self.spacing, self.tolerance_mm = pred, truth, spacing, tolerance_mm

    @cached_property
    def distances(self) -> tuple[np.ndarray, np.ndarray]:
        return surface_distances(self.pred, self.truth, self.spacing)


METRICS: dict[str, Callable[[_Pair], float]] = {
    "dice": lambda c: dice(c.pred, c.truth),
    "iou": lambda c: iou(c.pred, c.truth),
    "precision": lambda c: precision(c.pred, c.truth),
    "recall": lambda c: recall(c.pred, c.truth),
    "hd95": lambda c: _hd95_from(*c.distances),
    "assd": lambda c: _assd_from(*c.distances),
    "nsd": lambda c: _nsd_from(*c.distances, c.tolerance_mm),
    "volume_pred_ml": lambda c: volume_ml(c.pred, c.spacing),
    "volume_truth_ml": lambda c: volume_ml(c.truth, c.spacing),
    "volume_abs_error_ml": lambda c: volume_error(c.pred, c.truth, c.spacing)[0],
    "volume_rel_error": lambda c: volume_error(c.pred, c.truth, c.spacing)[1],
}
"""Metric names accepted by ``per_class_metrics``, each computed from one class's pair of masks."""


def per_class_metrics(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    label_map: dict[str, int],
    spacing: Sequence[float],
    metrics: Sequence[str] = ("dice", "iou"),
    tolerance_mm: float = 2.0,
) -> dict[str, dict[str, float]]:
    """Named metrics for every foreground class of two integer label maps.

    Returns ``{label_name: {metric_name: value}}`` for every entry of ``label_map`` whose value is not 0
    (0 is background), each computed on ``pred_labels == value`` vs ``truth_labels == value``. Metric names
    are the keys of ``METRICS``; ``tolerance_mm`` is used by ``nsd``. Empty-class conventions are those of
    the single metrics (see the module docstring).

    Raises:
        ValueError: if the label maps differ in shape or ``spacing`` does not fit them.
        KeyError: for an unknown metric name (the message lists the valid names).
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} does not match ground-truth shape {truth_labels.shape}")
    _check_spacing(spacing, pred_labels.ndim)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; valid names: {sorted(METRICS)}")
    results: dict[str, dict[str, float]] = {}
    for name, value in label_map.items():
        if value == 0:
            continue
        pair = _Pair(pred_labels == value, truth_labels == value, spacing, tolerance_mm)
        results[name] = {m: float(METRICS[m](pair)) for m in metrics}
    return results
