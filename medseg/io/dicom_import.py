"""``medseg data import-dicom``: a training manifest from DICOM image series with RTSTRUCT or DICOM-SEG labels.

For every image series that a label object of the requested kind references (``dicom_import_links``): read the
series (``read_series``), rasterise / read its labels onto the series' own grid (``dicom_import_labels``), and
cache image and label map as NIfTI beside the manifest, both with the same affine::

    <stem>.json                     the manifest (``load_manifest`` reads it; the trainer trains it)
    <stem>_nifti/<case>_0000.nii.gz image      <stem>_nifti/<case>.nii.gz label map
    <stem>_nifti/<case>.json        the case's record; written last, so it marks the cache complete
    <stem>_case_map.json            case id -> source folder (relative to DIR), SeriesInstanceUID, label files
    <stem>_import_report.json       per case: labels found, unmatched ROIs, warnings, errors

Case ids name no patient: a hash of the SeriesInstanceUID, or the top-level folder name under DIR where that
names no patient and is unique. Only the case map links ids back to the source; printed paths have every part
that holds a patient identifier fragment redacted. A bad case fails alone (one line naming the file and the
cause); a re-run skips cases whose cache is complete and made from the same inputs and ROI map.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib

from medseg.errors import InputError, MedsegError
from medseg.io.atomic import atomic_path, write_json_atomic
from medseg.io.dicom_case_ids import uid_hash
from medseg.io.dicom_import_labels import case_labels
from medseg.io.dicom_import_links import (
    FolderIndex,
    LabelObject,
    frame_of_reference,
    index_folder,
    link_label_objects,
    scan_image_series,
)
from medseg.io.dicom_series import SeriesInfo, read_series
from medseg.io.manifest import Case, Manifest, assign_splits
from medseg.io.nifti import load_nifti, save_label_like
from medseg.io.roi_map import RoiMap, identity_roi_map, load_roi_map
from medseg.io.sitk_nifti import sitk_to_nifti

LABEL_KINDS = ("rtstruct", "seg")
CASE_ID_MODES = ("hash", "folder")
CACHE_VERSION = 1


@dataclass(frozen=True)
class ImportOptions:
    """What ``import-dicom`` reads and how it names and splits the cases."""

    labels: str  # "rtstruct" or "seg"
    roi_map: Path | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    case_ids: str = "hash"  # or "folder"


@dataclass
class CaseResult:
    """One case's outcome: ``ok`` (imported now), ``cached`` (complete from an earlier run) or ``failed``."""

    case_id: str
    status: str
    record: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def line(self) -> str:
        """One line for the terminal: labels found, unmatched ROIs, warnings; or the error."""
        if self.status == "failed":
            return f"{self.case_id}: FAILED {self.error}"
        r = self.record
        parts = [", ".join(f"{k} {v} vox" for k, v in r["labels"].items()) or "no labels"]
        for key, what in (("unmatched_rois", "unmatched ROIs"), ("labels_without_roi", "labels without ROI")):
            if r[key]:
                parts.append(f"{what}: {', '.join(r[key])}")
        if r["empty_rois"]:
            parts.append(f"empty: {', '.join(r['empty_rois'])}")
        if r["contested_voxels"]:
            parts.append(f"contested voxels: {r['contested_voxels']}")
        parts += r["warnings"]
        return f"{self.case_id}: {self.status} " + " | ".join(parts)


@dataclass
class ImportResult:
    """The manifest written, every case's outcome and the side files."""

    manifest: Manifest
    cases: list[CaseResult]
    report_path: Path
    case_map_path: Path
    unlinked: list[str]
    without_labels: list[str]
    unreadable: list[str] = field(default_factory=list)  # folders lost to a file that cannot be read

    @property
    def failed(self) -> list[CaseResult]:
        """The cases that could not be imported."""
        return [c for c in self.cases if c.status == "failed"]

    @property
    def ok(self) -> bool:
        """Whether every labelled case found was imported (no failed case, no unreadable folder)."""
        return not self.failed and not self.unreadable


@dataclass(frozen=True)
class _Paths:
    manifest: Path
    nifti: Path
    report: Path
    case_map: Path

    @classmethod
    def of(cls, manifest: Path) -> _Paths:
        stem, parent = manifest.name.removesuffix(".json"), manifest.parent
        return cls(
            manifest, parent / f"{stem}_nifti", parent / f"{stem}_import_report.json", parent / f"{stem}_case_map.json"
        )

    def image(self, case_id: str) -> Path:
        return self.nifti / f"{case_id}_0000.nii.gz"

    def label(self, case_id: str) -> Path:
        return self.nifti / f"{case_id}.nii.gz"

    def record(self, case_id: str) -> Path:
        return self.nifti / f"{case_id}.json"


