"""The model's preprocessing, split the way inference needs it.

Training runs load -> orientation -> spacing -> foreground crop -> intensity (``data.transforms``). For
inference the same steps are kept but taken apart:

- the *spatial* part (load, float, orientation, spacing) stays a MONAI ``Compose``, so ``Invertd`` takes
  predictions back into the scan's own voxel grid;
- the foreground crop becomes a crop on the sliding-window grid (``window_grid.aligned_box``) plus
  body-window skipping, which is what makes the output inside the body equal to a whole-volume call;
- intensity normalisation takes its statistics (z-score mean/std) from the same foreground box training
  used (``CropForegroundd`` margin 2), so the network sees the values it was trained on, and can then be
  applied to any crop, or window by window in memory-bounded mode (``IntensityNormaliser``).
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.config import Config, DataConfig
from medseg.data.volume_transforms import ForegroundAbove, preprocessing
from medseg.inference.window_grid import aligned_box

_NOT_SPATIAL = (mt.CropForegroundd, mt.ScaleIntensityRanged, mt.NormalizeIntensityd)
FOREGROUND_MARGIN = 2  # voxels around the body that training's CropForegroundd keeps (data.transforms)
STAT_SLAB = 32  # slices per step when statistics are gathered over a raw (int16) scan without a float copy


def spatial_transforms(data: DataConfig, keep_dtype: bool = False) -> mt.Compose:
    """Load, orientation and spacing of the model's preprocessing (invertible); ``keep_dtype`` skips the float cast."""
    steps = [t for t in preprocessing(data, with_label=False) if not isinstance(t, _NOT_SPATIAL)]
    if keep_dtype:
        steps = [t for t in steps if not isinstance(t, mt.EnsureTyped)]
    return mt.Compose(steps)


def body_mask(x: torch.Tensor, data: DataConfig) -> torch.Tensor | None:
    """Body voxels (spatial bool mask) as the foreground crop selects them; None without a crop.

    As ``CropForegroundd`` (``generate_spatial_bounding_box``): ``ForegroundAbove`` on all channels, any channel.
    Its bounding box grown by ``FOREGROUND_MARGIN`` (``expand_box``) is the box training crops to.
    """
    if not data.crop_foreground:
        return None
    return torch.as_tensor(ForegroundAbove(data.foreground_threshold)(x)).any(0)


