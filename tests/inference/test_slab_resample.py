"""Slab-wise resampling against MONAI's whole-volume transforms: ``Orientationd`` + ``Spacingd`` forward and
``Invertd`` (nearest) back, on oblique, flipped and anisotropic volumes, one and two channels, any slab size."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.inference.slab_resample import lazy_geometry, resample_in_slabs, spacing_settings

LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
AFFINES = {
    "oblique_flipped": np.array([[-0.8, 0.05, 0.0, 10.0], [0.02, 0.8, 0.1, -5.0], [0.0, -0.05, 1.5, 3.0], [0, 0, 0, 1]]),
    "permuted_lps": np.array([[0.0, 0.0, -2.5, 4.0], [-0.9, 0.0, 0.0, 7.0], [0.0, 0.9, 0.0, -2.0], [0, 0, 0, 1]]),
    "ras_anisotropic": np.diag([0.7, 0.7, 3.0, 1.0]),
}


def _spatial(pixdim: tuple[float, ...]) -> mt.Compose:
    return mt.Compose([mt.Orientationd(keys="image", axcodes="RAS", labels=LABELS),
                       mt.Spacingd(keys="image", pixdim=pixdim, mode="bilinear")])


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("channels, slab", [(1, 5), (2, 64), (1, 1)])
def test_forward_equals_monai_spacing_and_back_equals_invertd(name: str, channels: int, slab: int) -> None:
    rng = np.random.default_rng(0)
    affine = AFFINES[name]
    source = rng.integers(-1000, 1000, size=(channels, 41, 37, 23)).astype(np.int16)
    spatial = _spatial((1.03, 1.17, 1.31))  # incommensurate with the source spacings: few nearest-neighbour ties
    ref = spatial({"image": MetaTensor(torch.from_numpy(source), affine=torch.as_tensor(affine))})
    grid_affine, grid_shape = lazy_geometry(spatial, MetaTensor(torch.zeros(1).expand(source.shape), affine=torch.as_tensor(affine)))
    assert grid_shape == tuple(ref["image"].shape[1:])
    np.testing.assert_allclose(grid_affine, np.asarray(ref["image"].affine), atol=1e-9)
    settings = spacing_settings(spatial)
    got = resample_in_slabs(source, affine, grid_affine, grid_shape, slab=slab, **settings)
    assert float((got - ref["image"].as_tensor()).abs().max()) < 1e-3  # measured: 0
    kept = resample_in_slabs(source, affine, grid_affine, grid_shape, slab=slab, out_dtype=torch.int16, **settings)
    assert float((kept.float() - ref["image"].as_tensor()).abs().max()) <= 0.5 + 1e-3  # stored type: rounded

    # back: a label map on the model's grid to the source grid with nearest, as Invertd does it
    labels = torch.from_numpy(rng.integers(0, 4, size=grid_shape).astype(np.uint8))
    ref["pred"] = MetaTensor(labels[None].clone(), meta=ref["image"].meta, applied_operations=ref["image"].applied_operations)
    inverted = mt.Invertd(keys="pred", transform=spatial, orig_keys="image", nearest_interp=True)(ref)["pred"]
    back = torch.zeros((1, *source.shape[1:]), dtype=torch.uint8)
    resample_in_slabs(labels[None], grid_affine, affine, source.shape[1:], out=back, slab=slab, **{**settings, "mode": "nearest"})
    want = torch.as_tensor(inverted).round().to(torch.uint8)[0]
    # Nearest neighbour is ambiguous where a voxel maps exactly half-way between two grid voxels (e.g. 2.5 mm ->
    # 1.25 mm grids put whole slices there): float rounding picks a side, differently per sub-block. Away from
    # those ties the two must agree voxel for voxel; at a tie, either neighbour is right.
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in source.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    coords = idx @ (np.linalg.inv(grid_affine) @ affine)[:3, :3].T + (np.linalg.inv(grid_affine) @ affine)[:3, 3]
    tie = (np.abs(coords - np.floor(coords) - 0.5) < 1e-3).any(1).reshape(source.shape[1:])
    assert tie.mean() < 0.05
    assert torch.equal(back[0][torch.from_numpy(~tie)], want[torch.from_numpy(~tie)])
    lab, hi = labels.numpy(), np.array(grid_shape) - 1
    for c, got in zip(coords[tie.ravel()], back[0].numpy()[tie]):
        sides = [(np.floor(v), np.ceil(v)) if abs(v - np.floor(v) - 0.5) < 1e-3 else (np.round(v),) for v in c]
        options = {lab[tuple(np.clip(np.array(k, dtype=int), 0, hi))] for k in itertools.product(*sides)}
        assert got in options


def test_spacing_settings_need_a_spacing_transform() -> None:
    with pytest.raises(ValueError, match="no Spacingd"):
        spacing_settings(mt.Compose([mt.Orientationd(keys="image", axcodes="RAS")]))
