"""One MLflow run per prediction batch (per shard): what ran, how many cases, how long, how much memory.

The run NEVER contains patient identifiers. Case ids, input file and folder names, DICOM UIDs, input
paths, per-case error messages (they quote file names) and the summary CSV are not logged, neither as
params, tags, metrics, run name nor artifacts. Only aggregate counts go in; the per-case details stay in
the output folder (``<id>.json``, ``summary.csv``). A local model package is named by its folder name only,
since a full path can include a site's or a study's folder names.

Params: ``model`` (reference), ``device`` (requested), ``shard`` (``I/N`` or ``all``), ``save_probabilities``
and the package's ``inference.*`` settings (after ``--set`` overrides). Metrics (one ``log_batch`` call):
``n_cases``, ``n_ok``, ``n_failed``, ``n_skipped``, ``total_seconds``, ``mean_seconds_per_case``,
``peak_rss_mib``. Tags: the model's name/version, training run id and dataset from the package metadata,
the kind of input (``medseg.data_kind``: volume or image2d) and the medseg version.

Status: a batch that ran to the end is ``FINISHED`` even when some cases failed (``n_failed`` > 0 and the
tag ``medseg.batch_result=some_failed`` say so): a failed scan is a normal nightly outcome, and the counts
of a finished batch stay comparable across nights. ``FAILED`` means the batch itself crashed.
"""

from __future__ import annotations

from pathlib import Path

from medseg import __version__
from medseg.config import flatten
from medseg.inference.model_package import ModelPackage
from medseg.inference.records import BatchReport
from medseg.tracking import MlflowTracker, resolve_tracking_uri

_REMOTE_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "http://", "https://")


def model_param(ref: str | None, package: ModelPackage) -> str:
    """The model reference to log: an MLflow/remote URI as given, a local path reduced to its folder name."""
    if ref and str(ref).startswith(_REMOTE_PREFIXES):
        return str(ref)
    return Path(ref).name if ref else package.path.name


def batch_metrics(report: BatchReport) -> dict[str, float]:
    """The aggregate numbers of one batch call (no per-case values)."""
    n_ok, n_failed, n_skipped = len(report.done), len(report.failed), len(report.skipped)
    processed = report.case_seconds
    return {
        "n_cases": n_ok + n_failed + n_skipped,
        "n_ok": n_ok,
        "n_failed": n_failed,
        "n_skipped": n_skipped,
        "total_seconds": round(report.seconds, 3),
        "mean_seconds_per_case": round(sum(processed) / len(processed), 3) if processed else 0.0,
        "peak_rss_mib": report.peak_rss_mb,
    }


class BatchTracking:
    """The MLflow run of one batch call; ``start`` opens it and logs params/tags, ``finish`` logs metrics."""

    def __init__(self, tracker: MlflowTracker) -> None:
        self.tracker = tracker

    @classmethod
    def start(
        cls,
        experiment: str,
        uri: str | None,
        package: ModelPackage,
        model_ref: str | None,
        device: str,
        shard: tuple[int, int] | None,
        save_probabilities: bool = False,
    ) -> BatchTracking:
        """Create the run in ``experiment`` at ``uri`` (else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` here;
        ``resolve_tracking_uri``) and log what will run."""
        tracker = MlflowTracker(resolve_tracking_uri(uri), experiment)
        shard_text = f"{shard[0]}/{shard[1]}" if shard else "all"
        tracker.start(run_name=f"predict shard {shard_text.replace('/', 'of')}" if shard else "predict")
        params = {
            "model": model_param(model_ref, package),
            "device": device,
            "shard": shard_text,
            "save_probabilities": save_probabilities,
        }
        params.update(flatten(package.config.inference.model_dump(mode="json"), "inference."))
        tracker.log_params(params)
        meta = package.metadata
        tags = {
            "medseg.kind": "batch_predict",
            "medseg.version": __version__,
            "medseg.data_kind": package.config.data.kind,
            "medseg.model_name": meta.get("name"),
            "medseg.model_version": meta.get("version"),
            "medseg.model_run_id": meta.get("run_id"),
            "medseg.dataset": meta.get("dataset"),
        }
        tracker.set_tags({k: v for k, v in tags.items() if v is not None})
        return cls(tracker)

    def finish(self, report: BatchReport) -> None:
        """Log the counts and timing and close the run ``FINISHED`` (also when some cases failed)."""
        self.tracker.log_metrics(batch_metrics(report), step=0)
        self.tracker.set_tags({"medseg.batch_result": "some_failed" if report.failed else "all_ok"})
        self.tracker.end("FINISHED")

    def end(self, status: str) -> None:
        """Close the run without metrics (the batch crashed or was interrupted)."""
        self.tracker.end(status)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id."""
        return self.tracker.run_id
