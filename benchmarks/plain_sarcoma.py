"""Plain MONAI baseline for the soft-tissue-sarcoma CT benchmark: a hand-written training script.

This is what a competent MONAI user writes from MONAI's 3D segmentation tutorials (the spleen tutorial,
``3d_segmentation/spleen_segmentation_3d.ipynb``), with no medseg code. The project's own preset must
beat it at an equal wall-clock training budget.

    .venv/bin/python benchmarks/plain_sarcoma.py --manifest /tmp/bench/sarcoma/sarcoma_ct.json \\
        --minutes 15 --threads 1 --output /tmp/bench/plain_sarcoma.json

Data: a medseg manifest (JSON, ``training`` entries with ``image`` / ``label`` / ``split``) of binary CT
masks (one foreground label, e.g. ``tumour: 1``). Cases of ``--train-splits`` (comma list) are trained on;
the ``--eval-split`` cases are only scored. The val split is not used: there is no model selection, the
weights after the last step are scored (the tutorial picks the best epoch on val; with 4 val cases and a
fixed budget we keep it plainer).

Pipeline (MONAI dictionary transforms, as in the tutorial):
  LoadImaged, EnsureChannelFirstd, Orientationd("RAS"), Spacingd(--spacing, bilinear / nearest),
  ScaleIntensityRanged(-160..240 HU -> 0..1, clip) — no CropForegroundd (the volumes are already crops).
  Training adds SpatialPadd(--patch) (not in the tutorial: at 1.5 mm some crops are narrower than 96
  voxels, and RandCropByPosNegLabeld would then return smaller patches that cannot be batched),
  RandCropByPosNegLabeld(--patch, pos=2, neg=1, num_samples=2) and RandFlipd(axis 0); CacheDataset
  (cache_rate 1.0), DataLoader with 0 workers (the cores are shared).
Model: monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, --channels, --strides,
  --res-units) with MONAI's default norm (INSTANCE; the tutorial passes Norm.BATCH).
Loss / optimiser: DiceCELoss(to_onehot_y=True, softmax=True); Adam at a constant lr, default 1e-3 (the
  tutorial uses Adam 1e-4 for 600 epochs; 1e-3 suits a budget of minutes). No lr schedule, as in the tutorial.
Budget: ``--minutes`` of training, counted from the first step (after CacheDataset has loaded and
  preprocessed the training cases; that time is reported apart as ``cache_seconds``). The clock is
  checked after every step, so the last step may overrun by one step.
Evaluation: sliding_window_inference(roi=--patch, sw_batch_size=2, overlap=0.5) on the resampled image,
  the softmax is inverted back to the original image grid with Invertd (as the tutorial's "original
  spacing" evaluation), then argmax. No post-processing. Scored on the ORIGINAL label grid: Dice and HD95
  in mm (monai.metrics.compute_hausdorff_distance, percentile 95, spacing = the label's voxel size).
  An empty prediction scores Dice 0 and HD95 NaN (NaN cases are left out of the HD95 mean / median and
  counted in ``hd95_nan_cases``).
Output: per-case rows, mean / median Dice and HD95, training iterations, seconds, peak RSS (MiB), printed
as a short table and written as JSON to ``--output`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import set_determinism


def int_list(text: str) -> list[int]:
    """``"96,96,32"`` -> ``[96, 96, 32]``."""
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text: str) -> list[float]:
    """``"1.5,1.5,3.27"`` -> ``[1.5, 1.5, 3.27]``."""
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, required=True, help="medseg manifest JSON")
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", type=float_list, default=[1.5, 1.5, 3.27], help="mm, x,y,z")
    ap.add_argument("--patch", type=int_list, default=[96, 96, 32], help="voxels, x,y,z")
    ap.add_argument("--batch", type=int, default=2, help="volumes per step (x2 patches each)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam lr, constant (tutorial: 1e-4)")
    ap.add_argument("--channels", type=int_list, default=[16, 32, 64, 128])
    ap.add_argument("--strides", type=int_list, default=[2, 2, 2])
    ap.add_argument("--res-units", type=int, default=1)
    ap.add_argument("--train-splits", default="train", help="comma list of splits to train on")
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--output", type=Path, default=None, help="JSON results")
    args = ap.parse_args(argv)
    if len(args.spacing) != 3 or len(args.patch) != 3:
        ap.error("--spacing and --patch need 3 values each")
    if len(args.strides) != len(args.channels) - 1:
        ap.error("--strides needs one value fewer than --channels")
    if args.minutes <= 0 or args.threads < 1 or args.batch < 1:
        ap.error("--minutes, --threads and --batch must be positive")
    return args


def load_cases(manifest: Path, splits: list[str]) -> list[dict[str, str]]:
    """Cases of ``splits`` as ``{"id", "image", "label"}`` dicts with absolute paths.

    Paths are relative to ``manifest_dir / medseg.root`` when that is set, else to the manifest's folder.
    Exits with one line if the manifest is unreadable, not binary, or holds no such case.
    """
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"{manifest}: cannot read manifest ({exc})")
    fg = {k: v for k, v in doc.get("labels", {}).items() if int(v) != 0}
    if list(fg.values()) != [1]:
        sys.exit(f"{manifest}: needs exactly one foreground label of value 1, found {fg}")
    root = manifest.parent / doc.get("medseg", {}).get("root", ".")
    cases = [
        {"id": c["id"], "image": str(root / c["image"]), "label": str(root / c["label"])}
        for c in doc.get("training", [])
        if c.get("split") in splits and c.get("label")
    ]
    if not cases:
        sys.exit(f"{manifest}: no labelled case in split(s) {','.join(splits)}")
    return cases


def base_transforms(args: argparse.Namespace, keys: list[str]) -> list[Any]:
    """Load, channel first, RAS, resample to ``--spacing``, CT window -160..240 HU -> 0..1."""
    modes = ["bilinear", "nearest"][: len(keys)]
    return [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=args.spacing, mode=modes),
        ScaleIntensityRanged(keys=["image"], a_min=-160, a_max=240, b_min=0.0, b_max=1.0, clip=True),
    ]


def train_transforms(args: argparse.Namespace) -> Compose:
    """Tutorial training pipeline (plus SpatialPadd to the patch size, see the docstring)."""
    keys = ["image", "label"]
    return Compose(
        base_transforms(args, keys)
        + [
            SpatialPadd(keys=keys, spatial_size=args.patch),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=args.patch,
                pos=2,
                neg=1,
                num_samples=2,
                image_key="image",
                image_threshold=0,
            ),
            RandFlipd(keys=keys, spatial_axis=[0], prob=0.5),
        ]
    )


def eval_transforms(args: argparse.Namespace) -> Compose:
    """Image through the base pipeline; label only loaded, on its original grid."""
    return Compose(base_transforms(args, ["image"]) + [LoadImaged(keys=["label"]), EnsureChannelFirstd(keys=["label"])])


def make_model(args: argparse.Namespace) -> UNet:
    """MONAI 3D UNet, two output channels, MONAI's default (instance) norm."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=args.channels,
        strides=args.strides,
        num_res_units=args.res_units,
    )


