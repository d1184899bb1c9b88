"""RTSTRUCT contours -> voxel masks on an image series' own grid, placed by their patient coordinates.

Why not rt-utils' reader: it puts each contour on the slice that its ContourImageSequence names by
SOPInstanceUID (``rt_utils/image_helper.py::get_slice_contour_data``), and real exports break those links (the
IBSI sarcoma RTSTRUCTs reference SOPInstanceUIDs that are not in their CT series). Here a contour is placed by
its ContourData (LPS mm) through the series' geometry, once its ROI's ReferencedFrameOfReferenceUID has been
checked against the series' FrameOfReferenceUID; ContourImageSequence is never read. A contour plane more than
``plane_tolerance_mm`` off the nearest slice position is an ``InputError`` naming the RTSTRUCT.

Fill rule (the boundary convention): a voxel belongs to an ROI when its *centre* lies inside the polygons of its
plane, even-odd rule (each polygon toggles the voxels it covers, so several polygons on one plane make holes and
islands). A centre exactly on an edge is decided as if it sat a hair (``EDGE_NUDGE``) towards +column and, by an
irrational fraction of that, +row: on an axis-aligned polygon the top and left edges are in, the bottom and right
ones out (the "top-left" rule of scan-line rasterisers), and as the nudge is parallel to no edge between lattice
points, two polygons sharing an edge (any slope) never both claim, nor both miss, the centres on it. A square
with corners on voxel centres (2, 2)-(5, 5) holds the 3 x 3 voxels 2..4: its area.

Why matplotlib's ``Path.contains_points`` (a kept dependency) and not ``cv2.fillPoly`` or PIL ``ImageDraw``:
those two fill every pixel the outline touches. Measured on the 18 IBSI cases, cv2/PIL masks hold 4-13 % more
voxels than the publisher's rasterisation (Dice 0.94-0.98); the centre-inside test reproduces it voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as PolygonPath

from medseg.errors import InputError

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
AREA_TYPES = frozenset({"CLOSED_PLANAR", "CLOSED_PLANAR_XOR"})  # contours that enclose an area
# Voxels. Far above the round-off of the index transform (~1e-12), and small: the IBSI contours have vertices within
# 2e-4 voxel of voxel centres, which the publisher's rasterisation resolves literally (a nudge of 1e-3 moves 44 voxels).
EDGE_NUDGE = 1e-6
_NUDGE = np.array([1.0, (np.sqrt(5.0) - 1.0) / 2.0]) * EDGE_NUDGE  # (column, row); the row part irrational
PLANE_TOLERANCE_FRACTION = 0.1  # of the slice step: contour planes within this of a slice position are on it
PLANE_TOLERANCE_MIN_MM = 0.01


@dataclass(frozen=True)
class RoiInfo:
    """One ROI of a structure set: its number, name and the frame of reference it is drawn in."""

    number: int
    name: str
    frame_of_reference_uid: str


@dataclass(frozen=True)
class StructureSet:
    """An RTSTRUCT's ROIs and references; contours are parsed per ROI when one is rasterised."""

    path: Path
    rois: tuple[RoiInfo, ...]
    referenced_series: tuple[str, ...]  # RTReferencedSeriesSequence SeriesInstanceUIDs
    frames_of_reference: tuple[str, ...]  # ReferencedFrameOfReferenceSequence FrameOfReferenceUIDs
    contour_items: dict[int, Sequence[Any]]  # ROI number -> its ContourSequence items


