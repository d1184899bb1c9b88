"""DICOM series: discover them in a folder tree, validate them, read them into SimpleITK, convert to NIfTI.

Rules kept here:

- Slices are ordered by their position along the slice normal (row x column cosines of
  ImageOrientationPatient, dotted with ImagePositionPatient), never by file name or InstanceNumber.
- The z spacing is the step between slice positions, not SliceThickness (gapped 2D acquisitions have
  5 mm slices every 6.5 mm). Oblique orientations are kept in the image direction.
- No patient identifier (name, id, birth date, accession number) goes into ids, errors or logs: a series
  is named by its folder, or by a hash of its SeriesInstanceUID.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medseg.errors import InputError
from medseg.io.dicom_case_ids import case_ids, identifier_tokens

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-4  # max |difference| of IOP components; some scanners differ by 1e-7
PIXEL_SPACING_TOLERANCE_MM = 1e-4
STEP_TOLERANCE_MM = 0.01  # also at least 0.1 % of the median step
MISSING_SLICE_FACTOR = 1.5  # a step longer than this x the median step means missing slices
# SOP classes that are not image slices (or are derived from them): RT structures/plans, SR, KOS,
# presentation states, SEG/registration/raw data, waveforms, encapsulated documents.
_NON_IMAGE_SOP_PREFIXES = (
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
)


@dataclass(frozen=True)
class SliceHeader:
    """What validation and reading need from one file's header (no patient data)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
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
    """One DICOM series: its files sorted along the slice normal, and a file-name-safe ``case_id``."""

    uid: str
    files: tuple[Path, ...]
    case_id: str
    modality: str
    n_slices: int
    slices: tuple[SliceHeader, ...] = field(repr=False)

    @property
    def folder(self) -> Path:
        """The folder holding the files (their deepest common folder)."""
        parents = {f.parent for f in self.files}
        if len(parents) == 1:
            return parents.pop()
        return Path(*_common_parts([p.parts for p in parents]))

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUIDs in slice order."""
        return [s.sop_instance_uid for s in self.slices]


@dataclass(frozen=True)
class DicomScan:
    """Result of a folder scan: the series found and the files skipped (not DICOM, or no series UID)."""

    series: list[SeriesInfo]
    skipped: tuple[Path, ...]


def scan_dicom_folder(root: Path) -> DicomScan:
    """Read every file's header under ``root`` (recursively) and group DICOM files by series."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "folder not found" if not root.exists() else "not a folder")
    by_uid: dict[str, list[SliceHeader]] = defaultdict(list)
    meta: dict[str, tuple[str, set[str]]] = {}  # uid -> (modality, identifier tokens)
    skipped: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            skipped.append(path)
            continue
        except Exception as e:  # truncated or corrupt DICOM: fail loudly, a dropped slice would mislead
            raise InputError(path, f"unreadable DICOM header ({type(e).__name__})") from e
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:  # DICOMDIR and other non-series objects
            skipped.append(path)
            continue
        by_uid[uid].append(_slice_header(path, ds))
        modality, tokens = meta.get(uid, (str(ds.get("Modality", "") or ""), set()))
        meta[uid] = (modality, tokens | identifier_tokens(ds))
    ids = case_ids({u: [h.path for h in hs] for u, hs in by_uid.items()}, {u: m[1] for u, m in meta.items()})
    series = []
    for uid, headers in by_uid.items():
        ordered = _sort_slices(headers)
        series.append(
            SeriesInfo(
                uid=uid,
                files=tuple(h.path for h in ordered),
                case_id=ids[uid],
                modality=meta[uid][0],
                n_slices=len(ordered),
                slices=tuple(ordered),
            )
        )
    series.sort(key=lambda s: str(s.files[0]))
    log.info("%s: %d DICOM series, %d other files skipped", root, len(series), len(skipped))
    return DicomScan(series=series, skipped=tuple(skipped))


def discover_series(root: Path) -> list[SeriesInfo]:
    """All DICOM series under ``root``, slices sorted along the normal; non-DICOM files are skipped."""
    return scan_dicom_folder(root).series


