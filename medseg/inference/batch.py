"""Batch prediction: many scans or images, one model load, resumable, and one bad input never stops the rest.

Inputs are NIfTI files (a file, a folder, a manifest), DICOM series found recursively in a folder, or 2D
PNG/JPG images (a file, a folder, a 2D-image manifest) for ``data.kind: image2d`` models; a model given the
other kind is a one-line error. For each case the mask ``<id>.nii.gz`` (for DICOM also the DICOM-SEG
``<id>.seg.dcm``; for an image ``<id>.png``) is written first, and with ``save_probabilities`` the class
probabilities ``<id>_probs.nii.gz`` (images: ``<id>_probs.npy``, see ``images2d``),
then ``<id>.json`` (status, organ volumes or, for images, class pixel counts, runtime, peak memory, model,
input checksum, warnings, outputs). All writes are atomic; the JSON is the completion marker, so ``resume``
skips exactly the cases whose JSON says ok and whose listed outputs exist. A failing case gets a JSON with its
error. At the end ``summary.csv`` is rebuilt from every case JSON in the folder, so it is right after a resume or shards.
With ``mlflow_experiment`` one MLflow run per call (per shard) records counts and timing only
(``medseg.inference.batch_tracking``: no case ids, file names or errors). A DICOM case's error (record, summary,
log) has the path parts and words holding its patient identifiers ``<redacted>``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError
from medseg.inference.batch_tracking import BatchTracking
from medseg.inference.case_notes import CaseNotes
from medseg.inference.case_runners import CASE_RUNNERS, CaseRunner
from medseg.inference.dicom_output import dicom_codes
from medseg.inference.inputs import InputCase, check_model_kind
from medseg.inference.model_package import ModelPackage
from medseg.inference.read_ahead import ReadAhead
from medseg.inference.records import (
    RECORD_SUFFIX,
    BatchReport,
    is_complete,
    model_identity,
    outputs_of,
    probabilities_name,
    remove_stale_temps,
    write_skipped_objects,
    write_summary,
)
from medseg.io.atomic import write_json_atomic
from medseg.io.dicom_case_ids import redact_identifiers
from medseg.io.dicom_series import NonImageObject
from medseg.runtime.memory import PeakMemory

log = logging.getLogger("medseg.predict")


def check_probabilities_option(package: ModelPackage, cases: list[InputCase]) -> None:
    """``ValueError`` if probabilities cannot be saved for this batch (memory-bounded mode, or a file name clash)."""
    if package.config.inference.memory_bounded and package.config.data.kind == "volume":
        raise ValueError(
            "saving probabilities is not supported with inference.memory_bounded=true "
            "(that mode inverts only the label map); drop one of the two"
        )
    masks = {name: c.id for c in cases for name in outputs_of(c)}
    for c in sorted(cases, key=lambda c: c.id):
        if probabilities_name(c) in masks:
            raise ValueError(
                f"case {c.id!r}: its probabilities file would overwrite the mask of case "
                f"{masks[probabilities_name(c)]!r}"
            )


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written in it; ``InputError`` naming it if not (before any case:
    otherwise every case's outputs and records would fail one by one). A real write, not ``os.access``: root passes
    permission bits, not a read-only mount."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".medseg-write-test-"):
            pass
    except OSError as e:
        raise InputError(out, f"output folder is not writable ({e.strerror or type(e).__name__})") from None


def check_inputs_fit_model(package: ModelPackage, cases: list[InputCase]) -> None:
    """``InputError`` naming the model if it was trained on the other kind of input (2D images vs volumes)."""
    images = package.config.data.kind == "image2d"
    wrong = next((c for c in cases if c.data_kind != package.config.data.kind), None)
    if wrong is not None:
        check_model_kind(package, not images, wrong.images[0] if wrong.series is None else wrong.id)


def run_batch(
    package: ModelPackage,
    cases: list[InputCase],
    out_dir: str | Path,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    model_ref: str | None = None,
    predictor: Any | None = None,
    local_rank: int | None = None,
    save_probabilities: bool = False,
    mlflow_experiment: str | None = None,
    tracking_uri: str | None = None,
    shard: tuple[int, int] | None = None,
    read_ahead: bool = True,
    not_scans: Sequence[NonImageObject] = (),
) -> BatchReport:
    """Segment every case; failures are recorded per case and the batch goes on.

    ``predictor`` replaces the one built from ``package`` (tests pass a fixed reference network).
    ``save_probabilities`` also writes ``<id>_probs.nii.gz`` (``ValueError`` in memory-bounded mode; 2D images:
    ``<id>_probs.npy``). A model given the other kind of input (2D images vs volumes) is an ``InputError``.
    ``mlflow_experiment`` logs one run for this call (``shard`` is recorded with it) to ``tracking_uri``
    (default: ``mlflow.db`` in the working folder); see ``batch_tracking`` for what is and is not logged.
    ``read_ahead`` reads the next case's files (checksum, page cache) while the current one is segmented.
    ``not_scans``: DICOM objects of the input that are not image series (``inputs.discover``); they are listed in
    ``skipped_objects.csv`` and in the report, never failures.
    """
    t_start = time.perf_counter()
    check_inputs_fit_model(package, cases)
    if any(c.series is not None for c in cases):  # a misspelt label in inference.dicom.codes fails now, not per case
        dicom_codes(package.config.inference.dicom, package.labels)
    if save_probabilities:
        check_probabilities_option(package, cases)
    tracking = None
    if mlflow_experiment:  # open the run first: an unreachable server should fail before a night of work
        tracking = BatchTracking.start(
            mlflow_experiment, tracking_uri, package, model_ref, device, shard, save_probabilities
        )
    try:
        report = _run(
            package,
            cases,
            Path(out_dir),
            device,
            resume,
            progress,
            model_ref,
            predictor,
            local_rank,
            save_probabilities,
            read_ahead,
        )
    except BaseException:
        if tracking is not None:
            tracking.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    report.not_scans = [(o.name, o.what) for o in not_scans]
    if not_scans:
        write_skipped_objects(Path(out_dir), not_scans)
    report.seconds = time.perf_counter() - t_start
    if tracking is not None:
        tracking.finish(report)
        report.mlflow_run_id = tracking.run_id
    return report


def _run(
    package: ModelPackage,
    cases: list[InputCase],
    out: Path,
    device: str,
    resume: bool,
    progress: bool,
    model_ref: str | None,
    predictor: Any | None,
    local_rank: int | None,
    save_probabilities: bool,
    read_ahead: bool = False,
) -> BatchReport:
    check_writable(out)
    remove_stale_temps(out, cases)
    report = BatchReport()
    todo: list[InputCase] = []
    for c in cases:
        if resume and is_complete(out, c.id, outputs_of(c, save_probabilities)):
            report.skipped.append(c.id)
        else:
            todo.append(c)
    kind = package.config.data.kind
    runner_cls = CASE_RUNNERS.get(kind)
    if todo and predictor is None:
        predictor = runner_cls.load(package, device, local_rank)
    runner = runner_cls(package, predictor)
    model = model_identity(package, model_ref)
    ahead = ReadAhead(todo, read_ahead)
    try:
        report = _predict_all(todo, ahead, runner, out, model, save_probabilities, progress, report)
    finally:
        ahead.close()
    report.summary = write_summary(out, package.labels, kind)
    return report


def _shown(case: InputCase, error: str) -> str:
    """A case's error as recorded and logged: for a DICOM series, every path part and word holding one of its
    patient identifier fragments (a folder or file named after the patient) is ``<redacted>``."""
    return redact_identifiers(error, case.series.identifiers) if case.series is not None else error


def _predict_all(
    todo: list[InputCase],
    ahead: ReadAhead,
    runner: CaseRunner,
    out: Path,
    model: dict[str, Any],
    save_probabilities: bool,
    progress: bool,
    report: BatchReport,
) -> BatchReport:
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(todo))
        for i, case in enumerate(todo):
            reading = ahead.take(i)
            inputs = [case.id] if case.series is not None else [p.name for p in case.images]
            record: dict[str, Any] = {"case": case.id, "kind": case.kind, "inputs": inputs, "model": model}
            t0 = time.perf_counter()
            with PeakMemory() as peak, CaseNotes() as caught:
                try:
                    fields = runner.run(case, out, model, save_probabilities, reading)
                    fields.setdefault("outputs", outputs_of(case, save_probabilities))
                    for note in fields.pop("warnings", []):
                        caught.add(note)
                    record.update(status="ok", **fields)
                    report.done.append(case.id)
                except MedsegError as e:
                    record.update(status="failed", error=_shown(case, str(e)))
                    log.error("%s: %s", case.id, record["error"])
                except Exception as e:  # one broken scan or image must not stop the batch; the error is recorded
                    record.update(status="failed", error=_shown(case, f"{e.__class__.__name__}: {e}"))
                    if case.series is None:
                        log.exception("%s failed", case.id)
                    else:  # one line: a traceback would quote the message unredacted
                        log.error("%s failed: %s", case.id, record["error"])
            if record["status"] == "failed":
                report.failed[case.id] = record["error"]
            notes = caught.notes
            notes += [
                f"no voxels predicted for {name}" for name, v in record.get("organs", {}).items() if not v["voxels"]
            ]
            record.update(
                runtime_s=round(time.perf_counter() - t0, 3),
                peak_rss_mb=peak.peak_mb,
                peak_rss_scope=peak.scope,
                warnings=notes,
            )
            write_json_atomic(out / f"{case.id}{RECORD_SUFFIX}", record)
            report.case_seconds.append(record["runtime_s"])
            report.peak_rss_mb = max(report.peak_rss_mb, peak.peak_mb)
            bar.advance(task)
    return report
