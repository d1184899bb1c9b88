"""Memory-bounded prediction (``inference.memory_bounded``): for scans whose class probabilities do not fit.

The raw scan is cropped to the body in its own dtype (no float copy), windows are normalised one by one,
blended slab by slab (``streaming``) and reduced to a uint8 label map as they finish; that label map (not the
probabilities) is inverted, with nearest interpolation, so it cannot save probabilities, and resampled label
boundaries may move by up to a voxel. A resampled model's crop goes to the model's grid and back slab by slab
(``slab_resample``). The windows go through the predictor's own ``WindowRunner`` (same network, mirroring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Unpack

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medseg.config import Config
from medseg.inference.label_maps import argmax_classes, invert_label_map, resampled_dtype
from medseg.inference.preparation import (
    FOREGROUND_MARGIN,
    IntensityNormaliser,
    expand_box,
    raw_body_box,
    raw_threshold,
    raw_window_box,
)
from medseg.inference.slab_resample import SpacingSettings, lazy_geometry, resample_in_slabs, spacing_settings
from medseg.inference.sliding import OomFallback, WindowOptions, WindowRunner, with_oom_fallback
from medseg.inference.streaming import streaming_sliding_window
from medseg.io.nifti import load_nifti, read_unscaled
from medseg.runtime.memory import release_free_heap


class Segmenting(Protocol):
    """What the strategy uses of its predictor (``medseg.inference.predictor.Predictor``)."""

    cfg: Config
    window: tuple[int, ...]
    device: torch.device
    memory: OomFallback
    num_classes: int
    invert_labels: Invertd
    grid_steps: Compose
    last_windows: dict[str, int]

    def window_runner(self, **kw: Unpack[WindowOptions]) -> WindowRunner: ...

    def check_finite(self, image: torch.Tensor | np.ndarray, name: Path | str) -> None: ...

    def check_channels(self, reference: nib.Nifti1Image, n_files: int, path: Path | str) -> None: ...

    def from_image(
        self, image: nib.Nifti1Image, name: str, raw: bool = False, steps: Compose | None = None
    ) -> dict: ...


class SegmentationPath(Protocol):
    """A strategy of the predictor: segments one scan into its label map in the scan's own grid."""

    def segment(
        self, source: nib.Nifti1Image | list[Path], name: str | Path, with_probabilities: bool
    ) -> tuple[np.ndarray, nib.Nifti1Image, np.ndarray | None]: ...


