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
(``medseg.inference.batch_tracking``: no case ids, file names or errors).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError
from medseg.inference.dicom_input import load_series_image, series_sha256, write_series_seg
from medseg.inference.images2d import (IMAGE_MASK_SUFFIX, IMAGE_PROBS_SUFFIX, ImagePredictor, check_model_kind,
                                       discover_images, is_image_file, is_image_input, predict_image_case)
from medseg.inference.memory import PeakMemory
from medseg.inference.model_package import ModelPackage
from medseg.inference.predictor import Prediction, Predictor, organ_volumes, save_probabilities_like
from medseg.io.atomic import is_output_file, write_json_atomic, write_text_atomic
from medseg.io.dicom_series import SeriesInfo, discover_series, uid_hash
from medseg.io.manifest import case_id_from_path, load_manifest
from medseg.io.nifti import save_label_like

log = logging.getLogger("medseg.predict")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_SUFFIX, SEG_SUFFIX, RECORD_SUFFIX, PROBS_SUFFIX = ".nii.gz", ".seg.dcm", ".json", "_probs.nii.gz"
SUMMARY = "summary.csv"


@dataclass(frozen=True)
class InputCase:
    """A scan or 2D image to segment: an id (output file stem) and its image file(s), or a DICOM series."""

    id: str
    images: tuple[Path, ...]
    series: SeriesInfo | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        """``dicom``, ``image2d`` (a PNG/JPG file) or ``nifti``."""
        if self.series is not None:
            return "dicom"
        return "image2d" if is_image_file(self.images[0]) else "nifti"


@dataclass
class BatchReport:
    """Counts of a batch run."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    summary: Path | None = None
    seconds: float = 0.0  # wall time of the whole call
    case_seconds: list[float] = field(default_factory=list)  # runtime of each case predicted or failed in this call
    peak_rss_mb: float = 0.0  # largest per-case peak RSS (MiB) in this call
    mlflow_run_id: str | None = None

    @property
    def exit_code(self) -> int:
        """0 all ok, 3 some failed."""
        return 3 if self.failed else 0


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES) and is_output_file(p)


def discover_inputs(source: str | Path, split: str | None = None) -> list[InputCase]:
    """A NIfTI file, a folder of NIfTI files, a manifest (``.json``; optionally one split), a DICOM folder,
    or 2D images (a PNG/JPG file, a folder of them, a 2D-image manifest; ids as ``discover_images``).

    A folder with NIfTI files directly inside is a NIfTI folder; otherwise it is searched recursively for
    DICOM series (one case per SeriesInstanceUID, id ``SeriesInfo.case_id``).
    """
    src = Path(source)
    if not src.exists():
        raise InputError(src, "input not found")
    if is_image_input(src):  # a manifest of images is read below like any other
        return [InputCase(cid, (path,)) for cid, path in discover_images(src)]
    if src.is_file() and src.suffix == ".json":
        m = load_manifest(src)
        cases = [c for c in m.cases if split is None or c.split == split]
        return [InputCase(c.id, tuple(m.image_paths(c))) for c in cases]
    if src.is_file():
        if not _is_nifti(src):
            raise InputError(src, "expected a NIfTI file (.nii/.nii.gz), a folder (NIfTI or DICOM) or a manifest .json")
        return [InputCase(case_id_from_path(src.name), (src,))]
    files = sorted(p for p in src.iterdir() if p.is_file() and _is_nifti(p))
    if files:
        cases = [InputCase(case_id_from_path(p.name), (p,)) for p in files]
        ids = [c.id for c in cases]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise InputError(src, f"several files map to case id {dup[0]!r}")
        return cases
    series = discover_series(src)
    if not series:
        raise InputError(src, "no NIfTI files (.nii/.nii.gz) in this folder and no DICOM series below it")
    ids = [s.case_id for s in series]  # two folders of the same name in different studies: add the UID hash
    return [InputCase(s.case_id if ids.count(s.case_id) == 1 else f"{s.case_id}-{uid_hash(s.uid)}", s.files, s)
            for s in series]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (recorded so a result can be matched to the exact input)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def probabilities_name(case: InputCase) -> str:
    """File name of a case's class probabilities (``<id>_probs.nii.gz``; 2D images ``<id>_probs.npy``)."""
    return f"{case.id}{IMAGE_PROBS_SUFFIX if case.kind == 'image2d' else PROBS_SUFFIX}"


