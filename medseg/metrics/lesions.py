"""Lesion-wise (instance) detection metrics for small structures such as metastases or MS lesions.

Lesions are the connected components of a mask with full connectivity (26 neighbours in 3D, 8 in 2D),
found with ``scipy.ndimage.label``. Prediction and truth are matched by overlap, in the style of the
MSSEG challenge (Commowick et al., 2018):

* a truth lesion ``t`` is *detected* if some single predicted component ``p`` overlaps it with
  ``|t ∩ p| > 0`` and ``|t ∩ p| / |t| >= min_overlap``;
* a predicted component ``p`` is *correct* if some single truth lesion ``t`` overlaps it with
  ``|t ∩ p| > 0`` and ``|t ∩ p| / |p| >= min_overlap``.

Recall is detected truths / truth lesions, precision is correct predictions / predicted components, and F1
is their harmonic mean. Because matching is not one-to-one:

* a *split* lesion (one truth, two predicted components on it) counts once for recall and both pieces
  count as correct for precision; it shows up as ``count_error`` +1 and in ``n_split``;
* a *merged* lesion (two truths, one predicted component over both) detects both truths and counts once
  as correct for precision; it shows up as ``count_error`` -1 and in ``n_merged``.

With ``min_overlap > 0`` a piece of a split (or a merged component) may fail the fraction test on its own.

Empty cases follow ``medseg.metrics.volumetric``: no lesions on either side gives precision = recall =
F1 = 1.0; lesions on exactly one side gives 0.0 for all three.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["label_lesions", "lesion_metrics"]


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a mask with full connectivity (26 in 3D, 8 in 2D): ``(labels, count)``."""
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, count = ndimage.label(mask, structure=structure)
    return labels, int(count)


def lesion_metrics(pred: np.ndarray, truth: np.ndarray, min_overlap: float = 0.0) -> dict[str, float]:
    """Lesion-wise precision, recall and F1 of a predicted mask against a truth mask (2D or 3D).

    ``min_overlap`` in [0, 1] is the fraction of a lesion that one component of the other mask must cover
    for a match (see the module docstring); 0.0 means any overlap of at least one voxel.

    Returns a dict with ``precision``, ``recall``, ``f1``, ``n_truth``, ``n_pred``, ``n_detected`` (truth
    lesions detected), ``n_correct`` (predicted components that are correct), ``count_error``
    (``n_pred - n_truth``, signed), ``n_split`` (truth lesions overlapped by two or more predicted
    components) and ``n_merged`` (predicted components overlapping two or more truth lesions). Splits and
    merges are counted from any overlap, whatever ``min_overlap`` is.

    Raises:
        ValueError: if the shapes differ or ``min_overlap`` is outside [0, 1].
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground-truth shape {truth.shape}")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    t_lab, n_truth = label_lesions(truth)
    p_lab, n_pred = label_lesions(pred)

    t_size = np.bincount(t_lab.ravel(), minlength=n_truth + 1)
    p_size = np.bincount(p_lab.ravel(), minlength=n_pred + 1)
    # Overlapping (truth, pred) component pairs and their overlap in voxels, from one pass over the volume.
    both = (t_lab > 0) & (p_lab > 0)
    pair_ids, overlap = np.unique(t_lab[both].astype(np.int64) * (n_pred + 1) + p_lab[both], return_counts=True)
    t_ids, p_ids = np.divmod(pair_ids, n_pred + 1)

    t_ok = overlap / t_size[t_ids] >= min_overlap
    p_ok = overlap / p_size[p_ids] >= min_overlap
    n_detected = np.unique(t_ids[t_ok]).size
    n_correct = np.unique(p_ids[p_ok]).size
    n_split = int(np.count_nonzero(np.bincount(t_ids, minlength=n_truth + 1) >= 2))
    n_merged = int(np.count_nonzero(np.bincount(p_ids, minlength=n_pred + 1) >= 2))

    if n_truth == 0 and n_pred == 0:
        prec = rec = f1 = 1.0
    elif n_truth == 0 or n_pred == 0:
        prec = rec = f1 = 0.0
    else:
        prec, rec = n_correct / n_pred, n_detected / n_truth
        f1 = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return {
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(f1),
        "n_truth": float(n_truth),
        "n_pred": float(n_pred),
        "n_detected": float(n_detected),
        "n_correct": float(n_correct),
        "count_error": float(n_pred - n_truth),
        "n_split": float(n_split),
        "n_merged": float(n_merged),
    }
