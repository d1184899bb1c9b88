"""DICOM series discovery, validation and reading, on the shared real MR series and synthetic copies."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from medseg.errors import InputError
from medseg.io.dicom_series import (
    DicomScan,
    SeriesInfo,
    discover_series,
    read_series,
    scan_dicom_folder,
    validate_series,
)
from medseg.io.sitk_nifti import nifti_to_sitk, sitk_to_nifti

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dicom_mr_series"
T1POST = DATA / "Study3" / "11-T1post-18670"
HIPPO = DATA / "Study3" / "11_HCropVolume"
FOLDERS = {"13_HCropVolume", "14_HCropVolume", "11_HCropVolume", "11-T1post-18670", "26401-T1prereg-52906",
           "36468-FLAIRreg-58706", "37830-T2reg-78532"}
OBLIQUE = (0.9, 0.0, -0.43588989, 0.1, 0.99, 0.0)  # orthonormalised below
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared DICOM data not available")


def _identifier_tokens(folder: Path) -> set[str]:
    """Patient identifier fragments of a real series (kept in memory only, never printed)."""
    tokens: set[str] = set()
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        values = [str(ds.get(k, "") or "") for k in ("PatientID", "AccessionNumber", "PatientBirthDate")]
        values += re.split(r"[\^\s]+", str(ds.get("PatientName", "") or ""))
        tokens |= {v.lower() for v in values if len(v) >= 3}
    return tokens


def _leaks(texts: list[str], tokens: set[str]) -> int:
    """How many (text, identifier) pairs match; a count, so a failing assert shows no identifier."""
    return sum(tok in t.lower() for t in texts for tok in tokens)


def _orthonormal(iop: tuple[float, ...]) -> tuple[float, ...]:
    row = np.array(iop[:3]) / np.linalg.norm(iop[:3])
    col = np.array(iop[3:]) - (np.array(iop[3:]) @ row) * row
    return tuple(row) + tuple(col / np.linalg.norm(col))


def write_series(folder: Path, n: int = 6, *, step: float = 2.5, iop: tuple[float, ...] = OBLIQUE,
                 pixel_spacing: tuple[float, float] = (0.8, 0.5), positions: list[float] | None = None,
                 names: list[str] | None = None) -> list[Path]:
    """Clone a real slice into a synthetic series (new UIDs, fake patient); return files in slice order.

    Slice k sits at ``positions[k]`` (default k * step) along the normal and holds the template pixels
    + 300 k, so the order is visible in the pixels. InstanceNumber runs backwards on purpose.
    """
    template = pydicom.dcmread(HIPPO / "1.dcm")
    iop = _orthonormal(iop)
    normal = np.cross(iop[:3], iop[3:])
    positions = positions if positions is not None else [k * step for k in range(n)]
    names = names or [f"slice{k:03d}.dcm" for k in range(len(positions))]
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, files = generate_uid(), []
    for k, (d, name) in enumerate(zip(positions, names)):
        ds = copy.deepcopy(template)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "Synthetic^Case", "SYNTH-PID-0001", "SYNTHACC01"
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = len(positions) - k
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array([-20.0, 10.0, 5.0]) + d * normal]
        ds.PixelSpacing = list(pixel_spacing)
        ds.PixelData = (template.pixel_array + 300 * k).astype(template.pixel_array.dtype).tobytes()
        ds.save_as(folder / name)
        files.append(folder / name)
    return files


def _only_series(folder: Path) -> SeriesInfo:
    series = discover_series(folder)
    assert len(series) == 1
    return series[0]


def _error(info: SeriesInfo) -> str:
    with pytest.raises(InputError) as exc:
        validate_series(info)
    return str(exc.value)


# --- the real series ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_scan() -> DicomScan:
    return scan_dicom_folder(DATA)


def test_discovers_the_seven_real_series_with_safe_unique_ids(real_scan: DicomScan) -> None:
    ids = [s.case_id for s in real_scan.series]
    tokens = set().union(*(_identifier_tokens(s.folder) for s in real_scan.series))
    assert tokens, "the real series should carry identifiers to check against"
    n_leaks = _leaks(ids + [repr(s) for s in real_scan.series], tokens)  # checked first: asserts print ids
    assert n_leaks == 0, "a patient identifier appears in a case id or SeriesInfo repr"
    assert sorted(ids) == sorted(FOLDERS)  # each folder holds one series: its name is the id
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids)
    assert sorted(p.name for p in real_scan.skipped) == ["PROVENANCE.md", "SHA256SUMS"]
    assert {s.case_id: s.n_slices for s in real_scan.series}["11_HCropVolume"] == 40
    assert all(s.modality == "MR" for s in real_scan.series)
    for s in real_scan.series:
        validate_series(s)


def test_oblique_gapped_series_geometry(real_scan: DicomScan) -> None:
    info = next(s for s in real_scan.series if s.case_id == "11-T1post-18670")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in info.files]
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.dot(normal, np.array(h.ImagePositionPatient, dtype=float))) for h in headers]
    assert along == sorted(along)
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, 23))  # PROVENANCE: same order here
    assert float(headers[0].SliceThickness) == 5.0

    image = read_series(info)
    assert image.GetSize() == (280, 320, 22)
    np.testing.assert_allclose(image.GetSpacing(), (0.6875, 0.6875, 6.5), atol=1e-5)  # IPP step, not 5 mm
    np.testing.assert_allclose(image.GetOrigin(), np.array(headers[0].ImagePositionPatient, dtype=float))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], iop[:3], atol=1e-9)
    np.testing.assert_allclose(direction[:, 1], iop[3:], atol=1e-9)
    np.testing.assert_allclose(direction[:, 2], normal / np.linalg.norm(normal), atol=1e-9)
    assert np.degrees(np.arccos(direction[2, 2])) == pytest.approx(10.8, abs=0.1)  # oblique kept

    reader = sitk.ImageSeriesReader()  # ITK/GDCM reading the same sorted files agrees
    reader.SetFileNames([str(f) for f in info.files])
    itk = reader.Execute()
    np.testing.assert_allclose(image.GetOrigin(), itk.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), itk.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), itk.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(itk))


def test_hippocrop_files_sort_by_position_not_name(real_scan: DicomScan) -> None:
    info = next(s for s in real_scan.series if s.case_id == "11_HCropVolume")
    assert [f.name for f in info.files] == [f"{k}.dcm" for k in range(1, 41)]  # lexical would be 1, 10, ...
    image = read_series(info)
    assert image.GetOrigin() == (0.0, 0.0, 1.0)
    assert image.GetSpacing() == (1.0, 1.0, 1.0)
    first = pydicom.dcmread(HIPPO / "1.dcm").pixel_array
    assert np.array_equal(sitk.GetArrayFromImage(image)[0], first)


def test_nifti_affine_agrees_with_simpleitk_writer(real_scan: DicomScan, tmp_path: Path) -> None:
    info = next(s for s in real_scan.series if s.case_id == "11-T1post-18670")
    image = read_series(info)
    sitk.WriteImage(image, str(tmp_path / "x.nii.gz"))
    written = nib.load(tmp_path / "x.nii.gz")
    nii = sitk_to_nifti(image)
    np.testing.assert_allclose(nii.affine, written.affine, atol=1e-4)  # ITK stores float32
    assert nii.shape == written.shape == (280, 320, 22)
    assert np.array_equal(np.asanyarray(nii.dataobj), np.asanyarray(written.dataobj))
    assert int(nii.header["qform_code"]) == int(nii.header["sform_code"]) == 1

    nib.save(nii, tmp_path / "ours.nii.gz")
    back_by_itk = sitk.ReadImage(str(tmp_path / "ours.nii.gz"))
    for back in (nifti_to_sitk(nii), back_by_itk):
        np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-4)
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_real_series_with_a_dropped_slice_names_folder_without_identifiers(real_scan: DicomScan) -> None:
    info = next(s for s in real_scan.series if s.case_id == "11-T1post-18670")
    keep = [k for k in range(info.n_slices) if k != 10]
    broken = dataclasses.replace(info, files=tuple(info.files[k] for k in keep),
                                 slices=tuple(info.slices[k] for k in keep), n_slices=len(keep))
    message = _error(broken)
    assert str(T1POST.resolve()) in str(Path(message.split(": ")[0]).resolve())
    assert "missing" in message and "13 mm" in message
    n_leaks = _leaks([message], _identifier_tokens(T1POST))
    assert n_leaks == 0, "a patient identifier appears in the error text"


# --- synthetic series ---------------------------------------------------------------------------------


def test_shuffled_names_sort_by_position_and_match_itk(tmp_path: Path) -> None:
    names = ["b.dcm", "z.dcm", "a.dcm", "10.dcm", "2.dcm", "m.dcm"]
    files = write_series(tmp_path / "s", names=names)
    info = _only_series(tmp_path / "s")
    assert list(info.files) == files  # not name order, not InstanceNumber order (it runs backwards)
    image = read_series(info)
    volume = sitk.GetArrayFromImage(image)
    assert [int(v) for v in volume[:, 0, 0] - volume[0, 0, 0]] == [300 * k for k in range(6)]
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.8, 2.5), atol=1e-5)  # (columns, rows, step)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    itk = reader.Execute()
    np.testing.assert_allclose(image.GetSpacing(), itk.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), itk.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), itk.GetDirection(), atol=1e-6)
    assert np.array_equal(volume, sitk.GetArrayFromImage(itk))


def test_missing_slice_names_folder(tmp_path: Path) -> None:
    write_series(tmp_path / "gap", positions=[0, 2.5, 5, 10, 12.5])
    message = _error(_only_series(tmp_path / "gap"))
    assert message.startswith(str(tmp_path / "gap") + ": ") and "missing" in message


def test_inconsistent_spacing(tmp_path: Path) -> None:
    write_series(tmp_path / "s", positions=[0, 2.5, 5, 7.8, 10.3])
    assert "inconsistent slice spacing" in _error(_only_series(tmp_path / "s"))


def test_duplicate_positions(tmp_path: Path) -> None:
    write_series(tmp_path / "s", positions=[0, 2.5, 2.5, 5])
    assert "duplicate slice positions" in _error(_only_series(tmp_path / "s"))


def test_gantry_tilt_shear_is_an_error(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", n=4)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        row = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array(ds.ImagePositionPatient, dtype=float) + k * row]
        ds.save_as(f)
    assert "sheared stack" in _error(_only_series(tmp_path / "s"))


def test_mixed_orientation_is_an_error_but_1e7_noise_is_not(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", n=4)
    ds = pydicom.dcmread(files[2])
    iop = [float(v) for v in ds.ImageOrientationPatient]
    ds.ImageOrientationPatient = [f"{v:.10f}" for v in np.array(iop) + [1e-7, 0, 0, 0, -1e-7, 0]]
    ds.save_as(files[2])
    validate_series(_only_series(tmp_path / "s"))  # like Study2 T1post: -0.0597709 vs -0.059771

    tilted = _orthonormal(tuple(np.array(iop) + [0, 0.02, 0, 0, 0, 0.02]))
    ds.ImageOrientationPatient = [f"{v:.10f}" for v in tilted]
    ds.save_as(files[2])
    message = _error(_only_series(tmp_path / "s"))
    assert message.startswith(str(files[2])) and "mixed orientations" in message


def test_multi_frame_object(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", n=3)
    ds = pydicom.dcmread(files[1])
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(files[1])
    message = _error(_only_series(tmp_path / "s"))
    assert message.startswith(str(files[1])) and "multi-frame" in message


def test_non_image_object_in_series_is_listed_apart(tmp_path: Path) -> None:
    """An SR sharing the series' SeriesInstanceUID is not a slice: listed in ``others``, the slices stay a series."""
    files = write_series(tmp_path / "s", n=4)
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.Modality = "SR"
    for keyword in ("PixelData", "Rows", "Columns", "ImagePositionPatient"):
        delattr(ds, keyword)
    ds.save_as(files[0])
    scan = scan_dicom_folder(tmp_path / "s")
    assert [o.path for o in scan.others] == [files[0]] and scan.others[0].what == "Basic Text SR Storage"
    (info,) = scan.series
    assert info.files == tuple(files[1:])
    validate_series(info)


