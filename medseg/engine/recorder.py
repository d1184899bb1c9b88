"""What a training run leaves behind besides weights: its folder, provenance, MLflow run, plots and package.

``RunRecorder`` is rank 0's (other ranks get one that records nothing): it writes ``config.yaml`` and the
manifest copy, computes provenance once (git commit, dataset fingerprint, plans), starts or re-attaches the MLflow
run, writes ``history.csv`` and logs each epoch, packages the best model with its per-case metrics and overlays,
and at the end logs the learning curve, artifacts and the registered model.

The manifest is also the run's MLflow dataset input (context ``training``; ``manifest_dataset``): named by the
dataset, its digest the dataset fingerprint, its source the manifest file, its profile the case counts per split.
No case ids or file names go in it (NIfTI file names are the user's). A packaged volume model
gets a ``python_function`` flavour (``medseg.inference.pyfunc_model``) beside its ``medseg`` one before it is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import monai
import torch
import torch.nn as nn

from medseg.config import Config
from medseg.engine.history import write_rows_csv
from medseg.engine.plots import learning_curve, overlay
from medseg.engine.validation import ValResult
from medseg.errors import MedsegError
from medseg.inference.model_package import save_package
from medseg.inference.pyfunc_model import add_pyfunc_flavour
from medseg.io.atomic import write_text_atomic
from medseg.io.manifest import Manifest
from medseg.io.system_metrics import SystemMetrics
from medseg.io.tracking_spool import SpoolingTracker
from medseg.planning.volumes import plans_path_for
from medseg.runtime.device import Precision
from medseg.tracking import MlflowTracker, NullTracker, Tracker, git_commit, is_outage, make_tracker, write_run_id

log = logging.getLogger("medseg.train")
EPOCH_SHOWN = ("train_loss", "val_loss", "val_dice_mean", "val_iou_mean", "val_pixel_accuracy")


class RunRecorder:
    """The run folder and the MLflow run of one training run (``active``: this process records)."""

    def __init__(
        self, cfg: Config, manifest: Manifest, run_dir: Path, tracking_uri: str | None, active: bool = True
    ) -> None:
        self.cfg, self.manifest, self.run_dir, self.tracking_uri = cfg, manifest, run_dir, tracking_uri
        self.active = active
        self.tracker: Tracker = NullTracker()
        self.commit, self.fingerprint = "", ""
        self.plans: dict[str, Any] | None = None
        self.system: SystemMetrics | None = None  # tracking.system_metrics: MLflow's sampler, from start to end

    def prepare(self, resume: bool) -> None:
        """Create the run folder; a new run also gets ``config.yaml`` and the manifest copy."""
        if not self.active:
            return
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not resume:
            write_text_atomic(self.run_dir / "config.yaml", self.cfg.to_yaml())
            data = self.manifest.to_json()  # kept beside the run, with its root re-anchored, for reproducibility
            data["medseg"]["source"] = str(self.manifest.path)
            write_text_atomic(self.run_dir / "manifest.json", json.dumps(data, indent=2) + "\n")

    def compute_provenance(self) -> None:
        """Fixed for the run: computed once (a git subprocess, a stat of every data file, the plans file)."""
        self.commit, self.fingerprint, self.plans = git_commit(), self.manifest.fingerprint(), read_plans(self.manifest)

    def start(self, resumed_id: str | None, device: torch.device, world: int, precision: Precision) -> None:
        """Start the MLflow run (or re-attach to ``resumed_id``); a new run gets params, tags and inputs."""
        if not self.active:
            return
        tracker = make_tracker(self.cfg.tracking, self.tracking_uri)
        # a tracking outage never stalls training: what the server cannot take waits in the run folder's spool
        self.tracker = SpoolingTracker(tracker, self.run_dir) if isinstance(tracker, MlflowTracker) else tracker
        run_id = self.tracker.start(run_name=self.run_dir.name, run_id=resumed_id)
        if resumed_id is None:
            self.tracker.log_params(self.cfg.flat())
            self.tracker.set_tags(self._tags(device, world, precision))
            self.tracker.log_artifact(self.run_dir / "config.yaml", "config")
            self.tracker.log_artifact(self.run_dir / "manifest.json", "data")
            self._log_dataset()
        if run_id:
            write_run_id(self.run_dir, run_id)
        if run_id and self.cfg.tracking.system_metrics and isinstance(tracker, MlflowTracker):
            self.system = SystemMetrics(tracker.uri, run_id, self.cfg.tracking.system_metrics_interval_s)

    def _log_dataset(self) -> None:
        """The manifest as the run's dataset input (spooled with the rest while the server is away)."""
        if not isinstance(self.tracker, (SpoolingTracker, MlflowTracker)):
            return
        try:
            self.tracker.log_dataset(manifest_dataset(self.manifest, self.fingerprint), context="training")
        except Exception as e:  # a plain MlflowTracker (no spool) whose server went away: the artifact is there
            if not is_outage(e):
                raise
            log.warning("tracking server away: the run gets no dataset input (data/manifest.json is logged)")

    def _tags(self, device: torch.device, world: int, precision: Precision) -> dict[str, Any]:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return {
            "mlflow.source.git.commit": self.commit,
            "git_commit": self.commit,
            "dataset_name": self.manifest.name,
            "dataset_fingerprint": self.fingerprint,
            "torch_version": torch.__version__,
            "monai_version": monai.__version__,
            "cuda_version": torch.version.cuda or "none",
            "cudnn_version": str(torch.backends.cudnn.version() or "none"),
            "device": name,
            "device_type": device.type,
            "world_size": world,
            "amp": str(precision.dtype),
            "run_dir": str(self.run_dir.resolve()),
        }

    def replay(self, history: list[dict[str, float]]) -> None:
        """After a resume: rebuild history.csv from the checkpoint and log the epochs MLflow has not seen."""
        if not self.active:
            return
        write_rows_csv(self.run_dir / "history.csv", history)
        seen = self.tracker.logged_steps("train_loss")
        for row in history:
            if int(row["epoch"]) not in seen:
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        self.tracker.set_tags({"resumed_at_epoch": len(history)})

    def epoch(self, epoch: int, metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        """history.csv (whole, atomically), the epoch's metrics to MLflow, one log line."""
        if not self.active:
            return
        write_rows_csv(self.run_dir / "history.csv", history)
        self.tracker.log_metrics(metrics, step=epoch)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in EPOCH_SHOWN)
        log.info("epoch %d/%d %s (%.1f s)", epoch + 1, self.cfg.train.epochs, shown, metrics["time_epoch_s"])

    def best(self, epoch: int, val: ValResult, model: nn.Module, num_classes: int, overlay_note: str = "") -> None:
        """Package the new best model with its validation metrics, per-case rows and overlay figures."""
        if not self.active:
            return
        extra = {
            "run_id": self.tracker.run_id,
            "epoch": epoch,
            "val_metrics": val.summary,
            "dataset_fingerprint": self.fingerprint,
            "git_commit": self.commit,
        }
        save_package(self.run_dir / "model", model, self.cfg, self.manifest, extra, plans=self.plans)
        write_rows_csv(self.run_dir / "val_cases_best.csv", val.rows)
        for index, image, truth, pred in val.views:  # named by position in the val split, never by case id
            overlay(
                image,
                truth,
                pred,
                num_classes,
                self.run_dir / "plots" / f"val_overlay_{index:02d}.png",
                title=f"validation case {index}, epoch {epoch + 1}{overlay_note}",
            )
        for rank, (index, score, image, truth, pred) in enumerate(val.worst, start=1):  # lowest mean Dice first
            overlay(
                image,
                truth,
                pred,
                num_classes,
                self.run_dir / "plots" / f"val_worst_{rank}.png",
                title=f"worst {rank}: validation case {index}, mean Dice {score:.3f}, epoch {epoch + 1}{overlay_note}",
            )

    def finish(self, history: list[dict[str, float]], labels: list[str], best_epoch: int, best_metric: float) -> None:
        """Learning curve, artifacts, best-epoch tags and the registered model (when configured)."""
        if not self.active:
            return
        if history:
            learning_curve(history, labels, self.run_dir / "plots" / "learning_curve.png")
        self.tracker.log_artifact(self.run_dir / "history.csv", "metrics")
        if (self.run_dir / "plots").is_dir():
            self.tracker.log_artifact(self.run_dir / "plots", "plots")
        if not (self.run_dir / "model").exists():
            return
        self.tracker.set_tags({"best_epoch": best_epoch, "best_val_dice_mean": f"{best_metric:.4f}"})
        if (self.run_dir / "val_cases_best.csv").exists():
            self.tracker.log_artifact(self.run_dir / "val_cases_best.csv", "metrics")
        if self.cfg.data.kind == "volume":  # mlflow.pyfunc.load_model("runs:/ID/model") predicts NIfTI scans
            add_pyfunc_flavour(self.run_dir / "model")  # (2D image models keep the medseg flavour only)
        self.tracker.log_artifact(self.run_dir / "model", "model")
        name = self.cfg.tracking.registered_model_name
        if name:  # also while the run is spooled: registered once it is sent
            version = self.tracker.register_model("model", name)  # also tags the run registered_model
            if version:
                log.info("registered model: models:/%s/%s", name, version)

    def end(self, status: str) -> None:
        """Close the MLflow run (FINISHED or FAILED), after its system metrics (when they are logged)."""
        if self.system is not None:
            self.system.stop()
            self.system = None
        self.tracker.end(status)


