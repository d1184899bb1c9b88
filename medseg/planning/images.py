"""Fingerprint and plans for 2D natural-image datasets (``data.kind: image2d``), the 2D side of ``planning``.

``medseg data plan`` on a manifest of PNG/JPG images reads every training image and its class-index label
once and writes the same kind of ``plans.json`` as for volumes:

- fingerprint: image sizes (height, width), colour modes, per-channel RGB mean/std of the pixels (a sample
  per image), void pixels (``ignore_index``, 255 in VOC), and per class its pixel count and the images it
  appears in;
- plans: the network depth and a crop ``data.patch_size`` from the median image size (``planning.patch_size``:
  rounded up to the network's divisor, shrunk to a pixel budget), whether sizes vary (then training crops and
  pads, as ``configs/voc_unet2d.yaml`` does) and ``range`` scaling of the 8-bit RGB values the network sees;
- class weights by *median frequency balancing* (Eigen & Fergus 2015, used by SegNet on CamVid):
  ``freq_c = pixels of c / pixels of the images containing c`` and ``w_c = median(freq) / freq_c`` over the
  classes present; a class never seen gets weight 0 (it cannot be learnt from this split). They are suggested
  as ``loss.params.class_weights`` for losses with a cross-entropy term (``ce``, ``dice_ce``).

Why hand-written: MONAI's ``DataAnalyzer`` targets 3D medical volumes (spacing, foreground intensity) and
computes neither image-size plans nor median-frequency weights.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.images2d.common import VOID, open_image, read_index_label
from medseg.io.manifest import Case, Manifest
from medseg.planning.volumes import FORMAT, MAX_DOWNSAMPLINGS, labelled_cases, num_downsamplings, patch_size

DEFAULT_MAX_PATCH_PIXELS = 256 * 256  # CPU-sized crop; raise it on GPUs
SAMPLES_PER_IMAGE = 2000


def fingerprint_image(
    manifest: Manifest,
    case: Case,
    rng: np.random.Generator,
    ignore_index: int | None = VOID,
    samples: int = SAMPLES_PER_IMAGE,
) -> dict[str, Any]:
    """Size, mode, a pixel sample and class pixel counts of one labelled image (``InputError`` naming the file)."""
    image_path = manifest.image_paths(case)[0]
    label_path = manifest.label_path(case)
    if label_path is None:
        raise InputError(image_path, f"image {case.id} has no label; planning needs labelled training images")
    image = open_image(image_path)
    mode = image.mode
    pixels = np.asarray(image if mode == "RGB" else image.convert("RGB"))  # what the network sees (``ToRGB``)
    label = read_index_label(label_path)
    if label.shape != pixels.shape[:2]:
        raise InputError(
            label_path,
            f"label size {label.shape[1]}x{label.shape[0]} != image size "
            f"{pixels.shape[1]}x{pixels.shape[0]} ({image_path.name})",
        )
    void = label == ignore_index if ignore_index is not None else np.zeros(label.shape, dtype=bool)
    known = set(manifest.labels.values())
    bad = sorted(set(np.unique(label[~void]).tolist()) - known)
    if bad:
        raise InputError(label_path, f"label values {bad[:10]} not in the label map {sorted(known)}")
    counts = np.bincount(label[~void].ravel(), minlength=max(known) + 1)
    flat = pixels.reshape(-1, 3)
    sample = flat[rng.choice(len(flat), size=min(samples, len(flat)), replace=False)].astype(np.float64)
    return {
        "id": case.id,
        "shape": [int(label.shape[0]), int(label.shape[1])],
        "mode": mode,
        "void_pixels": int(void.sum()),
        "class_pixels": {name: int(counts[v]) for name, v in manifest.labels.items()},
        "_sample": sample,
    }


def median_frequency_weights(classes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Median frequency balancing: ``median(freq) / freq_c``, ``freq_c`` over the images containing class c."""
    freq = {n: c["pixels"] / c["pixels_of_images_present"] for n, c in classes.items() if c["pixels"] > 0}
    if not freq:
        return {n: 0.0 for n in classes}
    median = float(np.median(list(freq.values())))
    return {n: round(median / freq[n], 4) if n in freq else 0.0 for n in classes}


