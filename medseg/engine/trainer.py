"""The training run: builds the parts from a config and a manifest, then trains, validates and checkpoints.

Run folder layout (``train.output_dir / run_name``)::

    config.yaml               resolved config of the run
    manifest.json             copy of the dataset manifest
    checkpoints/last.pt       full state after every epoch (model, optimizer, scheduler, scaler, RNG, run id)
    model/                    model package of the best epoch (see inference.model_package)
    history.csv               per-epoch metrics (rewritten atomically from the checkpoint's history)
    val_cases_best.csv        per-case, per-organ metrics of the best epoch
    plots/                    learning curve and validation overlays (PNG)

The parts, one job each: ``train_data`` (datasets, loader), ``epoch`` (the AMP / DDP training step),
``validation`` (sliding-window scoring per data kind), ``recorder`` (run folder, provenance, MLflow, package,
plots) and ``runtime.checkpoint`` (atomic checkpoints). This module holds the loop and the run's state.

Every epoch re-seeds the global and transform RNGs from ``(seed, epoch, rank)``, so a run resumed from
``last.pt`` draws exactly the patches an uninterrupted run would have drawn.

Order of writes per epoch: best model package -> ``last.pt`` (holds the metric history) -> ``history.csv``
-> MLflow. A run killed anywhere resumes from ``last.pt``: ``history.csv`` is rebuilt from it and epochs the
checkpoint has but MLflow lacks are logged then, so the MLflow run has every step exactly once.

SIGTERM (``stop_signal``): the epoch in progress finishes its training steps, skips its validation, is saved in
``last.pt`` and logged, then the run ends (MLflow status KILLED) and ``fit`` raises ``TrainingStopped``. A SIGTERM
during a validation stops after that epoch is saved. The final epoch is not saved unvalidated (a resume would
find nothing left to do and never package it): it is trained again on resume.
"""

from __future__ import annotations

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
from torch.nn.parallel import DistributedDataParallel as DDP

from medseg.components import check_components
from medseg.config import Config
from medseg.data.kinds import data_kind
from medseg.engine.epoch import StepParts, train_epoch
from medseg.engine.history import read_rows_csv
from medseg.engine.recorder import RunRecorder
from medseg.engine.schedules import build_optimizer, build_scheduler
from medseg.engine.stop_signal import StopSignal, TrainingStopped, stopped_message
from medseg.engine.train_data import TrainData
from medseg.engine.validation import SCORERS, CaseInference, ValResult, validate
from medseg.errors import ConfigError
from medseg.inference.sliding import network_fn
from medseg.io.atomic import remove_stale_temps
from medseg.io.manifest import Manifest
from medseg.losses import build_loss, wrap_deep_supervision
from medseg.metrics.confusion import nanmean
from medseg.models import build_model
from medseg.runtime import distributed as dist_utils
from medseg.runtime.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medseg.runtime.device import Precision, resolve_device, resolve_precision

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


