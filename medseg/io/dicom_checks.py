"""Is a DICOM series a regular stack of slices? One ``InputError`` naming the file or folder when it is not.

Checks every slice (image object, single frame, greyscale, placed in space), then the stack: same matrix,
pixel spacing and orientation on every slice; slice positions along the normal without duplicates, gaps,
uneven steps or in-plane shear.
"""

from __future__ import annotations

import numpy as np
from pydicom.uid import UID

from medseg.errors import InputError
from medseg.io.dicom_headers import NON_IMAGE_SOP_PREFIXES, SeriesInfo, SliceHeader, normal

ORIENTATION_TOLERANCE = 1e-4  # max |difference| of IOP components; some scanners differ by 1e-7
PIXEL_SPACING_TOLERANCE_MM = 1e-4
STEP_TOLERANCE_MM = 0.01  # also at least 0.1 % of the median step
MISSING_SLICE_FACTOR = 1.5  # a step longer than this x the median step means missing slices


def validate_series(info: SeriesInfo) -> None:
    """Raise ``InputError`` (naming the file or folder) unless ``info`` is a regular stack of slices."""
    for path, cause in info.unreadable:  # a truncated slice of this series would otherwise be a silent gap
        raise InputError(path, f"{cause}; it lies in this series' folder, so the series may be incomplete")
    for s in info.slices:
        problem = slice_problem(s)
        if problem:
            raise InputError(s.path, problem)
    if info.n_slices < 2:
        raise InputError(info.folder, f"fewer than 2 slices (found {info.n_slices}); a volume needs at least 2")
    _check_same_frame(info)
    _check_steps(info)


def _check_same_frame(info: SeriesInfo) -> None:
    """Every slice has the first slice's rows/columns, pixel spacing and orientation (within tolerance)."""
    first = info.slices[0]
    _, first_orientation, first_spacing = placed(first)
    for s in info.slices[1:]:
        _, orientation, spacing = placed(s)
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
    n = normal(placed(info.slices[0])[1])
    pos = np.array([placed(s)[0] for s in info.slices])
    steps = np.diff(pos @ n)
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
    lateral = np.linalg.norm(np.diff(pos, axis=0) - np.outer(steps, n), axis=1)
    if np.any(lateral > tol):
        raise InputError(
            info.folder,
            f"sheared stack: slice positions shift up to {lateral.max():.3g} mm within "
            "the slice plane (gantry tilt?); resample it before use",
        )


def placed(s: SliceHeader) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(position, orientation, pixel spacing) of a slice that ``slice_problem`` has accepted."""
    if s.position is None or s.orientation is None or s.pixel_spacing is None:
        raise InputError(
            s.path,
            "missing ImagePositionPatient, ImageOrientationPatient or PixelSpacing; cannot place the slice in space",
        )
    return s.position, s.orientation, s.pixel_spacing


def slice_problem(s: SliceHeader) -> str | None:
    """Why one slice cannot be part of a volume, or None."""
    if s.sop_class_uid.startswith(NON_IMAGE_SOP_PREFIXES):
        return f"non-image object ({UID(s.sop_class_uid).name}); a series must hold image slices only"
    if s.n_frames > 1:
        what = UID(s.sop_class_uid).name if s.sop_class_uid else "multi-frame object"
        return (
            f"{what} with {s.n_frames} frames: enhanced / multi-frame images are not read yet; export the series "
            "as single-frame slices (e.g. the PACS's 'classic' export, or dcmtk/dicom3tools emf2sf)"
        )
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