def train(args: argparse.Namespace, model: UNet, cases: list[dict[str, str]]) -> dict[str, Any]:
    """Cache the training cases, then train until ``--minutes`` are spent; return counts and times."""
    t0 = time.perf_counter()
    ds = CacheDataset(data=cases, transform=train_transforms(args), cache_rate=1.0, num_workers=0)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=0)
    cache_s = time.perf_counter() - t0
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), args.lr)
    budget = args.minutes * 60.0
    steps, epochs, losses = 0, 0, []
    model.train()
    start = time.perf_counter()
    done = False
    while not done:
        epochs += 1
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            steps += 1
            losses.append(loss.item())
            if time.perf_counter() - start >= budget:
                done = True
                break
    train_s = time.perf_counter() - start
    last = losses[-min(len(losses), len(loader)) :]
    return {
        "iterations": steps,
        "epochs_started": epochs,
        "cache_seconds": round(cache_s, 2),
        "train_seconds": round(train_s, 2),
        "final_loss_mean_last_epoch": round(float(np.mean(last)), 4),
    }


def score_case(pred: torch.Tensor, label: torch.Tensor, spacing: list[float]) -> tuple[float, float]:
    """Dice and HD95 (mm) of binary ``pred`` vs ``label`` (both 1xXxYxZ, same grid).

    Empty prediction: Dice 0 and HD95 NaN.
    """
    p = (pred > 0).float()[None]
    y = (label > 0).float()[None]
    p2 = torch.cat([1 - p, p], dim=1)
    y2 = torch.cat([1 - y, y], dim=1)
    dice = float(compute_dice(p2, y2, include_background=False)[0, 0])
    if p.sum() == 0:
        return 0.0, math.nan
    hd = compute_hausdorff_distance(p2, y2, include_background=False, percentile=95, spacing=spacing)
    return dice, float(hd[0, 0])


