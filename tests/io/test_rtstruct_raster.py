"""RTSTRUCT rasterisation (``medseg.io.rtstruct_raster``) on synthetic RTSTRUCTs written with pydicom: contours
placed by their patient coordinates (never by ContourImageSequence), centre-inside fill with the top-left edge
rule, even-odd holes and islands, and one-line errors naming the file for contours off the slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medseg.errors import InputError
from medseg.io.rtstruct_raster import (
    RTSTRUCT_SOP_CLASS,
    Grid,
    fill_polygons,
    plane_tolerance_mm,
    rasterise_roi,
    read_structure_set,
)

FRAME = generate_uid()
SIZE = (10, 12, 4)  # columns, rows, slices
SPACING = (0.5, 0.8, 2.5)


def _grid(direction: np.ndarray | None = None, frame: str = FRAME) -> Grid:
    image = sitk.Image(SIZE, sitk.sitkInt16)
    image.SetSpacing(SPACING)
    image.SetOrigin((10.0, -5.0, 30.0))
    if direction is not None:
        image.SetDirection(tuple(float(x) for x in direction.ravel()))
    return Grid.of_image(image, frame)


def _mm(grid: Grid, ijk: list[tuple[float, float, float]]) -> np.ndarray:
    """Index-space points -> patient LPS mm through the grid's geometry."""
    return grid.origin + np.asarray(ijk, dtype=float) @ grid.matrix.T


def _square(lo: float, hi: float, k: float) -> list[tuple[float, float, float]]:
    return [(lo, lo, k), (hi, lo, k), (hi, hi, k), (lo, hi, k)]


