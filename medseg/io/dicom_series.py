"""DICOM series: discover them in a folder tree, read them into SimpleITK (validated by ``dicom_checks``).

Rules kept here:

- Slices are ordered by their position along the slice normal (row x column cosines of
  ImageOrientationPatient, dotted with ImagePositionPatient), never by file name or InstanceNumber.
- The z spacing is the step between slice positions, not SliceThickness (gapped 2D acquisitions have
  5 mm slices every 6.5 mm). Oblique orientations are kept in the image direction.
- Objects that are not image slices (RTSTRUCT, SEG, SR, KO, PR, RT plan/dose, DICOMDIR) are listed apart
  (``DicomScan.others``), never grouped into a series. Files without a SeriesInstanceUID (anonymised exports) are
  grouped by folder + StudyInstanceUID + FrameOfReferenceUID + orientation + matrix size, with a warning.
- No patient identifier (name, id, birth date, accession number) goes into ids, errors or logs: a series
  is named by its folder, or by a hash of its SeriesInstanceUID.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from medseg.errors import InputError
from medseg.io.dicom_case_ids import case_ids, identifier_tokens, uid_hash
from medseg.io.dicom_checks import placed, validate_series
from medseg.io.dicom_headers import (
    SeriesInfo,
    SliceHeader,
    effective_sop_class,
    non_image_reason,
    normal,
    slice_header,
    text,
)
from medseg.io.dicom_pixels import read_slice_pixels

log = logging.getLogger(__name__)

UID_LESS_NOTE = (
    "the files carry no SeriesInstanceUID: grouped into a series by folder, StudyInstanceUID, "
    "FrameOfReferenceUID, orientation and matrix size"
)
__all__ = ["DicomScan", "NonImageObject", "SeriesInfo", "SliceHeader", "discover_series", "read_series"]
__all__ += ["scan_dicom_folder", "validate_series"]


@dataclass(frozen=True)
class NonImageObject:
    """A DICOM file that is not an image slice (RTSTRUCT, SEG, SR, DICOMDIR, ...): prediction skips and lists it."""

    path: Path
    what: str  # e.g. "RT Structure Set Storage", "DICOMDIR (media directory)"
    modality: str
    series_uid: str
    name: str  # for listings: the path below the scanned folder, or a hash where the path names the patient


@dataclass(frozen=True)
class DicomScan:
    """Result of a folder scan: the image series, the non-image DICOM objects, and the files that are not DICOM."""

    series: list[SeriesInfo]
    skipped: tuple[Path, ...]
    others: tuple[NonImageObject, ...] = ()
    unreadable: tuple[tuple[Path, str], ...] = ()  # (file, cause), also in their series or in ``others``


@dataclass
class _Group:
    headers: list[SliceHeader]
    modality: str
    tokens: set[str]
    notes: dict[str, None]  # ordered set
    uid_missing: bool


def scan_dicom_folder(root: Path) -> DicomScan:
    """Read every file's header under ``root`` (recursively) and group the image slices by series."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "folder not found" if not root.exists() else "not a folder")
    groups: dict[str, _Group] = {}
    skipped: list[Path] = []
    others: list[NonImageObject] = []
    unreadable: list[tuple[Path, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():  # value warnings come again, into the case record, when it is read
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            skipped.append(path)
            continue
        except Exception as e:  # truncated or corrupt: fails the series of its folder (a dropped slice would mislead)
            unreadable.append((path, f"unreadable DICOM header ({type(e).__name__})"))
            continue
        sop_class, note = effective_sop_class(ds)
        series_uid = text(ds, "SeriesInstanceUID")
        reason = non_image_reason(ds, sop_class)
        if reason is not None:
            others.append(NonImageObject(path, reason, text(ds, "Modality"), series_uid, _listed_name(root, path, ds)))
            continue
        if not series_uid and not all(text(ds, k) for k in ("SOPInstanceUID", "Rows", "Columns")):
            unreadable.append(
                (path, "incomplete DICOM header (no SeriesInstanceUID, SOPInstanceUID or matrix size: truncated?)")
            )
            continue
        key = series_uid or _uid_less_key(path, ds)
        group = groups.setdefault(key, _Group([], text(ds, "Modality"), set(), {}, not series_uid))
        group.headers.append(slice_header(path, ds, sop_class))
        group.tokens |= identifier_tokens(ds)
        if note:
            group.notes[note] = None
    series = _series_of(groups, unreadable)
    claimed = {p for s in series for p, _ in s.unreadable}
    for path, cause in unreadable:  # in no series' folder: listed with the objects that are not scans
        if path not in claimed:
            others.append(NonImageObject(path, cause, "", "", path.relative_to(root).as_posix()))
    n_uid_less = sum(g.uid_missing for g in groups.values())
    if n_uid_less:
        log.warning("%s: %d series without SeriesInstanceUID; %s", root, n_uid_less, UID_LESS_NOTE.split(": ")[1])
    log.info(
        "%s: %d DICOM series, %d non-image objects and %d other files skipped",
        root,
        len(series),
        len(others),
        len(skipped),
    )
    return DicomScan(series=series, skipped=tuple(skipped), others=tuple(others), unreadable=tuple(unreadable))


def _listed_name(root: Path, path: Path, ds: pydicom.Dataset) -> str:
    """``path`` below ``root``, or ``object-<hash>`` where it contains a patient identifier fragment."""
    rel = path.relative_to(root).as_posix()
    if any(tok in rel.lower() for tok in identifier_tokens(ds)):
        return f"object-{uid_hash(text(ds, 'SOPInstanceUID') or rel)}"
    return rel


def _uid_less_key(path: Path, ds: pydicom.Dataset) -> str:
    """A stand-in series UID for a file without SeriesInstanceUID (a hash: the folder may name the patient)."""
    iop = tuple(round(float(x), 4) for x in (ds.get("ImageOrientationPatient") or ()))
    study, frame = text(ds, "StudyInstanceUID"), text(ds, "FrameOfReferenceUID")
    key = (str(path.parent), study, frame, iop, text(ds, "Rows"), text(ds, "Columns"), text(ds, "Modality"))
    return "uidless-" + hashlib.sha1(repr(key).encode()).hexdigest()[:20]


def _series_of(groups: dict[str, _Group], unreadable: list[tuple[Path, str]]) -> list[SeriesInfo]:
    ids = case_ids(
        {u: [h.path for h in g.headers] for u, g in groups.items()}, {u: g.tokens for u, g in groups.items()}
    )
    series = []
    for uid, g in groups.items():
        ordered = _sort_slices(g.headers)
        notes = ([UID_LESS_NOTE] if g.uid_missing else []) + list(g.notes)
        folders = {h.path.parent for h in g.headers}
        series.append(
            SeriesInfo(
                uid=uid,
                files=tuple(h.path for h in ordered),
                case_id=ids[uid],
                modality=g.modality,
                n_slices=len(ordered),
                slices=tuple(ordered),
                uid_missing=g.uid_missing,
                warnings=tuple(notes),
                unreadable=tuple((p, c) for p, c in unreadable if p.parent in folders),
                identifiers=frozenset(g.tokens),
            )
        )
    return sorted(series, key=lambda s: str(s.files[0]))


def discover_series(root: Path) -> list[SeriesInfo]:
    """All DICOM image series under ``root``, slices sorted along the normal; other files are skipped."""
    return scan_dicom_folder(root).series


def read_series(info: SeriesInfo) -> sitk.Image:
    """Validate, then read the series as a 3D image (rescale applied) with the scanner's geometry.

    Pixels are decoded by ``dicom_pixels.read_slice_pixels`` (pydicom's plugins; GDCM for the retired JPEG syntaxes);
    origin = first slice's ImagePositionPatient, spacing = (column spacing, row spacing, IPP step),
    direction columns = (row cosines, column cosines, slice normal) — oblique stacks stay oblique.
    """
    validate_series(info)
    planes = [_read_pixels(s) for s in info.slices]
    slopes = np.array([s.rescale[0] for s in info.slices])
    intercepts = np.array([s.rescale[1] for s in info.slices])
    volume = _rescale(planes, slopes, intercepts)
    image = sitk.GetImageFromArray(volume)
    first = info.slices[0]
    first_position, first_orientation, first_spacing = placed(first)
    n = normal(first_orientation)
    d = np.array([placed(s)[0] for s in info.slices]) @ n
    row, col = np.array(first_orientation[:3]), np.array(first_orientation[3:])
    image.SetOrigin(tuple(float(x) for x in first_position))
    image.SetSpacing((first_spacing[1], first_spacing[0], float(d[-1] - d[0]) / (len(d) - 1)))
    image.SetDirection(tuple(float(x) for x in np.column_stack([row, col, n]).ravel()))
    return image


def _sort_slices(headers: list[SliceHeader]) -> list[SliceHeader]:
    """Sort along the slice normal; unsortable series (no geometry) keep path order for validation."""
    ref = next((h.orientation for h in headers if h.orientation is not None), None)
    positions = [h.position for h in headers if h.position is not None]
    if ref is None or len(positions) < len(headers) or np.linalg.norm(np.cross(ref[:3], ref[3:])) < 0.5:
        return sorted(headers, key=lambda h: str(h.path))
    n = normal(ref)
    ordered = sorted(zip(headers, positions), key=lambda hp: (float(np.dot(n, hp[1])), str(hp[0].path)))
    return [h for h, _ in ordered]


def _read_pixels(s: SliceHeader) -> np.ndarray:
    return read_slice_pixels(s.path, s.rows, s.columns)


def _rescale(planes: list[np.ndarray], slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Stack planes applying per-slice slope/intercept; integer results stay integer (like ITK/GDCM)."""
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return np.stack(planes)
    volume = np.stack([p.astype(np.float64) * a + b for p, a, b in zip(planes, slopes, intercepts)])
    if np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts)):
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if volume.min() >= info.min and volume.max() <= info.max:
                return np.rint(volume).astype(dtype)
    return volume.astype(np.float32)
