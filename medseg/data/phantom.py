"""Deterministic synthetic multi-organ CT-like phantom (the embedded default dataset).

Anatomy is defined in *world* (RAS, mm) coordinates and sampled through each case's affine, so cases
stored with flipped axes or an oblique direction still contain the same body in the same place: exactly
what a geometry-aware pipeline must recover. Cases cycle through four storage geometries:

    0: RAS axis-aligned   1: x flipped (LAS)   2: x and y flipped (LPS, DICOM-like)   3: oblique (12 deg about x)

Organs (label value): liver 1 (large), spleen 2 (medium), kidney 3 (small, two components). Intensities
are Hounsfield-like (air -1000, soft tissue ~20, liver ~60, spleen ~110, kidney ~180) with Gaussian noise
and a little blur; every size, position and intensity is jittered per case from a seeded generator.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from medseg.io.atomic import atomic_path
from medseg.io.manifest import Case, Manifest, assign_splits

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
GEOMETRIES = ("ras", "flip_x", "flip_xy", "oblique")

# (label, centre mm, semi-axes mm, mean HU)
_ORGANS = (
    (1, (-22.0, 5.0, 0.0), (30.0, 24.0, 34.0), 60.0),
    (2, (36.0, 12.0, 8.0), (13.0, 11.0, 20.0), 110.0),
    (3, (-30.0, -22.0, -14.0), (8.0, 12.0, 18.0), 180.0),
    (3, (30.0, -22.0, -14.0), (8.0, 12.0, 18.0), 180.0),
)


def case_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float], geometry: str) -> np.ndarray:
    """Affine whose volume centre maps to world (0, 0, 0), with the requested storage geometry."""
    direction = np.eye(3)
    if geometry == "flip_x":
        direction = np.diag([-1.0, 1.0, 1.0])
    elif geometry == "flip_xy":
        direction = np.diag([-1.0, -1.0, 1.0])
    elif geometry == "oblique":
        a = math.radians(12.0)
        direction = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    elif geometry != "ras":
        raise ValueError(f"unknown geometry {geometry!r}; valid: {', '.join(GEOMETRIES)}")
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    centre_vox = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre_vox
    return affine


def make_case(
    index: int,
    seed: int = 0,
    shape: tuple[int, int, int] = (72, 72, 40),
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image int16, label uint8, affine) for case ``index``; same inputs give identical outputs."""
    rng = np.random.default_rng([seed, index])
    geometry = GEOMETRIES[index % len(GEOMETRIES)]
    affine = case_affine(shape, spacing, geometry)
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]

    body_a, body_b = 62.0 * rng.uniform(0.92, 1.05), 46.0 * rng.uniform(0.92, 1.05)
    body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1.0
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = 20.0 + rng.normal(0, 5)
    label = np.zeros(shape, dtype=np.uint8)
    shift = rng.uniform(-5, 5, size=3)  # whole-abdomen shift keeps organs from overlapping
    for value, centre, axes, hu in _ORGANS:
        c = np.array(centre) + shift + rng.uniform(-3, 3, size=3)
        ax = np.array(axes) * rng.uniform(0.85, 1.15, size=3)
        inside = ((x - c[0]) / ax[0]) ** 2 + ((y - c[1]) / ax[1]) ** 2 + ((z - c[2]) / ax[2]) ** 2 <= 1.0
        inside &= body
        label[inside] = value
        image[inside] = hu + rng.normal(0, 8)
    image = gaussian_filter(image, sigma=0.7)
    image += rng.normal(0, 18, size=shape).astype(np.float32)
    image[~body] = -1000.0 + rng.normal(0, 10, size=int((~body).sum()))
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label, affine


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def write_phantom(
    out_dir: str | Path,
    cases: int = 12,
    seed: int = 0,
    val_fraction: float = 0.25,
    shape: tuple[int, int, int] = (72, 72, 40),
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
) -> Manifest:
    """Write ``cases`` phantom cases as NIfTI (imagesTr/labelsTr) plus ``dataset.json`` manifest."""
    if cases < 2:
        raise ValueError("a phantom needs at least 2 cases (train and val)")
    out = Path(out_dir)
    ids = [f"phantom_{i:03d}" for i in range(cases)]
    splits = assign_splits(ids, val_fraction, 0.0, seed)
    entries = []
    for i, cid in enumerate(ids):
        image, label, affine = make_case(i, seed, shape, spacing)
        _save(image, affine, out / "imagesTr" / f"{cid}.nii.gz")
        _save(label, affine, out / "labelsTr" / f"{cid}.nii.gz")
        entries.append(Case(cid, (f"imagesTr/{cid}.nii.gz",), f"labelsTr/{cid}.nii.gz", splits[cid]))
    manifest = Manifest(
        name="phantom",
        labels=dict(LABELS),
        cases=entries,
        channel_names={"0": "CT"},
        description=f"medseg synthetic multi-organ CT phantom, seed {seed}, {cases} cases, spacing {spacing} mm",
    )
    manifest.save(out / "dataset.json")
    return manifest