class IntensityNormaliser:
    """The model's intensity step with fixed statistics, applicable to any crop or window of the scan.

    ``ct_window`` / ``range`` are voxel-wise (no statistics). ``zscore`` uses per-channel mean/std taken over the training
    foreground box (over non-zero voxels with ``nonzero``), computed in float64 slab by slab so a raw int16
    scan needs no float copy (``x``: channel-first tensor or array). Applied through MONAI's own ``NormalizeIntensity`` with those statistics.
    """

    transform: mt.ScaleIntensityRange | mt.NormalizeIntensity

    def __init__(
        self, cfg: Config, x: torch.Tensor | np.ndarray, box: Sequence[slice], scale: tuple[float, float] = (1.0, 0.0)
    ) -> None:
        it = cfg.data.intensity
        self.scale = scale  # (slope, inter) of stored values (``io.nifti.read_unscaled``), applied before normalising
        if it.mode in ("ct_window", "range"):
            self.transform = mt.ScaleIntensityRange(a_min=it.lower, a_max=it.upper, b_min=0.0, b_max=1.0, clip=True)
            return
        means, stds = [], []
        for c in range(x.shape[0]):
            n = total = total_sq = 0.0
            index: tuple[int | slice, ...] = (c, *box)
            region = x[index]
            for z in range(0, region.shape[-1], STAT_SLAB):
                v = np.asarray(region[..., z : z + STAT_SLAB], dtype=np.float64) * scale[0] + scale[1]
                if it.nonzero:
                    v = v[v != 0]
                n += v.size
                total += float(v.sum())
                total_sq += float((v * v).sum())
            mean = total / n if n else 0.0
            means.append(mean)
            stds.append(float(np.sqrt(max(total_sq / n - mean * mean, 0.0))) if n else 1.0)
        self.transform = mt.NormalizeIntensity(subtrahend=means, divisor=stds, nonzero=it.nonzero, channel_wise=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a channel-first image (float32 out; a float32 input is normalised in place)."""
        x = x.float()  # a copy unless already float32
        if self.scale != (1.0, 0.0):
            x.mul_(self.scale[0]).add_(self.scale[1])
        out = self.transform(x)
        # MONAI's array transforms return MetaTensors; a window fed to the network as one pays MetaTensor's
        # __torch_function__ on every layer: a plain tensor (the same memory) goes on.
        return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)

    def windows(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalise a (B, C, ...) batch of raw windows."""
        return torch.stack([self(w) for w in batch])


def raw_threshold(array: np.ndarray, data: DataConfig, scale: tuple[float, float] = (1.0, 0.0)) -> float:
    """The foreground crop's body threshold (``ForegroundAbove``) in stored values: above it is body.

    ``scale`` is the stored values' (slope > 0, inter); without a configured threshold, the minimum is used.
    """
    if data.foreground_threshold is None:
        return float(array.min())
    return (float(data.foreground_threshold) - scale[1]) / scale[0]


def raw_body_box(array: np.ndarray, threshold: float) -> tuple[slice, ...] | None:
    """Bounding box of the body (any channel above ``threshold``) of a raw (X, Y, Z[, C]) scan array, slab by
    slab (no full-size mask); None if there is none."""
    hits = [np.zeros(n, dtype=bool) for n in array.shape[:3]]
    for z in range(0, array.shape[2], STAT_SLAB):
        body = array[:, :, z : z + STAT_SLAB] > threshold
        if body.ndim == 4:
            body = np.asarray(body.any(axis=3))
        hits[0] |= body.any(axis=(1, 2))
        hits[1] |= body.any(axis=(0, 2))
        hits[2][z : z + STAT_SLAB] = body.any(axis=(0, 1))
    if not hits[0].any():
        return None
    return tuple(slice(int(np.flatnonzero(h)[0]), int(np.flatnonzero(h)[-1]) + 1) for h in hits)


def expand_box(box: Sequence[slice], shape: Sequence[int], margin: int) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` voxels on every side, clipped to ``shape``."""
    return tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, shape))


def raw_window_box(
    body: Sequence[slice],
    shape: Sequence[int],
    affine: np.ndarray,
    data: DataConfig,
    window: Sequence[int],
    overlap: float,
) -> tuple[slice, ...]:
    """The grid-aligned crop (``window_grid.aligned_box``) of the *reoriented* scan, as a box of the raw array.

    Without resampling, reorientation only permutes and flips axes, so the raw box can be cut first (in the
    scan's own dtype) and reoriented afterwards: the result is the same voxels, on the same window grid, as the
    reoriented whole scan cropped. Uses the orientation transform MONAI's ``Orientationd`` computes.
    """
    labels = (("L", "R"), ("P", "A"), ("I", "S"))
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(data.orientation, labels=labels)
    )
    out_shape = [0] * 3
    out_extent: list[tuple[int, int]] = [(0, 0)] * 3
    for axis in range(3):
        j, flip, n, b = int(ornt[axis, 0]), ornt[axis, 1] < 0, int(shape[axis]), body[axis]
        out_shape[j] = n
        out_extent[j] = (n - b.stop, n - b.start) if flip else (b.start, b.stop)
    out_box = aligned_box(out_shape, window, overlap, out_extent)
    raw_box = []
    for axis in range(3):
        j, flip, n = int(ornt[axis, 0]), ornt[axis, 1] < 0, int(shape[axis])
        s = out_box[j]
        raw_box.append(slice(n - s.stop, n - s.start) if flip else s)
    return tuple(raw_box)
