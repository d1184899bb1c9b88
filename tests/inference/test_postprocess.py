"""Post-processing on constructed label maps: small components, largest component per organ, holes."""

from __future__ import annotations

import numpy as np

from medseg.config import InferenceConfig
from medseg.inference.postprocess import min_voxels, postprocess


def _scene() -> np.ndarray:
    """Organ 1: a 5x5x5 cube (125 voxels) with a 1-voxel hole, plus a 2x2x2 blob (8). Organ 2: two cubes (27, 64)."""
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[2:7, 2:7, 2:7] = 1
    lab[4, 4, 4] = 0  # enclosed hole
    lab[20:22, 20:22, 20:22] = 1
    lab[10:13, 20:23, 2:5] = 2
    lab[20:24, 2:6, 20:24] = 2
    return lab


def test_off_by_default_changes_nothing() -> None:
    lab = _scene()
    assert np.array_equal(postprocess(lab.copy(), InferenceConfig(), 1.0, [1, 2]), lab)


def test_keep_largest_component_per_organ() -> None:
    out = postprocess(_scene(), InferenceConfig(keep_largest_component=True), 1.0, [1, 2])
    assert (out == 1).sum() == 124 and out[20, 20, 20] == 0  # the cube stays, the blob goes
    assert (out == 2).sum() == 64 and out[11, 21, 3] == 0  # per organ: organ 2 keeps its own largest


def test_remove_small_components_by_voxels_and_by_ml() -> None:
    out = postprocess(_scene(), InferenceConfig(min_component_voxels=30), 1.0, [1, 2])
    assert (out == 1).sum() == 124 and (out == 2).sum() == 64
    # 0.5 ml at 8 mm^3 voxels (0.008 ml) is 63 voxels: the 27-voxel cube goes, the 64-voxel one stays
    cfg = InferenceConfig(min_component_ml=0.5)
    assert min_voxels(cfg, 0.008) == 63
    out = postprocess(_scene(), cfg, 0.008, [1, 2])
    assert (out == 2).sum() == 64 and (out == 1).sum() == 124


def test_fill_holes_fills_only_enclosed_holes() -> None:
    out = postprocess(_scene(), InferenceConfig(fill_holes=True), 1.0, [1, 2])
    assert out[4, 4, 4] == 1 and (out == 1).sum() == 125 + 8
    cup = np.zeros((12, 12, 12), np.uint8)
    cup[2:9, 2:9, 2:9] = 1
    cup[4:7, 4:7, 4:9] = 0  # a cavity open at the top: not a hole
    filled = postprocess(cup.copy(), InferenceConfig(fill_holes=True), 1.0, [1])
    assert np.array_equal(filled, cup)
