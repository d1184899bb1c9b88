"""A batch's bookkeeping on disk: which files a finished case leaves, whether a case is complete (resume),
stale temp files of a killed run, the model's identity in each record, and ``summary.csv``.

The per-case JSON record is written after the case's outputs, so it is the completion marker.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.data.kinds import data_kind
from medseg.inference.inputs import InputCase
from medseg.inference.model_package import ModelPackage
from medseg.io.atomic import is_output_file, write_text_atomic
from medseg.io.dicom_series import NonImageObject

SEG_SUFFIX, RECORD_SUFFIX = ".seg.dcm", ".json"
RTSTRUCT_SUFFIX = ".rtstruct.dcm"
# inference.dicom_output -> suffixes of the DICOM objects a DICOM series case gets, in writing order
DICOM_OUTPUT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "seg": (SEG_SUFFIX,),
    "rtstruct": (RTSTRUCT_SUFFIX,),
    "both": (SEG_SUFFIX, RTSTRUCT_SUFFIX),
    "none": (),
}
MASK_SUFFIX = data_kind("volume").mask_suffix  # records older than the "outputs" list name only a volume mask
SUMMARY = "summary.csv"
SKIPPED_OBJECTS = "skipped_objects.csv"


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
    not_scans: list[tuple[str, str]] = field(default_factory=list)  # (listed name, what) of skipped DICOM objects

    @property
    def exit_code(self) -> int:
        """0 all ok, 3 some failed."""
        return 3 if self.failed else 0


def probabilities_name(case: InputCase) -> str:
    """File name of a case's class probabilities (``<id>_probs.nii.gz``; 2D images ``<id>_probs.npy``)."""
    return f"{case.id}{data_kind(case.data_kind).probabilities_suffix}"


def dicom_output_names(case_id: str, dicom_output: str) -> list[str]:
    """Names of the DICOM files a DICOM series case leaves for ``inference.dicom_output`` (``ValueError`` if unknown)."""
    if dicom_output not in DICOM_OUTPUT_SUFFIXES:
        raise ValueError(f"dicom_output {dicom_output!r}: expected one of {sorted(DICOM_OUTPUT_SUFFIXES)}")
    return [f"{case_id}{suffix}" for suffix in DICOM_OUTPUT_SUFFIXES[dicom_output]]


def outputs_of(case: InputCase, probabilities: bool = False) -> list[str]:
    """File names every finished case of this kind leaves: the mask (and probabilities).

    A DICOM series' DICOM-SEG / RTSTRUCT (``dicom_output_names``) are not among them: they are written when they
    can be, and the case's record lists the files it actually left (``is_complete`` checks those too).
    """
    names = [f"{case.id}{data_kind(case.data_kind).mask_suffix}"]
    return names + ([probabilities_name(case)] if probabilities else [])


def is_complete(out_dir: Path, case_id: str, outputs: list[str] | None = None) -> bool:
    """True if this case has a JSON record with status ok and every output it lists (or ``outputs``) exists."""
    record = out_dir / f"{case_id}{RECORD_SUFFIX}"
    try:
        doc = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(doc, dict):  # valid JSON but not a record
        return False
    listed = doc["outputs"] if isinstance(doc.get("outputs"), list) else []
    names = list(dict.fromkeys([*(outputs or []), *listed])) or [f"{case_id}{MASK_SUFFIX}"]
    return doc.get("status") == "ok" and all(
        (out_dir / n).is_file() and (out_dir / n).stat().st_size > 0 for n in names
    )


def remove_stale_temps(out_dir: Path, cases: list[InputCase]) -> int:
    """Delete atomic-write temp files left by a killed run for these cases (another shard's cases are untouched)."""
    n = 0
    for case in cases:
        dicom = dicom_output_names(case.id, "both") if case.series is not None else []
        for name in [*outputs_of(case, probabilities=True), *dicom, f"{case.id}{RECORD_SUFFIX}"]:
            for tmp in out_dir.glob(f".{glob.escape(name)}.*.tmp*"):
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def model_identity(package: ModelPackage, ref: str | None = None) -> dict[str, Any]:
    """Name and version of the model: from the model card, an MLflow ``models:/NAME/VERSION`` ref, or the run.

    A ``models:/NAME@ALIAS`` ref records the version the alias pointed at when the package was loaded
    (``package.resolved_ref``), and the alias itself under ``alias``.
    """
    meta = package.metadata
    name, version = meta.get("name"), meta.get("version")
    alias = None
    if ref and str(ref).startswith("models:/"):
        body = str(ref)[len("models:/") :].rstrip("/")
        if "@" in body:  # an alias names no version: the one it resolved to does
            body, _, alias = body.rpartition("@")
            resolved = package.resolved_ref or ""
            body = resolved[len("models:/") :] if resolved.startswith(f"models:/{body}/") else body
        parts = body.split("/")
        name = name or parts[0]
        version = version or (parts[1] if len(parts) > 1 else None)
    name = name or package.config.tracking.registered_model_name or meta.get("dataset") or package.path.name
    if version is None:
        run, epoch = meta.get("run_id"), meta.get("epoch")
        version = (
            f"run {run}" + (f" epoch {int(epoch) + 1}" if epoch is not None else "")
            if run
            else f"medseg {meta.get('versions', {}).get('medseg', '?')}"
        )
    return {
        "name": str(name),
        "version": str(version),
        "path": str(package.path),
        "run_id": meta.get("run_id"),
        "dataset": meta.get("dataset"),
        "epoch": meta.get("epoch"),
        **({"alias": alias} if alias else {}),
    }


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


def write_summary(out_dir: Path, label_map: dict[str, int], kind: str = "volume") -> Path:
    """Rebuild ``summary.csv`` (case, status, seconds, peak memory, per-class amounts, error) atomically.

    The per-class columns are the data kind's (``DataKind.summary_columns``): volumes ``<organ>_ml`` and
    ``<organ>_voxels``; 2D images ``<class>_pixels`` and ``<class>_fraction`` of every class, background included.
    """
    dk = data_kind(kind)
    ordered = dk.reported_classes(label_map)
    fields = ["case", "status", "seconds", "runtime_s", "peak_rss_mb", *dk.summary_columns(label_map), "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for doc in case_records(out_dir):
        row = {k: doc.get(k, "") for k in ("case", "status", "seconds", "runtime_s", "peak_rss_mb", "error")}
        for o in ordered:
            v = doc.get(dk.record_section, {}).get(o, {})
            row.update({f"{o}_{col}": v.get(key, "") for col, key in dk.amount_columns.items()})
        w.writerow(row)
    return write_text_atomic(Path(out_dir) / SUMMARY, buf.getvalue())


def write_skipped_objects(out_dir: Path, objects: Sequence[NonImageObject]) -> Path:
    """``skipped_objects.csv``: the input's DICOM objects that are not image series (file, what, modality)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "what", "modality"])
    for o in sorted(objects, key=lambda o: o.name):
        w.writerow([o.name, o.what, o.modality])
    return write_text_atomic(Path(out_dir) / SKIPPED_OBJECTS, buf.getvalue())
