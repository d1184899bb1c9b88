"""What medseg reads from a DICOM file's header: the slice geometry, and whether the file is an image slice at all.

PACS exports mix image series with objects that are not scans (RT structures, plans and doses, SEG, SR, key
object notes, presentation states, DICOMDIR): ``non_image_reason`` names them so a batch can skip and list them
instead of failing them. Anonymisers blank UIDs: ``effective_sop_class`` derives an empty SOPClassUID from the file
meta or, for single-frame CT/MR/PT slices, from Modality. No patient attribute is kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

# SOP classes that are not image slices (or are derived from them): RT structures/plans, SR, KOS,
# presentation states, SEG/registration/raw data, waveforms, encapsulated documents.
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, SEG, surface SEG
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT structure set
    "1.2.840.10008.5.1.4.1.1.481.4",  # RT beams treatment record
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT plan
    "1.2.840.10008.5.1.4.1.1.481.",  # other RT objects (ion plans, records, ...)
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
)
# Modalities of objects that carry no image slice (used when the SOP class is blank or unknown).
NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "SR", "KO", "PR", "REG", "FID", "DOC", "RWV", "PLAN", "AU"}
)
# Single-frame image storage classes an empty SOPClassUID may safely be derived to (by Modality).
SOP_CLASS_OF_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
}
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class SliceHeader:
    """What validation and reading need from one file's header (no patient data)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str  # as derived by ``effective_sop_class``
    position: tuple[float, ...] | None  # ImagePositionPatient (3)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6)
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, ...] | None  # (row spacing, column spacing) in mm
    n_frames: int
    samples_per_pixel: int
    rescale: tuple[float, float]  # (slope, intercept)


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series: its files sorted along the slice normal, and a file-name-safe ``case_id``.

    ``uid`` is the SeriesInstanceUID, or for files that carry none (``uid_missing``) a stable stand-in made from
    the grouping key; ``warnings`` are notes about the series' headers for the case record (no patient data);
    ``unreadable`` files in its folder may be its own slices, so they fail the series (``validate_series``).
    """

    uid: str
    files: tuple[Path, ...]
    case_id: str
    modality: str
    n_slices: int
    slices: tuple[SliceHeader, ...] = field(repr=False)
    uid_missing: bool = False
    warnings: tuple[str, ...] = ()
    unreadable: tuple[tuple[Path, str], ...] = ()  # (file, cause): unreadable DICOM files in the series' folder
    identifiers: frozenset[str] = field(default=frozenset(), repr=False, compare=False)  # redact_identifiers' tokens

    @property
    def folder(self) -> Path:
        """The folder holding the files (their deepest common folder)."""
        parents = {f.parent for f in self.files}
        if len(parents) == 1:
            return parents.pop()
        return Path(*common_parts([p.parts for p in parents]))

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUIDs in slice order."""
        return [s.sop_instance_uid for s in self.slices]


def common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The longest common prefix of path parts."""
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return tuple(out)


def text(ds: pydicom.Dataset, keyword: str) -> str:
    """A header value as a stripped string ('' when absent or empty)."""
    return str(ds.get(keyword, "") or "").strip()


def effective_sop_class(ds: pydicom.Dataset) -> tuple[str, str | None]:
    """(SOPClassUID, note): the header's, else the file meta's MediaStorageSOPClassUID, else derived from
    Modality for single-frame CT/MR/PT slices with a pixel matrix; the note says what was derived (or None)."""
    uid = text(ds, "SOPClassUID")
    if uid:
        return uid, None
    meta = text(getattr(ds, "file_meta", pydicom.Dataset()), "MediaStorageSOPClassUID")
    if meta:
        return meta, f"empty SOPClassUID: took {UID(meta).name} from the file meta information"
    modality = text(ds, "Modality").upper()
    single_frame = (int_of(ds, "NumberOfFrames", 1) or 1) == 1
    if modality in SOP_CLASS_OF_MODALITY and single_frame and "Rows" in ds and "Columns" in ds:
        derived = SOP_CLASS_OF_MODALITY[modality]
        return derived, f"empty SOPClassUID: derived {UID(derived).name} from Modality {modality}"
    return "", None


def non_image_reason(ds: pydicom.Dataset, sop_class_uid: str) -> str | None:
    """What the file is, if it is not an image slice (RTSTRUCT, SEG, SR, DICOMDIR, ...); None for image slices."""
    meta = text(getattr(ds, "file_meta", pydicom.Dataset()), "MediaStorageSOPClassUID")
    if meta == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "DICOMDIR (media directory)"
    if sop_class_uid.startswith(NON_IMAGE_SOP_PREFIXES):
        return UID(sop_class_uid).name
    modality = text(ds, "Modality").upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"{modality} object ({UID(sop_class_uid).name if sop_class_uid else 'no SOPClassUID'})"
    return None


def floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats of a multi-valued attribute, or None when absent or malformed."""
    try:
        value = ds.get(keyword)
        out = tuple(float(x) for x in value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and len(out) == n and all(np.isfinite(out)) else None


def float_of(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    """A numeric attribute, or ``default`` when absent or malformed."""
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def int_of(ds: pydicom.Dataset, keyword: str, default: int | None) -> int | None:
    """An integer attribute, or ``default`` when absent or malformed."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def slice_header(path: Path, ds: pydicom.Dataset, sop_class_uid: str) -> SliceHeader:
    """The geometry and pixel layout of one image file (``sop_class_uid`` from ``effective_sop_class``)."""
    return SliceHeader(
        path=path,
        sop_instance_uid=text(ds, "SOPInstanceUID"),
        sop_class_uid=sop_class_uid,
        position=floats(ds, "ImagePositionPatient", 3),
        orientation=floats(ds, "ImageOrientationPatient", 6),
        rows=int_of(ds, "Rows", None),
        columns=int_of(ds, "Columns", None),
        pixel_spacing=floats(ds, "PixelSpacing", 2),
        n_frames=int_of(ds, "NumberOfFrames", 1) or 1,
        samples_per_pixel=int_of(ds, "SamplesPerPixel", 1) or 1,
        rescale=(float_of(ds, "RescaleSlope", 1.0), float_of(ds, "RescaleIntercept", 0.0)),
    )


def normal(orientation: tuple[float, ...]) -> np.ndarray:
    """The unit slice normal (row cosines x column cosines)."""
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)
