"""Predict label maps in the input scan's own geometry.

The scan goes through the model's own (invertible) preprocessing, is segmented with MONAI sliding-window
inference, and the class probabilities are taken back through ``Invertd`` (undoing the foreground crop,
the resampling and the reorientation) before the argmax. The mask is then written with the input file's
own affine and header, so it overlays the scan voxel for voxel; ``check_overlay`` asserts that.
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
from monai.transforms import Invertd

from medseg.data.transforms import eval_transforms
from medseg.engine.device import resolve_device, resolve_precision
from medseg.errors import InputError
from medseg.inference.model_package import ModelPackage
from medseg.inference.sliding import predictor_for
from medseg.io.nifti import load_nifti, voxel_spacing


@dataclass
class Prediction:
    """A label map in the input's voxel grid plus the input header it belongs to."""

    labels: np.ndarray
    reference: nib.Nifti1Image
    seconds: float


class Predictor:
    """Holds one loaded model (loaded once per batch) and segments scans with it."""

    def __init__(self, package: ModelPackage, device: str = "auto", model: torch.nn.Module | None = None) -> None:
        """Load the package's network once; ``model`` replaces it (e.g. a fixed reference network in tests)."""
        self.package = package
        self.cfg = package.config
        self.device = resolve_device(device)
        self.precision = resolve_precision(self.cfg.train.amp, self.device)
        self.model = model.to(self.device).eval() if model is not None else package.build(self.device)
        self.pre = eval_transforms(self.cfg, with_label=False)
        self.invert = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False, to_tensor=True)
        self.window = self.cfg.roi_size if self.cfg.model.spatial_dims == 3 else (*self.cfg.roi_size, 1)
        self.predict_fn = predictor_for(self.model, self.cfg.model.spatial_dims)

    @torch.inference_mode()
    def probabilities(self, image_paths: list[Path]) -> tuple[torch.Tensor, nib.Nifti1Image]:
        """Class probabilities (C, *input_shape) in the input's voxel grid, and the input header."""
        reference = load_nifti(image_paths[0])
        if len(reference.shape) not in (3, 4):
            raise InputError(image_paths[0], f"expected a 3D volume, got shape {reference.shape}")
        n_in = int(self.package.metadata["in_channels"])
        n_given = len(image_paths) if len(image_paths) > 1 else (reference.shape[3] if len(reference.shape) == 4 else 1)
        if n_given != n_in:
            raise InputError(image_paths[0], f"model expects {n_in} input channel(s), got {n_given}")
        data = self.pre({"image": [str(p) for p in image_paths] if len(image_paths) > 1 else str(image_paths[0])})
        image: MetaTensor = data["image"]
        if not torch.isfinite(image.as_tensor()).all():
            raise InputError(image_paths[0], "image contains NaN/inf voxels")
        inf = self.cfg.inference
        with self.precision.autocast(self.device):
            logits = sliding_window_inference(image.unsqueeze(0).to(self.device), self.window, inf.sw_batch_size,
                                              self.predict_fn, overlap=inf.overlap, mode=inf.blend_mode)
            if inf.tta_mirror:  # average over mirrored copies (flips are their own inverse)
                dims = list(range(2, logits.ndim))
                for d in dims:
                    flipped = torch.flip(image.unsqueeze(0).to(self.device), [d])
                    logits = logits + torch.flip(sliding_window_inference(flipped, self.window, inf.sw_batch_size,
                                                                          self.predict_fn, overlap=inf.overlap, mode=inf.blend_mode), [d])
                logits = logits / (len(dims) + 1)
        probs = torch.softmax(logits.float(), dim=1)[0].cpu()
        data["pred"] = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
        restored = self.invert(data)["pred"]
        restored = restored.as_tensor() if isinstance(restored, MetaTensor) else torch.as_tensor(restored)
        return restored, reference

    def predict(self, image_paths: list[Path]) -> Prediction:
        """Label map (argmax) in the input's voxel grid."""
        t0 = time.perf_counter()
        probs, reference = self.probabilities(image_paths)
        labels = probs.argmax(0).numpy().astype(np.uint8 if self.package.num_classes < 256 else np.uint16)
        check_overlay(labels, reference, image_paths[0])
        return Prediction(labels, reference, time.perf_counter() - t0)


def check_overlay(labels: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """The mask must have exactly the input's spatial shape (its affine is copied from the input)."""
    if labels.shape != tuple(reference.shape[:3]):
        raise RuntimeError(f"{path}: prediction shape {labels.shape} does not match input {reference.shape[:3]} (inversion bug)")


def organ_volumes(labels: np.ndarray, reference: nib.Nifti1Image, label_map: dict[str, int]) -> dict[str, dict[str, float]]:
    """Voxel count and volume (ml) per organ name."""
    voxel_ml = float(np.prod(voxel_spacing(reference.affine))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(label_map.values()) + 1)
    return {name: {"voxels": int(counts[v]), "volume_ml": round(float(counts[v]) * voxel_ml, 4)}
            for name, v in label_map.items() if v != 0}
