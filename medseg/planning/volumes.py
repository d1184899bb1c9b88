"""Dataset fingerprint and experiment plans, in the spirit of nnU-Net's planning (small and readable).

Two steps, each a plain dict that ends up in one JSON file (``plans.json``):

1. ``fingerprint_dataset``: for every training case, the header facts (shape and spacing *in the
   orientation the network sees*, voxel dtype), a sample of intensities from foreground (labelled)
   voxels, the share of non-zero voxels and the voxel count of each class.
2. ``make_plans``: sensible defaults from that fingerprint:

   - target spacing: the median spacing per axis (for strongly anisotropic data, > 3x, the low-resolution
     axis takes the 10th percentile, as nnU-Net does); ``None`` when every case already has it, so
     nothing is resampled;
   - patch size: the median shape at target spacing, rounded *up* to a multiple of ``2 ** downsamplings``
     (the network halves each axis that often; it downsamples until the smallest median axis would fall
     below ``MIN_FEATURE_SIZE`` voxels), then shrunk along its longest axis until it fits a voxel budget;
   - intensity normalisation by modality: CT -> ``ct_window`` between the 0.5 / 99.5 percentiles of
     foreground intensities; anything else (MR, ...) -> per-volume z-score, restricted to non-zero voxels
     when a large share of the volumes is zero (i.e. the scans were skull-stripped or cropped with zero
     padding);
   - class frequencies (voxel share and how many cases contain each class).

``plan_dataset`` writes the result atomically and returns it; ``overrides`` turns it into
``KEY=VALUE`` config overrides for ``medseg train``.

Why hand-written: MONAI's Auto3DSeg ``DataAnalyzer`` computes a superset of these statistics but runs
each volume through its full transform stack (slow on CPU for hundreds of cases) and derives no
spacing/patch plan; nnU-Net's planner is not a dependency of medseg and is tied to its own folder layout.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import write_json_atomic
from medseg.io.manifest import Case, Manifest, load_manifest
from medseg.io.nifti import load_nifti, read_array, voxel_spacing

FORMAT = "medseg-plans/1"
MIN_FEATURE_SIZE = 4  # nnU-Net stops downsampling an axis once it would drop below 4 voxels
MAX_DOWNSAMPLINGS = 5
DEFAULT_MAX_PATCH_VOXELS = 96 * 96 * 64  # CPU-sized cap; raise it for GPUs (nnU-Net's 3D patches are ~128^3)
ANISOTROPY_RATIO = 3.0
CT_NAMES = ("ct",)


def plans_path_for(manifest_path: str | Path) -> Path:
    """Conventional location of a manifest's plans: ``<manifest stem>.plans.json`` next to it."""
    p = Path(manifest_path)
    return p.with_name(f"{p.stem}.plans.json")


# ---- fingerprint ---------------------------------------------------------------------------------
def _to_orientation(
    shape: tuple[int, ...], spacing: tuple[float, ...], affine: np.ndarray, orientation: str
) -> tuple[list[int], list[float]]:
    """Shape and spacing after reorienting to ``orientation`` (what MONAI's ``Orientationd`` does: a permutation)."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(orientation))
    )
    out_shape, out_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(ornt):
        out_shape[int(dst_axis)] = int(shape[src_axis])
        out_spacing[int(dst_axis)] = round(float(spacing[src_axis]), 6)
    return out_shape, out_spacing


def fingerprint_case(
    manifest: Manifest,
    case: Case,
    orientation: str = "RAS",
    samples: int = 2000,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Header facts, foreground intensity sample, non-zero share and class voxel counts of one case.

    Reads the first image channel (intensity statistics are per channel in nnU-Net; medseg's presets
    are single-channel) and the label; shapes must agree or the case is an ``InputError``.
    """
    rng = rng or np.random.default_rng(0)
    image_path = manifest.image_paths(case)[0]
    label_path = manifest.label_path(case)
    if label_path is None:
        raise InputError(image_path, f"case {case.id} has no label; planning needs labelled training cases")
    img = load_nifti(image_path)
    data = read_array(img, image_path)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(image_path, f"expected a 3D volume, got shape {data.shape}")
    lab_img = load_nifti(label_path)
    lab = np.rint(read_array(lab_img, label_path)).astype(np.int64)
    if lab.shape[:3] != data.shape:
        raise InputError(label_path, f"label shape {lab.shape[:3]} != image shape {data.shape}")
    data = data.astype(np.float64, copy=False)
    if not np.isfinite(data).all():
        raise InputError(image_path, "image contains NaN/inf voxels")
    fg = data[lab > 0]
    sample = fg if fg.size <= samples else rng.choice(fg, samples, replace=False)
    shape, spacing = _to_orientation(data.shape, voxel_spacing(img.affine), img.affine, orientation)
    counts = np.bincount(lab.ravel().clip(min=0), minlength=max(manifest.labels.values()) + 1)
    return {
        "id": case.id,
        "shape": shape,
        "spacing": spacing,
        "dtype": str(img.get_data_dtype()),
        "intensity_min": float(data.min()),
        "intensity_max": float(data.max()),
        "nonzero_fraction": float(np.count_nonzero(data) / data.size),
        "class_voxels": {name: int(counts[v]) if v < counts.size else 0 for name, v in manifest.labels.items()},
        "_foreground_sample": sample.astype(np.float32),
    }


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "percentile_00_5": float(p[0]),
        "median": float(p[1]),
        "percentile_99_5": float(p[2]),
    }