def validate_series(info: SeriesInfo) -> None:
    """Raise ``InputError`` (naming the file or folder) unless ``info`` is a regular stack of slices."""
    for s in info.slices:
        problem = _slice_problem(s)
        if problem:
            raise InputError(s.path, problem)
    if info.n_slices < 2:
        raise InputError(info.folder, f"fewer than 2 slices (found {info.n_slices}); a volume needs at least 2")
    _check_same_frame(info)
    _check_steps(info)


def _check_same_frame(info: SeriesInfo) -> None:
    """Every slice has the first slice's rows/columns, pixel spacing and orientation (within tolerance)."""
    first = info.slices[0]
    _, first_orientation, first_spacing = _placed(first)
    for s in info.slices[1:]:
        _, orientation, spacing = _placed(s)
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(
                s.path,
                f"mixed rows/columns in series: {s.rows}x{s.columns} here, "
                f"{first.rows}x{first.columns} in {first.path.name}",
            )
        if np.max(np.abs(np.subtract(spacing, first_spacing))) > PIXEL_SPACING_TOLERANCE_MM:
            raise InputError(
                s.path,
                f"mixed pixel spacing in series: {list(spacing)} here, {list(first_spacing)} in {first.path.name}",
            )
        dev = float(np.max(np.abs(np.subtract(orientation, first_orientation))))
        if dev > ORIENTATION_TOLERANCE:
            raise InputError(
                s.path,
                f"mixed orientations in series: ImageOrientationPatient differs from "
                f"{first.path.name} by up to {dev:.3g} (tolerance {ORIENTATION_TOLERANCE:g})",
            )


def _check_steps(info: SeriesInfo) -> None:
    """Slice positions along the normal: no duplicates, no gaps, even spacing, no in-plane shear."""
    normal = _normal(_placed(info.slices[0])[1])
    pos = np.array([_placed(s)[0] for s in info.slices])
    steps = np.diff(pos @ normal)
    names = [s.path.name for s in info.slices]
    tol = max(STEP_TOLERANCE_MM, 1e-3 * float(np.median(steps)))
    if np.any(steps <= tol):
        i = int(np.argmin(steps))
        raise InputError(
            info.folder,
            f"duplicate slice positions: {names[i]} and {names[i + 1]} lie at the "
            "same position along the slice normal (several echoes, phases or "
            "time points in one series?)",
        )
    median = float(np.median(steps))
    if np.any(steps > MISSING_SLICE_FACTOR * median):
        i = int(np.argmax(steps))
        raise InputError(
            info.folder,
            f"missing slice(s): a gap of {steps[i]:.4g} mm between {names[i]} and "
            f"{names[i + 1]} is {steps[i] / median:.2g}x the median step "
            f"{median:.4g} mm",
        )
    if np.any(np.abs(steps - median) > tol):
        i = int(np.argmax(np.abs(steps - median)))
        raise InputError(
            info.folder,
            f"inconsistent slice spacing: step {steps[i]:.4g} mm between {names[i]} and "
            f"{names[i + 1]}, median {median:.4g} mm (tolerance {tol:.2g} mm)",
        )
    lateral = np.linalg.norm(np.diff(pos, axis=0) - np.outer(steps, normal), axis=1)
    if np.any(lateral > tol):
        raise InputError(
            info.folder,
            f"sheared stack: slice positions shift up to {lateral.max():.3g} mm within "
            "the slice plane (gantry tilt?); resample it before use",
        )


