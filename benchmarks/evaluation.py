"""Benchmark ``medseg evaluate`` on large synthetic cases (default: 100 cases of 256x256x200, HD95 + NSD).

Writes synthetic ground truth (liver, spleen, two kidneys as ellipsoids, moved per case) and predictions
(the truth eroded / shifted, with a few stray false-positive voxels far away, which make each organ's
crop box span most of the volume: the expensive case), then times the real CLI with ``--workers``::

    .venv/bin/python benchmarks/evaluation.py --cases 8 --workers 2

It prints seconds per case of the CLI run, and, in this process on one case, the time of
``report.evaluate_case`` against a plain MONAI reference computing the same metrics (Dice, HD95, ASSD,
NSD per organ with ``monai.metrics`` on the whole volume) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SPACING = (0.8, 0.8, 1.5)
ORGANS = {"liver": 1, "spleen": 2, "kidney": 3}
# (label, centre as a fraction of the shape, semi-axes in mm)
_SHAPES = ((1, (0.40, 0.45, 0.50), (70.0, 60.0, 80.0)), (2, (0.70, 0.50, 0.50), (30.0, 25.0, 45.0)),
           (3, (0.35, 0.70, 0.45), (20.0, 25.0, 40.0)), (3, (0.68, 0.70, 0.45), (20.0, 25.0, 40.0)))


def make_truth(shape: tuple[int, int, int]) -> np.ndarray:
    """One label map of ellipsoid organs (cases are this map moved by a few voxels)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    out = np.zeros(shape, np.uint8)
    for label, centre, semi in _SHAPES:
        r2 = sum(((g - c * n) * s / a) ** 2 for g, c, n, s, a in zip(grids, centre, shape, SPACING, semi))
        out[r2 <= 1.0] = label
    return out


def make_prediction(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The truth with each organ eroded or shifted by a voxel or two, plus stray false-positive voxels."""
    pred = np.zeros_like(truth)
    for v in ORGANS.values():
        mask = truth == v
        mask = ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 3))) if rng.random() < 0.5 else \
            np.roll(mask, tuple(rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
        pred[mask & (pred == 0)] = v
    idx = tuple(rng.integers(0, n, size=6) for n in truth.shape)
    pred[idx] = rng.integers(1, len(ORGANS) + 1, size=6)
    return pred


def write_dataset(root: Path, cases: int, shape: tuple[int, int, int], seed: int = 0) -> tuple[Path, Path]:
    """Write labels, predictions and a manifest under ``root``; returns (manifest, prediction folder)."""
    rng = np.random.default_rng(seed)
    base = make_truth(shape)
    affine = np.diag([*SPACING, 1.0])
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    (root / "preds").mkdir(exist_ok=True)
    entries = []
    for i in range(cases):
        cid = f"synth_{i:03d}"
        truth = np.roll(base, tuple(rng.integers(-8, 9, size=3)), axis=(0, 1, 2))
        nib.save(nib.Nifti1Image(truth, affine), str(root / "labelsTr" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(make_prediction(truth, rng), affine), str(root / "preds" / f"{cid}.nii.gz"))
        entries.append({"id": cid, "image": f"labelsTr/{cid}.nii.gz", "label": f"labelsTr/{cid}.nii.gz", "split": "test"})
    manifest = root / "dataset.json"
    manifest.write_text(json.dumps({"name": "synthetic_eval", "labels": {"background": 0, **ORGANS},
                                    "channel_names": {"0": "CT"}, "training": entries, "test": []}))
    return manifest, root / "preds"


def monai_reference(pred: np.ndarray, truth: np.ndarray, tolerance_mm: float) -> dict[str, float]:
    """Dice, HD95, ASSD, NSD per organ with monai.metrics on the whole volume (the plain reference)."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )
    from monai.networks.utils import one_hot

    n = len(ORGANS) + 1
    p = one_hot(torch.from_numpy(pred.astype(np.int64))[None, None], n)
    t = one_hot(torch.from_numpy(truth.astype(np.int64))[None, None], n)
    out = {}
    out["dice"] = compute_dice(p, t, include_background=False)
    out["hd95"] = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=SPACING)
    out["assd"] = compute_average_surface_distance(p, t, include_background=False, symmetric=True, spacing=SPACING)
    out["nsd"] = compute_surface_dice(p, t, [tolerance_mm] * (n - 1), include_background=False, spacing=SPACING)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tolerance-mm", type=float, default=2.0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="medseg_bench_eval_") as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        manifest, preds = write_dataset(root, args.cases, tuple(args.shape))
        print(f"wrote {args.cases} cases of {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s")

        cmd = [sys.executable, "-m", "medseg.cli", "evaluate", "--pred", str(preds), "--manifest", str(manifest),
               "--output", str(root / "evaluation"), "--workers", str(args.workers), "--tolerance-mm", str(args.tolerance_mm)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        cli_s = time.perf_counter() - t0
        print(f"medseg evaluate --workers {args.workers}: {cli_s:.1f} s for {args.cases} cases = "
              f"{cli_s / args.cases:.2f} s/case (all metrics incl. HD95, ASSD, NSD; plots; CLI start-up included); "
              f"projected for 100 cases: {cli_s / args.cases * 100 / 60:.1f} min")

        # one case in this process, one core: medseg's evaluate_case vs a plain MONAI reference
        from medseg.evaluation.report import DEFAULT_METRICS, EvalJob, evaluate_case

        cid = "synth_000"
        truth_p, pred_p = root / "labelsTr" / f"{cid}.nii.gz", preds / f"{cid}.nii.gz"
        job = EvalJob(cid, pred_p, truth_p, tuple(ORGANS.items()), DEFAULT_METRICS, args.tolerance_mm)
        t0 = time.perf_counter()
        rows = evaluate_case(job)
        ours = time.perf_counter() - t0
        truth, pred = np.asarray(nib.load(str(truth_p)).dataobj), np.asarray(nib.load(str(pred_p)).dataobj)
        t0 = time.perf_counter()
        ref = monai_reference(pred, truth, args.tolerance_mm)
        monai_s = time.perf_counter() - t0
        for i, row in enumerate(rows):
            print(f"  {row['organ']:7s} hd95 medseg {row['hd95']:.3f} / MONAI {float(ref['hd95'][0, i]):.3f} mm, "
                  f"nsd {row['nsd']:.4f} / {float(ref['nsd'][0, i]):.4f}")
        print(f"one case, one process: medseg evaluate_case (load + 11 metrics) {ours:.2f} s; MONAI reference "
              f"(Dice, HD95, ASSD, NSD on loaded arrays) {monai_s:.2f} s; ratio medseg/MONAI {ours / monai_s:.2f}")


if __name__ == "__main__":
    main()
