"""Plain PyTorch + MONAI baseline for CamVid: the hand-written loop the medseg 2D preset must beat.

    .venv/bin/python benchmarks/plain_camvid.py --manifest /tmp/bench/camvid.json --minutes 15 \\
        --threads 1 --output /tmp/bench/plain_camvid.json

What a competent user would write without any framework, at an equal wall-clock budget:

* Data: every "train" image of the medseg manifest is loaded into memory once (PIL -> float32 / 255,
  CHW; labels int64, 255 = void). Each step draws ``--batch`` random ``--patch`` crops (uniform
  position) with a random horizontal flip, in plain numpy; no MONAI transforms, no workers.
* Network: ``monai.networks.nets.UNet(spatial_dims=2, in_channels=3, out_channels=11, ...)`` with the
  channels / strides / residual units / norm given on the command line.
* Loss: cross-entropy (``ignore_index=255``) + soft Dice over the 11 classes, computed over the whole
  batch on non-void pixels only (void pixels are masked out of both the softmax and the one-hot target;
  smoothing 1e-5 in numerator and denominator, so a class absent from target and prediction scores ~1).
* Optimiser: AdamW, poly LR (power 0.9) whose progress is the elapsed fraction of the time budget, so
  the LR reaches ~0 when the budget ends; training stops when the budget is spent (the budget counts
  the training loop only, not data loading nor evaluation). Iterations are counted.
* Evaluation, on the "val" split: the whole image at once, reflect-padded at the bottom / right to a
  multiple of ``2 ** len(strides)`` and the logits cropped back (no sliding window), argmax, one
  11-class confusion matrix over all val pixels, void pixels (label 255) ignored.
* Report: per-class IoU (named from the manifest's "labels", index order), mIoU over the 11 classes
  (a class absent from both prediction and label on the whole val split has IoU NaN -- ``null`` in the
  JSON -- and is left out of the mean), pixel accuracy over non-void pixels, iterations, training /
  eval seconds, seconds per iteration, peak RSS (``resource.getrusage``). A table is printed and the
  JSON is written atomically to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

NUM_CLASSES = 11
VOID = 255


def parse_ints(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers (``"16,32,64"``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True, help="medseg manifest of CamVid")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=parse_ints, default=[16, 32, 64, 128, 256])
    p.add_argument("--strides", type=parse_ints, default=[2, 2, 2, 2])
    p.add_argument("--res-units", type=int, default=2)
    p.add_argument("--norm", default="instance")
    p.add_argument("--patch", type=parse_ints, default=[256, 256], help="H,W of the random crops")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--output", type=Path, default=None, help="JSON results")
    args = p.parse_args(argv)
    if len(args.channels) != len(args.strides) + 1:
        p.error("--channels needs exactly one more entry than --strides")
    if len(args.patch) != 2:
        p.error("--patch needs two values: H,W")
    if args.minutes <= 0 or args.threads <= 0 or args.batch <= 0 or args.res_units < 0:
        p.error("--minutes, --threads and --batch must be positive, --res-units non-negative")
    return args


def load_manifest(path: Path) -> tuple[dict, Path]:
    """Read a medseg manifest; return it and the folder its image / label paths are relative to."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read manifest {path}: {exc}") from exc
    if not isinstance(manifest.get("training"), list) or not isinstance(manifest.get("labels"), dict):
        raise SystemExit(f"error: {path} is not a medseg manifest (no 'training' list / 'labels' mapping)")
    root = path.resolve().parent
    rel = (manifest.get("medseg") or {}).get("root")
    return manifest, (root / rel).resolve() if rel else root


def class_names(manifest: dict) -> list[str]:
    """Names of classes 0..10 in index order; a value missing from "labels" is named ``class_<i>``."""
    by_value = {int(v): str(k) for k, v in manifest["labels"].items()}
    return [by_value.get(i, "background" if i == 0 else f"class_{i}") for i in range(NUM_CLASSES)]


