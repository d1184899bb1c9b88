"""Experiment tracking behind one interface: MLflow, or a no-op.

Metrics are sent with ``log_batch`` (one HTTP call per epoch, not one per value: a single
``log_metric`` against a server costs ~50 ms). ``MlflowClient.log_batch`` itself splits what it is given into
requests within MLflow's limits (100 params/tags, 1000 metrics, 1000 entries per request; mlflow/mlflow#6052,
2022, well before the required mlflow>=2.16), so nothing is chunked here. The default store is a local SQLite
file in the working folder; ``uri`` points at a tracking server instead.
"""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from medseg.config import TrackingConfig
from medseg.errors import MedsegError

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


class Tracker(Protocol):
    """What the trainer, evaluator and batch predictor need from a tracker."""

    run_id: str | None

    def start(self, run_name: str | None = None, run_id: str | None = None) -> str | None:
        """Start a new run, or resume ``run_id``."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (strings)."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log a batch of metrics at one step (NaN values are skipped)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder."""

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which metric ``key`` is already recorded in this run (to resume without duplicates)."""

    def register_model(self, artifact_path: str, name: str) -> str | None:
        """Register the run's artifact folder ``artifact_path`` as a new version of model ``name``."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run."""


class NullTracker:
    """Tracks nothing (``tracking.backend: none``, and non-zero DDP ranks)."""

    run_id: str | None = None

    def start(self, run_name: str | None = None, run_id: str | None = None) -> str | None:
        return run_id

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def register_model(self, artifact_path: str, name: str) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass


def default_tracking_uri(folder: str | Path | None = None) -> str:
    """``sqlite:///<folder>/mlflow.db`` (absolute), folder defaulting to the working folder."""
    db = (Path(folder) if folder else Path.cwd()).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


class MlflowTracker:
    """MLflow client wrapper using batched logging."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient  # heavy import, only when tracking is on

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = experiment
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:///"):  # keep local artifacts beside the local database
            artifact_location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=artifact_location)

    def start(self, run_name: str | None = None, run_id: str | None = None) -> str:
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.run_id = self.client.create_run(self._experiment_id(), run_name=run_name).info.run_id
        return self.run_id

    @property
    def _run(self) -> str:
        """The current run's id; ``MedsegError`` before ``start``."""
        if self.run_id is None:
            raise MedsegError("MLflow tracker used before start()")
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self._run).data.params
        self.client.log_batch(
            self._run, params=[Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        )

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self._run, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(
            self._run,
            metrics=[
                Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))
            ],
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run, str(path), artifact_path)
        else:
            self.client.log_artifact(self._run, str(path), artifact_path)

    def logged_steps(self, key: str) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(self._run, key)}

    def register_model(self, artifact_path: str, name: str) -> str | None:
        """Register ``runs:/<run>/<artifact_path>`` (a medseg model package) in the model registry.

        The package is plain files (weights, config.yaml, metadata.json) rather than an MLflow pyfunc flavour:
        a pyfunc model would pickle Python code, and medseg loads only weights-only checkpoints. The registry
        version points at the run's artifact folder, so ``models:/NAME/VERSION`` downloads exactly that folder.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, description="medseg model package (model.pt, config.yaml, metadata.json)"
            )
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        source = f"{self.client.get_run(self._run).info.artifact_uri.rstrip('/')}/{artifact_path}"
        mv = self.client.create_model_version(
            name, source=source, run_id=self.run_id, tags={"format": "medseg-model-package/1"}
        )
        return str(mv.version)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def make_tracker(cfg: TrackingConfig, uri_override: str | None = None, enabled: bool = True) -> Tracker:
    """Tracker from config; ``enabled=False`` (e.g. DDP rank > 0) gives the no-op tracker."""
    if not enabled or cfg.backend == "none":
        return NullTracker()
    return MlflowTracker(uri_override or cfg.uri or default_tracking_uri(), cfg.experiment)


def git_commit(path: str | Path | None = None) -> str:
    """The git commit of the medseg source tree (``+dirty`` if modified), or ``unknown``."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