def test_mixed_rows_and_pixel_spacing(tmp_path: Path) -> None:
    files = write_series(tmp_path / "rows", n=3)
    ds = pydicom.dcmread(files[1])
    ds.PixelData, ds.Rows = ds.pixel_array[:-2].tobytes(), ds.Rows - 2
    ds.save_as(files[1])
    assert "mixed rows/columns" in _error(_only_series(tmp_path / "rows"))

    files = write_series(tmp_path / "spacing", n=3)
    ds = pydicom.dcmread(files[2])
    ds.PixelSpacing = [0.8, 0.52]
    ds.save_as(files[2])
    assert "mixed pixel spacing" in _error(_only_series(tmp_path / "spacing"))


def test_single_slice_is_too_few(tmp_path: Path) -> None:
    write_series(tmp_path / "one", n=1)
    assert "fewer than 2 slices" in _error(_only_series(tmp_path / "one"))


def test_rescale_is_applied(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", n=3)
    raw = sitk.GetArrayFromImage(read_series(_only_series(tmp_path / "s"))).astype(np.float64)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = 2, -10
        ds.save_as(f)
    scaled = read_series(_only_series(tmp_path / "s"))
    assert scaled.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayFromImage(scaled), raw * 2 - 10)
    ds = pydicom.dcmread(files[0])
    ds.RescaleSlope = 0.5
    ds.save_as(files[0])
    mixed = sitk.GetArrayFromImage(read_series(_only_series(tmp_path / "s")))
    assert mixed.dtype == np.float32 and np.array_equal(mixed[0], raw[0] * 0.5 - 10)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_compressed_copy_reads_identical_pixels(syntax: str, real_scan: DicomScan, tmp_path: Path) -> None:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder installed")
    info = next(s for s in real_scan.series if s.case_id == "11_HCropVolume")
    for f in info.files:
        ds = pydicom.dcmread(f)
        ds.compress(syntax)
        ds.save_as(tmp_path / f.name)
    copy_info = _only_series(tmp_path)
    assert pydicom.dcmread(copy_info.files[0]).file_meta.TransferSyntaxUID == syntax
    original, compressed = read_series(info), read_series(copy_info)
    assert np.array_equal(sitk.GetArrayFromImage(compressed), sitk.GetArrayFromImage(original))
    assert compressed.GetOrigin() == original.GetOrigin() and compressed.GetSpacing() == original.GetSpacing()


def test_case_ids_avoid_identifiers_and_collisions(tmp_path: Path) -> None:
    write_series(tmp_path / "a" / "T1")
    write_series(tmp_path / "b" / "T1")
    write_series(tmp_path / "SYNTH-PID-0001_scan")  # folder named after the (fake) patient id
    write_series(tmp_path / "two", names=[f"x{k}.dcm" for k in range(6)])
    write_series(tmp_path / "two", names=[f"y{k}.dcm" for k in range(6)])
    (tmp_path / "notes.txt").write_text("not DICOM")
    scan = scan_dicom_folder(tmp_path)
    ids = [s.case_id for s in scan.series]
    assert len(ids) == len(set(ids)) == 5
    assert sum(i.startswith("T1-") for i in ids) == 2
    assert sum(i.startswith("series-") for i in ids) == 3  # patient-named folder + 2 series in one folder
    assert not any("synth" in i.lower() for i in ids)
    assert [p.name for p in scan.skipped] == ["notes.txt"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder not found"):
        discover_series(tmp_path / "nope")