def import_dicom(
    root: str | Path,
    output: str | Path,
    options: ImportOptions,
    on_case: Callable[[CaseResult], None] | None = None,
) -> ImportResult:
    """Import every labelled image series under ``root`` into a manifest at ``output`` (see the module doc).

    ``on_case`` is called with each case's result as it is done. Cases that fail are in ``result.failed``;
    ``MedsegError`` only for what stops the whole import (bad options or ROI map, --case-ids folder refused,
    no case imported).
    """
    _check_options(options)
    root, paths = Path(root), _Paths.of(Path(output).resolve())
    roi_map = load_roi_map(options.roi_map) if options.roi_map else None
    scan = scan_image_series(root)
    series = scan.series
    index = index_folder(root)
    wanted = [o for o in index.objects if o.kind == options.labels]
    frames = {s.uid: frame_of_reference(s) for s in series}
    links = link_label_objects(wanted, series, frames)
    labelled = [s for s in series if s.uid in links.by_series]
    if roi_map is None:
        roi_map = identity_roi_map(n for s in labelled for o, _ in links.by_series[s.uid] for n in o.names)
    ids = case_ids_for(labelled, root, index, options.case_ids)
    results = []
    for info in labelled:
        linked = links.by_series[info.uid]
        result = _import_case(info, ids[info.uid], linked, frames[info.uid], roi_map, options.labels, paths, index)
        if on_case is not None:
            on_case(result)
        results.append(result)
    unlinked = [f"{index.shown(o.path)}: {why}" for o, why in links.unlinked]
    broken = [f"{index.shown(e.path)}: {e.problem}" for e in scan.broken]
    unscanned = {Path(e.path) for e in scan.broken}
    unlinked += [f"{index.shown(p)}: {why}" for p, why in index.unreadable if p not in unscanned]
    without = [f"series-{uid_hash(s.uid)}" for s in series if s.uid not in links.by_series]
    _write_case_map(paths, root, labelled, ids, links.by_series)
    report = {
        "labels": options.labels,
        "roi_map": roi_map.to_json(),
        "label_values": {"background": 0, **roi_map.values},
        "cases": {
            r.case_id: {"status": r.status, **r.record, **({"error": r.error} if r.error else {})} for r in results
        },
        "failed": {r.case_id: r.error for r in results if r.status == "failed"},
        "unlinked_label_objects": unlinked,
        "series_without_labels": without,
        "label_objects_of_other_kinds": len(index.objects) - len(wanted),
        "unreadable_folders": broken,
        "non_dicom_files_skipped": scan.skipped,
    }
    write_json_atomic(paths.report, report)
    manifest = _write_manifest(paths, results, roi_map, options)
    return ImportResult(manifest, results, paths.report, paths.case_map, unlinked, without, broken)


def case_ids_for(series: list[SeriesInfo], root: Path, index: FolderIndex, mode: str) -> dict[str, str]:
    """Series UID -> case id: ``series-<uid hash>``, or (``folder``) the top-level folder under ``root``, refused
    (``MedsegError``, naming no patient) where that holds a patient identifier fragment or is not unique."""
    if mode == "hash":
        return {s.uid: f"series-{uid_hash(s.uid)}" for s in series}
    ids, problems = {}, []
    for s in series:
        rel = s.files[0].relative_to(root).parts
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", rel[0]).strip("._-") if len(rel) > 1 else ""
        if len(rel) < 2:
            problems.append(f"series-{uid_hash(s.uid)} lies directly in DIR, in no folder")
        elif any(t in rel[0].lower() for t in index.tokens):
            problems.append(f"the folder of series-{uid_hash(s.uid)} contains a patient identifier")
        elif not name:
            problems.append(f"the folder of series-{uid_hash(s.uid)} has no usable characters for an id")
        ids[s.uid] = name
    counts = Counter(v for v in ids.values() if v)
    problems += [f"folder {name!r} holds {n} labelled series" for name, n in counts.items() if n > 1]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MedsegError(f"--case-ids folder refused: {'; '.join(problems[:3])}{more}; use --case-ids hash")
    return ids


def _check_options(options: ImportOptions) -> None:
    if options.labels not in LABEL_KINDS:
        raise MedsegError(f"--labels {options.labels!r}: choose one of {', '.join(LABEL_KINDS)}")
    if options.case_ids not in CASE_ID_MODES:
        raise MedsegError(f"--case-ids {options.case_ids!r}: choose one of {', '.join(CASE_ID_MODES)}")
    if not (0 <= options.val_fraction < 1 and 0 <= options.test_fraction < 1) or (
        options.val_fraction + options.test_fraction >= 1
    ):
        raise MedsegError("--val-fraction and --test-fraction must be >= 0 with a sum below 1")