def read_series(info: SeriesInfo) -> sitk.Image:
    """Validate, then read the series as a 3D image (rescale applied) with the scanner's geometry.

    Pixels are decoded by pydicom (its pylibjpeg/pyjpegls plugins handle JPEG, JPEG-LS, JPEG 2000, RLE);
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
    first_position, first_orientation, first_spacing = _placed(first)
    normal = _normal(first_orientation)
    d = np.array([_placed(s)[0] for s in info.slices]) @ normal
    row, col = np.array(first_orientation[:3]), np.array(first_orientation[3:])
    image.SetOrigin(tuple(float(x) for x in first_position))
    image.SetSpacing((first_spacing[1], first_spacing[0], float(d[-1] - d[0]) / (len(d) - 1)))
    image.SetDirection(tuple(float(x) for x in np.column_stack([row, col, normal]).ravel()))
    return image


# --- helpers -----------------------------------------------------------------------------------------


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
        out = tuple(float(x) for x in value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and len(out) == n and all(np.isfinite(out)) else None


def _float(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _int(ds: pydicom.Dataset, keyword: str, default: int | None) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _slice_header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    return SliceHeader(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
        position=_floats(ds, "ImagePositionPatient", 3),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        rows=_int(ds, "Rows", None),
        columns=_int(ds, "Columns", None),
        pixel_spacing=_floats(ds, "PixelSpacing", 2),
        n_frames=_int(ds, "NumberOfFrames", 1) or 1,
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1) or 1,
        rescale=(_float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0)),
    )


def _placed(s: SliceHeader) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(position, orientation, pixel spacing) of a slice that ``_slice_problem`` has accepted."""
    if s.position is None or s.orientation is None or s.pixel_spacing is None:
        raise InputError(
            s.path,
            "missing ImagePositionPatient, ImageOrientationPatient or PixelSpacing; cannot place the slice in space",
        )
    return s.position, s.orientation, s.pixel_spacing


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def _sort_slices(headers: list[SliceHeader]) -> list[SliceHeader]:
    """Sort along the slice normal; unsortable series (no geometry) keep path order for validation."""
    ref = next((h.orientation for h in headers if h.orientation is not None), None)
    positions = [h.position for h in headers if h.position is not None]
    if ref is None or len(positions) < len(headers) or np.linalg.norm(np.cross(ref[:3], ref[3:])) < 0.5:
        return sorted(headers, key=lambda h: str(h.path))
    normal = _normal(ref)
    placed = sorted(zip(headers, positions), key=lambda hp: (float(np.dot(normal, hp[1])), str(hp[0].path)))
    return [h for h, _ in placed]


def _slice_problem(s: SliceHeader) -> str | None:
    if s.sop_class_uid.startswith(_NON_IMAGE_SOP_PREFIXES):
        return f"non-image object ({UID(s.sop_class_uid).name}); a series must hold image slices only"
    if s.n_frames > 1:
        return f"multi-frame object (NumberOfFrames={s.n_frames}); only single-frame slices are supported"
    if s.rows is None or s.columns is None:
        return "non-image object (no Rows/Columns, so no pixel data)"
    if s.samples_per_pixel != 1:
        return f"colour image (SamplesPerPixel={s.samples_per_pixel}); only greyscale series are supported"
    missing = [
        k
        for k, v in (
            ("ImagePositionPatient", s.position),
            ("ImageOrientationPatient", s.orientation),
            ("PixelSpacing", s.pixel_spacing),
        )
        if v is None
    ]
    if missing or s.orientation is None or s.pixel_spacing is None:
        return f"missing or malformed {', '.join(missing)}; cannot place the slice in space"
    row, col = np.array(s.orientation[:3]), np.array(s.orientation[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        return "ImageOrientationPatient is not two orthogonal unit vectors"
    if min(s.pixel_spacing) <= 0:
        return f"non-positive PixelSpacing {list(s.pixel_spacing)}"
    return None


def _read_pixels(s: SliceHeader) -> np.ndarray:
    try:
        ds = pydicom.dcmread(s.path)
    except Exception as e:
        raise InputError(s.path, f"unreadable DICOM file ({type(e).__name__})") from e
    if "PixelData" not in ds:
        raise InputError(s.path, "non-image object (no PixelData)")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        raise InputError(
            s.path,
            f"cannot decode pixel data ({UID(str(syntax)).name}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        ) from e
    if pixels.shape != (s.rows, s.columns):
        raise InputError(s.path, f"pixel data shape {pixels.shape} != Rows x Columns ({s.rows}, {s.columns})")
    return pixels


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


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return tuple(out)
