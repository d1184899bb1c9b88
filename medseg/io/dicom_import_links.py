"""For ``medseg data import-dicom``: find the label objects (RTSTRUCT, DICOM-SEG) under a folder with an own header
walk, and link each to its image series.

The walk does not rely on ``scan_dicom_folder`` listing or hiding non-image objects: every file's header is read
(``stop_before_pixels``) and RTSTRUCT / SEG objects are recognised by Modality or SOPClassUID. A label object is
linked to the image series its references name (RTSTRUCT: ReferencedFrameOfReferenceSequence /
RTReferencedStudySequence / RTReferencedSeriesSequence; SEG: ReferencedSeriesSequence), else to the one series
whose FrameOfReferenceUID it names; never by folder name. The walk also gathers the patient identifier fragments
per top-level folder, only to keep them out of case ids and printed paths.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medseg.errors import InputError
from medseg.io.dicom_case_ids import identifier_tokens
from medseg.io.dicom_series import SeriesInfo, scan_dicom_folder

SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.481.3": "rtstruct",  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7": "seg",  # Label Map Segmentation Storage
}
MODALITIES = {"RTSTRUCT": "rtstruct", "SEG": "seg"}
_FIRST_PASS_TAGS = ["Modality", "SOPClassUID", "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"]
REDACTED = "<redacted>"


@dataclass(frozen=True)
class LabelObject:
    """An RTSTRUCT or SEG file: what it references and the ROI / segment names it holds."""

    path: Path
    kind: str  # "rtstruct" or "seg"
    referenced_series: tuple[str, ...]
    frames_of_reference: tuple[str, ...]
    names: tuple[str, ...]  # ROI names (RTSTRUCT) or segment labels (SEG)
    segment_numbers: tuple[int, ...] = ()  # SEG: the number of each name


@dataclass
class FolderIndex:
    """What the header walk found under ``root``: label objects and identifier fragments (kept in memory only)."""

    root: Path
    objects: list[LabelObject] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # label objects whose references cannot be read
    tokens_by_top: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @property
    def tokens(self) -> set[str]:
        """All identifier fragments found under ``root``."""
        return set().union(*self.tokens_by_top.values())

    def shown(self, path: str | Path) -> str:
        """``path`` below ``root`` for printing, with every part that holds a patient identifier redacted."""
        p = Path(path)
        try:
            rel = p.resolve().relative_to(self.root.resolve())
        except ValueError:
            return str(path)
        tokens = self.tokens
        return "/".join(REDACTED if any(t in part.lower() for t in tokens) else part for part in rel.parts) or "."


@dataclass
class Links:
    """Label objects per image series UID (with how each was linked), and the label objects linked to none."""

    by_series: dict[str, list[tuple[LabelObject, str]]]
    unlinked: list[tuple[LabelObject, str]]


@dataclass
class SeriesScan:
    """The image series under a folder, the files skipped (not DICOM), and the folders that could not be scanned."""

    series: list[SeriesInfo]
    skipped: int
    broken: list[InputError]


def scan_image_series(root: Path) -> SeriesScan:
    """``scan_dicom_folder`` over ``root``, keeping image series only; files that cannot be read (a truncated
    RTSTRUCT or slice) are reported in ``broken``, and a series whose folder holds one is left out."""
    scan = scan_dicom_folder(Path(root))
    broken = [InputError(path, cause) for path, cause in scan.unreadable]
    series = [s for s in scan.series if not s.unreadable]  # the scan lists non-image objects apart, never as series
    return SeriesScan(series, len(scan.skipped), broken)


def index_folder(root: Path) -> FolderIndex:
    """Walk every file under ``root``; collect RTSTRUCT / SEG objects and identifier fragments per top folder."""
    root = Path(root)
    index = FolderIndex(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_FIRST_PASS_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError):
            continue  # not DICOM, or broken: the folder scan of the image series reports it
        rel = path.relative_to(root).parts
        index.tokens_by_top[rel[0] if len(rel) > 1 else "."] |= identifier_tokens(head)
        kind = SOP_CLASSES.get(str(head.get("SOPClassUID", "")), MODALITIES.get(str(head.get("Modality", ""))))
        if kind is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            index.objects.append(_label_object(path, kind, ds))
        except Exception as e:  # a broken label object is reported; the other cases go on
            index.unreadable.append((path, f"unreadable {kind.upper()} header ({type(e).__name__})"))
    return index


def _label_object(path: Path, kind: str, ds: pydicom.Dataset) -> LabelObject:
    if kind == "rtstruct":
        frames = [f for f in ds.get("ReferencedFrameOfReferenceSequence", [])]
        series = [
            str(s.get("SeriesInstanceUID", ""))
            for f in frames
            for st in f.get("RTReferencedStudySequence", [])
            for s in st.get("RTReferencedSeriesSequence", [])
        ]
        frame_uids = [str(f.get("FrameOfReferenceUID", "")) for f in frames]
        frame_uids += [str(r.get("ReferencedFrameOfReferenceUID", "")) for r in ds.get("StructureSetROISequence", [])]
        names = [
            str(r.get("ROIName", "") or f"ROI {r.get('ROINumber', '?')}") for r in ds.get("StructureSetROISequence", [])
        ]
        numbers: list[int] = []
    else:
        series = [str(s.get("SeriesInstanceUID", "")) for s in ds.get("ReferencedSeriesSequence", [])]
        frame_uids = [str(ds.get("FrameOfReferenceUID", ""))]
        segments = list(ds.get("SegmentSequence", []))
        names = [str(s.get("SegmentLabel", "") or f"segment {s.SegmentNumber}") for s in segments]
        numbers = [int(s.SegmentNumber) for s in segments]
    return LabelObject(
        path,
        kind,
        tuple(dict.fromkeys(s for s in series if s)),
        tuple(dict.fromkeys(f for f in frame_uids if f)),
        tuple(names),
        tuple(numbers),
    )


def frame_of_reference(info: SeriesInfo) -> str:
    """The FrameOfReferenceUID of a series (its first file's), '' if it has none."""
    ds = pydicom.dcmread(info.files[0], stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"])
    return str(ds.get("FrameOfReferenceUID", "") or "")


def link_label_objects(objects: list[LabelObject], series: list[SeriesInfo], frames: dict[str, str]) -> Links:
    """Link each label object to one image series: by referenced series UID, else by a frame of reference that
    names exactly one series. ``frames``: series UID -> its FrameOfReferenceUID."""
    known = {s.uid for s in series}
    by_frame: dict[str, list[str]] = defaultdict(list)
    for s in series:
        if frames.get(s.uid):
            by_frame[frames[s.uid]].append(s.uid)
    links = Links(defaultdict(list), [])
    for obj in objects:
        named = [uid for uid in obj.referenced_series if uid in known]
        if len(named) == 1:
            links.by_series[named[0]].append((obj, "series"))
            continue
        if len(named) > 1:
            links.unlinked.append((obj, f"references {len(named)} image series; a label object must name one"))
            continue
        candidates = sorted({uid for f in obj.frames_of_reference for uid in by_frame.get(f, [])})
        if len(candidates) == 1:
            links.by_series[candidates[0]].append((obj, "frame of reference"))
        else:
            links.unlinked.append((obj, _unlinked_reason(obj, len(candidates))))
    return links


def _unlinked_reason(obj: LabelObject, n_by_frame: int) -> str:
    refs = "its referenced series is not" if obj.referenced_series else "it references no series that is"
    if n_by_frame == 0:
        return f"{refs} among the image series found, and no image series is in its frame of reference"
    return f"{refs} among the image series found, and its frame of reference holds {n_by_frame} image series"