@dataclass(frozen=True)
class Grid:
    """Voxel grid of an image series: continuous index (column i, row j, slice k) <-> patient LPS mm."""

    origin: np.ndarray  # (3,) centre of voxel (0, 0, 0)
    matrix: np.ndarray  # (3, 3) columns: the steps (mm) along i, j and k
    size: tuple[int, int, int]  # (columns, rows, slices), SimpleITK's GetSize()
    frame_of_reference_uid: str

    @classmethod
    def of_image(cls, image: sitk.Image, frame_of_reference_uid: str) -> Grid:
        """The grid of a 3D SimpleITK image (e.g. ``read_series``) in the given frame of reference."""
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        matrix = direction @ np.diag(image.GetSpacing())
        size = tuple(int(n) for n in image.GetSize())
        return cls(
            np.array(image.GetOrigin(), dtype=float), matrix, (size[0], size[1], size[2]), frame_of_reference_uid
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (slices, rows, columns), the order of ``sitk.GetArrayFromImage``."""
        return self.size[2], self.size[1], self.size[0]

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) LPS mm -> (n, 3) continuous (i, j, k) indices."""
        return np.linalg.solve(self.matrix, (np.asarray(points, dtype=float) - self.origin).T).T


@dataclass
class RoiMask:
    """A rasterised ROI: mask (slices, rows, columns) and notes (ignored or clipped contours)."""

    mask: np.ndarray
    notes: list[str]


def read_structure_set(path: Path) -> StructureSet:
    """Read an RTSTRUCT's ROIs and references; ``InputError`` naming the file when it is not a usable one."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise InputError(path, f"unreadable RTSTRUCT ({type(e).__name__})") from e
    if str(ds.get("Modality", "")) != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
        raise InputError(path, "not an RTSTRUCT (Modality / SOPClassUID)")
    for keyword in ("StructureSetROISequence", "ROIContourSequence"):  # type 1; pydicom reads truncated files
        if keyword not in ds:  # without complaint, so a missing one is also how a cut-off file shows
            raise InputError(path, f"unreadable RTSTRUCT: no {keyword} (truncated or incomplete file?)")
    frames = tuple(str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", []))
    series = tuple(
        str(s.get("SeriesInstanceUID", ""))
        for f in ds.get("ReferencedFrameOfReferenceSequence", [])
        for st in f.get("RTReferencedStudySequence", [])
        for s in st.get("RTReferencedSeriesSequence", [])
    )
    default_frame = frames[0] if len(set(frames)) == 1 else ""
    rois = []
    for item in ds.StructureSetROISequence:
        try:
            number = int(item.ROINumber)
        except (AttributeError, TypeError, ValueError):
            raise InputError(path, "unreadable RTSTRUCT: a StructureSetROISequence item has no ROINumber") from None
        frame = str(item.get("ReferencedFrameOfReferenceUID", "") or default_frame)
        rois.append(RoiInfo(number, str(item.get("ROIName", "") or f"ROI {number}"), frame))
    contours: dict[int, Sequence[Any]] = {}
    for item in ds.get("ROIContourSequence", []):
        ref = item.get("ReferencedROINumber")
        if ref is not None:
            contours[int(ref)] = list(contours.get(int(ref), [])) + list(item.get("ContourSequence", []))
    return StructureSet(path, tuple(rois), tuple(s for s in series if s), tuple(f for f in frames if f), contours)


def rasterise_roi(structure: StructureSet, roi: RoiInfo, grid: Grid) -> RoiMask:
    """Voxel mask of one ROI on ``grid`` (centre-inside, even-odd); ``InputError`` for contours off the slices.

    Contours that enclose no area (POINT, OPEN_PLANAR, OPEN_NONPLANAR, fewer than 3 points) are left out with a
    note; polygons reaching beyond the image are clipped to it with a note.
    """
    path = structure.path
    if roi.frame_of_reference_uid != grid.frame_of_reference_uid:
        what = "names no frame of reference" if not roi.frame_of_reference_uid else "is drawn in another frame"
        raise InputError(path, f"ROI {roi.name!r} {what} than the image series' (FrameOfReferenceUID differs)")
    planes: dict[int, list[np.ndarray]] = {}
    skipped: dict[str, int] = {}
    clipped = 0
    for n, item in enumerate(structure.contour_items.get(roi.number, []), start=1):
        kind = str(item.get("ContourGeometricType", "") or "").upper()
        points = _contour_points(path, roi, n, item)
        if kind not in AREA_TYPES or len(points) < 3:
            label = kind if kind not in AREA_TYPES else "degenerate (< 3 points)"
            skipped[label] = skipped.get(label, 0) + 1
            continue
        ijk = grid.to_index(points)
        k = _plane_index(path, roi, n, ijk[:, 2], grid)
        lo, hi = ijk[:, :2].min(axis=0), ijk[:, :2].max(axis=0)
        clipped += int(np.any(lo < -0.5) or hi[0] > grid.size[0] - 0.5 or hi[1] > grid.size[1] - 0.5)
        planes.setdefault(k, []).append(ijk[:, :2])
    mask = np.zeros(grid.shape, dtype=bool)
    for k, polygons in planes.items():
        mask[k] = fill_polygons(polygons, grid.shape[1:])
    notes = [f"ROI {roi.name!r}: {count} {kind} contour(s) ignored (no area)" for kind, count in skipped.items()]
    if clipped:
        notes.append(f"ROI {roi.name!r}: {clipped} contour(s) reach beyond the image and were clipped to it")
    return RoiMask(mask, notes)


def fill_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(rows, columns) mask of the voxel centres inside ``polygons`` ((n, 2) column/row indices), even-odd rule."""
    rows, cols = shape
    plane = np.zeros(shape, dtype=bool)
    for xy in polygons:
        lo = np.maximum(np.floor(xy.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(xy.max(axis=0)).astype(int), (cols - 1, rows - 1))
        if np.any(hi < lo):
            continue  # wholly outside the image
        ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
        centres = np.column_stack([ii.ravel(), jj.ravel()]).astype(float) + _NUDGE
        inside = PolygonPath(xy).contains_points(centres).reshape(ii.shape)
        plane[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] ^= inside
    return plane


def plane_tolerance_mm(grid: Grid) -> float:
    """How far (mm) a contour plane may lie from a slice position and still be on that slice."""
    return max(PLANE_TOLERANCE_MIN_MM, PLANE_TOLERANCE_FRACTION * float(np.linalg.norm(grid.matrix[:, 2])))


def _contour_points(path: Path, roi: RoiInfo, n: int, item: Any) -> np.ndarray:
    raw = item.get("ContourData")
    try:
        values = np.array([float(v) for v in (raw if raw is not None else [])], dtype=float)
    except (TypeError, ValueError):
        raise InputError(path, f"ROI {roi.name!r} contour #{n}: ContourData is not numeric") from None
    if values.size % 3 or not np.all(np.isfinite(values)):
        raise InputError(path, f"ROI {roi.name!r} contour #{n}: ContourData is not (x, y, z) triples of numbers")
    declared = item.get("NumberOfContourPoints")
    if declared not in (None, "") and int(declared) != values.size // 3:
        raise InputError(
            path,
            f"ROI {roi.name!r} contour #{n}: NumberOfContourPoints is {int(declared)} but ContourData holds "
            f"{values.size // 3} points (truncated file?)",
        )
    return values.reshape(-1, 3)


def _plane_index(path: Path, roi: RoiInfo, n: int, k: np.ndarray, grid: Grid) -> int:
    """The slice a contour lies on; ``InputError`` if its points are off every slice plane or beyond the stack."""
    step = float(np.linalg.norm(grid.matrix[:, 2]))
    nearest = int(np.rint(np.median(k)))
    off_mm = float(np.max(np.abs(k - nearest))) * step
    tolerance = plane_tolerance_mm(grid)
    if off_mm > tolerance:
        raise InputError(
            path,
            f"ROI {roi.name!r} contour #{n} is off the slice planes: its points lie up to {off_mm:.3g} mm from the "
            f"nearest slice position (tolerance {tolerance:.3g} mm; slice step {step:.4g} mm)",
        )
    if not 0 <= nearest < grid.size[2]:
        raise InputError(
            path,
            f"ROI {roi.name!r} contour #{n} lies {min(abs(nearest), abs(nearest - grid.size[2] + 1))} slice(s) "
            f"beyond the image series' {grid.size[2]} slices",
        )
    return nearest