def outputs_of(case: InputCase, probabilities: bool = False) -> list[str]:
    """File names a finished case leaves (the JSON record is written after them)."""
    names = [f"{case.id}{IMAGE_MASK_SUFFIX if case.kind == 'image2d' else MASK_SUFFIX}"]
    names += [f"{case.id}{SEG_SUFFIX}"] if case.series is not None else []
    return names + ([probabilities_name(case)] if probabilities else [])


def is_complete(out_dir: Path, case_id: str, outputs: list[str] | None = None) -> bool:
    """True if this case has a JSON record with status ok and every output it lists (or ``outputs``) exists."""
    record = out_dir / f"{case_id}{RECORD_SUFFIX}"
    try:
        doc = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    names = outputs or doc.get("outputs") or [f"{case_id}{MASK_SUFFIX}"]
    return doc.get("status") == "ok" and all((out_dir / n).is_file() and (out_dir / n).stat().st_size > 0 for n in names)


def remove_stale_temps(out_dir: Path, cases: list[InputCase]) -> int:
    """Delete atomic-write temp files left by a killed run for these cases (another shard's cases are untouched)."""
    n = 0
    for case in cases:
        for name in [*outputs_of(case, probabilities=True), f"{case.id}{RECORD_SUFFIX}"]:
            for tmp in out_dir.glob(f".{name}.*.tmp*"):
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def model_identity(package: ModelPackage, ref: str | None = None) -> dict[str, Any]:
    """Name and version of the model: from the model card, an MLflow ``models:/NAME/VERSION`` ref, or the run."""
    meta = package.metadata
    name, version = meta.get("name"), meta.get("version")
    if ref and str(ref).startswith("models:/"):
        parts = str(ref)[len("models:/"):].split("/")
        name = name or parts[0]
        version = version or (parts[1] if len(parts) > 1 else None)
    name = name or package.config.tracking.registered_model_name or meta.get("dataset") or package.path.name
    if version is None:
        run, epoch = meta.get("run_id"), meta.get("epoch")
        version = f"run {run}" + (f" epoch {int(epoch) + 1}" if epoch is not None else "") if run else \
            f"medseg {meta.get('versions', {}).get('medseg', '?')}"
    return {"name": str(name), "version": str(version), "path": str(package.path), "run_id": meta.get("run_id"),
            "dataset": meta.get("dataset"), "epoch": meta.get("epoch")}


def _warning_text(w: warnings.WarningMessage) -> str:
    # pydicom's value warnings can quote header values (patient names); keep only their category.
    if "pydicom" in (w.filename or "") or "pydicom" in type(w.message).__module__:
        return f"pydicom {w.category.__name__}"
    return f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}"


def case_sha256(case: InputCase) -> str:
    """sha256 of a case's input: the file (first channel file) or the series' files in slice order."""
    return series_sha256(case.series) if case.series is not None else sha256_file(case.images[0])


