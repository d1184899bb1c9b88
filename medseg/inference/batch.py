"""Batch prediction: many scans, one model load, resumable, and one bad scan never stops the rest.

For each case the mask ``<id>.nii.gz`` is written first, then ``<id>.json`` (organ volumes, runtime,
model, input checksum, status). Both are atomic; the JSON is the completion marker, so ``resume`` skips
exactly the cases whose mask and JSON are complete and valid. A failing case gets a JSON with its error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError
from medseg.inference.model_package import ModelPackage
from medseg.inference.predictor import Predictor, organ_volumes
from medseg.io.atomic import is_output_file, write_json_atomic
from medseg.io.manifest import case_id_from_path, load_manifest
from medseg.io.nifti import save_label_like

log = logging.getLogger("medseg.predict")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class InputCase:
    """A scan to segment: an id (output file stem) and its image file(s)."""

    id: str
    images: tuple[Path, ...]


@dataclass
class BatchReport:
    """Counts of a batch run."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 all ok, 3 some failed."""
        return 3 if self.failed else 0


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES) and is_output_file(p)


def discover_inputs(source: str | Path, split: str | None = None) -> list[InputCase]:
    """A NIfTI file, a folder of NIfTI files, or a manifest (``.json``; optionally one split)."""
    src = Path(source)
    if not src.exists():
        raise InputError(src, "input not found")
    if src.is_file() and src.suffix == ".json":
        m = load_manifest(src)
        cases = [c for c in m.cases if split is None or c.split == split]
        return [InputCase(c.id, tuple(m.image_paths(c))) for c in cases]
    if src.is_file():
        if not _is_nifti(src):
            raise InputError(src, "expected a NIfTI file (.nii/.nii.gz), a folder or a manifest .json")
        return [InputCase(case_id_from_path(src.name), (src,))]
    files = sorted(p for p in src.iterdir() if p.is_file() and _is_nifti(p))
    if not files:
        raise InputError(src, "no NIfTI files (.nii/.nii.gz) in this folder")
    cases = [InputCase(case_id_from_path(p.name), (p,)) for p in files]
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(src, f"several files map to case id {dup[0]!r}")
    return cases


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (recorded so a result can be matched to the exact input)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_complete(out_dir: Path, case_id: str) -> bool:
    """True if this case already has a valid mask and a JSON record with status ok."""
    mask, record = out_dir / f"{case_id}.nii.gz", out_dir / f"{case_id}.json"
    if not (mask.is_file() and record.is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("status") == "ok"
    except (OSError, json.JSONDecodeError):
        return False


def run_batch(package: ModelPackage, cases: list[InputCase], out_dir: str | Path, device: str = "auto",
              resume: bool = False, progress: bool = True) -> BatchReport:
    """Segment every case; failures are recorded per case and the batch goes on."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    todo: list[InputCase] = []
    for c in cases:
        if resume and is_complete(out, c.id):
            report.skipped.append(c.id)
        else:
            todo.append(c)
    predictor = Predictor(package, device) if todo else None
    model_info = {"path": str(package.path), "run_id": package.metadata.get("run_id"),
                  "dataset": package.metadata.get("dataset"), "epoch": package.metadata.get("epoch")}
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(todo))
        for case in todo:
            record: dict[str, Any] = {"case": case.id, "inputs": [p.name for p in case.images], "model": model_info}
            try:
                pred = predictor.predict(list(case.images))  # type: ignore[union-attr]
                save_label_like(pred.labels, pred.reference, out / f"{case.id}.nii.gz")
                record.update(status="ok", seconds=round(pred.seconds, 3), shape=list(pred.labels.shape),
                              organs=organ_volumes(pred.labels, pred.reference, package.labels),
                              input_sha256=sha256_file(case.images[0]))
                report.done.append(case.id)
            except MedsegError as e:
                record.update(status="failed", error=str(e))
                report.failed[case.id] = str(e)
                log.error("%s: %s", case.id, e)
            except Exception as e:  # one broken scan must not stop the batch; the error is recorded
                record.update(status="failed", error=f"{e.__class__.__name__}: {e}")
                report.failed[case.id] = record["error"]
                log.exception("%s failed", case.id)
            write_json_atomic(out / f"{case.id}.json", record)
            bar.advance(task)
    return report