def evaluate(args: argparse.Namespace, model: UNet, cases: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Sliding-window predict each case, invert to the original grid, argmax, score on the original label."""
    tf = eval_transforms(args)
    invert = Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=False, to_tensor=True)
    loader = DataLoader(Dataset(data=cases, transform=tf), batch_size=1, num_workers=0)
    rows = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            t0 = time.perf_counter()
            logits = sliding_window_inference(batch["image"], args.patch, 2, model, overlap=0.5)
            batch["pred"] = torch.softmax(logits, dim=1)
            item = invert(decollate_batch(batch)[0])
            pred = torch.argmax(item["pred"], dim=0, keepdim=True)
            label = item["label"]
            if pred.shape != label.shape:
                sys.exit(f"{item['id']}: inverted prediction {tuple(pred.shape)} != label {tuple(label.shape)}")
            spacing = [float(s) for s in label.pixdim]
            dice, hd95 = score_case(pred, label, spacing)
            rows.append(
                {
                    "id": item["id"],
                    "dice": round(dice, 4),
                    "hd95_mm": None if math.isnan(hd95) else round(hd95, 2),
                    "pred_voxels": int(pred.sum()),
                    "label_voxels": int((label > 0).sum()),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / median Dice over all cases; mean / median HD95 over the cases with a prediction."""
    dice = [r["dice"] for r in rows]
    hd = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
    return {
        "cases": len(rows),
        "dice_mean": round(statistics.mean(dice), 4),
        "dice_median": round(statistics.median(dice), 4),
        "hd95_mean_mm": round(statistics.mean(hd), 2) if hd else None,
        "hd95_median_mm": round(statistics.median(hd), 2) if hd else None,
        "hd95_nan_cases": len(rows) - len(hd),
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], info: dict[str, Any]) -> None:
    """Per-case rows, then the summary line and the training figures."""
    print(f"{'case':<22}{'Dice':>8}{'HD95 mm':>10}{'pred vox':>10}{'gt vox':>9}")
    for r in rows:
        hd = "nan" if r["hd95_mm"] is None else f"{r['hd95_mm']:.2f}"
        print(f"{r['id']:<22}{r['dice']:>8.4f}{hd:>10}{r['pred_voxels']:>10}{r['label_voxels']:>9}")
    hd_mean, hd_med = summary["hd95_mean_mm"], summary["hd95_median_mm"]
    print(
        f"Dice mean {summary['dice_mean']:.4f} median {summary['dice_median']:.4f} | "
        f"HD95 mean {hd_mean} median {hd_med} mm ({summary['hd95_nan_cases']} NaN)"
    )
    print(
        f"iterations {info['iterations']} ({info['epochs_started']} epochs started), "
        f"train {info['train_seconds']} s, cache {info['cache_seconds']} s, eval {info['eval_seconds']} s, "
        f"peak RSS {info['peak_rss_mib']} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, print, write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    train_cases = load_cases(args.manifest, [s.strip() for s in args.train_splits.split(",") if s.strip()])
    eval_cases = load_cases(args.manifest, [args.eval_split])
    model = make_model(args)
    info = train(args, model, train_cases)
    t0 = time.perf_counter()
    rows = evaluate(args, model, eval_cases)
    info["eval_seconds"] = round(time.perf_counter() - t0, 2)
    info["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary = summarise(rows)
    print_table(rows, summary, info)
    if args.output is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        doc = {
            "benchmark": "plain_monai_sarcoma",
            "config": config,
            "train_cases": len(train_cases),
            "scored_on": "original label grid (softmax inverted with Invertd, then argmax)",
            "summary": summary,
            "training": info,
            "cases": rows,
        }
        write_json(args.output, doc)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