def labelled_cases(
    manifest: Manifest, splits: tuple[str, ...], max_cases: int | None, what: str = "cases"
) -> list[Case]:
    """The labelled cases of ``splits`` (all, or the first ``max_cases``); ``InputError`` when there are none."""
    # Split names arrive as plain str from the CLI; an unknown one matches no case (InputError below).
    cases = [c for c in manifest.split(*splits) if c.label]  # type: ignore[arg-type]  # str split names, see above
    if max_cases is not None:
        cases = cases[:max_cases]
    if not cases:
        raise InputError(
            manifest.path or "manifest", f"no labelled {what} in split(s) {', '.join(splits)} to plan from"
        )
    return cases


def fingerprint_dataset(
    manifest: Manifest,
    splits: tuple[str, ...] = ("train",),
    max_cases: int | None = None,
    orientation: str = "RAS",
    samples_per_case: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fingerprint the labelled cases of ``splits`` (all of them, or the first ``max_cases``)."""
    cases = labelled_cases(manifest, splits, max_cases)
    rng = np.random.default_rng(seed)
    per_case = [fingerprint_case(manifest, c, orientation, samples_per_case, rng) for c in cases]
    fg = np.concatenate([pc.pop("_foreground_sample") for pc in per_case])
    shapes = np.array([pc["shape"] for pc in per_case], dtype=np.float64)
    spacings = np.array([pc["spacing"] for pc in per_case], dtype=np.float64)
    total = {name: sum(pc["class_voxels"][name] for pc in per_case) for name in manifest.labels}
    all_voxels = max(1, sum(total.values()))
    classes = {
        name: {
            "value": v,
            "voxels": total[name],
            "fraction": total[name] / all_voxels,
            "cases_present": sum(pc["class_voxels"][name] > 0 for pc in per_case),
        }
        for name, v in sorted(manifest.labels.items(), key=lambda kv: kv[1])
    }
    maxima = np.array([pc["intensity_max"] for pc in per_case])
    return {
        "dataset": manifest.name,
        "modality": manifest.channel_names.get("0", "image"),
        "orientation": orientation,
        "splits": list(splits),
        "n_cases": len(per_case),
        "spacing": {
            "median": np.median(spacings, 0).tolist(),
            "min": spacings.min(0).tolist(),
            "max": spacings.max(0).tolist(),
            "percentile_10": np.percentile(spacings, 10, axis=0).tolist(),
        },
        "shape": {
            "median": np.median(shapes, 0).tolist(),
            "min": shapes.min(0).astype(int).tolist(),
            "max": shapes.max(0).astype(int).tolist(),
        },
        "dtypes": dict(sorted(Counter(pc["dtype"] for pc in per_case).items())),
        "foreground_intensity": _stats(fg),
        "intensity_max_per_case": {
            "min": float(maxima.min()),
            "median": float(np.median(maxima)),
            "max": float(maxima.max()),
        },
        "nonzero_fraction_median": float(np.median([pc["nonzero_fraction"] for pc in per_case])),
        "classes": classes,
        "cases": per_case,
    }


# ---- plans ---------------------------------------------------------------------------------------
def target_spacing(fp: dict[str, Any]) -> list[float]:
    """Median spacing; for anisotropic data (ratio > 3) the coarse axis takes the 10th percentile."""
    median = list(fp["spacing"]["median"])
    axis = int(np.argmax(median))
    if median[axis] > ANISOTROPY_RATIO * min(median):
        median[axis] = float(fp["spacing"]["percentile_10"][axis])
    return [round(s, 6) for s in median]


def num_downsamplings(shape: list[float], max_downsamplings: int = MAX_DOWNSAMPLINGS) -> int:
    """Halvings (isotropic strides of 2) before the smallest axis would drop below ``MIN_FEATURE_SIZE``."""
    smallest = max(1.0, min(shape))
    return int(max(1, min(max_downsamplings, math.floor(math.log2(smallest / MIN_FEATURE_SIZE)))))


def patch_size(median_shape: list[float], divisor: int, max_voxels: int) -> list[int]:
    """Median shape rounded up to multiples of ``divisor``, then shrunk (longest axis first) to ``max_voxels``."""
    patch = [max(divisor, int(math.ceil(s / divisor)) * divisor) for s in median_shape]
    while math.prod(patch) > max_voxels and max(patch) > divisor:
        axis = int(np.argmax(patch))
        patch[axis] -= divisor
    return patch


def normalization(fp: dict[str, Any]) -> dict[str, Any]:
    """CT -> window over foreground 0.5/99.5 percentiles; other modalities -> z-score (non-zero if mostly zero)."""
    if fp["modality"].strip().lower() in CT_NAMES and fp["foreground_intensity"]:
        fi = fp["foreground_intensity"]
        return {"mode": "ct_window", "lower": round(fi["percentile_00_5"], 3), "upper": round(fi["percentile_99_5"], 3)}
    # nnU-Net normalises inside the non-zero mask only when cropping to it removed a lot (> 25 %) of the volume.
    return {"mode": "zscore", "nonzero": bool(fp["nonzero_fraction_median"] < 0.75)}


def make_plans(
    fp: dict[str, Any], max_patch_voxels: int = DEFAULT_MAX_PATCH_VOXELS, max_downsamplings: int = MAX_DOWNSAMPLINGS
) -> dict[str, Any]:
    """Derive spacing, patch size, network depth and normalisation from a fingerprint."""
    target = target_spacing(fp)
    spacings = np.array([c["spacing"] for c in fp["cases"]])
    resample = not np.allclose(spacings, np.array(target)[None], rtol=0.01, atol=1e-3)
    shapes = np.array([c["shape"] for c in fp["cases"]], dtype=np.float64)
    scaled = shapes * spacings / np.array(target)[None] if resample else shapes
    median_shape = np.median(scaled, 0).tolist()
    k = num_downsamplings(median_shape, max_downsamplings)
    patch = patch_size(median_shape, 2**k, max_patch_voxels)
    return {
        "target_spacing": target if resample else None,
        "median_spacing": fp["spacing"]["median"],
        "median_shape_at_target": [round(s, 1) for s in median_shape],
        "network_downsamplings": k,
        "patch_divisor": 2**k,
        "patch_size": patch,
        "patch_covers_median_fraction": round(
            float(np.prod(np.minimum(patch, median_shape)) / np.prod(median_shape)), 3
        ),
        "max_patch_voxels": max_patch_voxels,
        "intensity": normalization(fp),
        "class_fractions": {n: round(c["fraction"], 6) for n, c in fp["classes"].items()},
    }


def overrides(plans: dict[str, Any]) -> list[str]:
    """``KEY=VALUE`` overrides for ``medseg train`` (data section only; the network is the preset's choice)."""
    p = plans["plans"]
    spacing = "null" if p["target_spacing"] is None else "[" + ",".join(f"{s:g}" for s in p["target_spacing"]) + "]"
    out = [f"data.spacing={spacing}", "data.patch_size=[" + ",".join(str(s) for s in p["patch_size"]) + "]"]
    out += [f"data.intensity.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in p["intensity"].items()]
    return out


def plan_dataset(
    manifest_path: str | Path,
    out: str | Path | None = None,
    splits: tuple[str, ...] = ("train",),
    max_cases: int | None = None,
    max_patch_voxels: int = DEFAULT_MAX_PATCH_VOXELS,
    orientation: str = "RAS",
    seed: int = 0,
) -> dict[str, Any]:
    """Fingerprint + plans for a manifest, written atomically to ``out`` (default: ``plans_path_for``)."""
    manifest = load_manifest(manifest_path)
    fp = fingerprint_dataset(manifest, splits, max_cases, orientation, seed=seed)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "dataset": manifest.name,
        "manifest_fingerprint": manifest.fingerprint(),
        "plans": make_plans(fp, max_patch_voxels),
        "fingerprint": fp,
    }
    doc["overrides"] = overrides(doc)
    write_json_atomic(Path(out) if out is not None else plans_path_for(manifest_path), doc)
    return doc