class ReadAhead:
    """Reads the next case's files in a background thread while the current case is segmented.

    What it does with them is the input checksum every record carries, which needs every byte anyway; the
    read also leaves the files in the OS page cache, so the case's own load (gunzip, DICOM decoding) no longer
    waits for the disk or a network share. Nothing is decoded here and nothing is held in process memory
    (memory-bounded mode keeps its one-scan budget), and no Python warnings can come from this thread (the
    per-case warning capture is process-wide). hashlib and file reads release the GIL, so this overlaps the
    network's work. A read error surfaces for its own case, when the checksum is asked for.
    """

    def __init__(self, cases: list[InputCase], enabled: bool = True) -> None:
        self.cases = cases
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-read-ahead") if enabled else None
        self.next: Future | None = self._submit(0)

    def _submit(self, i: int) -> Future | None:
        return self.pool.submit(case_sha256, self.cases[i]) if self.pool is not None and i < len(self.cases) else None

    def take(self, i: int) -> Future | None:
        """The checksum of case ``i`` being computed (None when off); starts reading case ``i + 1``."""
        current, self.next = self.next, self._submit(i + 1)
        return current

    def close(self) -> None:
        """Stop reading ahead (a pending read is cancelled or awaited)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _predict_case(predictor: Predictor | ImagePredictor, case: InputCase, out: Path, package: ModelPackage,
                  model: dict[str, Any], probabilities: bool = False, checksum: Future | None = None) -> dict[str, Any]:
    """Read, predict and write one case's outputs; returns the record fields (``checksum``: read ahead).

    The checksum is taken after the prediction, so an unreadable input fails with the loader's own message.
    """
    def sha256() -> str:
        return checksum.result() if checksum is not None else case_sha256(case)

    if isinstance(predictor, ImagePredictor):
        probs = out / probabilities_name(case) if probabilities else None
        fields = predict_image_case(predictor, case.images[0], out / outputs_of(case)[0], probs, package.labels)
        return {**fields, "input_sha256": sha256()}
    if case.series is not None:
        image = load_series_image(case.series)
        pred = predictor.predict(image, name=str(case.series.folder), with_probabilities=probabilities)
        _save_probabilities(pred, out / f"{case.id}{PROBS_SUFFIX}")
        save_label_like(pred.labels, pred.reference, out / f"{case.id}{MASK_SUFFIX}")
        write_series_seg(pred.labels, case.series, package.labels, out / f"{case.id}{SEG_SUFFIX}",
                         model["name"], model["version"])
        extra = {"input_sha256": sha256(), "n_slices": case.series.n_slices, "modality": case.series.modality}
    else:
        pred = predictor.predict(list(case.images), with_probabilities=probabilities)
        _save_probabilities(pred, out / f"{case.id}{PROBS_SUFFIX}")
        save_label_like(pred.labels, pred.reference, out / f"{case.id}{MASK_SUFFIX}")
        extra = {"input_sha256": sha256()}
    return {"seconds": round(pred.seconds, 3), "shape": list(pred.labels.shape),
            "organs": organ_volumes(pred.labels, pred.reference, package.labels), "windows": pred.windows, **extra}


def _save_probabilities(pred: Prediction, path: Path) -> None:
    if pred.probabilities is not None:
        save_probabilities_like(pred.probabilities, pred.reference, path)
        pred.probabilities = None  # free it before the next case


def check_probabilities_option(package: ModelPackage, cases: list[InputCase]) -> None:
    """``ValueError`` if probabilities cannot be saved for this batch (memory-bounded mode, or a file name clash)."""
    if package.config.inference.memory_bounded and package.config.data.kind == "volume":
        raise ValueError("saving probabilities is not supported with inference.memory_bounded=true "
                         "(that mode inverts only the label map); drop one of the two")
    masks = {name: c.id for c in cases for name in outputs_of(c)}
    for c in sorted(cases, key=lambda c: c.id):
        if probabilities_name(c) in masks:
            raise ValueError(f"case {c.id!r}: its probabilities file would overwrite the mask of case "
                             f"{masks[probabilities_name(c)]!r}")


def check_inputs_fit_model(package: ModelPackage, cases: list[InputCase]) -> None:
    """``InputError`` naming the model if it was trained on the other kind of input (2D images vs volumes)."""
    images = package.config.data.kind == "image2d"
    wrong = next((c for c in cases if (c.kind == "image2d") != images), None)
    if wrong is not None:
        check_model_kind(package, not images, wrong.images[0] if wrong.series is None else wrong.id)


def run_batch(package: ModelPackage, cases: list[InputCase], out_dir: str | Path, device: str = "auto",
              resume: bool = False, progress: bool = True, model_ref: str | None = None,
              predictor: Predictor | ImagePredictor | None = None, local_rank: int | None = None,
              save_probabilities: bool = False, mlflow_experiment: str | None = None, tracking_uri: str | None = None,
              shard: tuple[int, int] | None = None, read_ahead: bool = True) -> BatchReport:
    """Segment every case; failures are recorded per case and the batch goes on.

    ``predictor`` replaces the one built from ``package`` (tests pass a fixed reference network).
    ``save_probabilities`` also writes ``<id>_probs.nii.gz`` (``ValueError`` in memory-bounded mode; 2D images:
    ``<id>_probs.npy``). A model given the other kind of input (2D images vs volumes) is an ``InputError``.
    ``mlflow_experiment`` logs one run for this call (``shard`` is recorded with it) to ``tracking_uri``
    (default: ``mlflow.db`` in the working folder); see ``batch_tracking`` for what is and is not logged.
    ``read_ahead`` reads the next case's files (checksum, page cache) while the current one is segmented.
    """
    t_start = time.perf_counter()
    check_inputs_fit_model(package, cases)
    if save_probabilities:
        check_probabilities_option(package, cases)
    tracking = None
    if mlflow_experiment:  # open the run first: an unreachable server should fail before a night of work
        from medseg.inference.batch_tracking import BatchTracking

        tracking = BatchTracking.start(mlflow_experiment, tracking_uri, package, model_ref, device, shard, save_probabilities)
    try:
        report = _run(package, cases, Path(out_dir), device, resume, progress, model_ref, predictor, local_rank,
                      save_probabilities, read_ahead)
    except BaseException:
        if tracking is not None:
            tracking.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    report.seconds = time.perf_counter() - t_start
    if tracking is not None:
        tracking.finish(report)
        report.mlflow_run_id = tracking.run_id
    return report


def _run(package: ModelPackage, cases: list[InputCase], out: Path, device: str, resume: bool, progress: bool,
         model_ref: str | None, predictor: Predictor | ImagePredictor | None, local_rank: int | None,
         save_probabilities: bool, read_ahead: bool = False) -> BatchReport:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, cases)
    report = BatchReport()
    todo: list[InputCase] = []
    for c in cases:
        if resume and is_complete(out, c.id, outputs_of(c, save_probabilities)):
            report.skipped.append(c.id)
        else:
            todo.append(c)
    if todo and predictor is None:
        build = ImagePredictor if package.config.data.kind == "image2d" else Predictor
        predictor = build(package, device, local_rank=local_rank)
    model = model_identity(package, model_ref)
    ahead = ReadAhead(todo, read_ahead)
    try:
        report = _predict_all(todo, ahead, predictor, out, package, model, save_probabilities, progress, report)  # type: ignore[arg-type]
    finally:
        ahead.close()
    report.summary = write_summary(out, package.labels, images=package.config.data.kind == "image2d")
    return report


def _predict_all(todo: list[InputCase], ahead: ReadAhead, predictor: Predictor | ImagePredictor, out: Path,
                 package: ModelPackage, model: dict[str, Any], save_probabilities: bool, progress: bool,
                 report: BatchReport) -> BatchReport:
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(todo))
        for i, case in enumerate(todo):
            reading = ahead.take(i)
            inputs = [case.id] if case.series is not None else [p.name for p in case.images]
            record: dict[str, Any] = {"case": case.id, "kind": case.kind, "inputs": inputs, "model": model}
            t0 = time.perf_counter()
            with PeakMemory() as peak, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fields = _predict_case(predictor, case, out, package, model, save_probabilities, reading)
                    record.update(status="ok", **fields, outputs=outputs_of(case, save_probabilities))
                    report.done.append(case.id)
                except MedsegError as e:
                    record.update(status="failed", error=str(e))
                    log.error("%s: %s", case.id, e)
                except Exception as e:  # one broken scan or image must not stop the batch; the error is recorded
                    record.update(status="failed", error=f"{e.__class__.__name__}: {e}")
                    log.exception("%s failed", case.id)
            if record["status"] == "failed":
                report.failed[case.id] = record["error"]
            notes = list(dict.fromkeys(_warning_text(w) for w in caught))
            notes += [f"no voxels predicted for {name}" for name, v in record.get("organs", {}).items() if not v["voxels"]]
            record.update(runtime_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak.peak_mb,
                          peak_rss_scope=peak.scope, warnings=notes)
            write_json_atomic(out / f"{case.id}{RECORD_SUFFIX}", record)
            report.case_seconds.append(record["runtime_s"])
            report.peak_rss_mb = max(report.peak_rss_mb, peak.peak_mb)
            bar.advance(task)
    return report


def case_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every per-case JSON record in ``out_dir`` (other JSON files are ignored), sorted by case id."""
    records = []
    for p in sorted(Path(out_dir).glob(f"*{RECORD_SUFFIX}")):
        if not is_output_file(p):
            continue
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and {"case", "status"} <= doc.keys() and p.name == f"{doc['case']}{RECORD_SUFFIX}":
            records.append(doc)
    return sorted(records, key=lambda d: str(d["case"]))


