"""Post-processing of label maps by config: small components out, largest component per organ, holes filled.

Runs in the input scan's voxel grid (after inversion), per organ label. Hole filling is MONAI's
``FillHoles``. Connected components use ``scipy.ndimage.label``: MONAI's ``KeepLargestConnectedComponent``
and ``RemoveSmallObjects`` need scikit-image on the CPU, which medseg does not depend on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from monai.transforms import FillHoles
from scipy import ndimage

from medseg.config import InferenceConfig


def is_enabled(cfg: InferenceConfig) -> bool:
    """True if any post-processing step is switched on."""
    return bool(cfg.keep_largest_component or cfg.min_component_voxels or cfg.min_component_ml or cfg.fill_holes)


def min_voxels(cfg: InferenceConfig, voxel_ml: float) -> int:
    """Smallest component kept, in voxels: the larger of the voxel and the ml thresholds."""
    by_ml = int(np.ceil(cfg.min_component_ml / voxel_ml)) if cfg.min_component_ml > 0 else 0
    return max(cfg.min_component_voxels, by_ml)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component labels (full 3D connectivity, as MONAI's default) and each component's size (index 0 unused)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    comp, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    sizes[0] = 0
    return comp, sizes


def postprocess(labels: np.ndarray, cfg: InferenceConfig, voxel_ml: float, label_values: Iterable[int]) -> np.ndarray:
    """Apply the configured steps to each organ of ``labels`` (in place where possible); returns the result.

    Order: remove small components, keep the largest, fill holes (so a hole is filled with its own organ).
    Removed voxels become background (0).
    """
    if not is_enabled(cfg):
        return labels
    out = labels
    smallest = min_voxels(cfg, voxel_ml)
    values = [int(v) for v in label_values if int(v) != 0]
    for value in values:
        mask = out == value
        if not mask.any() or not (smallest or cfg.keep_largest_component):
            continue
        comp, sizes = _components(mask)
        keep = sizes >= max(smallest, 1)
        if cfg.keep_largest_component and sizes.max() > 0:
            keep &= sizes == sizes.max()
            keep[np.flatnonzero(keep)[1:]] = False  # ties: one component only
        out[mask & ~keep[comp]] = 0
    if cfg.fill_holes:
        filled = FillHoles(applied_labels=values)(out[None])
        out = np.asarray(filled)[0].astype(labels.dtype, copy=False)
    return out
