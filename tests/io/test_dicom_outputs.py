"""DICOM-SEG and RTSTRUCT of a DICOM series, read back and checked against the series itself.

Real MR series (../shared/data/dicom_mr_series), copied with identifying attributes planted in every slice: the
oblique 320 x 280 T1post, the 35 x 51 HippoCrop of Study1, and T1post again with non-square pixels (PixelSpacing
changed in the copies: rt-utils on its own scales the pixel axes with each other's spacing). A mask of three blobs
placed in millimetres on the series' NIfTI grid (and a fourth label that is absent) goes through
``write_dicom_outputs`` with ``inference.*`` overrides; then, per label:

- the SEG (highdicom) reads back to the mask voxel for voxel;
- every RTSTRUCT contour point lies on the plane of the slice it references, and the contours, rasterised here
  from the series' own geometry (voxel centre inside, even-odd), overlap the mask with Dice >= 0.98 (measured:
  1.0, the mask voxel for voxel); rt-utils' own reader (pixels the outline touches) agrees;
- both outputs' centroids in patient coordinates (LPS mm, from the slices' positions, orientation and spacing)
  equal the NIfTI mask's (from its affine) within half a voxel;
- names, header fields, codes, and that no planted attribute reaches either file.

Also: ROIs touching the image border, each ``dicom_output`` choice (``none`` writes nothing), bad settings, and a
write that fails half-way (file size limit in a subprocess) leaving the old files and no temp file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath
from rt_utils import RTStructBuilder
from scipy import ndimage

from medseg.config import Config, InferenceConfig
from medseg.errors import ConfigError
from medseg.inference.dicom_input import load_series_image, seg_label_array
from medseg.inference.dicom_output import write_dicom_outputs
from medseg.inference.model_package import ModelPackage
from medseg.inference.options import apply_inference_overrides
from medseg.inference.records import dicom_output_names
from medseg.io.dicom_seg import REQUIRED_PATIENT_STUDY, read_dicom_seg
from medseg.io.dicom_series import SeriesInfo, discover_series
from medseg.io.rtstruct_write import write_rtstruct
from tests.helpers import SHARED_DATA

DATA = SHARED_DATA / "dicom_mr_series"
LABELS = {"background": 0, "tumour": 1, "edema": 2, "cyst": 3, "necrosis": 4}  # necrosis: never in the mask
SEGMENTS = {k: v for k, v in LABELS.items() if v}
CODES = {
    "tumour": ("SCT^49755003^Morphologically Altered Structure", "SCT^108369006^Neoplasm"),
    "edema": ("SCT^49755003^Morphologically Altered Structure", "SCT^79654002^Edema"),
}
OVERRIDES = [
    "inference.dicom_output=both",
    "inference.dicom.series_description=AI brain lesions",
    "inference.dicom.manufacturer=Example Hospital AI",
    "inference.dicom.algorithm_version=2.1.0",
    *(
        f"inference.dicom.codes.{name}.{part}={code}"
        for name, pair in CODES.items()
        for part, code in zip(("category", "type"), pair)
    ),
]
PLANTED = {  # keyword -> value put into every source slice; none of it may reach an output
    "InstitutionName": "PLANTED-INSTITUTION",
    "InstitutionAddress": "PLANTED-ADDRESS-1",
    "InstitutionalDepartmentName": "PLANTED-DEPARTMENT",
    "StationName": "PLANTEDSTATION",
    "DeviceSerialNumber": "PLANTED-SERIAL",
    "OtherPatientIDs": "PLANTED-OTHER-ID",
    "OtherPatientNames": "PLANTED^OTHERNAME",
    "PatientAddress": "PLANTED-ADDRESS-2",
    "PatientTelephoneNumbers": "PLANTED-PHONE",
    "PatientMotherBirthName": "PLANTED^MOTHER",
    "PatientComments": "PLANTED-COMMENT",
    "EthnicGroup": "PLANTED-ETHNIC",
    "MilitaryRank": "PLANTED-RANK",
    "AdditionalPatientHistory": "PLANTED-HISTORY",
    "StudyDescription": "PLANTED-STUDY-DESCRIPTION",
    "PhysiciansOfRecord": "PLANTED^RECORD",
    "OperatorsName": "PLANTED^OPERATOR",
    "PerformingPhysicianName": "PLANTED^PERFORMER",
    "RequestingPhysician": "PLANTED^REQUESTER",
    "PatientAge": "041Y",
    "PatientWeight": "71.5",
    "PatientSize": "1.83",
}
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared DICOM data not available")


@dataclass
class Written:
    info: SeriesInfo  # the planted copies
    labels_xyz: np.ndarray
    affine: np.ndarray  # the series' NIfTI affine (RAS)
    seg: Path
    rtstruct: Path
    anisotropic: bool


def _planted_copy(src: Path, dst: Path, pixel_spacing: tuple[float, float] | None) -> SeriesInfo:
    dst.mkdir(parents=True)
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.OtherPatientIDsSequence = [pydicom.Dataset()]
        ds.OtherPatientIDsSequence[0].PatientID = "PLANTED-SEQ-ID"
        ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
        ds.PatientBirthDate = "19700101"
        if pixel_spacing is not None:
            ds.PixelSpacing = list(pixel_spacing)
        ds.save_as(dst / path.name)
    (info,) = discover_series(dst)
    return info


def _blobs(shape: tuple[int, ...], zooms: np.ndarray) -> np.ndarray:
    """Two spheres and a hollow cube (holes in some slices) placed in mm on the (x, y, z) grid, sized by the scan's
    extent (labels 1, 2, 3)."""
    extent = np.array(shape) * zooms
    mm = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * z for n, z in zip(shape, zooms)], indexing="ij"), -1)
    r = 0.17 * float(extent.min())
    out = np.zeros(shape, dtype=np.uint8)
    out[np.linalg.norm(mm - extent * (0.38, 0.40, 0.45), axis=-1) < r] = 1
    out[np.linalg.norm(mm - extent * (0.66, 0.55, 0.55), axis=-1) < 0.7 * r] = 2
    box = np.abs(mm - extent * (0.70, 0.30, 0.45)).max(axis=-1)
    out[(box < 0.5 * r) & (box > 0.25 * r)] = 3
    return out


def _options(tmp: Path, overrides: list[str]) -> InferenceConfig:
    """``inference.*`` overrides applied as ``medseg predict --set`` applies them (to a package's config)."""
    package = ModelPackage(tmp, Config(), {"labels": LABELS})
    return apply_inference_overrides(package, overrides).config.inference


@pytest.fixture(
    scope="module",
    params=[
        ("Study3/11-T1post-18670", None),
        ("Study1/13_HCropVolume", None),
        ("Study3/11-T1post-18670", (0.6875, 0.9)),
    ],
    ids=["oblique", "hippocrop", "oblique-nonsquare-pixels"],
)
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Written:
    series, spacing = request.param
    tmp = tmp_path_factory.mktemp("dicom_outputs")
    info = _planted_copy(DATA / series, tmp / Path(series).name, spacing)
    image = load_series_image(info)
    labels = _blobs(image.shape, np.array(image.header.get_zooms()[:3], dtype=float))
    assert all((labels == v).sum() > 50 for v in (1, 2, 3))  # blobs, not specks
    hollow = labels == 3
    assert any((ndimage.binary_fill_holes(hollow[:, :, z]) > hollow[:, :, z]).any() for z in range(labels.shape[2]))
    paths = write_dicom_outputs(
        labels, info, LABELS, tmp / "out", "case-1", _options(tmp, OVERRIDES), "brainseg", "models:/brainseg/3"
    )
    assert [p.name for p in paths] == ["case-1.seg.dcm", "case-1.rtstruct.dcm"] == dicom_output_names("case-1", "both")
    assert sorted(p.name for p in (tmp / "out").iterdir()) == sorted(p.name for p in paths)  # no temp left
    return Written(info, labels, image.affine, paths[0], paths[1], spacing is not None)


# --- geometry of the series: (slice k, row, column) -> LPS mm --------------------------------------------------


def _frame(info: SeriesInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    first = info.slices[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    row_dir, col_dir = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    positions = np.array([s.position for s in info.slices], dtype=float)
    return positions, row_dir, col_dir, (float(first.pixel_spacing[0]), float(first.pixel_spacing[1]))


def _centroid_lps(info: SeriesInfo, krc: np.ndarray) -> np.ndarray:
    """Mean patient position of the voxels of a (slice, row, column) mask."""
    positions, row_dir, col_dir, (row_mm, col_mm) = _frame(info)
    k, r, c = np.nonzero(krc)
    return (positions[k] + np.outer(c * col_mm, row_dir) + np.outer(r * row_mm, col_dir)).mean(axis=0)


def _nifti_centroid_lps(w: Written, value: int) -> np.ndarray:
    ras = nib.affines.apply_affine(w.affine, np.argwhere(w.labels_xyz == value).mean(axis=0))
    return ras * (-1, -1, 1)


def _half_voxel(info: SeriesInfo) -> float:
    positions, _, _, spacing = _frame(info)
    return 0.5 * min(*spacing, float(np.linalg.norm(positions[1] - positions[0])))


def _rasterise(ds: pydicom.Dataset, info: SeriesInfo, name: str) -> np.ndarray:
    """An ROI's contours on the series' own grid (slice, row, column), a voxel inside when its centre is (even-odd:
    a contour inside another cuts a hole), the reading of TPSs; asserts each contour lies on its slice's plane."""
    positions, row_dir, col_dir, (row_mm, col_mm) = _frame(info)
    normal = np.cross(row_dir, col_dir)
    (number,) = [int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == name]
    (roi,) = [c for c in ds.ROIContourSequence if int(c.ReferencedROINumber) == number]
    slice_of = {uid: k for k, uid in enumerate(info.sop_instance_uids)}
    rows, cols = info.slices[0].rows, info.slices[0].columns
    centres = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), axis=-1).reshape(-1, 2)  # (column, row)
    out = np.zeros((info.n_slices, rows, cols), dtype=bool)
    for contour in roi.get("ContourSequence", []):
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        k = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        d = np.array(contour.ContourData, dtype=float).reshape(-1, 3) - positions[k]
        assert int(contour.NumberOfContourPoints) == len(d)
        assert np.abs(d @ normal).max() < 1e-3  # on the plane of the slice it references
        polygon = PolygonPath(np.stack([d @ row_dir / col_mm, d @ col_dir / row_mm], axis=1))
        out[k] ^= polygon.contains_points(centres).reshape(rows, cols)
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# --- the checks --------------------------------------------------------------------------------------------------


def test_seg_reads_back_to_the_mask_in_patient_space(written: Written) -> None:
    w = written
    got = read_dicom_seg(w.seg, w.info, SEGMENTS)
    assert np.array_equal(got, seg_label_array(w.labels_xyz))
    for value in (1, 2, 3):
        offset = _centroid_lps(w.info, got == value) - _nifti_centroid_lps(w, value)
        assert np.linalg.norm(offset) < _half_voxel(w.info), f"label {value}: centroid off by {offset} mm"
    seg = hd.seg.segread(w.seg)
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == list(SEGMENTS)


def test_rtstruct_contours_rasterise_to_the_mask_in_patient_space(written: Written, record_property) -> None:
    w = written
    ds = pydicom.dcmread(w.rtstruct)
    assert [r.ROIName for r in ds.StructureSetROISequence] == list(SEGMENTS)
    want_all = seg_label_array(w.labels_xyz)
    dice = {}
    for name, value in SEGMENTS.items():
        got, want = _rasterise(ds, w.info, name), want_all == value
        if not want.any():  # the absent label: an ROI without contours
            assert not got.any() and not ds.ROIContourSequence[value - 1].ContourSequence
            continue
        dice[name] = _dice(got, want)
        offset = _centroid_lps(w.info, got) - _nifti_centroid_lps(w, value)
        assert np.linalg.norm(offset) < _half_voxel(w.info), f"{name}: centroid off by {offset} mm"
    record_property("rtstruct_dice", dice)
    print(f"RTSTRUCT Dice {w.info.case_id} anisotropic={w.anisotropic}: {dice}")
    assert min(dice.values()) >= 0.98, dice


def test_rt_utils_reads_our_rtstruct(written: Written) -> None:
    """rt-utils' own reader finds the references and the ROIs. Its mask is allocated (Columns, Rows, slices) but
    indexed [row, column] (1.2.7), so it is compared on the square both shapes hold; with non-square pixels its
    reader repeats the spacing mix-up our writer avoids, so only the names are compared there."""
    w = written
    rt = RTStructBuilder.create_from(str(w.info.folder), str(w.rtstruct))
    assert rt.get_roi_names() == list(SEGMENTS)
    if w.anisotropic:
        return
    want_all = seg_label_array(w.labels_xyz)
    m = min(w.info.slices[0].rows or 0, w.info.slices[0].columns or 0)
    for name in ("tumour", "edema", "cyst"):
        theirs = rt.get_roi_mask_by_name(name)[:m, :m].transpose(2, 0, 1)  # -> (slice, row, column)
        ours = (want_all == SEGMENTS[name])[:, :m, :m]
        dice = _dice(theirs, ours)
        print(f"rt-utils reader Dice {w.info.case_id} {name}: {dice:.4f}")
        assert ours.sum() > 50 and dice >= 0.98


def test_rois_touching_the_image_border_keep_their_edge_pixels(tmp_path: Path) -> None:
    (info,) = discover_series(DATA / "Study1" / "13_HCropVolume")
    rows, cols = info.slices[0].rows or 0, info.slices[0].columns or 0
    labels = np.zeros((info.n_slices, rows, cols), dtype=np.uint8)
    labels[3:9, :6, :] = 1  # top rows, from the left edge to the right edge
    labels[10:20, rows - 7 :, cols - 5 :] = 2  # the bottom-right corner
    path = write_rtstruct(
        labels, info.files, {"top": 1, "corner": 2}, tmp_path / "edge.dcm", algorithm_name="m", algorithm_version="1"
    )
    ds = pydicom.dcmread(path)
    for name, value in (("top", 1), ("corner", 2)):
        assert np.array_equal(_rasterise(ds, info, name), labels == value), name


def test_names_headers_and_codes(written: Written) -> None:
    seg, rts = hd.seg.segread(written.seg), pydicom.dcmread(written.rtstruct)
    for ds in (seg, rts):
        assert ds.SeriesDescription == "AI brain lesions" and ds.Manufacturer == "Example Hospital AI"
        assert ds.ManufacturerModelName == "brainseg" and ds.SoftwareVersions == "2.1.0"
        assert (
            ds.SeriesInstanceUID != written.info.uid
            and ds.StudyInstanceUID == pydicom.dcmread(written.info.files[0], stop_before_pixels=True).StudyInstanceUID
        )
    for number in seg.segment_numbers:
        d = seg.get_segment_description(number)
        assert d.algorithm_identification[0].AlgorithmName == "brainseg"
        assert d.algorithm_identification[0].AlgorithmVersion == "2.1.0"
        category, prop_type = CODES.get(d.segment_label, ("SCT^85756007^Tissue", "SCT^85756007^Tissue"))
        for coded, text in ((d.segmented_property_category, category), (d.segmented_property_type, prop_type)):
            assert f"{coded.scheme_designator}^{coded.value}^{coded.meaning}" == text
    assert {r.ROIGenerationAlgorithm for r in rts.StructureSetROISequence} == {"AUTOMATIC"}
    assert {r.ROIGenerationDescription for r in rts.StructureSetROISequence} == {"brainseg 2.1.0"}
    for observation, name in zip(rts.RTROIObservationsSequence, SEGMENTS):
        codes = [
            observation.get(k) for k in ("SegmentedPropertyCategoryCodeSequence", "RTROIIdentificationCodeSequence")
        ]
        if name not in CODES:
            assert codes == [None, None]
            continue
        got = [f"{c[0].CodingSchemeDesignator}^{c[0].CodeValue}^{c[0].CodeMeaning}" for c in codes]
        assert got == list(CODES[name])


@pytest.mark.parametrize("kind", ["seg", "rtstruct"])
def test_only_required_patient_and_study_attributes_are_copied(written: Written, kind: str) -> None:
    path = written.seg if kind == "seg" else written.rtstruct
    assert b"PLANTED" not in path.read_bytes()
    ds = pydicom.dcmread(path)
    keywords = {e.keyword for e in ds.iterall()}
    ours = {"DeviceSerialNumber": "0"} if kind == "seg" else {"OperatorsName": ""}  # set by the writer, not copied
    assert not (set(PLANTED) | {"OtherPatientIDsSequence"}) - set(ours) & keywords
    assert all(str(ds[k].value) == v for k, v in ours.items())
    patient_group = {e.keyword for e in ds.iterall() if e.tag.group == 0x0010}  # Patient module and its relatives
    assert patient_group == {"PatientName", "PatientID", "PatientBirthDate", "PatientSex"}
    assert not any(e.tag.is_private for e in ds.iterall())
    source = pydicom.dcmread(written.info.files[0], stop_before_pixels=True)
    for keyword in REQUIRED_PATIENT_STUDY:
        assert keyword in ds and str(ds[keyword].value) == str(source.get(keyword, "")), keyword
    assert ds.PatientBirthDate == "19700101"


def test_dicom_output_choice(tmp_path: Path) -> None:
    (info,) = discover_series(DATA / "Study1" / "13_HCropVolume")
    labels = _blobs(load_series_image(info).shape, np.ones(3))
    for choice, names in [("none", []), ("seg", ["c.seg.dcm"]), ("rtstruct", ["c.rtstruct.dcm"])]:
        out = tmp_path / choice
        paths = write_dicom_outputs(
            labels, info, LABELS, out, "c", _options(tmp_path, [f"inference.dicom_output={choice}"]), "m", "1"
        )
        assert [p.name for p in paths] == names == dicom_output_names("c", choice)
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert left == names  # and for "none" not even the folder
        assert out.exists() == bool(names)
    assert InferenceConfig().dicom_output == "seg"  # the default: what medseg wrote before


def test_bad_dicom_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inference.dicom_output"):
        _options(tmp_path, ["inference.dicom_output=rt-struct"])
    with pytest.raises(ConfigError, match="SNOMED CT code value is a number"):
        _options(
            tmp_path,
            [
                "inference.dicom.codes.tumour.category=SCT^Tissue^85756007",
                "inference.dicom.codes.tumour.type=SCT^108369006^Neoplasm",
            ],
        )
    with pytest.raises(ConfigError, match="codes.tumour.category: Field required"):
        _options(tmp_path, ["inference.dicom.codes.tumour.type=SCT^108369006^Neoplasm"])
    options = _options(
        tmp_path,
        [
            "inference.dicom.codes.liver.category=SCT^123037004^Anatomical Structure",
            "inference.dicom.codes.liver.type=SCT^10200004^Liver",
        ],
    )
    (info,) = discover_series(DATA / "Study1" / "13_HCropVolume")
    labels = np.zeros(load_series_image(info).shape, dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"\['liver'\] are not labels of the model"):
        write_dicom_outputs(labels, info, LABELS, tmp_path / "out", "c", options, "m", "1")
    assert not (tmp_path / "out").exists()


FAILING_WRITES = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.dicom_series import discover_series
from medseg.io.rtstruct_write import write_rtstruct
(info,) = discover_series(Path(sys.argv[1]))
labels = np.load(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit a write then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))
for writer, name in ((write_dicom_seg, "c.seg.dcm"), (write_rtstruct, "c.rtstruct.dcm")):
    try:
        writer(labels, info.files, {"a": 1, "b": 2, "c": 3}, Path(sys.argv[3]) / name, algorithm_name="m",
               algorithm_version="1")
    except OSError as e:
        print(name, "failed:", "File too large" in str(e))  # pydicom re-raises EFBIG with the tag in the message
"""


def test_a_failing_write_leaves_no_partial_file(tmp_path: Path) -> None:
    """Writes that fail half-way (a file size limit, in a real process) leave the old files and no temp file.

    The writers are run directly (the io layer, where ``atomic_path`` is used): the subprocess then needs no torch.
    """
    (info,) = discover_series(DATA / "Study3" / "11-T1post-18670")
    labels = _blobs(load_series_image(info).shape, np.array([0.6875, 0.6875, 6.5]))
    np.save(tmp_path / "labels.npy", seg_label_array(labels))
    out = tmp_path / "out"
    out.mkdir()
    old = {"c.seg.dcm": b"old seg", "c.rtstruct.dcm": b"old rtstruct"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    limit = 16 * 1024  # the SEG is ~220 KB, the RTSTRUCT ~100 KB: both fail part-way
    args = [str(info.folder), str(tmp_path / "labels.npy"), str(out), str(limit)]
    p = subprocess.run(
        [sys.executable, "-c", FAILING_WRITES, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=Path(__file__).parents[2],
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == ["c.seg.dcm failed: True", "c.rtstruct.dcm failed: True"]
    assert {q.name: q.read_bytes() for q in out.iterdir()} == old  # untouched, and no temp file beside them