def _import_case(
    info: SeriesInfo,
    case_id: str,
    linked: list[tuple[LabelObject, str]],
    frame_uid: str,
    roi_map: RoiMap,
    kind: str,
    paths: _Paths,
    index: FolderIndex,
) -> CaseResult:
    objects = [o for o, _ in linked]
    key = _cache_key(info, objects, roi_map, kind)
    cached = _cached_record(paths, case_id, key)
    if cached is not None:
        return CaseResult(case_id, "cached", cached)
    try:
        image = read_series(info)
        labels = case_labels(objects, info, image, frame_uid, roi_map)
        nii = sitk_to_nifti(image)
        with atomic_path(paths.image(case_id), suffix=".nii.gz") as tmp:
            nib.save(nii, str(tmp))
        save_label_like(labels.labels.transpose(2, 1, 0), nii, paths.label(case_id))
    except InputError as e:
        return CaseResult(case_id, "failed", error=f"{index.shown(e.path)}: {e.problem}")
    except Exception as e:  # one broken case must not stop the import; the cause is recorded, redacted
        return CaseResult(
            case_id, "failed", error=f"{index.shown(info.folder)}: {type(e).__name__} ({_redact(e, index)})"
        )
    record = {
        "modality": info.modality,
        "shape": [int(n) for n in nii.shape],
        "spacing": [round(float(x), 6) for x in nii.header.get_zooms()[:3]],
        "linked_by": sorted({how for _, how in linked}),
        **labels.record(),
    }
    write_json_atomic(paths.record(case_id), {"key": key, "record": record})
    return CaseResult(case_id, "ok", record)


def _redact(error: Exception, index: FolderIndex) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    for token in index.tokens:
        text = re.sub(re.escape(token), "<redacted>", text, flags=re.IGNORECASE)
    return text


def _cache_key(info: SeriesInfo, objects: list[LabelObject], roi_map: RoiMap, kind: str) -> str:
    """Hash of what a case's cache is made from: series files (names, sizes), label files, ROI map, version."""
    doc = {
        "version": CACHE_VERSION,
        "kind": kind,
        "series": info.uid,
        "files": [(f.name, f.stat().st_size) for f in info.files],
        "objects": sorted((o.path.name, o.path.stat().st_size) for o in objects),
        "roi_map": roi_map.to_json(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _cached_record(paths: _Paths, case_id: str, key: str) -> dict[str, Any] | None:
    """The record of a complete cache made from the same inputs, else None."""
    try:
        doc = json.loads(paths.record(case_id).read_text())
        if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("record"), dict):
            return None
        image, label = load_nifti(paths.image(case_id)), load_nifti(paths.label(case_id))
    except (OSError, ValueError, InputError):
        return None
    complete = image.shape == label.shape and list(image.shape) == doc["record"].get("shape")
    return doc["record"] if complete else None


def _write_case_map(
    paths: _Paths,
    root: Path,
    series: list[SeriesInfo],
    ids: dict[str, str],
    by_series: dict[str, list[tuple[LabelObject, str]]],
) -> None:
    cases = {
        ids[s.uid]: {
            "folder": s.folder.relative_to(root).as_posix(),
            "series_uid": s.uid,
            "label_objects": [o.path.relative_to(root).as_posix() for o, _ in by_series[s.uid]],
        }
        for s in series
    }
    note = "re-identifies the cases: keep it with the source data, not with shared manifests or runs"
    write_json_atomic(paths.case_map, {"note": note, "cases": cases})


def _write_manifest(paths: _Paths, results: list[CaseResult], roi_map: RoiMap, options: ImportOptions) -> Manifest:
    done = [r for r in results if r.status != "failed"]
    if not done:
        raise MedsegError(
            f"no case imported ({len(results)} failed; see {paths.report})"
            if results
            else f"no image series with {options.labels.upper()} labels found (see {paths.report})"
        )
    splits = assign_splits([r.case_id for r in done], options.val_fraction, options.test_fraction, options.seed)
    folder = paths.nifti.name
    modality = Counter(r.record["modality"] for r in done).most_common(1)[0][0]
    manifest = Manifest(
        name=paths.manifest.name.removesuffix(".json"),
        labels={"background": 0, **roi_map.values},
        cases=[
            Case(r.case_id, (f"{folder}/{r.case_id}_0000.nii.gz",), f"{folder}/{r.case_id}.nii.gz", splits[r.case_id])
            for r in done
        ],
        channel_names={"0": modality or "image"},
        description=f"imported from DICOM with {options.labels.upper()} labels (medseg data import-dicom, seed "
        f"{options.seed})",
    )
    manifest.save(paths.manifest)
    return manifest
