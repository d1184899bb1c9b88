"""Label maps and class probabilities: the uint8 argmax, probability quantisation and files, the inversion of a
label map to the scan's grid, the overlay check and organ volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medseg.io.nifti import save_like, voxel_spacing

STORED_INTEGERS = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32))  # kept as is when resampled


def invert_label_map(invert: Invertd, data: dict, labels: torch.Tensor) -> np.ndarray:
    """A uint8 label map on the preprocessed grid taken back to the scan's grid by ``invert`` (nearest), as uint8.

    The preprocessed scan in ``data["image"]`` is first swapped for an empty tensor carrying its metadata (all
    ``Invertd`` needs), so it is freed before the inversion allocates (callers drop their own references to it).
    """
    image = data["image"]
    data["image"] = MetaTensor(torch.empty(0), meta=image.meta, applied_operations=image.applied_operations)
    del image
    data["pred"] = MetaTensor(
        labels[None], meta=data["image"].meta, applied_operations=data["image"].applied_operations
    )
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
        raise RuntimeError(
            f"{path}: prediction shape {labels.shape} does not match input {reference.shape[:3]} (inversion bug)"
        )


def organ_volumes(
    labels: np.ndarray, reference: nib.Nifti1Image, label_map: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Voxel count and volume (ml) per organ name."""
    voxel_ml = float(np.prod(voxel_spacing(reference.affine))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(label_map.values()) + 1)
    return {
        name: {"voxels": int(counts[v]), "volume_ml": round(float(counts[v]) * voxel_ml, 4)}
        for name, v in label_map.items()
        if v != 0
    }