class Trainer:
    """Builds everything from a config and a manifest, then ``fit()`` trains."""

    history: list[dict[str, float]]  # set in ``_set_up``, replaced by ``_restore`` on resume
    _resume_run_id: str | None

    def __init__(
        self,
        cfg: Config,
        manifest: Manifest,
        run_dir: Path | None = None,
        tracking_uri: str | None = None,
        resume: bool = False,
    ) -> None:
        self.cfg = check_components(cfg)
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
        self.kind = data_kind(cfg)
        # volumes score organs, 2D images every class; void (data.ignore_index) is neither scored nor an output
        self.labels = self.kind.scored_labels(manifest, cfg.data.ignore_index)
        self.num_classes = manifest.num_classes_without(cfg.data.ignore_index)
        self.recorder = RunRecorder(cfg, manifest, self.run_dir, tracking_uri, active=dist_utils.is_main())
        self.data: TrainData | None = None
        self.stop = StopSignal()  # installed by fit()
        self.saved_epoch = -1  # the epoch last.pt holds (-1: none)

    # ---- construction ----------------------------------------------------------------------------
    @property
    def train_loader(self) -> Any:
        """The training loader (after ``_datasets``)."""
        return self._data().train_loader

    @property
    def train_ds(self) -> Any:
        """The training dataset (after ``_datasets``)."""
        return self._data().train_ds

    def _data(self) -> TrainData:
        if self.data is None:
            raise RuntimeError("datasets are built by fit() (or _datasets())")
        return self.data

    def _seed(self, epoch: int) -> None:
        seed = self.cfg.train.seed + 1000 * epoch + self.rank
        # Not monai.utils.set_determinism: it also forces cudnn.deterministic and disables cudnn.benchmark,
        # which would slow every non-deterministic GPU run; those switches follow train.deterministic instead.
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.data is not None:
            self.data.reseed(seed)

    def _datasets(self) -> None:
        self.data = TrainData(
            self.cfg,
            self.manifest,
            self.kind,
            self.num_classes,
            self.run_dir,
            self.rank,
            self.world,
            pin_memory=self.device.type == "cuda",
        )

    def _model(self) -> None:
        cfg = self.cfg
        self._seed(0)
        self.model = build_model(
            cfg.model.name, cfg.model.spatial_dims, self.manifest.num_channels, self.num_classes, cfg.model.params
        ).to(self.device)
        self._check_patch_fits()
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.net: nn.Module = DDP(self.model, device_ids=ids) if self.world > 1 else self.model
        self.loss_fn = build_loss(cfg.loss.name, self.num_classes, cfg.loss.params, cfg.data.ignore_index).to(
            self.device
        )  # class-weight buffers
        # Deep-supervision nets return every decoder head in train mode; eval mode gives one tensor.
        deep = bool(cfg.model.params.get("deep_supervision"))
        self.train_loss_fn = wrap_deep_supervision(self.loss_fn) if deep else self.loss_fn
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optimizer)
        self.budget_spent = 0.0  # share of train.max_minutes spent, set (the same on every rank) before each step
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.train.epochs, lambda: self.budget_spent)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)

    def _check_patch_fits(self) -> None:
        """Fail at start-up, naming the setting, if the patch/ROI does not fit the architecture.

        Some networks only take sizes divisible by their total stride (V-Net: 16); MONAI would otherwise
        fail deep inside the first step with a tensor-size mismatch. One batch-1 forward pass in eval mode
        (no dropout, so no RNG is consumed) checks it for any registered model.
        """
        cfg = self.cfg
        for setting, size in (
            ("data.patch_size", tuple(cfg.data.patch_size)),
            ("inference.roi_size", tuple(cfg.roi_size)),
        ):
            x = torch.zeros(1, self.manifest.num_channels, *size, device=self.device)
            try:
                with torch.no_grad():
                    out = self.model.eval()(x)
            except torch.OutOfMemoryError:
                raise  # a real memory problem, not a size mismatch
            except RuntimeError as e:
                raise ConfigError(
                    f"{setting} {list(size)} does not fit model {cfg.model.name!r} "
                    f"({str(e).splitlines()[0][:160]}); try multiples of 16"
                ) from None
            finally:
                self.model.train()
            out = out[0] if isinstance(out, (list, tuple)) else out
            if tuple(out.shape[2:]) != size:
                raise ConfigError(
                    f"{setting} {list(size)}: model {cfg.model.name!r} returns size {list(out.shape[2:])}; "
                    "use sizes divisible by its total stride (e.g. multiples of 16)"
                )

    # ---- one epoch -------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        data = self._data()
        if data.sampler is not None:
            data.sampler.set_epoch(epoch)
        parts = StepParts(
            self.net,
            self.model,
            self.train_loss_fn,
            self.optimizer,
            self.scaler,
            self.precision,
            self.device,
            self.cfg.train.grad_accumulation,
            self.cfg.optimizer.grad_clip,
            self.world > 1,
        )
        return train_epoch(parts, data.train_loader, len(data.train_loader))

    def validate(self, with_hd95: bool = False, n_views: int = 0) -> ValResult:
        """Sliding-window validation of whole preprocessed val cases, scored by the data kind's scorer."""
        cfg = self.cfg
        network = network_fn(self.model, cfg.model.spatial_dims, self.kind.input_dims)
        run = CaseInference(
            self.model, network, self.kind.window(cfg), cfg.inference, self.device, self.precision, self.num_classes
        )
        scorer = SCORERS.get(self.kind.name)(
            self.labels, self.num_classes, self.loss_fn, cfg.data.ignore_index, with_hd95
        )
        val_ds = self._data().val_ds  # MONAI datasets iterate by __getitem__, a protocol mypy does not model
        return validate(run, val_ds, scorer, n_views)  # type: ignore[arg-type]  # iterable at runtime, see above

    # ---- state -----------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_rounds": self.bad_rounds,
            "run_id": self.recorder.tracker.run_id or "",
            "rng": rng_state(),
            "elapsed_s": self.elapsed_before + (time.time() - self.t_start),
            "history": self.history,
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

    # ---- main loop -------------------------------------------------------------------------------
    def _set_up(self) -> int:
        """Run folder, data, provenance, model, resumed state, tracking; returns the first epoch to train."""
        cfg = self.cfg
        if cfg.train.deterministic and self.device.type == "cuda":  # cuBLAS needs this for reproducible matmuls
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cudnn.benchmark = self.device.type == "cuda" and not cfg.train.deterministic
        self.recorder.prepare(self.resume)
        if dist_utils.is_main():  # temp files of writes a SIGKILL interrupted (readers skip them anyway)
            for folder in ("", "checkpoints", "model", "plots"):
                remove_stale_temps(self.run_dir / folder)
        self._datasets()
        self.recorder.compute_provenance()
        self._model()
        self.best_metric, self.best_epoch, self.bad_rounds, self.elapsed_before = -math.inf, -1, 0, 0.0
        self.history = []
        self._resume_run_id = None
        start_epoch = self._restore() if self.resume else 0
        self.recorder.start(self._resume_run_id, self.device, self.world, self.precision)
        if self.resume:
            self.recorder.replay(self.history)
        self.t_start = time.time()
        self.best_rows: list[dict[str, Any]] = read_rows_csv(self.run_dir / "val_cases_best.csv") if self.resume else []
        return start_epoch

    def _epoch(self, epoch: int) -> bool:
        """Train, maybe validate, checkpoint and log one epoch; True when the run should stop after it."""
        cfg = self.cfg
        self._seed(epoch + 1)
        metrics = self._train_epoch(epoch)
        # A run stopped by its time budget validates its final epoch, so it still ends with a model.
        out_of_time = self._out_of_time(epoch, metrics)
        self.scheduler.step()
        last = epoch + 1 == cfg.train.epochs or out_of_time
        if self.stop.agreed():  # SIGTERM during the training steps: no validation; save unless it is the final epoch
            if not last:
                self._save_and_log(epoch, metrics)
            return True
        if (epoch + 1) % cfg.train.val_every == 0 or last:
            every = cfg.train.hd95_every
            val = self.validate(
                with_hd95=bool(every) and ((epoch + 1) % every == 0 or last), n_views=cfg.train.overlay_cases
            )
            metrics.update(val.summary)
            score = val.summary.get("val_dice_mean", -metrics["train_loss"])
            if score > self.best_metric:
                self.best_metric, self.best_epoch, self.best_rows, self.bad_rounds = score, epoch, val.rows, 0
                note = "" if self.kind.input_dims == 2 else " (middle of organs, axial)"
                self.recorder.best(epoch, val, self.model, self.num_classes, note)
            else:
                self.bad_rounds += 1
        # checked before the epoch is logged: a SIGTERM during this epoch's validation stops after it is saved
        stop = self.stop.agreed()
        self._save_and_log(epoch, metrics)
        return stop or out_of_time or self._early_stop()

    def _save_and_log(self, epoch: int, metrics: dict[str, float]) -> None:
        self.history.append({"epoch": epoch, **metrics})
        if dist_utils.is_main():  # checkpoint first: it is the record the CSV and MLflow follow
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt", self._state(epoch))
        self.saved_epoch = epoch
        self.recorder.epoch(epoch, metrics, self.history)
        dist_utils.barrier()

    def fit(self) -> TrainResult:
        """Train for ``train.epochs`` (or until the time budget / early stopping), validating every k epochs.

        ``TrainingStopped`` (a ``KeyboardInterrupt``) when a SIGTERM stopped it: nothing to package or register."""
        with self.stop:  # the SIGTERM handler, for the duration of the run
            return self._fit()

    def _fit(self) -> TrainResult:
        start_epoch = self._set_up()
        epoch, status = start_epoch - 1, "FINISHED"
        self.saved_epoch = start_epoch - 1
        already_done = start_epoch >= self.cfg.train.epochs  # resuming a finished run: nothing to train or register
        if already_done:
            log.info("%s: all %d epochs are done already", self.run_dir, self.cfg.train.epochs)
        try:
            if not self.stop.agreed():  # a SIGTERM during the set-up: train nothing
                for epoch in range(start_epoch, self.cfg.train.epochs):
                    if self._epoch(epoch):
                        break
            if self.stop.requested:
                status = "KILLED"
                if dist_utils.is_main():
                    log.info(stopped_message(self.run_dir, self.saved_epoch, self.cfg.train.epochs))
        except BaseException as e:
            # a second SIGTERM is KILLED; anything else (Ctrl-C too) FAILED; the run can be resumed from last.pt
            status = "KILLED" if isinstance(e, TrainingStopped) else "FAILED"
            raise
        finally:
            if status == "FINISHED" and not already_done:
                self.recorder.finish(self.history, list(self.labels), self.best_epoch, self.best_metric)
            self.recorder.end(status)
            if self.world > 1:
                dist_utils.barrier()
                dist_utils.cleanup()
        if status == "KILLED":
            raise TrainingStopped(stopped_message(self.run_dir, self.saved_epoch, self.cfg.train.epochs))
        rows = self.best_rows  # per class: the mean over the best epoch's validation cases
        per_class = {
            n: {m: nanmean([float(r[f"{m}_{n}"]) for r in rows]) for m in ("dice", "iou")} for n in self.labels
        }
        result = TrainResult(self.run_dir, self.recorder.tracker.run_id, epoch + 1, self.best_epoch, self.best_metric)
        result.best_per_class = per_class if rows else {}
        return result

    def _early_stop(self) -> bool:
        """No validation improvement in ``early_stopping_patience`` rounds (the same on every rank)."""
        patience = self.cfg.train.early_stopping_patience
        if patience and self.bad_rounds >= patience:
            log.info("early stopping: no val improvement in %d rounds", self.bad_rounds)
            return True
        return False

    def _out_of_time(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Would another epoch overrun ``train.max_minutes``? Rank 0 decides for all ranks; sets ``budget_spent``."""
        budget = self.cfg.train.max_minutes
        stop, fraction = False, 0.0
        if budget is not None:
            spent = self.elapsed_before + time.time() - self.t_start
            fraction = spent / (budget * 60)
            if spent + metrics["time_epoch_s"] > budget * 60:
                log.info("time budget of %.1f min reached after epoch %d", budget, epoch + 1)
                stop = True
        stop, self.budget_spent = dist_utils.broadcast_object((stop, fraction))  # type: ignore[misc]  # that tuple
        return bool(stop)
