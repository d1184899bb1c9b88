"""Predict label maps in the input scan's own geometry.

The scan goes through the model's own preprocessing (``preparation``: the spatial steps stay invertible),
is segmented with MONAI sliding-window inference, and the class probabilities are taken back through
``Invertd`` (undoing the resampling and the reorientation) before the argmax. The mask is then written with
the input file's own affine and header, so it overlays the scan voxel for voxel; ``check_overlay`` asserts that.

Window grids (``inference.window_grid``). ``body`` (default) tiles the body's box exactly as validation
during training did (foreground crop, then MONAI's grid), so a packaged model reproduces the metrics it
was selected on. ``whole`` keeps the whole scan's grid on a grid-aligned crop (``window_grid``), so every
body voxel gets exactly what a plain whole-volume ``sliding_window_inference`` call would give. In both,
windows holding no body voxel are answered with background instead of running the network.

Inputs are NIfTI files or an in-memory ``nib.Nifti1Image`` (e.g. a DICOM series converted with
``sitk_to_nifti``), so DICOM needs no temporary file. ``inference.memory_bounded`` is for scans whose
class probabilities do not fit: the raw scan is cropped to the body in its own dtype (no float copy),
windows are normalised one by one, blended slab by slab (``streaming``) and reduced to a uint8 label map
as they finish; that label map (not the probabilities) is inverted, with nearest interpolation, so it
cannot save probabilities, and resampled label boundaries may move by up to a voxel.

Optional probabilities (``predict(..., with_probabilities=True)``) are the inverted softmax before
post-processing, quantised to uint8 steps of 1/255 (``quantize_probabilities``) and written by
``save_probabilities_like`` as a 4D NIfTI (classes on the last axis) with the input's geometry.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medseg.data.kinds import data_kind
from medseg.errors import InputError
from medseg.inference.bounded import BoundedPath, SegmentationPath
from medseg.inference.label_maps import argmax_classes, check_overlay, invert_label_map, quantize_probabilities
from medseg.inference.model_package import ModelPackage
from medseg.inference.onnx_network import network_record
from medseg.inference.postprocess import postprocess
from medseg.inference.preparation import (
    FOREGROUND_MARGIN,
    IntensityNormaliser,
    body_mask,
    expand_box,
    spatial_transforms,
)
from medseg.inference.resampled import ResampledPath
from medseg.inference.sliding import (
    CheckedAutocast,
    OomFallback,
    WindowOptions,
    WindowRunner,
    model_channels_last,
    network_fn,
    window_logits,
)
from medseg.inference.window_grid import BodyWindows, aligned_box, body_extent
from medseg.io.nifti import load_nifti, read_array, verify_gzip, voxel_spacing
from medseg.runtime.device import resolve_device
from medseg.runtime.memory import return_freed_memory_to_os
from medseg.runtime.precision import PrecisionWarning, network_precision

_GRID_STEPS = (mt.Orientationd, mt.Spacingd)  # the steps that move voxels to the model's grid
SOFTMAX_SLAB = 16  # slices per softmax step when logits become probabilities
FINITE_SLAB = 32  # slices per step when a raw float scan is checked for NaN/inf without a full-size mask


@dataclass
class Prediction:
    """A label map in the input's voxel grid plus the input header it belongs to."""

    labels: np.ndarray
    reference: nib.Nifti1Image
    seconds: float
    probabilities: np.ndarray | None = None  # uint8 (*input shape, C), value/255 = probability (before post-processing)
    windows: dict[str, int] = field(default_factory=dict)  # sliding windows run / skipped as body-free
    network: dict[str, Any] = field(default_factory=dict)  # backend and precision that ran (``network_record``)