def write_summary(out_dir: Path, label_map: dict[str, int], images: bool = False) -> Path:
    """Rebuild ``summary.csv`` (case, status, seconds, peak memory, per-organ volume, error) atomically.

    For 2D images (``images``) the per-class columns are ``<class>_pixels`` and ``<class>_fraction`` of
    every class, background included, instead of ``<organ>_ml`` and ``<organ>_voxels``.
    """
    ordered = [n for n, v in sorted(label_map.items(), key=lambda kv: kv[1]) if images or v != 0]
    section, columns = ("classes", {"pixels": "pixels", "fraction": "fraction"}) if images else \
        ("organs", {"ml": "volume_ml", "voxels": "voxels"})  # column suffix -> record key
    fields = ["case", "status", "seconds", "runtime_s", "peak_rss_mb"]
    fields += [f"{o}_{k}" for o in ordered for k in columns] + ["error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for doc in case_records(out_dir):
        row = {k: doc.get(k, "") for k in ("case", "status", "seconds", "runtime_s", "peak_rss_mb", "error")}
        for o in ordered:
            v = doc.get(section, {}).get(o, {})
            row.update({f"{o}_{col}": v.get(key, "") for col, key in columns.items()})
        w.writerow(row)
    return write_text_atomic(Path(out_dir) / SUMMARY, buf.getvalue())
