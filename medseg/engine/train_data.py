"""Training data: the train and validation datasets and the loader, built from a config and a manifest.

The kind of data (``data.kind``) gives the transforms and the input checks; caching follows ``data.cache``
(memory, disk, none); under DDP each rank draws from its own shard of the training cases
(``DistributedSampler``) and validates its own share of the validation cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from torch.utils.data import DistributedSampler

from medseg.config import Config
from medseg.data.kinds import DataKind
from medseg.errors import MedsegError
from medseg.io.manifest import Manifest, Split


def case_dicts(manifest: Manifest, split: Split) -> list[dict[str, Any]]:
    """The cases of one split as MONAI dictionaries: image file(s), label file, id and position in the split."""
    out: list[dict[str, Any]] = []
    for c in manifest.split(split):
        images = [str(p) for p in manifest.image_paths(c)]
        out.append(
            {
                "image": images if len(images) > 1 else images[0],
                "label": str(manifest.label_path(c)),
                "id": c.id,
                "index": len(out),
            }
        )
    return out


class TrainData:
    """Datasets and loader of one training run (rank ``rank`` of ``world``)."""

    def __init__(
        self,
        cfg: Config,
        manifest: Manifest,
        kind: DataKind,
        num_classes: int,
        run_dir: Path,
        rank: int = 0,
        world: int = 1,
        pin_memory: bool = False,
    ) -> None:
        train_cases, val_cases = case_dicts(manifest, "train"), case_dicts(manifest, "val")
        if not train_cases:
            raise MedsegError(f"{manifest.path}: no cases with split 'train'")
        kind.check_cases(manifest, manifest.split("train", "val"), cfg.data)
        self.train_ds = _dataset(cfg, train_cases, kind.train_transforms(cfg, num_classes), run_dir)
        self.generator = torch.Generator()
        self.sampler: DistributedSampler | None = (
            DistributedSampler(self.train_ds, shuffle=True, seed=cfg.train.seed) if world > 1 else None
        )
        self.train_loader = DataLoader(
            self.train_ds,
            batch_size=cfg.data.batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            pin_memory=pin_memory,
            generator=self.generator,
            persistent_workers=False,
        )
        mine = val_cases[rank::world]  # each rank validates its own share of cases
        vtf = kind.eval_transforms(cfg, with_label=True)
        self.val_ds = (
            CacheDataset(mine, vtf, cache_rate=1.0, num_workers=1, progress=False)
            if cfg.data.cache == "memory"
            else Dataset(mine, vtf)
        )
        self.num_val_cases = len(val_cases)

    def reseed(self, seed: int) -> None:
        """Seed the random transforms and the loader's shuffling (every epoch: resumed runs draw the same)."""
        self.train_ds.transform.set_random_state(seed=seed)
        self.generator.manual_seed(seed)


def _dataset(cfg: Config, cases: list[dict[str, Any]], transform: Any, run_dir: Path) -> Dataset:
    if cfg.data.cache == "memory":
        return CacheDataset(cases, transform, cache_rate=1.0, num_workers=max(1, cfg.data.num_workers), progress=False)
    if cfg.data.cache == "disk":
        return PersistentDataset(cases, transform, cache_dir=cfg.data.cache_dir or (run_dir / "cache"))
    return Dataset(cases, transform)
