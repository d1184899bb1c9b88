"""The training loop: patches in, sliding-window validation, atomic checkpoints, batched tracking.

Run folder layout (``train.output_dir / run_name``)::

    config.yaml               resolved config of the run
    manifest.json             copy of the dataset manifest
    checkpoints/last.pt       full state after every epoch (model, optimizer, scheduler, scaler, RNG, run id)
    model/                    model package of the best epoch (see inference.model_package)
    history.csv               per-epoch metrics (rewritten atomically from the checkpoint's history)
    val_cases_best.csv        per-case, per-organ metrics of the best epoch
    plots/                    learning curve and validation overlays (PNG)

Every epoch re-seeds the global and transform RNGs from ``(seed, epoch, rank)``, so a run resumed from
``last.pt`` draws exactly the patches an uninterrupted run would have drawn.

Order of writes per epoch: best model package -> ``last.pt`` (holds the metric history) -> ``history.csv``
-> MLflow. A run killed anywhere resumes from ``last.pt``: ``history.csv`` is rebuilt from it and epochs the
checkpoint has but MLflow lacks are logged then, so the MLflow run has every step exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from medseg.config import Config
from medseg.data.transforms import eval_transforms, train_transforms
from medseg.data.validation import validate_cases
from medseg.engine import distributed as dist_utils
from medseg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medseg.engine.device import Precision, resolve_device, resolve_precision
from medseg.engine.history import read_rows_csv, write_rows_csv
from medseg.engine.validation import CaseInference, ValResult, validate, validate_images
from medseg.engine.schedules import build_optimizer, build_scheduler
from medseg.errors import ConfigError, MedsegError
from medseg.inference.model_package import save_package
from medseg.inference.sliding import predictor_for
from medseg.io.atomic import write_text_atomic
from medseg.io.manifest import Manifest
from medseg.losses import build_loss, wrap_deep_supervision
from medseg.models import build_model
from medseg.tracking import NullTracker, Tracker, git_commit, make_tracker

log = logging.getLogger("medseg.train")


@dataclass
class TrainResult:
    """What a finished (or stopped) training run produced."""

    run_dir: Path
    run_id: str | None
    epochs_run: int
    best_epoch: int
    best_metric: float
    best_per_class: dict[str, dict[str, float]] = field(default_factory=dict)


def _case_dicts(manifest: Manifest, split: str) -> list[dict[str, Any]]:
    out = []
    for c in manifest.split(split):  # type: ignore[arg-type]
        images = [str(p) for p in manifest.image_paths(c)]
        out.append({"image": images if len(images) > 1 else images[0], "label": str(manifest.label_path(c)), "id": c.id,
                    "index": len(out)})
    return out


class Trainer:
    """Builds everything from a config and a manifest, then ``fit()`` trains."""

    def __init__(self, cfg: Config, manifest: Manifest, run_dir: Path | None = None, tracking_uri: str | None = None,
                 resume: bool = False) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.rank, self.world, local_rank = dist_utils.init_distributed()
        self.device = resolve_device(cfg.train.device, local_rank)
        if cfg.train.num_threads is not None:  # e.g. 1 per process on CPU servers shared by several jobs
            torch.set_num_threads(cfg.train.num_threads)
        self.precision: Precision = resolve_precision(cfg.train.amp, self.device)
        name = cfg.train.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not resume and self.world > 1:  # every rank must agree on the run folder
            name = str(dist_utils.broadcast_object(name))
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.train.output_dir) / name
        self.resume = resume
        self.tracking_uri = tracking_uri
        # Volumes score organs (background excluded); in 2D natural images every class is scored (VOC background too).
        self.labels = manifest.labels if cfg.data.kind == "image2d" else manifest.foreground
        self.num_classes = manifest.num_classes
        self.tracker: Tracker = NullTracker()

    # ---- construction ----------------------------------------------------------------------------
    def _seed(self, epoch: int) -> None:
        seed = self.cfg.train.seed + 1000 * epoch + self.rank
        # Not monai.utils.set_determinism: it also forces cudnn.deterministic and disables cudnn.benchmark,
        # which would slow every non-deterministic GPU run; those switches follow train.deterministic instead.
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if hasattr(self, "train_ds"):
            self.train_ds.transform.set_random_state(seed=seed)
            self.loader_gen.manual_seed(seed)

    def _datasets(self) -> None:
        cfg = self.cfg
        train_cases = _case_dicts(self.manifest, "train")
        val_cases = _case_dicts(self.manifest, "val")
        if not train_cases:
            raise MedsegError(f"{self.manifest.path}: no cases with split 'train'")
        if cfg.data.kind == "image2d":
            from medseg.data.natural_images import validate_image_cases

            validate_image_cases(self.manifest, self.manifest.split("train", "val"), cfg.data.ignore_index)
        else:
            validate_cases(self.manifest, self.manifest.split("train", "val"))
        ttf = train_transforms(cfg, self.num_classes)
        if cfg.data.cache == "memory":
            self.train_ds = CacheDataset(train_cases, ttf, cache_rate=1.0, num_workers=max(1, cfg.data.num_workers), progress=False)
        elif cfg.data.cache == "disk":
            cache_dir = cfg.data.cache_dir or (self.run_dir / "cache")
            self.train_ds = PersistentDataset(train_cases, ttf, cache_dir=cache_dir)
        else:
            self.train_ds = Dataset(train_cases, ttf)
        self.loader_gen = torch.Generator()
        self.sampler = DistributedSampler(self.train_ds, shuffle=True, seed=cfg.train.seed) if self.world > 1 else None
        self.train_loader = DataLoader(
            self.train_ds, batch_size=cfg.data.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda", generator=self.loader_gen,
            persistent_workers=False,
        )
        my_val = val_cases[self.rank :: self.world]  # each rank validates its own share of cases
        vtf = eval_transforms(cfg, with_label=True)
        self.val_ds = CacheDataset(my_val, vtf, cache_rate=1.0, num_workers=1, progress=False) if cfg.data.cache == "memory" else Dataset(my_val, vtf)
        self.num_val_cases = len(val_cases)

    def _model(self) -> None:
        cfg = self.cfg
        self._seed(0)
        self.model = build_model(cfg.model.name, cfg.model.spatial_dims, self.manifest.num_channels, self.num_classes, cfg.model.params).to(self.device)
        self._check_patch_fits()
        self.net: nn.Module = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None) if self.world > 1 else self.model
        self.loss_fn = build_loss(cfg.loss.name, self.num_classes, cfg.loss.params, cfg.data.ignore_index).to(self.device)  # class-weight buffers
        # Deep-supervision nets return every decoder head in train mode; eval mode gives one tensor.
        deep = bool(cfg.model.params.get("deep_supervision"))
        self.train_loss_fn = wrap_deep_supervision(self.loss_fn) if deep else self.loss_fn
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.train.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)

    def _check_patch_fits(self) -> None:
        """Fail at start-up, naming the setting, if the patch/ROI does not fit the architecture.

        Some networks only take sizes divisible by their total stride (V-Net: 16); MONAI would otherwise
        fail deep inside the first step with a tensor-size mismatch. One batch-1 forward pass in eval mode
        (no dropout, so no RNG is consumed) checks it for any registered model.
        """
        cfg = self.cfg
        for setting, size in (("data.patch_size", tuple(cfg.data.patch_size)), ("inference.roi_size", tuple(cfg.roi_size))):
            x = torch.zeros(1, self.manifest.num_channels, *size, device=self.device)
            try:
                with torch.no_grad():
                    out = self.model.eval()(x)
            except torch.OutOfMemoryError:
                raise  # a real memory problem, not a size mismatch
            except RuntimeError as e:
                raise ConfigError(f"{setting} {list(size)} does not fit model {cfg.model.name!r} "
                                  f"({str(e).splitlines()[0][:160]}); try multiples of 16") from None
            finally:
                self.model.train()
            out = out[0] if isinstance(out, (list, tuple)) else out
            if tuple(out.shape[2:]) != size:
                raise ConfigError(f"{setting} {list(size)}: model {cfg.model.name!r} returns size {list(out.shape[2:])}; "
                                  "use sizes divisible by its total stride (e.g. multiples of 16)")

    # ---- one epoch -------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.net.train()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        accum = self.cfg.train.grad_accumulation
        total, n, t_data, t0 = 0.0, 0, 0.0, time.perf_counter()
        tick = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(self.train_loader):
            t_data += time.perf_counter() - tick
            image = batch["image"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            update = (step + 1) % accum == 0 or step + 1 == len(self.train_loader)
            # DDP all-reduces gradients on every backward; skip that on accumulation-only micro-steps.
            sync = contextlib.nullcontext() if update or self.world == 1 else self.net.no_sync()  # type: ignore[operator]
            with sync:
                with self.precision.autocast(self.device):
                    out = self.net(image)
                # The loss runs in fp32 outside autocast; deep-supervision nets may return a list of heads.
                out = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
                loss = self.train_loss_fn(out, label)
                self.scaler.scale(loss / accum).backward()
            if update:
                if self.cfg.optimizer.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) * image.shape[0]
            n += image.shape[0]
            tick = time.perf_counter()
        sums = dist_utils.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64))
        elapsed = time.perf_counter() - t0
        return {"train_loss": float(sums[0] / max(sums[1], 1)), "lr": self.optimizer.param_groups[0]["lr"],
                "time_epoch_s": elapsed, "time_data_fraction": t_data / max(elapsed, 1e-9)}

    def validate(self, with_hd95: bool = False, n_views: int = 0) -> ValResult:
        """Sliding-window validation on whole preprocessed val volumes; per-organ Dice/IoU (HD95) by name."""
        images = self.cfg.data.kind == "image2d"
        predictor = predictor_for(self.model, 2, volume_dims=2) if images else predictor_for(self.model, self.cfg.model.spatial_dims)
        run = CaseInference(self.model, predictor, self._window(), self.cfg.inference, self.device, self.precision)
        if images:  # whole 2D images: pooled pixel accuracy, per-class IoU/Dice, mIoU
            return validate_images(run, self.val_ds, self.labels, self.num_classes, self.loss_fn,
                                   self.cfg.data.ignore_index, n_views)
        return validate(run, self.val_ds, self.labels, self.num_classes, self.loss_fn, with_hd95=with_hd95, n_views=n_views)

    def _window(self) -> tuple[int, ...]:
        roi = self.cfg.roi_size
        return roi if self.cfg.model.spatial_dims == 3 or self.cfg.data.kind == "image2d" else (*roi, 1)

    # ---- state -----------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "bad_rounds": self.bad_rounds, "run_id": self.tracker.run_id or "", "rng": rng_state(),
            "elapsed_s": self.elapsed_before + (time.time() - self.t_start), "history": self.history,
        }

    def _restore(self) -> int:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights/optimizer state to the device.
        ckpt = load_checkpoint(self.run_dir / "checkpoints" / "last.pt", map_location="cpu")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.best_metric, self.best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
        self.bad_rounds = int(ckpt["bad_rounds"])
        self.elapsed_before = float(ckpt["elapsed_s"])
        set_rng_state(ckpt["rng"])
        self._resume_run_id = ckpt["run_id"] or None
        self.history = [dict(r) for r in ckpt.get("history", [])]
        return int(ckpt["epoch"]) + 1

    def _start_tracking(self) -> None:
        if not dist_utils.is_main():
            return
        resumed_id = getattr(self, "_resume_run_id", None)
        self.tracker = make_tracker(self.cfg.tracking, self.tracking_uri)
        run_id = self.tracker.start(run_name=self.run_dir.name, run_id=resumed_id)
        if resumed_id is None:
            self.tracker.log_params(self.cfg.flat())
            self.tracker.set_tags({
                "mlflow.source.git.commit": self.commit, "git_commit": self.commit,
                "dataset_name": self.manifest.name, "dataset_fingerprint": self.fingerprint,
                "torch_version": torch.__version__, "monai_version": __import__("monai").__version__,
                "cuda_version": torch.version.cuda or "none", "cudnn_version": str(torch.backends.cudnn.version() or "none"),
                "device": self._device_name(), "device_type": self.device.type,
                "world_size": self.world, "amp": str(self.precision.dtype), "run_dir": str(self.run_dir.resolve()),
            })
            self.tracker.log_artifact(self.run_dir / "config.yaml", "config")
            self.tracker.log_artifact(self.run_dir / "manifest.json", "data")
        if run_id:
            write_text_atomic(self.run_dir / "mlflow_run_id.txt", run_id + "\n")

    def _replay_history(self) -> None:
        """After a resume: rebuild history.csv from the checkpoint and log the epochs MLflow has not seen."""
        if not dist_utils.is_main():
            return
        write_rows_csv(self.run_dir / "history.csv", self.history)
        seen = self.tracker.logged_steps("train_loss")
        for row in self.history:
            if int(row["epoch"]) not in seen:
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        self.tracker.set_tags({"resumed_at_epoch": len(self.history)})

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    # ---- main loop -------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train for ``train.epochs`` (or until the time budget / early stopping), validating every k epochs."""
        cfg = self.cfg
        if cfg.train.deterministic and self.device.type == "cuda":  # cuBLAS needs this for reproducible matmuls
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cudnn.benchmark = self.device.type == "cuda" and not cfg.train.deterministic
        if dist_utils.is_main():
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            if not self.resume:
                write_text_atomic(self.run_dir / "config.yaml", cfg.to_yaml())
                self.manifest_copy()
        self._datasets()
        # Provenance is fixed for the run: computed once here (a git subprocess, a stat of every data file, the
        # plans file), not again at every tag write and every new best epoch.
        self.commit, self.fingerprint, self.plans = git_commit(), self.manifest.fingerprint(), self._plans()
        self._model()
        self.best_metric, self.best_epoch, self.bad_rounds, self.elapsed_before = -math.inf, -1, 0, 0.0
        self.history: list[dict[str, float]] = []
        start_epoch = self._restore() if self.resume else 0
        self._start_tracking()
        if self.resume:
            self._replay_history()
        self.t_start = time.time()
        best_rows: list[dict[str, Any]] = read_rows_csv(self.run_dir / "val_cases_best.csv") if self.resume else []
        epoch = start_epoch - 1
        status = "FINISHED"
        already_done = start_epoch >= cfg.train.epochs  # resuming a finished run: nothing to train or register
        if already_done:
            log.info("%s: all %d epochs are done already", self.run_dir, cfg.train.epochs)
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                self._seed(epoch + 1)
                metrics = self._train_epoch(epoch)
                self.scheduler.step()
                # A run stopped by its time budget validates its final epoch, so it still ends with a model.
                out_of_time = self._out_of_time(epoch, metrics)
                last = epoch + 1 == cfg.train.epochs or out_of_time
                if (epoch + 1) % cfg.train.val_every == 0 or last:
                    every = cfg.train.hd95_every
                    val = self.validate(with_hd95=bool(every) and ((epoch + 1) % every == 0 or last),
                                        n_views=cfg.train.overlay_cases)
                    metrics.update(val.summary)
                    score = val.summary.get("val_dice_mean", -metrics["train_loss"])
                    if score > self.best_metric:
                        self.best_metric, self.best_epoch, best_rows, self.bad_rounds = score, epoch, val.rows, 0
                        self._save_best(epoch, val)
                    else:
                        self.bad_rounds += 1
                self.history.append({"epoch": epoch, **metrics})
                if dist_utils.is_main():  # checkpoint first: it is the record the CSV and MLflow follow
                    save_checkpoint(self.run_dir / "checkpoints" / "last.pt", self._state(epoch))
                self._log_epoch(epoch, metrics)
                dist_utils.barrier()
                if out_of_time or self._early_stop():
                    break
        except BaseException:
            status = "FAILED"  # KeyboardInterrupt/SIGTERM too; the run can be resumed from last.pt
            raise
        finally:
            if status == "FINISHED" and not already_done:
                self._finish()
            self.tracker.end(status)
            if self.world > 1:
                dist_utils.barrier()
                dist_utils.cleanup()
        best_per_class = {n: {"dice": best_rows_mean(best_rows, f"dice_{n}"), "iou": best_rows_mean(best_rows, f"iou_{n}")}
                          for n in self.labels} if best_rows else {}
        return TrainResult(self.run_dir, self.tracker.run_id, epoch + 1, self.best_epoch, self.best_metric, best_per_class)

    def manifest_copy(self) -> None:
        """Keep the manifest beside the run (with its root re-anchored) for reproducibility."""
        import json

        data = self.manifest.to_json()
        data["medseg"]["source"] = str(self.manifest.path)
        write_text_atomic(self.run_dir / "manifest.json", json.dumps(data, indent=2) + "\n")

    def _early_stop(self) -> bool:
        """No validation improvement in ``early_stopping_patience`` rounds (the same on every rank)."""
        patience = self.cfg.train.early_stopping_patience
        if patience and self.bad_rounds >= patience:
            log.info("early stopping: no val improvement in %d rounds", self.bad_rounds)
            return True
        return False

    def _out_of_time(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Would another epoch overrun ``train.max_minutes``? Rank 0 decides for all ranks."""
        budget = self.cfg.train.max_minutes
        stop = False
        if budget is not None:
            spent = self.elapsed_before + time.time() - self.t_start
            if spent + metrics["time_epoch_s"] > budget * 60:
                log.info("time budget of %.1f min reached after epoch %d", budget, epoch + 1)
                stop = True
        return bool(dist_utils.broadcast_object(stop))

    def _log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if not dist_utils.is_main():
            return
        write_rows_csv(self.run_dir / "history.csv", self.history)
        self.tracker.log_metrics(metrics, step=epoch)
        keys = ("train_loss", "val_loss", "val_dice_mean", "val_iou_mean", "val_pixel_accuracy")
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in keys)
        log.info("epoch %d/%d %s (%.1f s)", epoch + 1, self.cfg.train.epochs, shown, metrics["time_epoch_s"])

    def _plans(self) -> dict[str, Any] | None:
        """The manifest's plans (``<manifest>.plans.json`` from ``medseg data plan``), if there are any."""
        import json

        from medseg.planning import plans_path_for

        path = plans_path_for(self.manifest.path) if self.manifest.path else None
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MedsegError(f"{path}: unreadable plans file ({e.__class__.__name__})") from None

    def _save_best(self, epoch: int, val: ValResult) -> None:
        if not dist_utils.is_main():
            return
        extra = {"run_id": self.tracker.run_id, "epoch": epoch, "val_metrics": val.summary,
                 "dataset_fingerprint": self.fingerprint, "git_commit": self.commit}
        save_package(self.run_dir / "model", self.model, self.cfg, self.manifest, extra, plans=self.plans)
        write_rows_csv(self.run_dir / "val_cases_best.csv", val.rows)
        from medseg.engine.plots import overlay

        for index, image, truth, pred in val.views:  # named by position in the val split, never by case id
            overlay(image, truth, pred, self.num_classes, self.run_dir / "plots" / f"val_overlay_{index:02d}.png",
                    title=f"validation case {index}, epoch {epoch + 1}" + ("" if self.cfg.data.kind == "image2d" else " (middle of organs, axial)"))

    def _finish(self) -> None:
        if not dist_utils.is_main():
            return
        from medseg.engine.plots import learning_curve

        if self.history:
            learning_curve(self.history, list(self.labels), self.run_dir / "plots" / "learning_curve.png")
        self.tracker.log_artifact(self.run_dir / "history.csv", "metrics")
        if (self.run_dir / "plots").is_dir():
            self.tracker.log_artifact(self.run_dir / "plots", "plots")
        if not (self.run_dir / "model").exists():
            return
        self.tracker.set_tags({"best_epoch": self.best_epoch, "best_val_dice_mean": f"{self.best_metric:.4f}"})
        if (self.run_dir / "val_cases_best.csv").exists():
            self.tracker.log_artifact(self.run_dir / "val_cases_best.csv", "metrics")
        self.tracker.log_artifact(self.run_dir / "model", "model")
        name = self.cfg.tracking.registered_model_name
        if name and self.tracker.run_id:
            version = self.tracker.register_model("model", name)
            if version:
                self.tracker.set_tags({"registered_model": f"models:/{name}/{version}"})
                log.info("registered model: models:/%s/%s", name, version)


def best_rows_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of one column over per-case rows (NaN-aware)."""
    values = np.asarray([float(r[key]) for r in rows], dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")  # all NaN: no warning