def write_rtstruct(
    path: Path,
    grid: Grid,
    rois: dict[str, list[list[tuple[float, float, float]]]],
    *,
    kinds: dict[str, str] | None = None,
    frame: str | None = None,
    contour_image_uids: list[str] | None = None,
) -> Path:
    """An RTSTRUCT with one ROI per entry of ``rois`` (contours given in index space, written in mm)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "RTSTRUCT", "Synthetic^Patient", "SYNTH-0001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    series_item = Dataset()
    series_item.SeriesInstanceUID = generate_uid()
    study_item = Dataset()
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame or grid.frame_of_reference_uid
    frame_item.RTReferencedStudySequence = Sequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_item])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        roi.ReferencedFrameOfReferenceUID = frame or grid.frame_of_reference_uid
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = Sequence()
        for c, ijk in enumerate(contours):
            contour = Dataset()
            contour.ContourGeometricType = (kinds or {}).get(name, "CLOSED_PLANAR")
            contour.NumberOfContourPoints = len(ijk)
            contour.ContourData = [format_number_as_ds(float(v)) for v in _mm(grid, ijk).ravel()]  # 16-char DS
            if contour_image_uids is not None:  # a link to a slice, as rt-utils' reader would follow it
                image_item = Dataset()
                image_item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                image_item.ReferencedSOPInstanceUID = contour_image_uids[c % len(contour_image_uids)]
                contour.ContourImageSequence = Sequence([image_item])
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


def _mask(path: Path, grid: Grid, name: str = "GTV") -> np.ndarray:
    structure = read_structure_set(path)
    roi = next(r for r in structure.rois if r.name == name)
    return rasterise_roi(structure, roi, grid).mask


def test_square_with_corners_on_voxel_centres_holds_its_area(tmp_path: Path) -> None:
    grid = _grid()
    path = write_rtstruct(tmp_path / "rs.dcm", grid, {"GTV": [[(2, 3, 1), (6, 3, 1), (6, 7, 1), (2, 7, 1)]]})
    mask = _mask(path, grid)
    expected = np.zeros(grid.shape, dtype=bool)
    expected[1, 3:7, 2:6] = True  # rows 3..6, columns 2..5: top/left edges in, bottom/right edges out
    assert mask.shape == (4, 12, 10)
    assert np.array_equal(mask, expected) and mask.sum() == 16


def test_square_between_voxel_centres_holds_the_centres_inside(tmp_path: Path) -> None:
    grid = _grid()
    path = write_rtstruct(tmp_path / "rs.dcm", grid, {"GTV": [_square(1.5, 5.5, 2)]})
    expected = np.zeros(grid.shape, dtype=bool)
    expected[2, 2:6, 2:6] = True
    assert np.array_equal(_mask(path, grid), expected)


def test_polygons_on_one_plane_make_holes_and_islands(tmp_path: Path) -> None:
    grid = _grid()
    rois = {"GTV": [_square(0.5, 8.5, 1), _square(2.5, 6.5, 1), _square(3.5, 5.5, 1), _square(1.5, 3.5, 3)]}
    mask = _mask(write_rtstruct(tmp_path / "rs.dcm", grid, rois), grid)
    expected = np.zeros(grid.shape, dtype=bool)
    expected[1, 1:9, 1:9] = True  # outer
    expected[1, 3:7, 3:7] = False  # hole
    expected[1, 4:6, 4:6] = True  # island in the hole
    expected[3, 2:4, 2:4] = True  # another plane
    assert np.array_equal(mask, expected)
    assert mask[1].sum() == 64 - 16 + 4


def test_contours_are_placed_by_coordinates_on_an_oblique_grid(tmp_path: Path) -> None:
    c, s = np.cos(0.5), np.sin(0.5)
    tilt = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    oblique, straight = _grid(tilt), _grid()
    contours = {"GTV": [[(2, 3, 1), (6, 3, 1), (6, 7, 1), (2, 7, 1)]]}
    on_oblique = _mask(write_rtstruct(tmp_path / "a.dcm", oblique, contours), oblique)
    assert np.array_equal(on_oblique, _mask(write_rtstruct(tmp_path / "b.dcm", straight, contours), straight))
    # the same mm points on the straight grid are off its slice planes: placement really uses the geometry
    with pytest.raises(InputError, match="off the slice planes"):
        _mask(tmp_path / "a.dcm", straight)


def test_stale_contour_image_references_are_ignored(tmp_path: Path) -> None:
    grid = _grid()
    contours = {"GTV": [_square(1.5, 4.5, 2)]}
    plain = _mask(write_rtstruct(tmp_path / "plain.dcm", grid, contours), grid)
    stale = write_rtstruct(tmp_path / "stale.dcm", grid, contours, contour_image_uids=[generate_uid()])
    assert np.array_equal(_mask(stale, grid), plain) and plain[2].sum() == 9
    assert pydicom.dcmread(stale).ROIContourSequence[0].ContourSequence[0].ContourImageSequence  # really written


def test_contour_off_the_slice_planes_is_an_error_naming_the_file(tmp_path: Path) -> None:
    grid = _grid()
    tolerance_k = plane_tolerance_mm(grid) / SPACING[2]
    ok = write_rtstruct(tmp_path / "near.dcm", grid, {"GTV": [_square(1.5, 4.5, 2 + 0.9 * tolerance_k)]})
    assert _mask(ok, grid)[2].sum() == 9  # within the tolerance: on slice 2
    bad = write_rtstruct(tmp_path / "RS_off.dcm", grid, {"GTV": [_square(1.5, 4.5, 1), _square(1.5, 4.5, 2.4)]})
    with pytest.raises(InputError) as e:
        _mask(bad, grid)
    assert e.value.path == str(bad) and str(e.value).startswith(str(bad))
    assert "'GTV' contour #2 is off the slice planes" in e.value.problem and "1 mm" in e.value.problem
    beyond = write_rtstruct(tmp_path / "RS_beyond.dcm", grid, {"GTV": [_square(1.5, 4.5, 5)]})
    with pytest.raises(InputError, match="beyond the image series' 4 slices"):
        _mask(beyond, grid)


def test_other_frame_of_reference_is_an_error(tmp_path: Path) -> None:
    grid = _grid()
    path = write_rtstruct(tmp_path / "rs.dcm", grid, {"GTV": [_square(1.5, 4.5, 2)]}, frame=generate_uid())
    with pytest.raises(InputError, match="another frame than the image series'"):
        _mask(path, grid)


def test_contours_without_area_are_left_out_with_a_note(tmp_path: Path) -> None:
    grid = _grid()
    rois = {"GTV": [_square(1.5, 4.5, 2)], "marker": [[(3, 3, 1)]], "line": [[(1, 1, 1), (5, 5, 1)]]}
    path = write_rtstruct(tmp_path / "rs.dcm", grid, rois, kinds={"marker": "POINT", "line": "OPEN_PLANAR"})
    structure = read_structure_set(path)
    results = {r.name: rasterise_roi(structure, r, grid) for r in structure.rois}
    assert results["GTV"].mask.sum() == 9 and not results["GTV"].notes
    assert not results["marker"].mask.any() and results["marker"].notes == [
        "ROI 'marker': 1 POINT contour(s) ignored (no area)"
    ]
    assert not results["line"].mask.any() and "OPEN_PLANAR" in results["line"].notes[0]


def test_polygon_beyond_the_image_is_clipped_with_a_note(tmp_path: Path) -> None:
    grid = _grid()
    path = write_rtstruct(tmp_path / "rs.dcm", grid, {"GTV": [_square(-3.5, 2.5, 0)]})
    structure = read_structure_set(path)
    raster = rasterise_roi(structure, structure.rois[0], grid)
    assert raster.mask[0].sum() == 9 and raster.mask[0, :3, :3].all()
    assert raster.notes == ["ROI 'GTV': 1 contour(s) reach beyond the image and were clipped to it"]


def test_unreadable_rtstructs_are_errors_naming_the_file(tmp_path: Path) -> None:
    grid = _grid()
    not_dicom = tmp_path / "RS_text.dcm"
    not_dicom.write_text("not DICOM at all")
    with pytest.raises(InputError, match="unreadable RTSTRUCT") as e:
        read_structure_set(not_dicom)
    assert e.value.path == str(not_dicom)
    path = write_rtstruct(tmp_path / "RS_bad.dcm", grid, {"GTV": [_square(1.5, 4.5, 2)]})
    ds = pydicom.dcmread(path)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = contour.ContourData[:-1]
    ds.save_as(path)
    with pytest.raises(InputError, match=r"'GTV' contour #1: ContourData is not \(x, y, z\) triples"):
        _mask(path, grid)
    contour.ContourData = contour.ContourData[:-2]  # 3 whole points, 4 declared: cut off
    ds.save_as(path)
    with pytest.raises(InputError, match="NumberOfContourPoints is 4 but ContourData holds 3 points"):
        _mask(path, grid)
    cut = path.read_bytes()
    path.write_bytes(cut[: len(cut) // 2])  # pydicom reads this without complaint, the ROI contours gone
    with pytest.raises(InputError, match=r"no (StructureSetROISequence|ROIContourSequence) \(truncated"):
        read_structure_set(path)
    del ds.StructureSetROISequence
    ds.save_as(path)
    with pytest.raises(InputError, match="no StructureSetROISequence"):
        read_structure_set(path)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 9), st.integers(0, 9), st.integers(1, 6), st.integers(1, 6), st.booleans())
def test_integer_rectangles_hold_exactly_their_area(x0: int, y0: int, w: int, h: int, reverse: bool) -> None:
    corners = np.array([(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)], dtype=float)
    mask = fill_polygons([corners[::-1] if reverse else corners], (20, 20))
    expected = np.zeros((20, 20), dtype=bool)
    expected[y0 : y0 + h, x0 : x0 + w] = True
    assert np.array_equal(mask, expected)  # either orientation; area = w * h voxels


def test_polygons_sharing_an_edge_through_voxel_centres_never_both_claim_it() -> None:
    # A square cut along its diagonal, which runs through voxel centres (0,0), (1,1), ... (8,8).
    square = np.array([(0, 0), (8, 0), (8, 8), (0, 8)], dtype=float)
    upper = np.array([(0, 0), (8, 0), (8, 8)], dtype=float)
    lower = np.array([(0, 0), (8, 8), (0, 8)], dtype=float)
    a, b, whole = (fill_polygons([p], (10, 10)) for p in (upper, lower, square))
    assert not (a & b).any() and np.array_equal(a | b, whole) and whole.sum() == 64