def load_split(manifest: dict, root: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Load the images (float32 CHW in [0, 1]) and labels (int64 HW) of one split into memory."""
    images, labels = [], []
    for entry in manifest["training"]:
        if entry.get("split") != split:
            continue
        try:
            img = np.asarray(Image.open(root / entry["image"]).convert("RGB"), dtype=np.float32) / 255.0
            lab = np.asarray(Image.open(root / entry["label"]), dtype=np.int64)
        except (OSError, KeyError) as exc:
            raise SystemExit(f"error: cannot load case {entry.get('id')!r}: {exc}") from exc
        if lab.ndim != 2 or lab.shape != img.shape[:2]:
            raise SystemExit(f"error: case {entry.get('id')!r}: label {lab.shape} does not match image {img.shape}")
        bad = (lab >= NUM_CLASSES) & (lab != VOID)
        if bad.any():
            raise SystemExit(f"error: case {entry.get('id')!r}: label values outside 0..10 / 255")
        images.append(np.ascontiguousarray(img.transpose(2, 0, 1)))
        labels.append(lab)
    if not images:
        raise SystemExit(f"error: no {split!r} cases in the manifest")
    return images, labels


def random_batch(
    images: list[np.ndarray], labels: list[np.ndarray], patch: list[int], batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch`` random crops of size ``patch`` (uniform image and position), each flipped left-right
    with probability 0.5."""
    ph, pw = patch
    xs, ys = [], []
    for i in rng.integers(0, len(images), size=batch):
        img, lab = images[i], labels[i]
        h, w = lab.shape
        y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        x = img[:, y0 : y0 + ph, x0 : x0 + pw]
        y = lab[y0 : y0 + ph, x0 : x0 + pw]
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Cross-entropy (void ignored) + soft Dice over the classes on non-void pixels, batch-wise."""
    ce = F.cross_entropy(logits, target, ignore_index=VOID)
    valid = (target != VOID).unsqueeze(1).to(logits.dtype)  # N1HW
    prob = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(torch.where(target == VOID, 0, target), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot.to(logits.dtype) * valid
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return ce + (1.0 - dice.mean())


def train(model: torch.nn.Module, data: tuple[list, list], args: argparse.Namespace) -> dict[str, float]:
    """Train for ``args.minutes`` of wall clock with AdamW + time-based poly LR; return the loop's figures."""
    images, labels = data
    rng = np.random.default_rng(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    budget = args.minutes * 60.0
    model.train()
    iters, loss_sum, last_losses = 0, 0.0, []
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget:
        lr = args.lr * (1.0 - elapsed / budget) ** 0.9
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = random_batch(images, labels, args.patch, args.batch, rng)
        loss = ce_dice_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        iters += 1
        loss_sum += loss.item()
        last_losses = (last_losses + [loss.item()])[-20:]
        if iters == 1 or iters % 50 == 0:
            print(f"iter {iters:5d}  t={elapsed:7.1f}s  lr={lr:.2e}  loss={loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    return {
        "iterations": iters,
        "train_seconds": seconds,
        "seconds_per_iteration": seconds / iters if iters else math.nan,
        "mean_loss": loss_sum / iters if iters else math.nan,
        "final_loss_last20": float(np.mean(last_losses)) if last_losses else math.nan,
    }


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: tuple[list, list], multiple: int) -> np.ndarray:
    """Whole-image prediction (reflect pad to ``multiple``, crop the logits back); return the 11x11
    confusion matrix (rows = label, columns = prediction) over non-void pixels."""
    model.eval()
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for img, lab in zip(*data):
        h, w = lab.shape
        x = torch.from_numpy(img).unsqueeze(0)
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        pred = model(x)[0, :, :h, :w].argmax(0).numpy()
        keep = lab != VOID
        idx = lab[keep] * NUM_CLASSES + pred[keep]
        conf += np.bincount(idx, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    return conf


def metrics(conf: np.ndarray, names: list[str]) -> dict:
    """Per-class IoU (NaN when the class is absent from label and prediction), mIoU over the present
    classes, pixel accuracy over non-void pixels."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    total = conf.sum()
    return {
        "iou": {n: float(v) for n, v in zip(names, iou)},
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
        "classes_in_mean": int(np.isfinite(iou).sum()),
        "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
        "val_pixels": int(total),
    }


def nan_to_none(obj: object) -> object:
    """Replace NaN floats by None, recursively, so the JSON stays strict."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    return obj


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(nan_to_none(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def print_table(result: dict) -> None:
    """Print the per-class IoU and the headline figures."""
    print(f"\n{'class':<20} {'IoU':>7}")
    for name, v in result["metrics"]["iou"].items():
        print(f"{name:<20} {'nan' if math.isnan(v) else f'{v:.4f}':>7}")
    m, t = result["metrics"], result["timing"]
    print(f"{'mIoU':<20} {m['miou']:.4f}  ({m['classes_in_mean']} classes)")
    print(f"{'pixel accuracy':<20} {m['pixel_accuracy']:.4f}")
    print(
        f"iterations {t['iterations']}  train {t['train_seconds']:.1f}s  "
        f"{t['seconds_per_iteration']:.3f}s/iter  eval {t['eval_seconds']:.1f}s  "
        f"load {t['load_seconds']:.1f}s  peak RSS {result['peak_rss_mib']:.0f} MiB"
    )


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The MONAI 2D UNet of the command line."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=NUM_CLASSES,
        channels=args.channels,
        strides=args.strides,
        num_res_units=args.res_units,
        norm=args.norm,
    )


def main(argv: list[str] | None = None) -> int:
    """Load, train for the budget, evaluate on val, print and write the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    manifest, root = load_manifest(args.manifest)
    names = class_names(manifest)
    t0 = time.perf_counter()
    train_data, val_data = load_split(manifest, root, "train"), load_split(manifest, root, "val")
    load_seconds = time.perf_counter() - t0
    min_h = min(lab.shape[0] for lab in train_data[1])
    min_w = min(lab.shape[1] for lab in train_data[1])
    if args.patch[0] > min_h or args.patch[1] > min_w:
        raise SystemExit(f"error: --patch {args.patch} is larger than the smallest train image ({min_h}x{min_w})")
    print(f"{len(train_data[0])} train / {len(val_data[0])} val images loaded in {load_seconds:.1f}s", flush=True)
    model = build_model(args)
    timing = train(model, train_data, args)
    t1 = time.perf_counter()
    conf = evaluate(model, val_data, 2 ** len(args.strides))
    timing.update(eval_seconds=time.perf_counter() - t1, load_seconds=load_seconds)
    result = {
        "benchmark": "plain_camvid",
        "manifest": str(args.manifest),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "eval_mode": "whole image, reflect pad to a multiple of 2**len(strides), logits cropped back",
        "n_train": len(train_data[0]),
        "n_val": len(val_data[0]),
        "metrics": metrics(conf, names),
        "timing": timing,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "confusion_matrix": conf.tolist(),
        "torch": torch.__version__,
    }
    print_table(result)
    if args.output is not None:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
