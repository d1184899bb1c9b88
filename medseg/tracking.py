"""Experiment tracking behind one interface: MLflow, or a no-op; a tracking outage never stalls training.

Metrics are sent with ``log_batch`` (one HTTP call per epoch, not one per value: a single
``log_metric`` against a server costs ~50 ms). ``MlflowClient.log_batch`` itself splits what it is given into
requests within MLflow's limits (100 params/tags, 1000 metrics, 1000 entries per request; mlflow/mlflow#6052,
2022, well before the required mlflow>=2.16), so nothing is chunked here. Where runs go: ``resolve_tracking_uri``
(``--tracking-uri``, else the config's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a local SQLite file in
the working folder). An experiment medseg creates or first uses gets MLflow 3's ``mlflow.experimentKind`` tag
(classic model training), and a training run gets its manifest as a dataset input (``log_dataset``).

Outages. MLflow's own HTTP defaults retry a failed request 7 times with exponential back-off (over 4 minutes
per call against a stopped server). Every call of medseg's client runs with ``HTTP_SETTINGS`` (one retry, 5 s
timeout, no Retry-After waits) unless the user set those MLflow variables; they are set for the duration of
the call only, so other MLflow use in the process keeps MLflow's defaults. A training run's tracker also spools
what the server cannot take and stops calling it for a while (``medseg.io.tracking_spool``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from medseg.config import TrackingConfig
from medseg.errors import MedsegError
from medseg.io.atomic import write_text_atomic
from medseg.io.metric_names import mlflow_key
from medseg.io.store_lock import SQLITE_PREFIX, sqlite_path, sqlite_store_lock

log = logging.getLogger("medseg.tracking")
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
RUN_ID_FILE = "mlflow_run_id.txt"  # in the run folder: the MLflow run id, once the run exists
START_KEY_TAG = "medseg.start_key"  # the id of the record that created the run (see MlflowTracker.start)
# MLflow's variables (mlflow/environment_variables.py) for medseg's calls: a refused connection fails in
# milliseconds, a hung server in ~10 s (2 tries x 5 s), a 429/503 is not waited out (the record is spooled).
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}
# Uploads wait longer for the reply: a proxying server answers once the file is in its artifact store (a model
# to S3 can take more than 5 s), and they come at the start and the end of a run, not between epochs.
_UPLOADS = frozenset({"log_artifact", "log_artifacts"})
UPLOAD_HTTP_SETTINGS = {**HTTP_SETTINGS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
# MLflow 3's experiment type (the UI's ExperimentKind): without it an experiment may open as a GenAI one.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


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
    return f"{SQLITE_PREFIX}{db}"


def resolve_tracking_uri(
    cli_uri: str | None = None, config_uri: str | None = None, folder: str | Path | None = None
) -> str:
    """The one place medseg picks its tracking URI: ``--tracking-uri`` > config ``tracking.uri`` >
    ``MLFLOW_TRACKING_URI`` (read through MLflow) > ``default_tracking_uri(folder)``."""
    if cli_uri:
        return cli_uri
    if config_uri:
        return config_uri
    from mlflow.environment_variables import MLFLOW_TRACKING_URI

    return MLFLOW_TRACKING_URI.get() or default_tracking_uri(folder)


@contextlib.contextmanager
def bounded_http(settings: dict[str, str] = HTTP_SETTINGS) -> Iterator[None]:
    """``settings`` the user has not set, in the environment while the block runs (MLflow reads them per
    request); a variable the user set keeps its value."""
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _BoundedClient:
    """An ``MlflowClient`` whose every method runs under ``bounded_http`` (uploads: ``UPLOAD_HTTP_SETTINGS``)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        settings = UPLOAD_HTTP_SETTINGS if name in _UPLOADS else HTTP_SETTINGS

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with bounded_http(settings):
                return attr(*args, **kwargs)

        return call


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server could not take a call now (unreachable, timed out, 5xx, 429),
    rather than that it refused the call (4xx: a wrong request, which spooling would not mend)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):  # connection errors arrive as INTERNAL_ERROR (HTTP 500)
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, OSError)  # requests' exceptions are OSErrors


