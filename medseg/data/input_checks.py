"""Check every case's files before any training starts (volumes: NIfTI; 2D images: PNG/JPG + index PNG).

Each problem is an ``InputError`` naming the file and the cause (missing, unreadable, NaN, image/label
shape or affine mismatch, label values outside the manifest's label map), so a bad case is found in
seconds, not after hours of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.errors import InputError
from medseg.io.images2d.common import check_pair
from medseg.io.manifest import Case, Manifest
from medseg.io.nifti import load_nifti, read_array, voxel_spacing

AFFINE_ATOL = 1e-3  # mm; header round-off between image and label writers stays well below this


@dataclass(frozen=True)
class CaseInfo:
    """What the checks learnt about a case (used for dataset fingerprints and planning)."""

    id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    label_values: tuple[int, ...]


def check_case(manifest: Manifest, case: Case, check_labels: bool = True) -> CaseInfo:
    """Check a case's image(s) and label; raise ``InputError`` on the first problem."""
    images = [(p, load_nifti(p)) for p in manifest.image_paths(case)]
    ref_path, ref = images[0]
    shape3 = ref.shape[:3]
    for p, img in images:
        if len(img.shape) not in (3, 4) and not (len(img.shape) == 2):
            raise InputError(p, f"expected a 2D, 3D or 4D image, got shape {img.shape}")
        if img.shape[:3] != shape3:
            raise InputError(p, f"channel shape {img.shape[:3]} != first channel {shape3} ({ref_path.name})")
        data = read_array(img, p)
        if not np.issubdtype(data.dtype, np.number):
            raise InputError(p, f"unsupported voxel dtype {data.dtype}")
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise InputError(p, f"image contains {int((~np.isfinite(data)).sum())} NaN/inf voxels")
    label_values: tuple[int, ...] = ()
    label_path = manifest.label_path(case)
    if label_path is not None and check_labels:
        lab = load_nifti(label_path)
        if lab.shape[:3] != shape3:
            raise InputError(label_path, f"label shape {lab.shape[:3]} != image shape {shape3} ({ref_path.name})")
        if not np.allclose(lab.affine, ref.affine, atol=AFFINE_ATOL):
            raise InputError(
                label_path, f"label affine differs from image affine ({ref_path.name}); they must share geometry"
            )
        arr = read_array(lab, label_path)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
                raise InputError(label_path, "label contains non-integer or NaN values")
        values = np.unique(arr).astype(np.int64)
        allowed = set(manifest.labels.values())
        bad = sorted(set(values.tolist()) - allowed)
        if bad:
            raise InputError(label_path, f"label values {bad} not in the manifest's label map {sorted(allowed)}")
        label_values = tuple(int(v) for v in values)
    return CaseInfo(case.id, tuple(int(s) for s in shape3), voxel_spacing(ref.affine), label_values)


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
