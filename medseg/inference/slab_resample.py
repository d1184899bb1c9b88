"""Resampling to the model's voxel grid (and back) slab by slab, with MONAI's own resampler.

Memory-bounded inference on a model trained at a target spacing must resample the scan. MONAI's ``Spacingd``
resamples the whole volume at once: a float64 working copy and a float32 result of the whole crop, plus the
sampling grid, and ``Invertd`` does the same again on the way back (measured: ~16x the input's bytes on a
512x512x300 int16 CT resampled from 0.8 to 1 mm). Here the same result is built slab by slab along the target's
last axis:

- the target geometry (affine and shape after ``Orientationd`` + ``Spacingd``) comes from MONAI itself, by
  running the spatial transforms *lazily* (``Compose(lazy=True)``: pending operations only, no voxel touched);
- each target slab is resampled by MONAI's ``SpatialResample`` (same mode, padding, corners and computing dtype
  as the ``Spacingd`` of training) from the source sub-block its corners map into, grown by a margin so
  interpolation never reaches the sub-block's inner faces; faces on the volume's own border stay there, so the
  padding mode acts as on the whole volume. The result equals the whole-volume transform (tests: max
  difference 0 on oblique, flipped, anisotropic volumes);
- the way back (label map, nearest) is the same operation with source and target swapped, slab by slab of
  the scan's own grid, straight into the output mask.

Why not MONAI alone: ``SpatialResample`` has no notion of a sub-block of a larger grid, and MONAI's sliding
window cannot resample per window; the slab loop and the sub-block arithmetic are the only hand-written parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.transforms import SpatialResample

SLAB = 16  # target slices per resampling step
MARGIN = 2  # source voxels added around a sub-block (linear interpolation reads one neighbour)


def lazy_geometry(spatial: mt.Compose, image: MetaTensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine, spatial shape) that ``spatial`` (a Compose of spatial dict transforms on key ``image``) would
    give ``image``, computed from MONAI's pending operations without resampling any voxel."""
    data = {"image": MetaTensor(image.as_tensor(), affine=image.affine)}
    for t in spatial.transforms:
        data = t(data, lazy=True)
    out: MetaTensor = data["image"]
    return np.asarray(out.peek_pending_affine(), dtype=np.float64), tuple(int(s) for s in out.peek_pending_shape())


class SpacingSettings(TypedDict):
    """Interpolation settings of a ``Spacingd``, as ``SpatialResample`` (and ``resample_in_slabs``) take them."""

    mode: str | int
    padding_mode: str
    align_corners: bool
    dtype: np.dtype | type | str | None


def spacing_settings(spatial: mt.Compose) -> SpacingSettings:
    """Interpolation settings (mode, padding_mode, align_corners, dtype) of the ``Spacingd`` in ``spatial``."""
    for t in spatial.transforms:
        if isinstance(t, mt.Spacingd):
            return {
                "mode": t.mode[0],
                "padding_mode": t.padding_mode[0],
                "align_corners": t.align_corners[0],
                "dtype": t.dtype[0],
            }
    raise ValueError("the spatial transforms have no Spacingd")


def _shifted(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    return out


def _source_block(src_from_dst: np.ndarray, dst_box: Sequence[slice], src_shape: Sequence[int]) -> tuple[slice, ...]:
    """Source voxels that the target box ``dst_box`` reads (its corners mapped, grown by ``MARGIN``, clipped)."""
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (dst_box[0].start, dst_box[0].stop - 1)
            for j in (dst_box[1].start, dst_box[1].stop - 1)
            for k in (dst_box[2].start, dst_box[2].stop - 1)
        ]
    ).T
    src = (src_from_dst @ corners)[:3]
    lo = np.maximum(np.floor(src.min(1)).astype(int) - MARGIN, 0)
    hi = np.minimum(np.ceil(src.max(1)).astype(int) + MARGIN + 1, np.asarray(src_shape))
    lo = np.minimum(lo, np.asarray(src_shape) - 1)  # a target slab wholly outside the source reads its border
    hi = np.maximum(hi, lo + 1)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def resample_in_slabs(
    src: torch.Tensor | np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    *,
    mode: str | int,
    padding_mode: str,
    align_corners: bool,
    dtype: np.dtype | type | str | None = np.float64,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    slab: int = SLAB,
    emit: Callable[[int, torch.Tensor], None] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """``src`` (C, X, Y, Z; any dtype, e.g. a raw int16 view) with voxel-to-world ``src_affine``, resampled onto the
    grid ``dst_affine`` / ``dst_shape`` as MONAI's ``SpatialResample`` would in one call, slab by slab.

    Results go into ``out`` (C, *dst_shape) when given, else a new tensor of ``out_dtype``; integer outputs are
    rounded (a label map resampled with nearest is exact). Only one slab's sub-block is ever in float. With
    ``emit``, nothing is kept: ``emit(z0, part)`` gets each float slab (C, X, Y, n) in order and None is returned.
    ``device``: where each slab is interpolated (a CUDA device on GPU servers, where the sampling is the costly
    part of the CPU's work); ``out`` stays where it is, ``emit`` gets the slab on ``device``.
    """
    channels = src.shape[0]
    dst_shape = tuple(int(s) for s in dst_shape)
    if out is None and emit is None:
        out = torch.empty((channels, *dst_shape), dtype=out_dtype)
    resampler = SpatialResample(mode=mode, padding_mode=padding_mode, align_corners=align_corners, dtype=dtype)
    src_from_dst = np.linalg.inv(src_affine) @ dst_affine
    for z0 in range(0, dst_shape[2], slab):
        z1 = min(z0 + slab, dst_shape[2])
        dst_box = (slice(0, dst_shape[0]), slice(0, dst_shape[1]), slice(z0, z1))
        block = _source_block(src_from_dst, dst_box, src.shape[1:])
        sub = src[(slice(None), *block)]
        sub = torch.from_numpy(np.ascontiguousarray(sub)) if isinstance(sub, np.ndarray) else sub.contiguous()
        sub = sub.to(device, non_blocking=True).float()
        part = resampler(
            MetaTensor(sub, affine=torch.as_tensor(_shifted(src_affine, [b.start for b in block]))),
            dst_affine=torch.as_tensor(_shifted(dst_affine, [0, 0, z0])),
            spatial_size=(*dst_shape[:2], z1 - z0),
        )
        part = part.as_tensor() if isinstance(part, MetaTensor) else torch.as_tensor(part)
        if emit is not None:
            emit(z0, part)
            continue
        assert out is not None
        if not out.dtype.is_floating_point:
            info = torch.iinfo(out.dtype)
            part = part.round().clamp_(info.min, info.max)
        out[..., z0:z1] = part.to(out.device, out.dtype)
    return out
