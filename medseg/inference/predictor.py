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
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai import transforms as mt
from monai.transforms import Compose, Invertd

from medseg.engine.device import resolve_device, resolve_precision
from medseg.errors import InputError
from medseg.inference.memory import release_free_heap, return_freed_memory_to_os
from medseg.inference.model_package import ModelPackage
from medseg.inference.postprocess import postprocess
from medseg.inference.preparation import (FOREGROUND_MARGIN, IntensityNormaliser, body_mask, expand_box, raw_body_box,
                                          raw_threshold, raw_window_box, spatial_transforms)
from medseg.inference.sliding import WindowPredictor, model_channels_last, predictor_for
from medseg.inference.slab_resample import lazy_geometry, resample_in_slabs, spacing_settings
from medseg.inference.streaming import streaming_sliding_window
from medseg.inference.window_grid import BodyWindows, aligned_box, body_extent
from medseg.io.nifti import load_nifti, read_array, read_unscaled, save_like, voxel_spacing

_GRID_STEPS = (mt.Orientationd, mt.Spacingd)  # the steps that move voxels to the model's grid
STORED_INTEGERS = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32))  # kept as is when resampled
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


class Predictor:
    """Holds one loaded model (loaded once per batch) and segments scans with it."""

    def __init__(self, package: ModelPackage, device: str = "auto", model: torch.nn.Module | None = None,
                 local_rank: int | None = None) -> None:
        """Load the package's network once; ``model`` replaces it (e.g. a fixed reference network in tests)."""
        self.package = package
        self.cfg = package.config
        self.device = resolve_device(device, local_rank)
        self.precision = resolve_precision(self.cfg.train.amp, self.device)
        self.model = model.to(self.device).eval() if model is not None else package.build(self.device)
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
        self.invert = Invertd(keys="pred", transform=self.spatial, orig_keys="image", nearest_interp=False, to_tensor=True)
        self.invert_nearest = Invertd(keys="pred", transform=self.spatial, orig_keys="image", nearest_interp=True, to_tensor=True)
        self.invert_labels = Invertd(keys="pred", transform=self.spatial_raw, orig_keys="image", nearest_interp=True, to_tensor=True)
        self.window = tuple(self.cfg.roi_size) if dims == 3 else (*self.cfg.roi_size, 1)
        self.predict_fn = predictor_for(self.model, dims, layout_channels_last=inf.channels_last)
        self.mirror_axes = (list(inf.tta_axes) if inf.tta_axes is not None else list(range(3))) if inf.tta_mirror else []
        self.last_windows: dict[str, int] = {}
        if inf.memory_bounded:
            return_freed_memory_to_os()

    # ---- loading ---------------------------------------------------------------------------------
    def _check_channels(self, reference: nib.Nifti1Image, n_files: int, path: Path | str) -> None:
        if len(reference.shape) not in (3, 4):
            raise InputError(path, f"expected a 3D volume, got shape {reference.shape}")
        n_in = int(self.package.metadata["in_channels"])
        n_given = n_files if n_files > 1 else (reference.shape[3] if len(reference.shape) == 4 else 1)
        if n_given != n_in:
            raise InputError(path, f"model expects {n_in} input channel(s), got {n_given}")

    def _from_files(self, image_paths: list[Path], steps: Compose | None = None) -> tuple[dict, nib.Nifti1Image]:
        """Load and preprocess channel files (``steps``: other transforms than the spatial ones, from loading on)."""
        reference = load_nifti(image_paths[0])
        self._check_channels(reference, len(image_paths), image_paths[0])
        files = [str(p) for p in image_paths]
        data = (steps or self.spatial)({"image": files if len(files) > 1 else files[0]})
        return data, reference

    def _from_image(self, image: nib.Nifti1Image, name: str, raw: bool = False, steps: Compose | None = None) -> dict:
        """Preprocess an in-memory image exactly as ``LoadImaged`` + the spatial steps would a file.

        ``raw`` keeps the voxel dtype (memory-bounded mode); otherwise the image becomes float32 as from a file.
        ``steps`` replaces the steps after loading (e.g. only the float cast, for slab-wise resampling).
        """
        self._check_channels(image, 1, name)
        array = read_array(image, name)
        array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)  # channel first
        affine = torch.as_tensor(image.affine, dtype=torch.float64)
        voxels = torch.from_numpy(array if raw and all(st > 0 for st in array.strides) else np.ascontiguousarray(array))
        tensor = MetaTensor(voxels, affine=affine,
                            meta={"original_affine": image.affine.copy(), "spatial_shape": np.array(image.shape[:3]),
                                  "filename_or_obj": name, "original_channel_dim": 0 if array.ndim == 4 else "no_channel"})
        return (steps or (self.spatial_raw_in_memory if raw else self.spatial_in_memory))({"image": tensor})

    # ---- inference -------------------------------------------------------------------------------
    def _window_predictor(self, **kw: object) -> WindowPredictor:
        return WindowPredictor(self.predict_fn, self.num_classes, mirror_axes=self.mirror_axes, **kw)  # type: ignore[arg-type]

    def _check_finite(self, image: torch.Tensor | np.ndarray, name: Path | str) -> None:
        if not np.issubdtype(np.asarray(image[..., :0]).dtype, np.floating):
            return
        for z in range(0, image.shape[-1], FINITE_SLAB):  # slab by slab: no full-size boolean mask
            if not np.isfinite(np.asarray(image[..., z:z + FINITE_SLAB])).all():
                raise InputError(name, "image contains NaN/inf voxels")

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
        wp = self._window_predictor(body=BodyWindows(body[box], self.window) if body is not None else None)
        with self.precision.autocast(self.device):
            logits = sliding_window_inference(crop[None], self.window, inf.sw_batch_size, wp, overlap=inf.overlap,
                                              mode=inf.blend_mode, sw_device=self.device, device=self.device, with_coord=True)
        self.last_windows = {"run": wp.windows_run, "skipped": wp.windows_skipped}
        return logits[0], box

    def _probabilities_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax (C, *spatial) on the preprocessed grid (background outside the crop)."""
        probs = torch.zeros((self.num_classes, *x.shape[1:]), dtype=torch.float32)
        probs[0] = 1.0
        result = self._windowed_logits(x)
        if result is None:
            return probs
        logits, box = result
        target = probs[(slice(None), *box)]
        for z in range(0, target.shape[-1], SOFTMAX_SLAB):  # slab by slab: no second full-size copy of the logits
            target[..., z:z + SOFTMAX_SLAB] = torch.softmax(logits[..., z:z + SOFTMAX_SLAB].float(), dim=0).cpu()
        return probs

    @torch.inference_mode()
    def _probabilities(self, data: dict, name: Path | str) -> torch.Tensor:
        image: MetaTensor = data["image"]
        self._check_finite(image.as_tensor(), name)
        probs = self._probabilities_preprocessed(image.as_tensor())
        data["pred"] = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
        restored = self.invert(data)["pred"]
        return restored.as_tensor() if isinstance(restored, MetaTensor) else torch.as_tensor(restored)

    @torch.inference_mode()
    def _labels_unresampled(self, data: dict, name: Path | str) -> np.ndarray:
        """Label map without the probability round trip, for preprocessing that does not resample.

        Reorientation and the crop only move voxels, so the argmax commutes with their inverse: taking it on the
        logits in the preprocessed grid and inverting the uint8 map gives the same mask as inverting the
        probabilities, without the softmax and the float copies of all classes.
        """
        image: MetaTensor = data["image"]
        self._check_finite(image.as_tensor(), name)
        labels = torch.zeros(image.shape[1:], dtype=torch.uint8)
        result = self._windowed_logits(image.as_tensor())
        if result is not None:
            logits, box = result
            labels[box] = argmax_classes(logits).cpu()  # on the GPU when there is one: only uint8 crosses
            del logits
        del image  # ``data`` holds the scan until ``_invert_label_map`` swaps it for its metadata
        return _invert_label_map(self.invert_nearest, data, labels)

    @torch.inference_mode()
    def _labels_bounded(self, image: nib.Nifti1Image, name: Path | str) -> np.ndarray:
        """Memory-bounded label map: raw crop in its own dtype, per-window normalisation, streamed blending."""
        inf, data_cfg = self.cfg.inference, self.cfg.data
        raw, slope, inter = read_unscaled(image, name)  # stored integers, not nibabel's float64 scaling of them
        scale = (slope, inter)
        self._check_finite(raw, name)
        shape = raw.shape[:3]
        whole = tuple(slice(0, n) for n in shape)
        # Windows stay raw: a window is body when it holds a voxel the foreground crop would keep.
        threshold = raw_threshold(raw, data_cfg, scale) if data_cfg.crop_foreground else None
        body = raw_body_box(raw, threshold) if threshold is not None else whole
        if body is None:  # no body at all: an empty mask
            self.last_windows = {"run": 0, "skipped": 0}
            return np.zeros(shape, dtype=np.uint8)
        # Without resampling, the crop keeps the whole scan's window grid (same answer as the standard path);
        # a resampled crop has its own sampling grid anyway, so it is just the training crop (margin 2), as is
        # window_grid "body".
        stats_box = expand_box(body, shape, FOREGROUND_MARGIN)
        exact = data_cfg.spacing is None and inf.window_grid == "whole"
        box = raw_window_box(body, shape, image.affine, data_cfg, self.window, inf.overlap) if exact else stats_box
        normalise = IntensityNormaliser(self.cfg, raw[None] if raw.ndim == 3 else np.moveaxis(raw, -1, 0), stats_box, scale)
        affine = image.affine.copy()  # the crop is a view of the stored array, its affine moved to the box corner
        affine[:3, 3] = image.affine[:3, :3] @ np.array([b.start for b in box]) + image.affine[:3, 3]
        source = raw[box][None] if raw.ndim == 3 else np.moveaxis(raw[box], -1, 0)  # channel-first view, no copy
        del raw
        # On the CPU the network's activations are process memory: one window per call (eval-mode networks give
        # the same output per window either way); on a GPU they are not, and windows stay batched.
        wp = self._window_predictor(body_above=threshold, prepare=normalise.windows,
                                    net_batch=1 if self.device.type == "cpu" else None)
        labels = np.zeros(image.shape[:3], dtype=np.uint8)
        if data_cfg.spacing is not None:  # resampled model: to its grid and back slab by slab (``slab_resample``)
            self._bounded_resampled(source, affine, wp, torch.from_numpy(labels[box])[None])
        else:
            labels[box] = self._bounded_oriented(source, affine, str(name), wp)
        self.last_windows = {"run": wp.windows_run, "skipped": wp.windows_skipped}
        return labels

    def _stream_labels(self, xt: torch.Tensor, wp: WindowPredictor) -> torch.Tensor:
        """uint8 label map of a channel-first raw scan on the model's grid, blended slab by slab."""
        inf = self.cfg.inference
        out = torch.zeros(xt.shape[1:], dtype=torch.uint8)

        def emit(z0: int, logits: torch.Tensor) -> None:
            out[..., z0:z0 + logits.shape[-1]] = argmax_classes(logits)

        with self.precision.autocast(self.device):
            streaming_sliding_window(xt, self.window, inf.sw_batch_size, wp, self.num_classes, emit, overlap=inf.overlap,
                                     mode=inf.blend_mode, sw_device=self.device, acc_dtype=torch.float16)
        release_free_heap()  # the network's activations lived on the heap; the inversion should not carry them
        return out

    def _bounded_oriented(self, source: np.ndarray, affine: np.ndarray, name: str, wp: WindowPredictor) -> np.ndarray:
        """No resampling: MONAI's orientation on the raw crop, streamed labels, ``Invertd`` (nearest) back."""
        crop = nib.Nifti1Image(source[0] if source.shape[0] == 1 else np.moveaxis(source, 0, -1), affine)
        data = self._from_image(crop, name, raw=True)
        out = self._stream_labels(data["image"].as_tensor(), wp)
        return _invert_label_map(self.invert_labels, data, out)

    def _bounded_resampled(self, source: np.ndarray, affine: np.ndarray, wp: WindowPredictor, target: torch.Tensor) -> None:
        """Resampled model: the raw crop is resampled to the model's grid slab by slab (kept in its stored integer
        type, rounded: at most half a stored unit, e.g. 0.5 HU), labels are streamed there and resampled back
        (nearest) slab by slab into ``target`` (1, *crop shape), a view of the output mask."""
        settings = spacing_settings(self.grid_steps)
        probe = MetaTensor(torch.zeros(1).expand(source.shape), affine=torch.as_tensor(affine))  # shape only, no memory
        grid_affine, grid_shape = lazy_geometry(self.grid_steps, probe)
        keep = resampled_dtype(source)
        xt = resample_in_slabs(source, affine, grid_affine, grid_shape, out_dtype=keep, device=self.device, **settings)
        out = self._stream_labels(xt, wp)
        del xt
        resample_in_slabs(out[None], grid_affine, affine, target.shape[1:], out=target, device=self.device,
                          **{**settings, "mode": "nearest"})

    def probabilities(self, image_paths: list[Path]) -> tuple[torch.Tensor, nib.Nifti1Image]:
        """Class probabilities (C, *input_shape) in the input's voxel grid, and the input header.

        Taken back with MONAI's whole-volume ``Invertd`` (full-size float volumes of every class): the reference
        the slab-wise path of ``predict`` is tested against, and a convenience for small scans.
        """
        data, reference = self._from_files(image_paths)
        return self._probabilities(data, image_paths[0]), reference

    def _segment(self, source: nib.Nifti1Image | list[Path], name: str | Path,
                 with_probabilities: bool = False) -> tuple[np.ndarray, nib.Nifti1Image, np.ndarray | None]:
        bounded = self.cfg.inference.memory_bounded
        if bounded and with_probabilities:
            raise ValueError("probabilities cannot be saved in memory-bounded mode (it inverts only the label map)")
        if not bounded or (isinstance(source, list) and len(source) > 1):  # multi-file channels: the standard path
            if self.cfg.data.spacing is not None:  # resampled model: to its grid and back slab by slab
                return self._segment_resampled(source, name, with_probabilities)
            if isinstance(source, list):
                data, reference = self._from_files(source)
            else:
                data, reference = self._from_image(source, str(name)), source
            if not with_probabilities and self.package.num_classes < 256:
                return self._labels_unresampled(data, name), reference, None
            probs = self._probabilities(data, name)
            return self._argmax(probs), reference, quantize_probabilities(probs) if with_probabilities else None
        reference = load_nifti(source[0]) if isinstance(source, list) else source
        self._check_channels(reference, 1, name)
        return self._labels_bounded(reference, name), reference, None

    @torch.inference_mode()
    def _segment_resampled(self, source: nib.Nifti1Image | list[Path], name: str | Path,
                           with_probabilities: bool) -> tuple[np.ndarray, nib.Nifti1Image, np.ndarray | None]:
        """Resampled model: the scan goes to the model's grid and the probabilities come back slab by slab.

        The float32 scan (as MONAI's loading makes it) is resampled onto the grid ``Orientationd`` + ``Spacingd``
        define, slab by slab with their settings (``slab_resample``; equal to the whole-volume transforms). Each slab
        of the scan's own grid then gets the class probabilities resampled back (bilinear, as ``Invertd``:
        reorientation and spacing undone in one step) and is reduced to labels (and quantised probabilities) at
        once, so neither direction builds a whole-volume sampling grid or a full-size float volume of all classes
        (512x512x300 resampled 0.8 -> 1 mm: +6.8 GiB above the scan with MONAI's whole-volume transforms).
        """
        if isinstance(source, list):
            data, reference = self._from_files(source, steps=self.loading)
        else:
            data, reference = self._from_image(source, str(name), steps=self.loading_in_memory), source
        loaded: MetaTensor = data.pop("image")
        self._check_finite(loaded.as_tensor(), name)
        src_affine = np.asarray(loaded.affine, dtype=np.float64)
        settings = spacing_settings(self.grid_steps)
        grid_affine, grid_shape = lazy_geometry(self.grid_steps, loaded)
        image = resample_in_slabs(loaded.as_tensor(), src_affine, grid_affine, grid_shape, device=self.device, **settings)
        del loaded
        probs = self._probabilities_preprocessed(image)
        del image
        shape = tuple(int(n) for n in reference.shape[:3])
        labels = np.zeros(shape, dtype=np.uint8 if self.num_classes < 256 else np.uint16)
        quantised = np.zeros((*shape, self.num_classes), dtype=np.uint8) if with_probabilities else None

        def emit(z0: int, part: torch.Tensor) -> None:
            part = part.cpu()  # sampled on the device; one slab comes back
            z1 = z0 + part.shape[-1]
            labels[..., z0:z1] = self._argmax(part)
            if quantised is not None:
                quantised[..., z0:z1, :] = quantize_probabilities(part)

        resample_in_slabs(probs, grid_affine, src_affine, shape, emit=emit, device=self.device, **settings)
        return labels, reference, quantised

    def _argmax(self, probs: torch.Tensor) -> np.ndarray:
        if self.package.num_classes < 256:
            return argmax_classes(probs).numpy()
        return probs.argmax(0).numpy().astype(np.uint16)

    def predict(self, source: list[Path] | nib.Nifti1Image, name: str | None = None,
                with_probabilities: bool = False) -> Prediction:
        """Label map (argmax, then the configured post-processing) in the input's voxel grid.

        ``source`` is a list of NIfTI files (one per channel) or an in-memory image; ``name`` names it in errors.
        ``with_probabilities`` also returns the quantised class probabilities (``ValueError`` in memory-bounded mode).
        """
        t0 = time.perf_counter()
        name = name or (str(source[0]) if isinstance(source, list) else "image")
        labels, reference, probs = self._segment(source, name, with_probabilities)
        check_overlay(labels, reference, name)
        voxel_ml = float(np.prod(voxel_spacing(reference.affine))) / 1000.0
        labels = postprocess(labels, self.cfg.inference, voxel_ml, self.package.labels.values())
        return Prediction(labels, reference, time.perf_counter() - t0, probs, dict(self.last_windows))


