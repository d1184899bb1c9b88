"""The resampled path of prediction: models trained at a target spacing (``data.spacing``).

The float32 scan (as MONAI's loading makes it) goes to the model's grid and the class probabilities come back to
the scan's grid slab by slab (``slab_resample``), so neither direction builds a whole-volume sampling grid or a
full-size float volume of all classes. The windows go through the predictor's own window function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medseg.inference.label_maps import quantize_probabilities
from medseg.inference.slab_resample import lazy_geometry, resample_in_slabs, spacing_settings


class Resampling(Protocol):
    """What the resampled path uses of its predictor (``medseg.inference.predictor.Predictor``)."""

    device: torch.device
    num_classes: int
    loading: Compose
    loading_in_memory: Compose
    grid_steps: Compose

    def from_files(self, image_paths: list[Path], steps: Compose | None = None) -> tuple[dict, nib.Nifti1Image]: ...

    def from_image(
        self, image: nib.Nifti1Image, name: str, raw: bool = False, steps: Compose | None = None
    ) -> dict: ...

    def check_finite(self, image: torch.Tensor | np.ndarray, name: Path | str) -> None: ...

    def probabilities_preprocessed(self, x: torch.Tensor) -> torch.Tensor: ...

    def argmax(self, probs: torch.Tensor) -> np.ndarray: ...


class ResampledPath:
    """Resampled models: to the model's grid and back, slab by slab."""

    def __init__(self, predictor: Resampling) -> None:
        self.p = predictor

    @torch.inference_mode()
    def segment(
        self, source: nib.Nifti1Image | list[Path], name: str | Path, with_probabilities: bool
    ) -> tuple[np.ndarray, nib.Nifti1Image, np.ndarray | None]:
        """Resampled model: the scan goes to the model's grid and the probabilities come back slab by slab.

        The float32 scan (as MONAI's loading makes it) is resampled onto the grid ``Orientationd`` + ``Spacingd``
        define, slab by slab with their settings (``slab_resample``; equal to the whole-volume transforms). Each slab
        of the scan's own grid then gets the class probabilities resampled back (bilinear, as ``Invertd``:
        reorientation and spacing undone in one step) and is reduced to labels (and quantised probabilities) at
        once, so neither direction builds a whole-volume sampling grid or a full-size float volume of all classes
        (512x512x300 resampled 0.8 -> 1 mm: +6.8 GiB above the scan with MONAI's whole-volume transforms).
        """
        p = self.p
        if isinstance(source, list):
            data, reference = p.from_files(source, steps=p.loading)
        else:
            data, reference = p.from_image(source, str(name), steps=p.loading_in_memory), source
        loaded: MetaTensor = data.pop("image")
        p.check_finite(loaded.as_tensor(), name)
        src_affine = np.asarray(loaded.affine, dtype=np.float64)
        settings = spacing_settings(p.grid_steps)
        grid_affine, grid_shape = lazy_geometry(p.grid_steps, loaded)
        image = resample_in_slabs(loaded.as_tensor(), src_affine, grid_affine, grid_shape, device=p.device, **settings)
        del loaded
        if image is None:  # only an ``emit`` call returns None
            raise RuntimeError("resample_in_slabs returned no image")
        probs = p.probabilities_preprocessed(image)
        del image
        shape = tuple(int(n) for n in reference.shape[:3])
        labels = np.zeros(shape, dtype=np.uint8 if p.num_classes < 256 else np.uint16)
        quantised = np.zeros((*shape, p.num_classes), dtype=np.uint8) if with_probabilities else None

        def emit(z0: int, part: torch.Tensor) -> None:
            part = part.cpu()  # sampled on the device; one slab comes back
            z1 = z0 + part.shape[-1]
            labels[..., z0:z1] = p.argmax(part)
            if quantised is not None:
                quantised[..., z0:z1, :] = quantize_probabilities(part)

        resample_in_slabs(probs, grid_affine, src_affine, shape, emit=emit, device=p.device, **settings)
        return labels, reference, quantised
