"""Log an evaluation to MLflow: per-organ summary metrics (one ``log_batch``) and the outputs as artifacts.

Either a new run in an experiment, or attached to an existing run (e.g. the training run that made the
model), whose status is left as it was. Metric names are ``eval_<metric>_<organ>_<stat>`` (stat: mean,
median, std, ci_low, ci_high, n, n_nan) and, with a comparison, ``eval_compare_<metric>_<organ>_<stat>``
(mean_diff, ci_low, ci_high, p_value). Nothing patient-identifying is logged: no file paths (the logged
``summary.json`` copies drop them), tags hold only the dataset's name and fingerprint and the settings.
Artifacts go under ``evaluation/`` (``evaluation/<split>/`` when a split was evaluated).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.evaluation.outputs import safe_name
from medseg.tracking import MlflowTracker, git_commit, resolve_tracking_uri

SUMMARY_STATS = ("mean", "median", "std", "ci_low", "ci_high", "n", "n_nan")
COMPARE_STATS = ("mean_diff", "ci_low", "ci_high", "p_value")
_PATH_KEYS = frozenset({"manifest", "predictions", "compare_predictions", "outputs"})  # local paths: not logged


def evaluation_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics from an ``evaluate`` summary document (NaN/None left out)."""
    if doc.get("kind") == "image2d":  # pooled confusion-matrix metrics of 2D images: their own names
        from medseg.evaluation.images2d import mlflow_metrics

        return mlflow_metrics(doc)
    out: dict[str, float] = {}
    for organ, per_metric in doc["organs"].items():
        for metric, stats in per_metric.items():
            for stat in SUMMARY_STATS:
                _put(out, f"eval_{safe_name(metric)}_{safe_name(organ)}_{stat}", stats.get(stat))
    for row in doc.get("comparison", []):
        for stat in COMPARE_STATS:
            _put(out, f"eval_compare_{safe_name(row['metric'])}_{safe_name(row['organ'])}_{stat}", row.get(stat))
    return out


def _put(out: dict[str, float], key: str, value: Any) -> None:
    if value is not None and value == value:  # skip None and NaN
        out[key] = float(value)


def evaluation_tags(doc: dict[str, Any]) -> dict[str, str]:
    """Run tags describing the evaluation (settings and dataset identity only)."""
    tags = {
        "eval.dataset_name": doc.get("dataset_name", ""),
        "eval.dataset_fingerprint": doc.get("dataset_fingerprint", ""),
        "eval.split": str(doc.get("split")),
        "eval.n_cases": str(doc.get("n_cases")),
        "eval.tolerance_mm": str(doc.get("tolerance_mm")),
        "eval.metrics": ",".join(doc.get("metrics", [])),
        "eval.git_commit": git_commit(),
    }
    if doc.get("kind") == "image2d":  # no distance tolerance; void pixels instead
        tags.pop("eval.tolerance_mm")
        tags["eval.ignore_index"] = str(doc.get("ignore_index"))
    if "compare" in doc:
        tags["eval.compare_n_paired_cases"] = str(doc["compare"]["n_paired_cases"])
    return tags


def _without_paths(obj: Any) -> Any:
    """``obj`` with every key of ``_PATH_KEYS`` removed, at any depth."""
    if isinstance(obj, dict):
        return {k: _without_paths(v) for k, v in obj.items() if k not in _PATH_KEYS}
    if isinstance(obj, list):
        return [_without_paths(v) for v in obj]
    return obj


def _stage_artifacts(doc: dict[str, Any], out_dir: Path, stage: Path) -> None:
    """Copy the written outputs (under ``out_dir``) to ``stage``; JSON documents lose their path keys."""
    for name in doc.get("outputs", []):
        src = Path(name)
        try:
            rel = src.resolve().relative_to(out_dir.resolve())
        except ValueError:
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".json":
            dst.write_text(json.dumps(_without_paths(json.loads(src.read_text())), indent=2) + "\n")
        else:
            shutil.copy2(src, dst)


class EvaluationLogger:
    """Where an evaluation goes in MLflow; ``open`` checks the target before any (long) evaluation runs."""

    def __init__(self, tracker: MlflowTracker, attach_to: str | None) -> None:
        self.tracker, self.attach_to = tracker, attach_to

    @classmethod
    def open(
        cls, tracking_uri: str | None = None, run_id: str | None = None, experiment: str | None = None
    ) -> EvaluationLogger:
        """Exactly one of ``run_id`` (attach to that existing run) and ``experiment`` (a new run) is given."""
        if (run_id is None) == (experiment is None):
            raise MedsegError("give exactly one of --mlflow-run-id (attach to a run) and --mlflow-experiment (new run)")
        uri = resolve_tracking_uri(tracking_uri)  # else MLFLOW_TRACKING_URI, else mlflow.db here
        tracker = MlflowTracker(uri, experiment or "")
        if run_id is not None:
            from mlflow.exceptions import MlflowException

            try:
                tracker.client.get_run(run_id)
            except MlflowException:
                raise MedsegError(f"{uri}: no MLflow run with id {run_id!r}") from None
        return cls(tracker, run_id)

    def log(self, doc: dict[str, Any], out_dir: str | Path) -> str:
        """Log ``doc`` (from ``report.evaluate``) and its files; return the run id.

        An attached run keeps its status (a finished training run stays finished); a new run is named
        ``evaluation`` and ends FINISHED (FAILED if logging fails).
        """
        tracker = self.tracker
        if self.attach_to is not None:
            tracker.run_id = self.attach_to  # not tracker.start(run_id=...), which would mark the run RUNNING
        else:
            tracker.start(run_name="evaluation")
            commit = git_commit()
            tracker.set_tags(
                {
                    "dataset_name": doc.get("dataset_name", ""),
                    "dataset_fingerprint": doc.get("dataset_fingerprint", ""),
                    "git_commit": commit,
                    "mlflow.source.git.commit": commit,
                }
            )
        status = "FAILED"
        try:
            tracker.set_tags(evaluation_tags(doc))
            tracker.log_metrics(evaluation_metrics(doc), step=0)
            with tempfile.TemporaryDirectory(prefix="medseg_eval_artifacts_") as tmp:
                _stage_artifacts(doc, Path(out_dir), Path(tmp))
                split = doc.get("split")
                tracker.log_artifact(tmp, f"evaluation/{safe_name(split)}" if split else "evaluation")
            status = "FINISHED"
        finally:
            if self.attach_to is None:
                tracker.end(status)
        return tracker.run_id  # type: ignore[return-value]  # set above: attached or started