def _invert_label_map(invert: Invertd, data: dict, labels: torch.Tensor) -> np.ndarray:
    """A uint8 label map on the preprocessed grid taken back to the scan's grid by ``invert`` (nearest), as uint8.

    The preprocessed scan in ``data["image"]`` is first swapped for an empty tensor carrying its metadata (all
    ``Invertd`` needs), so it is freed before the inversion allocates (callers drop their own references to it).
    """
    image = data["image"]
    data["image"] = MetaTensor(torch.empty(0), meta=image.meta, applied_operations=image.applied_operations)
    del image
    data["pred"] = MetaTensor(labels[None], meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    restored = invert(data)["pred"]
    data.clear()  # the preprocessed-grid label map goes before the caller fills the full-size one
    restored = restored.as_tensor() if isinstance(restored, MetaTensor) else torch.as_tensor(restored)
    return restored[0].round().to(torch.uint8).numpy() if restored.dtype.is_floating_point else restored[0].numpy()


def resampled_dtype(source: np.ndarray) -> torch.dtype:
    """The type a raw scan keeps on the model's grid in memory-bounded mode: its own integer type (int8/uint8/
    int16/int32), int16 for uint16 scans whose values fit (12-bit CT and MR: resampled values stay within the
    source's range), float32 otherwise."""
    if source.dtype in STORED_INTEGERS:
        return torch.from_numpy(np.empty(0, dtype=source.dtype)).dtype
    if source.dtype == np.uint16 and source.size and int(source.max()) <= np.iinfo(np.int16).max:
        return torch.int16
    return torch.float32


def argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over the class axis (dim 0) of (C, *spatial) scores, C < 256; ties go to the lower class.

    ``Tensor.argmax(0)`` reduces across the outermost axis with a stride of the whole volume and took 5.9 s on
    (4, 512, 512, 300) here; this running comparison is elementwise over contiguous class planes (0.8 s).
    """
    best = scores[0].clone()
    out = torch.zeros(scores.shape[1:], dtype=torch.uint8, device=scores.device)
    for c in range(1, scores.shape[0]):
        better = scores[c] > best  # strict: an equal later class does not win, as with argmax
        out.masked_fill_(better, c)
        torch.maximum(best, scores[c], out=best)
    return out


def quantize_probabilities(probs: torch.Tensor) -> np.ndarray:
    """Probabilities (C, *shape) as uint8 (*shape, C) in steps of 1/255 that sum to exactly 255 per voxel.

    Probabilities are first renormalised to sum to 1 (see below). Largest-remainder rounding: every class is rounded down and the missing steps go to the classes with the
    largest remainders, so each class is within 1/255 of its probability. Where that would let another class
    tie with or beat the most probable one (classes within 1/255 of each other), each tying class gives a step
    to the most probable one, so the saved argmax is the mask's argmax (ties resolve to the lower class, as
    ``argmax`` does); only at such near-ties is the most probable class off by more than 1/255 (one step per
    tying class). uint8 is a quarter of float32 and half of float16, compresses well, and 1/255 is finer than
    any threshold one would draw on a softmax output. Hand-written: no kept library quantises this way.
    """
    # Outside the foreground crop Invertd pads with zeros, and at the crop's edge interpolation mixes them in:
    # renormalise (the argmax is unchanged), and a voxel with no probability at all is background (class 0).
    x = probs.float().clamp(0.0, 1.0)
    total = x.sum(0, keepdim=True)
    empty = total <= 1e-6
    x.div_(total.clamp(min=1e-12)).masked_fill_(empty.expand_as(x), 0.0)
    x[0].masked_fill_(empty[0], 1.0)
    del total, empty
    x *= 255.0
    q = torch.floor(x)
    x -= q  # the remainders
    missing = (255.0 - q.sum(0, keepdim=True)).round().clamp(0, x.shape[0])
    for _ in range(x.shape[0] - 1):  # at most C-1 steps are missing per voxel; each goes to the largest remainder
        take = x.argmax(0, keepdim=True)
        give = (missing > 0).float()
        q.scatter_add_(0, take, give)
        x.scatter_(0, take, -1.0)
        missing -= give
    del x
    top = probs.argmax(0, keepdim=True)
    q_top = q.gather(0, top)
    index = torch.arange(q.shape[0]).view(-1, *([1] * (q.ndim - 1)))
    beats = (index != top) & ((q > q_top) | ((q == q_top) & (index < top)) & (q > 0))
    q -= beats.float()
    q.scatter_add_(0, top, beats.sum(0, keepdim=True).float())
    return np.moveaxis(q.to(torch.uint8).numpy(), 0, -1)


def save_probabilities_like(probs: np.ndarray, reference: nib.Nifti1Image, out_path: str | Path) -> Path:
    """Write uint8 probabilities (*shape, C) as a 4D NIfTI with the input's geometry and ``scl_slope`` 1/255, atomically.

    nibabel applies the slope on reading, so ``get_fdata()`` returns probabilities in [0, 1].
    """
    if probs.shape[:3] != reference.shape[:3] or probs.dtype != np.uint8:
        raise ValueError(f"probabilities {probs.shape} {probs.dtype} do not fit reference shape {reference.shape[:3]}")
    return save_like(probs, reference, out_path, slope=1.0 / 255.0, intent=("vector", (), "class probabilities"))


def check_overlay(labels: np.ndarray, reference: nib.Nifti1Image, path: Path | str) -> None:
    """The mask must have exactly the input's spatial shape (its affine is copied from the input)."""
    if labels.shape != tuple(reference.shape[:3]):
        raise RuntimeError(f"{path}: prediction shape {labels.shape} does not match input {reference.shape[:3]} (inversion bug)")


def organ_volumes(labels: np.ndarray, reference: nib.Nifti1Image, label_map: dict[str, int]) -> dict[str, dict[str, float]]:
    """Voxel count and volume (ml) per organ name."""
    voxel_ml = float(np.prod(voxel_spacing(reference.affine))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(label_map.values()) + 1)
    return {name: {"voxels": int(counts[v]), "volume_ml": round(float(counts[v]) * voxel_ml, 4)}
            for name, v in label_map.items() if v != 0}