def read_plans(manifest: Manifest) -> dict[str, Any] | None:
    """The manifest's plans (``<manifest>.plans.json`` from ``medseg data plan``), if there are any."""
    path = plans_path_for(manifest.path) if manifest.path else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedsegError(f"{path}: unreadable plans file ({e.__class__.__name__})") from None


def manifest_dataset(manifest: Manifest, fingerprint: str) -> dict[str, Any]:
    """The fields of the MLflow dataset of ``manifest``: name, digest (``fingerprint``), source (the manifest
    file), a schema of a case's fields and a profile of case counts; no case ids or file names."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # made at import
    from mlflow.types.schema import ColSpec, Schema

    source = LocalArtifactDatasetSource(str(Path(manifest.path).resolve()) if manifest.path else manifest.name)
    fields = [ColSpec("string", "id"), *(ColSpec("string", f"image_{k}") for k in manifest.channel_names)]
    schema = Schema([*fields, ColSpec("string", "label", required=False), ColSpec("string", "split")])
    # MetaDataset leaves ``profile`` abstract (its type stubs), yet it is a concrete class at run time
    doc = MetaDataset(source, name=manifest.name, digest=fingerprint, schema=schema).to_dict()  # type: ignore[abstract]
    counts = {split: len(manifest.split(split)) for split in ("train", "val", "test")}
    profile = {"num_cases": len(manifest.cases), **{f"num_{k}": v for k, v in counts.items()}}
    return {**doc, "profile": json.dumps({**profile, "labels": manifest.labels, "channels": manifest.channel_names})}
