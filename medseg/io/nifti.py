"""NIfTI reading with validation, and atomic writing of label maps in a reference geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import atomic_path


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load a NIfTI header (data stays lazy); a missing or unreadable file is an ``InputError``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(
            path, f"not a readable NIfTI file ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputError(path, "invalid affine (singular or not finite)")
    return img


def read_array(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """Read voxel data, turning truncated/corrupt payloads into an ``InputError``."""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:
        raise InputError(path, f"cannot read voxel data ({e.__class__.__name__})") from None


def read_unscaled(img: nib.Nifti1Image, path: str | Path) -> tuple[np.ndarray, float, float]:
    """Stored voxel values and their scaling: ``value = stored * slope + inter``.

    CT exported by dcm2niix and others keeps int16/uint16 voxels with ``scl_inter`` (e.g. -1024); nibabel
    applies that scaling in float64, four times an int16 scan. Memory-bounded inference reads the stored
    integers instead and applies the scaling window by window. Unscaled images give ``(array, 1.0, 0.0)``;
    a non-positive slope (order-reversing) is returned already scaled.
    """
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if (slope, inter) == (1.0, 0.0) or slope <= 0 or not hasattr(proxy, "get_unscaled"):
        return read_array(img, path), 1.0, 0.0
    try:
        return np.asanyarray(proxy.get_unscaled()), slope, inter
    except Exception as e:
        raise InputError(path, f"cannot read voxel data ({e.__class__.__name__})") from None


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel spacing (mm) from an affine's column norms."""
    return tuple(float(x) for x in np.linalg.norm(affine[:3, :3], axis=0))


def save_like(
    array: np.ndarray,
    reference: nib.Nifti1Image,
    out_path: str | Path,
    *,
    slope: float = 1.0,
    intent: tuple[str, tuple, str] | None = None,
) -> Path:
    """Write ``array`` with exactly the reference image's affine and (q/s)form codes, atomically.

    The reference is the *input scan*: copying its header geometry is what makes an output overlay it.
    ``array`` has the reference's spatial shape, optionally with a trailing axis (e.g. classes).
    """
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    out = nib.Nifti1Image(array, reference.affine, header)
    out.header.set_slope_inter(slope, 0.0)
    if intent is not None:
        out.header.set_intent(intent[0], intent[1], name=intent[2])
    qform, qcode = reference.get_qform(coded=True)
    sform, scode = reference.get_sform(coded=True)
    out.set_qform(qform if qform is not None else reference.affine, int(qcode) if qcode else 1)
    out.set_sform(sform if sform is not None else reference.affine, int(scode) if scode else 1)
    with atomic_path(out_path, suffix=".nii.gz") as tmp:
        nib.save(out, str(tmp))
    return Path(out_path)


def save_label_like(labels: np.ndarray, reference: nib.Nifti1Image, out_path: str | Path) -> Path:
    """Write a label map in the reference (input scan) geometry as uint8 (uint16 above 255 labels), atomically."""
    if labels.shape[:3] != reference.shape[:3]:
        raise ValueError(f"label shape {labels.shape} != reference shape {reference.shape[:3]}")
    max_label = int(labels.max()) if labels.size else 0
    return save_like(labels.astype(np.uint8 if max_label < 256 else np.uint16), reference, out_path)