class BoundedPath:
    """The memory-bounded strategy of a predictor (its network, transforms, window and device)."""

    def __init__(self, predictor: Segmenting) -> None:
        self.p = predictor

    def segment(
        self, source: nib.Nifti1Image | list[Path], name: str | Path, with_probabilities: bool
    ) -> tuple[np.ndarray, nib.Nifti1Image, None]:
        """Label map and input header of a one-file scan (no probabilities: only the label map is inverted)."""
        reference = load_nifti(source[0]) if isinstance(source, list) else source
        self.p.check_channels(reference, 1, name)
        return self.labels(reference, name), reference, None

    @torch.inference_mode()
    def labels(self, image: nib.Nifti1Image, name: Path | str) -> np.ndarray:
        """Memory-bounded label map: raw crop in its own dtype, per-window normalisation, streamed blending."""
        p = self.p
        inf, data_cfg = p.cfg.inference, p.cfg.data
        raw, slope, inter = read_unscaled(image, name)  # stored integers, not nibabel's float64 scaling of them
        scale = (slope, inter)
        p.check_finite(raw, name)
        shape = raw.shape[:3]
        whole = tuple(slice(0, n) for n in shape)
        # Windows stay raw: a window is body when it holds a voxel the foreground crop would keep.
        threshold = raw_threshold(raw, data_cfg, scale) if data_cfg.crop_foreground else None
        body = raw_body_box(raw, threshold) if threshold is not None else whole
        if body is None:  # no body at all: an empty mask
            p.last_windows = {"run": 0, "skipped": 0}
            return np.zeros(shape, dtype=np.uint8)
        # Without resampling, the crop keeps the whole scan's window grid (same answer as the standard path);
        # a resampled crop has its own sampling grid anyway, so it is just the training crop (margin 2), as is
        # window_grid "body".
        stats_box = expand_box(body, shape, FOREGROUND_MARGIN)
        exact = data_cfg.spacing is None and inf.window_grid == "whole"
        box = raw_window_box(body, shape, image.affine, data_cfg, p.window, inf.overlap) if exact else stats_box
        normalise = IntensityNormaliser(
            p.cfg, raw[None] if raw.ndim == 3 else np.moveaxis(raw, -1, 0), stats_box, scale
        )
        affine = image.affine.copy()  # the crop is a view of the stored array, its affine moved to the box corner
        affine[:3, 3] = image.affine[:3, :3] @ np.array([b.start for b in box]) + image.affine[:3, 3]
        source = raw[box][None] if raw.ndim == 3 else np.moveaxis(raw[box], -1, 0)  # channel-first view, no copy
        del raw
        # On the CPU the network's activations are process memory: one window per call (eval-mode networks give
        # the same output per window either way); on a GPU they are not, and windows stay batched.
        wp = p.window_runner(
            body_above=threshold, prepare=normalise.windows, net_batch=1 if p.device.type == "cpu" else None
        )
        labels = np.zeros(image.shape[:3], dtype=np.uint8)
        if data_cfg.spacing is not None:  # resampled model: to its grid and back slab by slab (``slab_resample``)
            self._resampled(source, affine, wp, torch.from_numpy(labels[box])[None])
        else:
            labels[box] = self._oriented(source, affine, str(name), wp)
        p.last_windows = {"run": wp.windows_run, "skipped": wp.windows_skipped}
        return labels

    def _stream_labels(self, xt: torch.Tensor, wp: WindowRunner) -> torch.Tensor:
        """uint8 label map of a channel-first raw scan on the model's grid, blended slab by slab."""
        p = self.p
        inf = p.cfg.inference
        out = torch.zeros(xt.shape[1:], dtype=torch.uint8)

        def emit(z0: int, logits: torch.Tensor) -> None:
            out[..., z0 : z0 + logits.shape[-1]] = argmax_classes(logits)

        def stream(_: torch.device) -> None:  # the blending is on the CPU already: only the window step applies
            streaming_sliding_window(
                xt,
                p.window,
                inf.sw_batch_size,
                wp,
                p.num_classes,
                emit,
                overlap=inf.overlap,
                mode=inf.blend_mode,
                sw_device=p.device,
                acc_dtype=torch.float16,
            )

        # The network runs under the runner's (the batch's) autocast; a retry after a CUDA out-of-memory error emits
        # every slice again, so a pass cut short leaves nothing behind.
        cpu = torch.device("cpu")
        with_oom_fallback(stream, wp, wp.net_batch or inf.sw_batch_size, cpu, int(xt[0].numel()), p.memory)
        release_free_heap()  # the network's activations lived on the heap; the inversion should not carry them
        return out

    def _oriented(self, source: np.ndarray, affine: np.ndarray, name: str, wp: WindowRunner) -> np.ndarray:
        """No resampling: MONAI's orientation on the raw crop, streamed labels, ``Invertd`` (nearest) back."""
        p = self.p
        crop = nib.Nifti1Image(source[0] if source.shape[0] == 1 else np.moveaxis(source, 0, -1), affine)
        data = p.from_image(crop, name, raw=True)
        out = self._stream_labels(data["image"].as_tensor(), wp)
        return invert_label_map(p.invert_labels, data, out)

    def _resampled(self, source: np.ndarray, affine: np.ndarray, wp: WindowRunner, target: torch.Tensor) -> None:
        """Resampled model: the raw crop is resampled to the model's grid slab by slab (kept in its stored integer
        type, rounded: at most half a stored unit, e.g. 0.5 HU), labels are streamed there and resampled back
        (nearest) slab by slab into ``target`` (1, *crop shape), a view of the output mask."""
        p = self.p
        settings = spacing_settings(p.grid_steps)
        probe = MetaTensor(torch.zeros(1).expand(source.shape), affine=torch.as_tensor(affine))  # shape only, no memory
        grid_affine, grid_shape = lazy_geometry(p.grid_steps, probe)
        keep = resampled_dtype(source)
        xt = resample_in_slabs(source, affine, grid_affine, grid_shape, out_dtype=keep, device=p.device, **settings)
        if xt is None:  # only an ``emit`` call returns None
            raise RuntimeError("resample_in_slabs returned no image")
        out = self._stream_labels(xt, wp)
        del xt
        nearest: SpacingSettings = {**settings, "mode": "nearest"}
        resample_in_slabs(out[None], grid_affine, affine, target.shape[1:], out=target, device=p.device, **nearest)
