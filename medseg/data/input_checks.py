"""Check every case's files before any training starts (volumes: NIfTI; 2D images: PNG/JPG + index PNG).

Each problem is an ``InputError`` naming the file and the cause (missing, unreadable or a broken header, see
``io.nifti.load_nifti``; not 3D, a channel count other than the manifest's, NaN/inf or constant voxels; image/label
shape or affine mismatch, non-integer labels, label values outside the manifest's label map), so a bad case is found
in seconds, not after hours of training. An empty label is a warning (``medseg.data`` logger), not an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import InputError
from medseg.io.images2d.common import check_pair
from medseg.io.manifest import Case, Manifest
from medseg.io.nifti import load_nifti, read_array, voxel_spacing

log = logging.getLogger("medseg.data")

AFFINE_ATOL = 1e-3  # mm; header round-off between image and label writers stays well below this


@dataclass(frozen=True)
class CaseInfo:
    """What the checks learnt about a case (used for dataset fingerprints and planning)."""

    id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    label_values: tuple[int, ...]


def check_case(manifest: Manifest, case: Case, check_labels: bool = True) -> CaseInfo:
    """Check a case's image(s) and label; raise ``InputError`` on the first problem.

    An empty label (background only) is allowed, with a warning naming it: a scan without the organs is a valid
    negative example, but a label that lost its contents in a conversion looks the same.
    """
    images = [(p, load_nifti(p)) for p in manifest.image_paths(case)]
    ref_path, ref = images[0]
    shape3 = ref.shape[:3]
    for p, img in images:
        _check_image(p, img, ref_path, shape3, len(images), manifest.num_channels)
    label_values: tuple[int, ...] = ()
    label_path = manifest.label_path(case)
    if label_path is not None and check_labels:
        label_values = _check_label(manifest, label_path, ref_path, ref)
    return CaseInfo(case.id, tuple(int(s) for s in shape3), voxel_spacing(ref.affine), label_values)


def _check_image(p: Path, img: nib.Nifti1Image, ref_path: Path, shape3: tuple, n_files: int, n_channels: int) -> None:
    """One channel file: a 3D volume (or 4D, channels last, as the only file) of finite, not constant voxels."""
    if len(img.shape) not in (3, 4):
        raise InputError(p, f"expected a 3D volume (or 4D: channels last), got shape {img.shape}")
    if len(img.shape) == 4 and n_files > 1:
        raise InputError(p, f"expected a 3D volume (one file per channel), got shape {img.shape}")
    given = int(img.shape[3]) if len(img.shape) == 4 else n_files
    if given != n_channels:
        raise InputError(p, f"the manifest lists {n_channels} channel(s), this case has {given} (shape {img.shape})")
    if img.shape[:3] != shape3:
        raise InputError(p, f"channel shape {img.shape[:3]} != first channel {shape3} ({ref_path.name})")
    data = read_array(img, p)
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(p, f"unsupported voxel dtype {data.dtype}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise InputError(p, f"image contains {int((~np.isfinite(data)).sum())} NaN/inf voxels")
    if data.size and data.min() == data.max():  # a lost pixel payload; nothing a network can learn from
        raise InputError(p, f"image is constant (every voxel {data.flat[0]:g}): no contrast to learn from")


def _check_label(manifest: Manifest, label_path: Path, ref_path: Path, ref: nib.Nifti1Image) -> tuple[int, ...]:
    """The label: the image's grid and geometry, integer values of the label map; the values found."""
    lab = load_nifti(label_path)
    if lab.shape[:3] != ref.shape[:3]:
        raise InputError(label_path, f"label shape {lab.shape[:3]} != image shape {ref.shape[:3]} ({ref_path.name})")
    if not np.allclose(lab.affine, ref.affine, atol=AFFINE_ATOL):
        gap = float(np.max(np.abs(lab.affine - ref.affine)))
        raise InputError(
            label_path,
            f"label affine differs from image affine ({ref_path.name}) by up to {gap:.3g} (tolerance "
            f"{AFFINE_ATOL:g} mm); they must share geometry",
        )
    arr = read_array(lab, label_path)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            raise InputError(label_path, "label contains non-integer or NaN values (a resampled or probability map?)")
    values = np.unique(arr).astype(np.int64)
    allowed = set(manifest.labels.values())
    bad = sorted(set(values.tolist()) - allowed)
    if bad:
        raise InputError(label_path, f"label values {bad} not in the manifest's label map {sorted(allowed)}")
    if not (values != 0).any():
        log.warning("%s: label is empty (background only); kept as a case without any organ", label_path)
    return tuple(int(v) for v in values)


def check_cases(manifest: Manifest, cases: list[Case]) -> list[CaseInfo]:
    """Check several volume cases (stops at the first bad one)."""
    if not cases:
        raise InputError(manifest.path or "manifest", "no cases to use (check the splits)")
    return [check_case(manifest, c) for c in cases]


def check_image_cases(manifest: Manifest, cases: list[Case], ignore_index: int | None) -> None:
    """Every case readable, one RGB image per case, label the image's size with values in the label map
    (or ``ignore_index``); the first problem is an ``InputError`` naming the file."""
    if not cases:
        raise InputError(manifest.path or "manifest", "no cases to use (check the splits)")
    allowed = set(manifest.labels.values()) | ({ignore_index} if ignore_index is not None else set())
    for c in cases:
        images = manifest.image_paths(c)
        if len(images) != 1:
            raise InputError(images[0], f"case {c.id}: 2D images take one RGB file per case, got {len(images)}")
        label = manifest.label_path(c)
        if label is None:
            raise InputError(images[0], f"case {c.id} has no label")
        check_pair(images[0], label, allowed)
