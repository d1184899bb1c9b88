"""For ``medseg data import-dicom``: one case's label map from its RTSTRUCT / DICOM-SEG objects, on the image
series' own grid, with the per-case report (labels found, unmatched ROIs, labels without ROI, empty ROIs,
contested voxels).

RTSTRUCT contours are rasterised by ``rtstruct_raster`` (placed by patient coordinates). DICOM-SEGs are read with
``dicom_seg.read_dicom_seg`` (frames aligned by their source SOPInstanceUIDs); where that cannot align them (no
references to the series' instances, or frames that do not state SpatialLocationsPreserved, as dcmqi writes
them), the frames are placed by their patient positions instead, with highdicom's ``Volume.match_geometry``
onto the series grid (same frame of reference required).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io.dicom_import_links import LabelObject
from medseg.io.dicom_seg import read_dicom_seg
from medseg.io.dicom_series import SeriesInfo
from medseg.io.roi_map import LabelVolume, RoiMap
from medseg.io.rtstruct_raster import Grid, rasterise_roi, read_structure_set


@dataclass
class CaseLabels:
    """A case's label map (slices, rows, columns) and what went into it."""

    labels: np.ndarray
    voxels: dict[str, int]
    unmatched_rois: list[str] = field(default_factory=list)
    labels_without_roi: list[str] = field(default_factory=list)
    empty_rois: list[str] = field(default_factory=list)
    contested_voxels: int = 0
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The JSON-able report (no label array)."""
        return {
            "labels": self.voxels,
            "unmatched_rois": self.unmatched_rois,
            "labels_without_roi": self.labels_without_roi,
            "empty_rois": self.empty_rois,
            "contested_voxels": self.contested_voxels,
            "warnings": self.warnings,
        }


def case_labels(
    objects: list[LabelObject], info: SeriesInfo, image: sitk.Image, frame_uid: str, roi_map: RoiMap
) -> CaseLabels:
    """Rasterise / read every label object of a case and combine their ROIs through ``roi_map`` (priority on
    overlap). ``InputError`` naming the label file for bad input (off-plane contour, other frame of reference)."""
    if not frame_uid:
        raise InputError(info.files[0], "the image series has no FrameOfReferenceUID; labels cannot be placed on it")
    grid = Grid.of_image(image, frame_uid)
    volume = LabelVolume(roi_map, grid.shape)
    matched: set[str] = set()
    out = CaseLabels(np.zeros(0, np.uint8), {})
    for obj in objects:
        if obj.kind == "rtstruct":
            masks = _rtstruct_masks(obj, grid, roi_map, out)
        else:
            masks = _seg_masks(obj, info, image, frame_uid, out)
        for name, mask in masks:
            label = roi_map.label_of(name)
            if label is None:
                out.unmatched_rois.append(name)
                continue
            hits = roi_map.matches(name)
            if len(hits) > 1:
                out.warnings.append(f"{name!r} matches labels {hits}; taken as {label!r} (priority)")
            matched.add(label)
            if not mask.any():
                out.empty_rois.append(name)
            volume.add(label, mask)
    if len(objects) > 1:
        out.warnings.append(f"{len(objects)} label objects reference this series; their ROIs were combined")
    out.labels = volume.labels()
    out.voxels = volume.voxels()
    out.contested_voxels = volume.contested
    out.labels_without_roi = [name for name in roi_map.labels if name not in matched]
    out.unmatched_rois = list(dict.fromkeys(out.unmatched_rois))
    return out


def _rtstruct_masks(obj: LabelObject, grid: Grid, roi_map: RoiMap, out: CaseLabels) -> Iterator[tuple[str, np.ndarray]]:
    """(ROI name, mask) per ROI; ROIs that match no label are not rasterised (an empty mask stands in)."""
    structure = read_structure_set(obj.path)
    empty = np.zeros(0, dtype=bool)
    for roi in structure.rois:
        if roi_map.label_of(roi.name) is None:
            yield roi.name, empty
            continue
        raster = rasterise_roi(structure, roi, grid)
        out.warnings.extend(raster.notes)
        yield roi.name, raster.mask


def _seg_masks(
    obj: LabelObject, info: SeriesInfo, image: sitk.Image, frame_uid: str, out: CaseLabels
) -> Iterator[tuple[str, np.ndarray]]:
    """(segment label, mask) per segment of a DICOM-SEG, on the series grid."""
    try:
        numbers = read_dicom_seg(obj.path, info)
    except InputError as first:
        numbers = _seg_by_geometry(obj, image, frame_uid, first)
        out.warnings.append("SEG frames placed by their patient positions (not alignable by their source references)")
    for number, name in zip(obj.segment_numbers, obj.names):
        yield name, numbers == number


def _seg_by_geometry(obj: LabelObject, image: sitk.Image, frame_uid: str, first: InputError) -> np.ndarray:
    """Segment numbers (slices, rows, columns) with the SEG frames placed by their patient positions."""
    if frame_uid not in obj.frames_of_reference:
        raise InputError(obj.path, f"{first.problem}; and the SEG is in another frame of reference than the series")
    try:
        seg = hd.seg.segread(obj.path)
        volume = seg.get_volume(combine_segments=True)
        placed = volume.match_geometry(hd.Volume.from_simpleitk(image).get_geometry()).array
    except Exception as e:  # highdicom raises ValueError / RuntimeError / KeyError for SEGs it cannot place
        raise InputError(
            obj.path, f"{first.problem}; placing the frames by their positions failed too ({type(e).__name__}: {e})"
        ) from e
    return np.asarray(placed).transpose(2, 1, 0)
