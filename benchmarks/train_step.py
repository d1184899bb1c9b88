"""Training-step benchmark per preset: data loading vs compute, and medseg vs a plain MONAI loop.

For each preset (sizes shrunk to CPU scale by the same overrides the preset tests use) this builds the
medseg Trainer and, in the same process, a hand-written MONAI training loop with the same network, the
same cached dataset and transforms, loss, optimizer and batch size. Both run the same number of epochs
after one warm-up epoch; printed: step time, data-loading share of it, samples/s and the ratio
medseg / plain (goal: data < 10 % of the step, ratio >= 1).

    .venv/bin/python benchmarks/train_step.py [--presets vnet_dice_focal dynunet] [--epochs 2] [--full-size]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.config import CONFIG_DIR, load_config  # noqa: E402
from medseg.data.kinds import train_transforms  # noqa: E402
from medseg.data.phantom import write_phantom  # noqa: E402
from medseg.engine.trainer import Trainer, _case_dicts  # noqa: E402
from medseg.io.manifest import load_manifest  # noqa: E402
from medseg.losses import build_loss  # noqa: E402
from medseg.models import build_model  # noqa: E402
from tests.test_presets import SMALL  # noqa: E402  (one place for the CPU-scale overrides)


def plain_loop(cfg, manifest, epochs: int) -> tuple[float, float, int]:  # noqa: ANN001
    """The reference: a minimal MONAI loop. Returns (seconds, data seconds, samples) over ``epochs``."""
    torch.manual_seed(cfg.train.seed)
    ds = CacheDataset(_case_dicts(manifest, "train"), train_transforms(cfg, manifest.num_classes), cache_rate=1.0,
                      num_workers=1, progress=False)
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=True, num_workers=cfg.data.num_workers)
    net = build_model(cfg.model.name, cfg.model.spatial_dims, manifest.num_channels, manifest.num_classes, cfg.model.params)
    loss_fn = build_loss(cfg.loss.name, manifest.num_classes, cfg.loss.params)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optimizer.lr)
    net.train()
    total = data = 0.0
    n = 0
    for epoch in range(epochs + 1):  # epoch 0 warms up
        t0 = tick = time.perf_counter()
        d = 0.0
        for batch in loader:
            d += time.perf_counter() - tick
            out = net(batch["image"])
            if out.ndim == batch["label"].ndim + 1:  # deep supervision (stacked heads): full-resolution head
                out = out[:, 0]
            loss = loss_fn(out, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch:
                n += batch["image"].shape[0]
            tick = time.perf_counter()
        if epoch:
            total += time.perf_counter() - t0
            data += d
    return total, data, n


def medseg_loop(cfg, manifest, epochs: int) -> tuple[float, float, int, int]:  # noqa: ANN001
    """The medseg Trainer's own epoch loop (no validation). Returns (seconds, data seconds, samples, steps)."""
    tr = Trainer(cfg, manifest)
    tr._datasets()
    tr._model()
    total = data = 0.0
    for epoch in range(epochs + 1):
        tr._seed(epoch + 1)
        m = tr._train_epoch(epoch)
        if epoch:
            total += m["time_epoch_s"]
            data += m["time_epoch_s"] * m["time_data_fraction"]
    samples = epochs * len(tr.train_ds) * cfg.data.samples_per_volume
    return total, data, samples, epochs * len(tr.train_loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--full-size", action="store_true", help="keep each preset's own patch and network sizes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="medseg_bench_"))
    manifest = write_phantom(work / "phantom", cases=args.cases, seed=0, val_fraction=0.34, shape=(64, 64, 32),
                             spacing=(3.0, 3.0, 4.0))
    manifest = load_manifest(manifest.path)
    print(f"CPU, {args.threads} threads, {args.cases}-case phantom, {args.epochs} timed epochs after 1 warm-up, "
          f"{'preset sizes' if args.full_size else 'CPU-scale sizes'}")
    print(f"{'preset':20s} {'steps':>5s} {'step ms':>8s} {'data %':>7s} {'medseg smp/s':>13s} {'plain smp/s':>12s} "
          f"{'plain data %':>12s} {'ratio':>6s}")
    for preset in args.presets:
        small = [] if args.full_size else SMALL.get(preset, [])
        cfg = load_config(preset, [*small, f"data.manifest={manifest.path}", f"train.output_dir={work / 'runs'}",
                                   f"train.run_name={preset}", "tracking.backend=none", "train.device=cpu",
                                   "data.samples_per_volume=2", "data.batch_size=2", "data.augment=true"])
        t_m, d_m, n_m, steps = medseg_loop(cfg, manifest, args.epochs)
        t_p, d_p, n_p = plain_loop(cfg, manifest, args.epochs)
        sps_m, sps_p = n_m / t_m, n_p / t_p
        print(f"{preset:20s} {steps:5d} {1000 * t_m / steps:8.1f} {100 * d_m / t_m:6.1f}% {sps_m:13.2f} {sps_p:12.2f} "
              f"{100 * d_p / t_p:11.1f}% {sps_m / sps_p:6.2f}")


if __name__ == "__main__":
    main()
