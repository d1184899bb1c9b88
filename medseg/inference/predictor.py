"""Predict label maps in the input scan's own geometry.

The scan goes through the model's own (invertible) preprocessing, is segmented with MONAI sliding-window
inference, and the class probabilities are taken back through ``Invertd`` (undoing the foreground crop,
the resampling and the reorientation) before the argmax. The mask is then written with the input file's
own affine and header, so it overlays the scan voxel for voxel; ``check_overlay`` asserts that.

Inputs are NIfTI files or an in-memory ``nib.Nifti1Image`` (e.g. a DICOM series converted with
``sitk_to_nifti``), so DICOM needs no temporary file. ``inference.memory_bounded`` trades a little
accuracy at label boundaries (the label map, not the probabilities, is inverted, with nearest
interpolation) for memory: the raw scan is cropped to the body before any float copy, and windows are
stitched on the CPU in float16. It never holds the inverted probabilities, so it cannot save them.

Optional probabilities (``predict(..., with_probabilities=True)``) are the inverted softmax before
post-processing, quantised to uint8 steps of 1/255 (``quantize_probabilities``) and written by
``save_probabilities_like`` as a 4D NIfTI (classes on the last axis) with the input's geometry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd

from medseg.data.transforms import ForegroundAbove, eval_transforms
from medseg.engine.device import resolve_device, resolve_precision
from medseg.errors import InputError
from medseg.inference.model_package import ModelPackage
from medseg.inference.postprocess import postprocess
from medseg.inference.sliding import predictor_for
from medseg.io.nifti import load_nifti, read_array, save_like, voxel_spacing

ARGMAX_SLAB = 16  # slices per argmax step in memory-bounded mode (int64 argmax output stays small)


@dataclass
class Prediction:
    """A label map in the input's voxel grid plus the input header it belongs to."""

    labels: np.ndarray
    reference: nib.Nifti1Image
    seconds: float
    probabilities: np.ndarray | None = None  # uint8 (*input shape, C), value/255 = probability (before post-processing)


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
        self.pre = eval_transforms(self.cfg, with_label=False)
        self.pre_in_memory = Compose(self.pre.transforms[1:])  # everything after LoadImaged
        self.invert = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False, to_tensor=True)
        self.invert_labels = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=True, to_tensor=True)
        self.window = self.cfg.roi_size if self.cfg.model.spatial_dims == 3 else (*self.cfg.roi_size, 1)
        self.predict_fn = predictor_for(self.model, self.cfg.model.spatial_dims)

    # ---- loading ---------------------------------------------------------------------------------
    def _check_channels(self, reference: nib.Nifti1Image, n_files: int, path: Path | str) -> None:
        if len(reference.shape) not in (3, 4):
            raise InputError(path, f"expected a 3D volume, got shape {reference.shape}")
        n_in = int(self.package.metadata["in_channels"])
        n_given = n_files if n_files > 1 else (reference.shape[3] if len(reference.shape) == 4 else 1)
        if n_given != n_in:
            raise InputError(path, f"model expects {n_in} input channel(s), got {n_given}")

    def _from_files(self, image_paths: list[Path]) -> tuple[dict, nib.Nifti1Image]:
        reference = load_nifti(image_paths[0])
        self._check_channels(reference, len(image_paths), image_paths[0])
        data = self.pre({"image": [str(p) for p in image_paths] if len(image_paths) > 1 else str(image_paths[0])})
        return data, reference

    def _from_image(self, image: nib.Nifti1Image, name: str) -> dict:
        """Preprocess an in-memory image exactly as ``LoadImaged`` + the rest of the pipeline would a file."""
        self._check_channels(image, 1, name)
        array = read_array(image, name)
        array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)  # channel first
        affine = torch.as_tensor(image.affine, dtype=torch.float64)
        tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=affine,
                            meta={"original_affine": image.affine.copy(), "spatial_shape": np.array(image.shape[:3]),
                                  "filename_or_obj": name, "original_channel_dim": 0 if array.ndim == 4 else "no_channel"})
        return self.pre_in_memory({"image": tensor})

    # ---- inference -------------------------------------------------------------------------------
    def _logits(self, image: MetaTensor, stitch_device: torch.device | None = None, half: bool = False) -> torch.Tensor:
        """Sliding-window logits (1, C, *preprocessed shape), mirrored TTA averaged in when configured."""
        inf = self.cfg.inference
        x = image.as_tensor().unsqueeze(0)
        fn = self.predict_fn
        if half:  # stitch in float16 (MONAI stitches in the input's dtype); the network still runs in float32
            x = x.half()
            fn = _cast_io(self.predict_fn)
        kw = dict(overlap=inf.overlap, mode=inf.blend_mode, sw_device=self.device, device=stitch_device or self.device)
        with self.precision.autocast(self.device):
            logits = sliding_window_inference(x, self.window, inf.sw_batch_size, fn, **kw)
            if inf.tta_mirror:  # average over mirrored copies (flips are their own inverse)
                axes = inf.tta_axes if inf.tta_axes is not None else range(logits.ndim - 2)
                dims = [2 + a for a in axes]
                for d in dims:
                    logits += torch.flip(sliding_window_inference(torch.flip(x, [d]), self.window, inf.sw_batch_size, fn, **kw), [d])
                logits /= len(dims) + 1
        return logits

    def _check_finite(self, image: MetaTensor, name: Path | str) -> None:
        if not torch.isfinite(image.as_tensor()).all():
            raise InputError(name, "image contains NaN/inf voxels")

    @torch.inference_mode()
    def _probabilities(self, data: dict, name: Path | str) -> torch.Tensor:
        image: MetaTensor = data["image"]
        self._check_finite(image, name)
        probs = torch.softmax(self._logits(image).float(), dim=1)[0].cpu()
        data["pred"] = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
        restored = self.invert(data)["pred"]
        return restored.as_tensor() if isinstance(restored, MetaTensor) else torch.as_tensor(restored)

    @torch.inference_mode()
    def _labels_bounded(self, data: dict, name: Path | str) -> np.ndarray:
        """Argmax in the preprocessed grid, slab by slab, then the uint8 label map is inverted (nearest)."""
        image: MetaTensor = data["image"]
        self._check_finite(image, name)
        logits = self._logits(image, stitch_device=torch.device("cpu"), half=True)[0]
        data["image"] = MetaTensor(torch.empty(0), meta=image.meta, applied_operations=image.applied_operations)
        del image  # the preprocessed float image is no longer needed
        labels = torch.empty(logits.shape[1:], dtype=torch.uint8)
        for z in range(0, labels.shape[-1], ARGMAX_SLAB):
            labels[..., z:z + ARGMAX_SLAB] = logits[..., z:z + ARGMAX_SLAB].argmax(0).to(torch.uint8)
        del logits
        data["pred"] = MetaTensor(labels[None], meta=data["image"].meta, applied_operations=data["image"].applied_operations)
        restored = self.invert_labels(data)["pred"]
        restored = restored.as_tensor() if isinstance(restored, MetaTensor) else torch.as_tensor(restored)
        return restored[0].round().to(torch.uint8).numpy()

    def probabilities(self, image_paths: list[Path]) -> tuple[torch.Tensor, nib.Nifti1Image]:
        """Class probabilities (C, *input_shape) in the input's voxel grid, and the input header."""
        data, reference = self._from_files(image_paths)
        return self._probabilities(data, image_paths[0]), reference

    def _segment(self, source: nib.Nifti1Image | list[Path], name: str | Path,
                 with_probabilities: bool = False) -> tuple[np.ndarray, nib.Nifti1Image, np.ndarray | None]:
        bounded = self.cfg.inference.memory_bounded
        if bounded and with_probabilities:
            raise ValueError("probabilities cannot be saved in memory-bounded mode (it inverts only the label map)")
        if not bounded:
            if isinstance(source, list):
                data, reference = self._from_files(source)
            else:
                data, reference = self._from_image(source, str(name)), source
            probs = self._probabilities(data, name)
            return self._argmax(probs), reference, quantize_probabilities(probs) if with_probabilities else None
        if isinstance(source, list) and len(source) > 1:
            data, reference = self._from_files(source)
            return self._argmax(self._probabilities(data, name)), reference, None
        reference = load_nifti(source[0]) if isinstance(source, list) else source
        self._check_channels(reference, 1, name)
        box = self._body_box(read_array(reference, name))
        labels = np.zeros(reference.shape[:3], dtype=np.uint8)
        if box is not None:  # no body at all: an empty mask
            cropped = reference.slicer[box]  # nibabel moves the affine with the crop: geometry is kept
            labels[box] = self._labels_bounded(self._from_image(cropped, str(name)), name)
        return labels, reference, None

    def _body_box(self, array: np.ndarray) -> tuple[slice, ...] | None:
        """Bounding box of the body on the raw array (before any float copy), with the pipeline's margin."""
        if not self.cfg.data.crop_foreground:
            return tuple(slice(0, s) for s in array.shape[:3])
        body = ForegroundAbove(self.cfg.data.foreground_threshold)(array if array.ndim == 3 else array[..., 0])
        if not body.any():
            return None
        box = []
        for axis in range(3):
            hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
            box.append(slice(max(int(hit[0]) - 2, 0), min(int(hit[-1]) + 3, array.shape[axis])))
        return tuple(box)

    def _argmax(self, probs: torch.Tensor) -> np.ndarray:
        return probs.argmax(0).numpy().astype(np.uint8 if self.package.num_classes < 256 else np.uint16)

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
        return Prediction(labels, reference, time.perf_counter() - t0, probs)


def _cast_io(fn):  # noqa: ANN001, ANN202 - a sliding-window predictor
    """Run ``fn`` in float32 on float16 windows and return float16 logits (for float16 stitching)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        return fn(x.float()).half()
    return run


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