def fingerprint_images(
    manifest: Manifest,
    splits: tuple[str, ...] = ("train",),
    max_cases: int | None = None,
    ignore_index: int | None = VOID,
    seed: int = 0,
) -> dict[str, Any]:
    """Fingerprint the labelled images of ``splits`` (all, or the first ``max_cases``)."""
    cases = labelled_cases(manifest, splits, max_cases, "images")
    rng = np.random.default_rng(seed)
    per_image = [fingerprint_image(manifest, c, rng, ignore_index) for c in cases]
    sample = np.concatenate([p.pop("_sample") for p in per_image])
    shapes = np.array([p["shape"] for p in per_image], dtype=np.float64)
    classes: dict[str, dict[str, Any]] = {}
    labelled = sum(sum(p["class_pixels"].values()) for p in per_image)
    for name, value in sorted(manifest.labels.items(), key=lambda kv: kv[1]):
        present = [p for p in per_image if p["class_pixels"][name] > 0]
        pixels = sum(p["class_pixels"][name] for p in present)
        classes[name] = {
            "value": value,
            "pixels": pixels,
            "fraction": pixels / max(1, labelled),
            "images_present": len(present),
            "pixels_of_images_present": sum(sum(p["class_pixels"].values()) for p in present),
        }
    return {
        "dataset": manifest.name,
        "kind": "image2d",
        "splits": list(splits),
        "n_images": len(per_image),
        "shape": {
            "median": np.median(shapes, 0).tolist(),
            "min": shapes.min(0).astype(int).tolist(),
            "max": shapes.max(0).astype(int).tolist(),
            "distinct": len({tuple(p["shape"]) for p in per_image}),
        },
        "modes": dict(sorted(Counter(p["mode"] for p in per_image).items())),
        "channel_mean": sample.mean(0).round(3).tolist(),
        "channel_std": sample.std(0).round(3).tolist(),
        "value_range": [float(sample.min()), float(sample.max())],
        "ignore_index": ignore_index,
        "void_fraction": sum(p["void_pixels"] for p in per_image) / float(shapes.prod(1).sum()),
        "classes": classes,
        "images": per_image,
    }


def make_image_plans(
    fp: dict[str, Any], max_patch_pixels: int = DEFAULT_MAX_PATCH_PIXELS, max_downsamplings: int = MAX_DOWNSAMPLINGS
) -> dict[str, Any]:
    """Network depth, crop size, intensity scaling and class weights from an image fingerprint."""
    median = [float(s) for s in fp["shape"]["median"]]
    k = num_downsamplings(median, max_downsamplings)
    patch = patch_size(median, 2**k, max_patch_pixels)
    return {
        "median_shape": [round(s, 1) for s in median],
        "sizes_vary": fp["shape"]["distinct"] > 1,
        "network_downsamplings": k,
        "patch_divisor": 2**k,
        "patch_size": patch,
        "patch_covers_median_fraction": round(float(np.prod(np.minimum(patch, median)) / np.prod(median)), 3),
        "max_patch_pixels": max_patch_pixels,
        "intensity": {"mode": "range", "lower": 0.0, "upper": 255.0},  # 8-bit RGB after ``ToRGB``
        "class_fractions": {n: round(c["fraction"], 6) for n, c in fp["classes"].items()},
        "class_weights": median_frequency_weights(fp["classes"]),
    }


def image_overrides(plans: dict[str, Any]) -> list[str]:
    """``KEY=VALUE`` overrides for ``medseg train`` with an image2d preset (the class weights need a CE loss)."""
    p = plans["plans"]
    weights = ",".join(f"{w:g}" for w in p["class_weights"].values())
    return [
        "data.patch_size=[" + ",".join(str(s) for s in p["patch_size"]) + "]",
        *(f"data.intensity.{k}={v}" for k, v in p["intensity"].items()),
        f"data.ignore_index={plans['fingerprint']['ignore_index'] if plans['fingerprint']['ignore_index'] is not None else 'null'}",
        f"loss.params.class_weights=[{weights}]",
    ]


def plan_images(
    manifest: Manifest,
    splits: tuple[str, ...] = ("train",),
    max_cases: int | None = None,
    max_patch_pixels: int = DEFAULT_MAX_PATCH_PIXELS,
    ignore_index: int | None = VOID,
    seed: int = 0,
) -> dict[str, Any]:
    """The plans document (format as ``planning.plan_dataset``) for a 2D image manifest; not written."""
    fp = fingerprint_images(manifest, splits, max_cases, ignore_index, seed)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "dataset": manifest.name,
        "manifest_fingerprint": manifest.fingerprint(),
        "plans": make_image_plans(fp, max_patch_pixels),
        "fingerprint": fp,
    }
    doc["overrides"] = image_overrides(doc)
    return doc


def describe(doc: dict[str, Any], target: Path) -> str:
    """One line for the CLI: what was planned."""
    p, fp = doc["plans"], doc["fingerprint"]
    return (
        f"wrote {target}: {fp['n_images']} images, median size {p['median_shape']} (height, width), "
        f"{'varying' if p['sizes_vary'] else 'one'} size{'s' if p['sizes_vary'] else ''}, "
        f"{p['network_downsamplings']} downsamplings, void {fp['void_fraction']:.1%}"
    )