def server_reachable(uri: str, timeout_s: float = 2.0) -> bool:
    """False when an ``http(s)`` tracking server gives no answer at all within ``timeout_s`` (any HTTP status
    counts as an answer); other stores (SQLite files) count as reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True
    except urllib.error.URLError as e:  # a TLS complaint (e.g. a site CA MLflow is told about) is an answer too
        return isinstance(e.reason, ssl.SSLError)
    except (OSError, ValueError):
        return False
    return True


class MlflowTracker:
    """MLflow client wrapper using batched logging, with bounded HTTP retries."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient  # heavy import, only when tracking is on

        self.uri = uri
        with sqlite_store_lock(uri):  # the client opens its store: a new SQLite one gets its tables, one at a time
            self.client = _BoundedClient(MlflowClient(tracking_uri=uri))
        self.experiment = experiment
        self.run_id: str | None = None
        self.experiment_id: str | None = None  # once looked up (and its kind tag checked)

    def _experiment_id(self) -> str:
        """The experiment's id, creating it if needed; the first use tags its kind (a kind set already stays)."""
        if self.experiment_id is not None:
            return self.experiment_id
        with sqlite_store_lock(self.uri):  # two processes creating one experiment: the second finds it
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                db = sqlite_path(self.uri)  # keep local artifacts beside the local database
                artifact_location = (db.parent / "mlartifacts").as_uri() if db is not None else None
                exp_id = str(self.client.create_experiment(self.experiment, artifact_location=artifact_location))
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if exp is not None:
            exp_id = str(exp.experiment_id)
            if EXPERIMENT_KIND_TAG not in exp.tags:
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.experiment_id = exp_id
        return exp_id

    def start(
        self, run_name: str | None = None, run_id: str | None = None, start_ms: int | None = None, key: str = ""
    ) -> str:
        """Start a new run (dated ``start_ms``), or resume ``run_id``. A ``key`` (a spool record's id) is kept as
        the tag ``START_KEY_TAG``: sent again after a reply was lost, it finds that run instead of making one."""
        if run_id is None and key:
            found = self.client.search_runs([self._experiment_id()], f"tags.`{START_KEY_TAG}` = '{key}'", max_results=1)
            run_id = str(found[0].info.run_id) if found else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            tags = {START_KEY_TAG: key} if key else None
            run = self.client.create_run(self._experiment_id(), start_time=start_ms, tags=tags, run_name=run_name)
            self.run_id = str(run.info.run_id)
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

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        self.log_metric_steps([(metrics, step, timestamp_ms or int(time.time() * 1000))])

    def log_metric_steps(self, entries: list[tuple[dict[str, float], int, int]]) -> None:
        """One ``log_batch`` of several steps' metrics: ``(metrics, step, timestamp in ms)`` each."""
        from mlflow.entities import Metric

        # flat names get their UI section here, the one place metrics reach MLflow (medseg.io.metric_names)
        metrics = [
            Metric(mlflow_key(k), float(v), ts, step) for values, step, ts in entries for k, v in finite(values).items()
        ]
        self.client.log_batch(self._run, metrics=metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run, str(path), artifact_path)
        else:
            self.client.log_artifact(self._run, str(path), artifact_path)

    def logged_steps(self, key: str) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(self._run, mlflow_key(key))}

    def log_dataset(self, dataset: dict[str, Any], context: str = "training") -> None:
        """Log a dataset input (``dataset``: the fields of ``mlflow.entities.Dataset``, e.g. from
        ``MetaDataset.to_dict()`` plus a ``profile``) with the tag ``mlflow.data.context``."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        entity = DatasetInput(Dataset(**dataset), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self.client.log_inputs(self._run, datasets=[entity])

    def register_model(self, artifact_path: str, name: str) -> str | None:
        """Register ``runs:/<run>/<artifact_path>`` (a medseg model package) in the model registry and tag the
        run ``registered_model: models:/NAME/VERSION``.

        The package is plain files (weights, config.yaml, metadata.json, MLmodel); its ``python_function``
        flavour names a loader module (``medseg.inference.pyfunc_model``), so nothing is pickled. The registry
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
        # this run's package registered already (a reply lost, a resumed run): that version, not a second one
        done = self.client.search_model_versions(f"name = '{name}' and run_id = '{self._run}'")
        mv = next((v for v in done if v.source == source), None) or self.client.create_model_version(
            name, source=source, run_id=self.run_id, tags={"format": "medseg-model-package/1"}
        )
        self.set_tags({"registered_model": f"models:/{name}/{mv.version}"})
        return str(mv.version)

    def end(self, status: str = "FINISHED", end_ms: int | None = None) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status, end_time=end_ms)


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics with a finite value (MLflow takes no NaN/None; a NaN Dice means 'not defined here')."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def apply_record(tracker: MlflowTracker, rec: dict[str, Any], folder: Path) -> Any:
    """Make one tracker call from a record, sent directly or from the spool: the one way a run is logged."""
    op = rec["op"]
    if op == "start":
        return tracker.start(rec.get("run_name"), rec.get("run_id"), rec.get("ts"), key=rec["id"])
    if op == "params":
        tracker.log_params(rec["params"])
    elif op == "tags":
        tracker.set_tags(rec["tags"])
    elif op == "dataset":
        tracker.log_dataset(rec["dataset"], rec.get("context", "training"))
    elif op == "metrics":
        tracker.log_metric_steps([(rec["metrics"], rec["step"], rec["ts"])])
    elif op == "artifact":
        path = folder / rec["path"]  # an absolute path stays as it is
        if not path.exists():
            log.warning("%s: no longer there, not uploaded to the run", path)
            return None
        tracker.log_artifact(path, rec.get("artifact_path"))
    elif op == "register":
        return tracker.register_model(rec["artifact_path"], rec["name"])
    elif op == "end":
        tracker.end(rec["status"], rec.get("ts"))
    else:
        raise MedsegError(f"{folder}: tracking record {rec['id']} has an unknown op {op!r}")
    return None


def make_tracker(cfg: TrackingConfig, uri_override: str | None = None, enabled: bool = True) -> Tracker:
    """Tracker from config; ``enabled=False`` (e.g. DDP rank > 0) gives the no-op tracker."""
    if not enabled or cfg.backend == "none":
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(uri_override, cfg.uri), cfg.experiment)


def write_run_id(folder: str | Path, run_id: str) -> None:
    """``RUN_ID_FILE`` in the run folder (atomically)."""
    write_text_atomic(Path(folder) / RUN_ID_FILE, run_id + "\n")


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