class Predictor:
    """Holds one loaded model (loaded once per batch) and segments scans with it."""

    def __init__(
        self,
        package: ModelPackage,
        device: str = "auto",
        model: torch.nn.Module | None = None,
        local_rank: int | None = None,
    ) -> None:
        """Load the package's network once; ``model`` replaces it (e.g. a fixed reference network in tests)."""
        self.package = package
        self.cfg = package.config
        self.device = resolve_device(device, local_rank)
        self.model = model.to(self.device).eval() if model is not None else package.build(self.device)
        # An exported network (ONNX Runtime, TorchScript) runs in fp32 only: a note for each case then, not an error.
        self.precision, self.precision_note = network_precision(self.cfg.inference.precision, self.device, self.model)
        # One self-check of reduced precision and one out-of-memory fallback for the batch this predictor serves.
        self.autocast = CheckedAutocast(self.precision, self.cfg.inference.precision_min_agreement)
        self.memory = OomFallback()
        inf, dims = self.cfg.inference, self.cfg.model.spatial_dims
        if inf.channels_last:
            model_channels_last(self.model, dims)
        self.num_classes = int(package.num_classes)
        self.spatial = spatial_transforms(self.cfg.data)
        self.spatial_in_memory = Compose(self.spatial.transforms[1:])  # everything after LoadImaged
        # Resampled models: loading (file -> float32 channel-first) stays MONAI's; reorientation + spacing are done
        # slab by slab on MONAI's own geometry (``slab_resample``), so no whole-volume float64 resampling pass.
        self.loading = Compose([t for t in self.spatial.transforms if not isinstance(t, _GRID_STEPS)])
        self.grid_steps = Compose([t for t in self.spatial.transforms if isinstance(t, _GRID_STEPS)])
        self.loading_in_memory = Compose(self.loading.transforms[1:])  # everything after LoadImaged
        self.spatial_raw = spatial_transforms(self.cfg.data, keep_dtype=True)  # memory-bounded: no float copy
        self.spatial_raw_in_memory = Compose(self.spatial_raw.transforms[1:])
        self.invert = Invertd(
            keys="pred", transform=self.spatial, orig_keys="image", nearest_interp=False, to_tensor=True
        )
        self.invert_nearest = Invertd(
            keys="pred", transform=self.spatial, orig_keys="image", nearest_interp=True, to_tensor=True
        )
        self.invert_labels = Invertd(
            keys="pred", transform=self.spatial_raw, orig_keys="image", nearest_interp=True, to_tensor=True
        )
        self.window = tuple(self.cfg.roi_size) if dims == 3 else (*self.cfg.roi_size, 1)
        self.predict_fn = network_fn(self.model, dims, layout_channels_last=inf.channels_last)
        self.mirror_axes = data_kind(self.cfg).mirror_axes(inf)
        self.last_windows: dict[str, int] = {}
        self.standard, self.resampled, self.bounded = StandardPath(self), ResampledPath(self), BoundedPath(self)
        if inf.memory_bounded:
            return_freed_memory_to_os()

    # ---- loading ---------------------------------------------------------------------------------
    def check_channels(self, reference: nib.Nifti1Image, n_files: int, path: Path | str) -> None:
        """``InputError`` naming ``path`` unless the scan is 3D (or 4D channels) with the model's channel count."""
        if len(reference.shape) not in (3, 4):
            raise InputError(path, f"expected a 3D volume, got shape {reference.shape}")
        n_in = int(self.package.metadata["in_channels"])
        n_given = n_files if n_files > 1 else (reference.shape[3] if len(reference.shape) == 4 else 1)
        if n_given != n_in:
            raise InputError(path, f"model expects {n_in} input channel(s), got {n_given}")

    def from_files(self, image_paths: list[Path], steps: Compose | None = None) -> tuple[dict, nib.Nifti1Image]:
        """Load and preprocess channel files (``steps``: other transforms than the spatial ones, from loading on)."""
        reference = load_nifti(image_paths[0])
        self.check_channels(reference, len(image_paths), image_paths[0])
        for p in image_paths[1:]:  # the other channel files' headers too, before MONAI reads any voxel
            load_nifti(p)
        for p in image_paths:  # nibabel, under MONAI, stops before the gzip trailer: a corrupt payload reads silently
            verify_gzip(p)
        files = [str(p) for p in image_paths]
        try:
            data = (steps or self.spatial)({"image": files if len(files) > 1 else files[0]})
        except Exception:
            # MONAI reports a payload that cannot be read (truncated or corrupt gzip) as "applying transform
            # <LoadImaged object at 0x...>": nibabel's own reading names the file and the cause. Only on failure.
            for p in image_paths:
                read_array(load_nifti(p), p)
            raise  # every file reads: not an input problem
        return data, reference

    def from_image(self, image: nib.Nifti1Image, name: str, raw: bool = False, steps: Compose | None = None) -> dict:
        """Preprocess an in-memory image exactly as ``LoadImaged`` + the spatial steps would a file.

        ``raw`` keeps the voxel dtype (memory-bounded mode); otherwise the image becomes float32 as from a file.
        ``steps`` replaces the steps after loading (e.g. only the float cast, for slab-wise resampling).
        """
        self.check_channels(image, 1, name)
        array = read_array(image, name)
        array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)  # channel first
        affine = torch.as_tensor(image.affine, dtype=torch.float64)
        voxels = torch.from_numpy(array if raw and all(st > 0 for st in array.strides) else np.ascontiguousarray(array))
        tensor = MetaTensor(
            voxels,
            affine=affine,
            meta={
                "original_affine": image.affine.copy(),
                "spatial_shape": np.array(image.shape[:3]),
                "filename_or_obj": name,
                "original_channel_dim": 0 if array.ndim == 4 else "no_channel",
            },
        )
        return (steps or (self.spatial_raw_in_memory if raw else self.spatial_in_memory))({"image": tensor})

    # ---- inference -------------------------------------------------------------------------------
    def window_runner(self, **kw: Unpack[WindowOptions]) -> WindowRunner:
        """A ``WindowRunner`` over this model's network with the configured mirroring and the batch's self-checked
        autocast (``kw``: its other options)."""
        return WindowRunner(
            self.predict_fn, self.num_classes, mirror_axes=self.mirror_axes, precision=self.autocast, **kw
        )

    def check_finite(self, image: torch.Tensor | np.ndarray, name: Path | str) -> None:
        """``InputError`` naming ``name`` if a scan holds NaN/inf voxels or is constant (checked slab by slab).

        A constant scan (every voxel one value: an export whose pixel data was lost, a blank series) fails rather
        than warns: its mask would be empty, and an empty mask reads as "nothing found", not as "no image".
        """
        floating = np.issubdtype(np.asarray(image[..., :0]).dtype, np.floating)
        low, high = np.inf, -np.inf
        for z in range(0, image.shape[-1], FINITE_SLAB):  # slab by slab: no full-size boolean mask
            slab = np.asarray(image[..., z : z + FINITE_SLAB])
            if floating and not np.isfinite(slab).all():
                raise InputError(name, "image contains NaN/inf voxels")
            if slab.size:
                low, high = min(low, float(slab.min())), max(high, float(slab.max()))
        if low == high:
            raise InputError(name, f"image is constant (every voxel {low:g}): no contrast to segment")

    def _windowed_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]] | None:
        """Sliding-window logits (C, *box) over the window-grid crop ``box`` of the preprocessed image, or None
        when there is no body at all. ``x`` (float32, channel first) is normalised in place."""
        inf = self.cfg.inference
        size = tuple(x.shape[1:])
        body = body_mask(x, self.cfg.data)
        extent = body_extent(body) if body is not None else [(0, n) for n in size]
        if extent is None:  # no body at all: background everywhere, nothing to run
            self.last_windows = {"run": 0, "skipped": 0}
            return None
        fg_box = expand_box([slice(lo, hi) for lo, hi in extent], size, FOREGROUND_MARGIN)  # training's crop box
        box = aligned_box(size, self.window, inf.overlap, extent) if inf.window_grid == "whole" else fg_box
        normalise = IntensityNormaliser(self.cfg, x, fg_box)
        crop = normalise(x[(slice(None), *box)])
        wp = self.window_runner(body=BodyWindows(body[box], self.window) if body is not None else None)
        logits = window_logits(crop[None], self.window, inf, wp, self.device, self.precision, self.memory)
        self.last_windows = {"run": wp.windows_run, "skipped": wp.windows_skipped}
        return logits[0], box

    def probabilities_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax (C, *spatial) on the preprocessed grid (background outside the crop); ``x`` is normalised in place."""
        probs = torch.zeros((self.num_classes, *x.shape[1:]), dtype=torch.float32)
        probs[0] = 1.0
        result = self._windowed_logits(x)
        if result is None:
            return probs
        logits, box = result
        target = probs[(slice(None), *box)]
        for z in range(0, target.shape[-1], SOFTMAX_SLAB):  # slab by slab: no second full-size copy of the logits
            target[..., z : z + SOFTMAX_SLAB] = torch.softmax(logits[..., z : z + SOFTMAX_SLAB].float(), dim=0).cpu()
        return probs

    @torch.inference_mode()
    def probabilities_inverted(self, data: dict, name: Path | str) -> torch.Tensor:
        """Softmax of preprocessed ``data`` taken back to the scan's grid by MONAI's ``Invertd`` (bilinear)."""
        image: MetaTensor = data["image"]
        self.check_finite(image.as_tensor(), name)
        probs = self.probabilities_preprocessed(image.as_tensor())
        data["pred"] = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
        restored = self.invert(data)["pred"]
        return restored.as_tensor() if isinstance(restored, MetaTensor) else torch.as_tensor(restored)

    @torch.inference_mode()
    def labels_unresampled(self, data: dict, name: Path | str) -> np.ndarray:
        """Label map without the probability round trip, for preprocessing that does not resample.

        Reorientation and the crop only move voxels, so the argmax commutes with their inverse: taking it on the
        logits in the preprocessed grid and inverting the uint8 map gives the same mask as inverting the
        probabilities, without the softmax and the float copies of all classes.
        """
        image: MetaTensor = data["image"]
        self.check_finite(image.as_tensor(), name)
        labels = torch.zeros(image.shape[1:], dtype=torch.uint8)
        result = self._windowed_logits(image.as_tensor())
        if result is not None:
            logits, box = result
            labels[box] = argmax_classes(logits).cpu()  # on the GPU when there is one: only uint8 crosses
            del logits
        del image  # ``data`` holds the scan until ``_invert_label_map`` swaps it for its metadata
        return invert_label_map(self.invert_nearest, data, labels)

    def probabilities(self, image_paths: list[Path]) -> tuple[torch.Tensor, nib.Nifti1Image]:
        """Class probabilities (C, *input_shape) in the input's voxel grid, and the input header.

        Taken back with MONAI's whole-volume ``Invertd`` (full-size float volumes of every class): the reference
        the slab-wise path of ``predict`` is tested against, and a convenience for small scans.
        """
        data, reference = self.from_files(image_paths)
        return self.probabilities_inverted(data, image_paths[0]), reference

    def path_for(self, source: nib.Nifti1Image | list[Path]) -> SegmentationPath:
        """The strategy that segments ``source``: memory-bounded (one-file scans only), resampled or standard."""
        if self.cfg.inference.memory_bounded and not (isinstance(source, list) and len(source) > 1):
            return self.bounded
        return self.resampled if self.cfg.data.spacing is not None else self.standard

    def _segment(
        self, source: nib.Nifti1Image | list[Path], name: str | Path, with_probabilities: bool = False
    ) -> tuple[np.ndarray, nib.Nifti1Image, np.ndarray | None]:
        if self.cfg.inference.memory_bounded and with_probabilities:
            raise ValueError("probabilities cannot be saved in memory-bounded mode (it inverts only the label map)")
        return self.path_for(source).segment(source, name, with_probabilities)

    def argmax(self, probs: torch.Tensor) -> np.ndarray:
        """Label map of (C, *spatial) scores: uint8 below 256 classes, else uint16."""
        if self.package.num_classes < 256:
            return argmax_classes(probs).numpy()
        return probs.argmax(0).numpy().astype(np.uint16)

    def predict(
        self, source: list[Path] | nib.Nifti1Image, name: str | None = None, with_probabilities: bool = False
    ) -> Prediction:
        """Label map (argmax, then the configured post-processing) in the input's voxel grid.

        ``source`` is a list of NIfTI files (one per channel) or an in-memory image; ``name`` names it in errors.
        ``with_probabilities`` also returns the quantised class probabilities (``ValueError`` in memory-bounded mode).
        """
        t0 = time.perf_counter()
        name = name or (str(source[0]) if isinstance(source, list) else "image")
        if self.precision_note:  # inside a batch: in each case's record
            warnings.warn(self.precision_note, PrecisionWarning, stacklevel=2)
        labels, reference, probs = self._segment(source, name, with_probabilities)
        check_overlay(labels, reference, name)
        voxel_ml = float(np.prod(voxel_spacing(reference.affine))) / 1000.0
        labels = postprocess(labels, self.cfg.inference, voxel_ml, self.package.labels.values())
        ran = network_record(self.model, self.cfg.inference.precision, self.autocast.dtype, self.autocast.agreement)
        return Prediction(labels, reference, time.perf_counter() - t0, probs, dict(self.last_windows), ran)


class StandardPath:
    """Models without resampling: the whole preprocessed scan, the window function, and ``Invertd`` back.

    Reorientation and the crop only move voxels, so without probabilities the argmax is taken on the
    preprocessed grid and only the uint8 label map is inverted; with probabilities (or 256+ classes) the
    softmax goes back through MONAI's ``Invertd`` first.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.p = predictor

    def segment(
        self, source: nib.Nifti1Image | list[Path], name: str | Path, with_probabilities: bool
    ) -> tuple[np.ndarray, nib.Nifti1Image, np.ndarray | None]:
        """Label map, the input header and (optionally) quantised probabilities, in the input's grid."""
        p = self.p
        if isinstance(source, list):
            data, reference = p.from_files(source)
        else:
            data, reference = p.from_image(source, str(name)), source
        if not with_probabilities and p.package.num_classes < 256:
            return p.labels_unresampled(data, name), reference, None
        probs = p.probabilities_inverted(data, name)
        return p.argmax(probs), reference, quantize_probabilities(probs) if with_probabilities else None
