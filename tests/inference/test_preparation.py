"""Inference's preprocessing split: the spatial part, the body mask and box, intensity statistics equal to
training's (foreground crop + MONAI's normalisation), and the raw-array box equal to cropping the reoriented
scan on its window grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.config import DataConfig, load_config
from medseg.data.volume_transforms import ForegroundAbove
from medseg.inference.preparation import (
    FOREGROUND_MARGIN,
    STAT_SLAB,
    IntensityNormaliser,
    body_mask,
    expand_box,
    raw_body_box,
    raw_threshold,
    raw_window_box,
    spatial_transforms,
)
from medseg.inference.window_grid import aligned_box, body_extent


def _scan(shape=(2, 20, 18, 70), seed: int = 0) -> np.ndarray:
    """Channel-first int16 scan: background -1000 around a noisy body (deeper than one statistics slab)."""
    rng = np.random.default_rng(seed)
    x = np.full(shape, -1000, np.int16)
    x[:, 4:15, 3:12, 5:60] = rng.integers(-100, 400, (shape[0], 11, 9, 55))
    x[0, 6:8, 5:7, 40:45] = 0  # zeros inside the body (the ``nonzero`` statistics leave them out)
    return x


def test_spatial_transforms_keep_only_the_invertible_spatial_steps() -> None:
    kinds = [type(t) for t in spatial_transforms(DataConfig(spacing=(1.0, 1.0, 2.0))).transforms]
    assert kinds == [mt.LoadImaged, mt.EnsureTyped, mt.Orientationd, mt.Spacingd]
    kinds = [type(t) for t in spatial_transforms(DataConfig(), keep_dtype=True).transforms]
    assert kinds == [mt.LoadImaged, mt.Orientationd]


def test_body_mask_is_the_foreground_crops_selection() -> None:
    x = torch.as_tensor(_scan()).float()
    x[1, 0, 0, 0] = 50  # body in the second channel only still counts
    m = body_mask(x, DataConfig(foreground_threshold=-500))
    assert m.shape == x.shape[1:] and torch.equal(m, (x > -500).any(0))
    assert torch.equal(body_mask(x, DataConfig()), (x > x.min()).any(0))  # no threshold: above the minimum
    assert body_mask(x, DataConfig(crop_foreground=False)) is None


@pytest.mark.parametrize("nonzero", [False, True])
def test_zscore_statistics_equal_training_crop_then_normalise(nonzero: bool) -> None:
    raw = _scan()
    data = DataConfig(foreground_threshold=-500, intensity={"mode": "zscore", "nonzero": nonzero})
    cfg = load_config(None, []).model_copy(update={"data": data})
    x = torch.as_tensor(raw).float()  # every use below takes a copy: normalising float32 works in place
    # what training does: crop to the foreground (margin 2), then MONAI's per-channel normalisation
    crop = mt.CropForeground(select_fn=ForegroundAbove(-500), margin=FOREGROUND_MARGIN, allow_smaller=True)
    want = torch.as_tensor(mt.NormalizeIntensity(nonzero=nonzero, channel_wise=True)(crop(x.clone()))).clone()
    box = expand_box(raw_body_box(np.moveaxis(raw, 0, -1), -500), raw.shape[1:], FOREGROUND_MARGIN)
    assert raw.shape[-1] > STAT_SLAB  # statistics gathered over several slabs
    norm = IntensityNormaliser(cfg, raw, box)  # statistics from the raw int16 array
    got = norm(x[(slice(None), *box)].clone())
    assert type(got) is torch.Tensor and got.dtype == torch.float32
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    whole = IntensityNormaliser(cfg, raw, (slice(None),) * 3)(x[(slice(None), *box)].clone())
    assert not torch.allclose(whole, got, atol=1e-2)  # the box's statistics, not the whole scan's
    # stored values with a slope/intercept: the same statistics once scaled
    stored = ((raw.astype(np.float64) + 1024) / 2).astype(np.float32)  # HU = 2 * stored - 1024
    scaled = IntensityNormaliser(cfg, stored, box, scale=(2.0, -1024.0))
    assert torch.allclose(scaled(torch.as_tensor(stored)[(slice(None), *box)].clone()), got, atol=1e-4)
    batch = torch.stack([x[(slice(None), *box)]] * 2)  # stack copies
    assert torch.allclose(norm.windows(batch), torch.stack([got, got]), atol=1e-6)


def test_ct_window_is_voxelwise() -> None:
    cfg = load_config(None, ["data.intensity.mode=ct_window", "data.intensity.lower=-200", "data.intensity.upper=300"])
    norm = IntensityNormaliser(cfg, np.zeros((1, 2, 2, 2), np.int16), (slice(0, 2),) * 3)
    x = torch.tensor([-1000.0, -200.0, 50.0, 300.0, 1000.0]).view(1, 5, 1, 1)
    assert torch.allclose(norm(x).flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_raw_threshold_in_stored_values() -> None:
    arr = np.array([[-5, 3], [7, 9]], np.int16)
    assert raw_threshold(arr, DataConfig()) == -5.0  # no threshold: the minimum
    assert raw_threshold(arr, DataConfig(foreground_threshold=100.0), scale=(2.0, -1024.0)) == 562.0


def test_raw_body_box_and_expand_box() -> None:
    raw = np.moveaxis(_scan(), 0, -1)  # (X, Y, Z, C)
    raw[1, 2, 66, 1] = 10  # a body voxel in one channel, in the last slab
    box = raw_body_box(raw, -500)
    want = body_extent(torch.as_tensor((raw > -500).any(-1)))
    assert [(b.start, b.stop) for b in box] == want == [(1, 15), (2, 12), (5, 67)]
    assert raw_body_box(raw[..., 0], -500) == (slice(4, 15), slice(3, 12), slice(5, 60))  # 3D array
    assert raw_body_box(np.full((4, 4, 40), -1000, np.int16), -500) is None
    assert expand_box((slice(1, 15), slice(0, 3)), (16, 20), 2) == (slice(0, 16), slice(0, 5))


@pytest.mark.parametrize("affine", [
    np.diag([1.0, 1.0, 2.0, 1.0]),  # RAS already
    np.diag([-1.0, 1.0, -2.0, 1.0]),  # flipped x and z
    np.array([[0, -1.0, 0, 0], [0, 0, 2.0, 0], [-1.5, 0, 0, 0], [0, 0, 0, 1]]),  # permuted and flipped
])
def test_raw_window_box_equals_cropping_the_reoriented_scan(affine: np.ndarray) -> None:
    raw = np.moveaxis(_scan((1, 40, 30, 70)), 0, -1)[..., 0]  # (X, Y, Z)
    data, window, overlap = DataConfig(orientation="RAS"), (16, 12, 24), 0.5
    # reference: MONAI's Orientation on the whole scan, then the grid-aligned crop of its body
    whole = mt.Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(
        MetaTensor(torch.as_tensor(raw)[None], affine=torch.as_tensor(affine)))[0].numpy()
    box = aligned_box(whole.shape, window, overlap, body_extent(torch.as_tensor(whole > -500)))
    want = whole[box]
    # raw crop first (in the scan's own dtype), reoriented afterwards
    raw_box = raw_window_box(raw_body_box(raw, -500), raw.shape, affine, data, window, overlap)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    got = nib.orientations.apply_orientation(raw[raw_box], ornt)
    assert got.dtype == np.int16 and got.shape == want.shape and np.array_equal(got, want)
    assert want.size < whole.size  # the crop is a real crop
