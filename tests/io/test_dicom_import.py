"""``medseg data import-dicom`` (``medseg.io.dicom_import``): DICOM series + RTSTRUCT / DICOM-SEG -> NIfTI cache and a
manifest the trainer trains.

Real data: all 18 IBSI soft-tissue-sarcoma cases (labels compared with the publisher's own rasterisation, images
voxel for voxel), and the dcmqi 3-slice CT with its liver SEG (compared with dcmqi's NRRD label map). Synthetic
hospital folders written with pydicom: ROI map (globs, synonyms, priority on overlap, unmatched report), linking
(series UID, frame-of-reference fallback, unlinked objects), case ids, the cache, failures, and the real CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medseg.config import load_config
from medseg.engine.trainer import Trainer
from medseg.errors import InputError, MedsegError
from medseg.io.dicom_import import ImportOptions, ImportResult, import_dicom
from medseg.io.manifest import Case, Manifest, load_manifest
from medseg.io.roi_map import LabelVolume, identity_roi_map, load_roi_map
from tests.helpers import SHARED_DATA, run_cli

IBSI = SHARED_DATA / "ibsi_sts_ct"
DCMQI = SHARED_DATA / "dicom_ct_transfer_syntaxes" / "dcmqi_ct3slice_SEG"
PATIENT = ("Qzxname^Wvyfirst", "PIDQ4711")  # synthetic; their fragments must never be printed or written
TOKENS = ("qzxname", "wvyfirst", "pidq4711")
ORIGIN, STEP = np.array([10.0, -5.0, 30.0]), np.array([0.5, 0.8, 2.5])  # column, row, slice steps (mm)
ROWS, COLS, SLICES = 12, 10, 4
MAP = "labels:\n  tumour: ['GTV*', 'gtv_mass*']\n  oedema: ['edema*', 'oedema*']\n  necrosis: []\n"


# ---- synthetic DICOM ------------------------------------------------------------------------------------------
def write_ct(folder: Path, frame: str | None = None) -> tuple[str, str]:
    """A 4-slice CT series (axial, 0.5 x 0.8 x 2.5 mm); voxel (k, j, i) holds 100 k + 10 j + i - 500 HU."""
    folder.mkdir(parents=True)
    series, frame, study = generate_uid(), frame or generate_uid(), generate_uid()
    for k in range(SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality, (ds.PatientName, ds.PatientID) = "CT", PATIENT
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.ImagePositionPatient = [float(x) for x in ORIGIN + [0, 0, k * STEP[2]]]
        ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [float(STEP[1]), float(STEP[0])]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        j, i = np.mgrid[:ROWS, :COLS]
        ds.PixelData = (100 * k + 10 * j + i - 500).astype(np.int16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return series, frame


def _square(lo: float, hi: float, k: float) -> list[tuple[float, float, float]]:
    return [(lo, lo, k), (hi, lo, k), (hi, hi, k), (lo, hi, k)]


def write_rtstruct(path: Path, series: str | None, frame: str, rois: dict[str, list[list[tuple[float, ...]]]]) -> Path:
    """An RTSTRUCT referencing ``series`` (None: no series reference) in ``frame``; contours in index space."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.TransferSyntaxUID, ds.SOPInstanceUID = ExplicitVRLittleEndian, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, (ds.PatientName, ds.PatientID) = "RTSTRUCT", PATIENT
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    if series is not None:
        study, item = Dataset(), Dataset()
        item.SeriesInstanceUID = series
        study.RTReferencedSeriesSequence = Sequence([item])
        ref.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi, item = Dataset(), Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame
        item.ReferencedROINumber, item.ContourSequence = number, Sequence()
        for ijk in contours:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(ijk)
            c.ContourData = [round(float(v), 6) for v in (ORIGIN + np.asarray(ijk) * STEP).ravel()]
            item.ContourSequence.append(c)
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


ROIS_A = {
    "GTV_primary": [_square(1.5, 5.5, 1)],  # columns/rows 2..5 of slice 1: 16 voxels
    "Edema_1": [_square(3.5, 7.5, 1)],  # 4..7: 16 voxels, 4 of them shared with the GTV
    "BODY": [_square(0.5, 8.5, 1)],  # matches no label
    "gtv_mass_tiny": [_square(2.1, 2.4, 2)],  # holds no voxel centre: empty
}


def hospital(root: Path, *, bad: bool = True) -> Path:
    """caseA (ROI map scenario), caseB (plain GTV), caseC (RTSTRUCT without a series reference), lonely (no labels),
    an orphan RTSTRUCT (references nothing here), and, if ``bad``, a case whose contour is off the slice planes
    in a folder named after the patient ID."""
    series, frame = write_ct(root / "caseA" / "ct")
    write_rtstruct(root / "caseA" / "RS.dcm", series, frame, ROIS_A)
    series, frame = write_ct(root / "caseB" / "ct")
    write_rtstruct(root / "caseB" / "rt" / "RS.dcm", series, frame, {"GTV": [_square(0.5, 2.5, 0)]})
    _, frame = write_ct(root / "caseC" / "ct")
    write_rtstruct(root / "caseC" / "RS.dcm", None, frame, {"GTV": [_square(0.5, 3.5, 3)]})
    write_ct(root / "lonely" / "ct")
    write_rtstruct(root / "orphan" / "RS.dcm", generate_uid(), generate_uid(), {"GTV": [_square(0.5, 2.5, 0)]})
    if bad:
        series, frame = write_ct(root / f"{PATIENT[1]}_bad" / "ct")
        write_rtstruct(root / f"{PATIENT[1]}_bad" / "RS.dcm", series, frame, {"GTV": [_square(0.5, 2.5, 1.5)]})
    return root


def _case_ids_by_folder(result: ImportResult) -> dict[str, str]:
    cases = json.loads(result.case_map_path.read_text())["cases"]
    return {entry["folder"].split("/")[0]: cid for cid, entry in cases.items()}


def _label(manifest: Manifest, case_id: str) -> np.ndarray:
    """A case's label map as (slices, rows, columns)."""
    path = manifest.label_path(manifest.case(case_id))
    assert path is not None
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImportResult]:
    root = hospital(tmp_path_factory.mktemp("hospital") / "dicom")
    roi_map = root.parent / "map.yaml"
    roi_map.write_text(MAP)
    return root, import_dicom(root, root.parent / "out" / "syn.json", ImportOptions("rtstruct", roi_map))


# ---- ROI map --------------------------------------------------------------------------------------------------
def test_roi_map_globs_synonyms_priority_and_reports(synthetic: tuple[Path, ImportResult]) -> None:
    _, result = synthetic
    ids = _case_ids_by_folder(result)
    record = next(c for c in result.cases if c.case_id == ids["caseA"]).record
    assert record["labels"] == {"tumour": 16, "oedema": 12, "necrosis": 0}  # tumour first: wins the overlap
    assert record["contested_voxels"] == 4
    assert record["unmatched_rois"] == ["BODY"] and record["labels_without_roi"] == ["necrosis"]
    assert record["empty_rois"] == ["gtv_mass_tiny"]
    labels = _label(result.manifest, ids["caseA"])
    expected = np.zeros((SLICES, ROWS, COLS), np.uint8)
    expected[1, 4:8, 4:8] = 2
    expected[1, 2:6, 2:6] = 1
    assert np.array_equal(labels, expected)
    assert result.manifest.labels == {"background": 0, "tumour": 1, "oedema": 2, "necrosis": 3}


def test_priority_decides_overlaps(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(MAP + "priority: [oedema]\n")  # unlisted labels follow in `labels` order
    roi_map = load_roi_map(path)
    assert roi_map.priority == ("oedema", "tumour", "necrosis") and roi_map.values["tumour"] == 1
    assert roi_map.label_of("GTV_Mass_CT") == "tumour" and roi_map.label_of("OEDEMA") == "oedema"
    assert roi_map.label_of("Necrosis") == "necrosis" and roi_map.label_of("BODY") is None  # own name is a synonym
    volume = LabelVolume(roi_map, (1, 4))
    volume.add("tumour", np.array([[1, 1, 1, 0]], bool))
    volume.add("oedema", np.array([[0, 1, 1, 1]], bool))
    volume.add("tumour", np.array([[1, 0, 0, 0]], bool))  # same label again: not contested
    assert volume.labels().tolist() == [[1, 2, 2, 2]] and volume.contested == 2
    assert volume.voxels() == {"tumour": 1, "oedema": 3, "necrosis": 0}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("labels: {tumour: ['GTV*']}\npriority: [tumor]\n", "'priority' names ['tumor']"),
        ("labels: {mean: ['GTV*']}\n", "reserved"),
        ("labels: {tumour: [3]}\n", "list of ROI name globs"),
        ("labels: {tumour: ['GTV*']}\nlabel: x\n", "unknown key"),
        ("[not: a, map\n", "not valid YAML"),
    ],
)
def test_bad_roi_maps_are_input_errors_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=re.escape(problem)) as e:
        load_roi_map(path)
    assert e.value.path == str(path)


def test_without_a_map_each_roi_name_is_a_label(tmp_path: Path) -> None:
    roi_map = identity_roi_map(["GTV", "BODY", "gtv", "PTV+5mm", "GTV"])
    assert roi_map.labels == ("BODY", "GTV", "PTV_5mm", "gtv") and roi_map.label_of("gtv") == "gtv"
    root = tmp_path / "dicom"
    series, frame = write_ct(root / "caseA" / "ct")
    write_rtstruct(root / "caseA" / "RS.dcm", series, frame, ROIS_A)
    result = import_dicom(root, tmp_path / "id.json", ImportOptions("rtstruct"))
    assert load_manifest(result.manifest.path).labels == {
        "background": 0,
        "BODY": 1,
        "Edema_1": 2,
        "GTV_primary": 3,
        "gtv_mass_tiny": 4,
    }
    record = result.cases[0].record  # default priority = label order: BODY, first, wins wherever it overlaps
    assert record["labels"] == {"BODY": 64, "Edema_1": 0, "GTV_primary": 0, "gtv_mass_tiny": 0}
    assert record["contested_voxels"] == 16 + 16 - 4 and record["empty_rois"] == ["gtv_mass_tiny"]


# ---- linking, reports, failures ---------------------------------------------------------------------------------
def test_links_reports_and_failures(synthetic: tuple[Path, ImportResult]) -> None:
    root, result = synthetic
    ids = _case_ids_by_folder(result)
    assert set(ids) == {"caseA", "caseB", "caseC", f"{PATIENT[1]}_bad"}
    status = {folder: next(c for c in result.cases if c.case_id == cid).status for folder, cid in ids.items()}
    assert status == {"caseA": "ok", "caseB": "ok", "caseC": "ok", f"{PATIENT[1]}_bad": "failed"}
    by_id = {c.case_id: c for c in result.cases}
    assert by_id[ids["caseC"]].record["linked_by"] == ["frame of reference"]
    assert by_id[ids["caseB"]].record["linked_by"] == ["series"]
    assert _label(result.manifest, ids["caseB"])[0, 1:3, 1:3].all() and _label(result.manifest, ids["caseB"]).sum() == 4
    failed = result.failed[0].error
    assert failed.startswith("<redacted>/RS.dcm: ROI 'GTV' contour #1 is off the slice planes"), failed
    assert result.unlinked == [
        "orphan/RS.dcm: its referenced series is not among the image series found, and no image series is in its "
        "frame of reference"
    ]
    assert len(result.without_labels) == 1 and result.without_labels[0].startswith("series-")
    manifest = load_manifest(result.manifest.path)
    assert sorted(c.id for c in manifest.cases) == sorted(ids[f] for f in ("caseA", "caseB", "caseC"))
    report = json.loads(result.report_path.read_text())
    assert (
        report["failed"] == {ids[f"{PATIENT[1]}_bad"]: failed}
        and report["series_without_labels"] == result.without_labels
    )


def test_images_and_labels_share_the_series_geometry(synthetic: tuple[Path, ImportResult]) -> None:
    _, result = synthetic
    m = result.manifest
    for case in m.cases:
        image, label = nib.load(m.image_paths(case)[0]), nib.load(m.label_path(case))
        assert image.shape == label.shape == (COLS, ROWS, SLICES) and np.array_equal(image.affine, label.affine)
        assert np.allclose(image.affine[:3, 3], [-10.0, 5.0, 30.0]) and np.allclose(image.header.get_zooms(), STEP)
        k, j, i = np.meshgrid(np.arange(SLICES), np.arange(ROWS), np.arange(COLS), indexing="ij")
        assert np.array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), 100 * k + 10 * j + i - 500)


def test_nothing_identifying_in_manifest_report_or_ids(synthetic: tuple[Path, ImportResult]) -> None:
    _, result = synthetic
    texts = [result.manifest.path.read_text(), result.report_path.read_text()]
    texts += [c.line() for c in result.cases] + result.unlinked + [p.name for p in result.manifest.root_dir.rglob("*")]
    assert sum(tok in t.lower() for t in texts for tok in TOKENS) == 0
    case_map = json.loads(result.case_map_path.read_text())["cases"]  # the one place that links back
    assert any(PATIENT[1] in entry["folder"] for entry in case_map.values())


def test_rerun_skips_complete_cases_and_redoes_changed_ones(
    synthetic: tuple[Path, ImportResult], tmp_path: Path
) -> None:
    root, first = synthetic
    roi_map = root.parent / "map.yaml"
    out = root.parent / "out" / "syn.json"
    ids = _case_ids_by_folder(first)
    again = import_dicom(root, out, ImportOptions("rtstruct", roi_map))
    assert {c.case_id: c.status for c in again.cases if c.status != "failed"} == {
        ids[f]: "cached" for f in ("caseA", "caseB", "caseC")
    }
    assert [c.record for c in again.cases] == [c.record for c in first.cases]
    label = first.manifest.label_path(first.manifest.case(ids["caseB"]))
    assert label is not None
    label.unlink()  # an incomplete cache is made again
    partial = import_dicom(root, out, ImportOptions("rtstruct", roi_map))
    assert {c.case_id for c in partial.cases if c.status == "ok"} == {ids["caseB"]} and label.is_file()
    changed = tmp_path / "map.yaml"
    changed.write_text(MAP + "priority: [oedema, tumour]\n")  # another map: every case is made again
    redone = import_dicom(root, out, ImportOptions("rtstruct", changed))
    assert {c.status for c in redone.cases} == {"ok", "failed"}
    assert next(c for c in redone.cases if c.case_id == ids["caseA"]).record["labels"]["oedema"] == 16
    import_dicom(root, out, ImportOptions("rtstruct", roi_map))  # leave the module fixture's outputs as they were


def test_folder_case_ids_are_refused_when_they_name_the_patient(tmp_path: Path) -> None:
    root = hospital(tmp_path / "dicom")
    with pytest.raises(
        MedsegError,
        match="--case-ids folder refused: the folder of series-[0-9a-f]+ contains a "
        "patient identifier; use --case-ids hash",
    ) as e:
        import_dicom(root, tmp_path / "f.json", ImportOptions("rtstruct", case_ids="folder"))
    assert PATIENT[1].lower() not in str(e.value).lower()
    twice = tmp_path / "twice"
    for sub in ("a", "b"):
        series, frame = write_ct(twice / "caseX" / sub)
        write_rtstruct(twice / "caseX" / sub / "RS.dcm", series, frame, {"GTV": [_square(0.5, 2.5, 0)]})
    with pytest.raises(MedsegError, match="folder 'caseX' holds 2 labelled series"):
        import_dicom(twice, tmp_path / "t.json", ImportOptions("rtstruct", case_ids="folder"))


# ---- the real CLI -------------------------------------------------------------------------------------------
def test_cli_imports_the_good_cases_and_exits_3_naming_the_bad_file(tmp_path: Path) -> None:
    root = hospital(tmp_path / "dicom")
    series, frame = write_ct(root / "caseT" / "ct")
    truncated = write_rtstruct(root / "caseT" / "RS.dcm", series, frame, ROIS_A)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # stops any header read
    out = tmp_path / "m" / "syn.json"
    p = run_cli("data", "import-dicom", str(root), "--labels", "rtstruct", "--output", str(out), check=False)
    assert p.returncode == 3, p.stderr
    failed = [line for line in p.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and "<redacted>/RS.dcm: ROI 'GTV' contour #1 is off the slice planes" in failed[0]
    assert "FAILED caseT/RS.dcm: unreadable RTSTRUCT: no ROIContourSequence (truncated" in failed[1]  # others go on
    ok = [line for line in p.stdout.splitlines() if re.match(r"series-[0-9a-f]{10}: ok ", line)]
    assert len(ok) == 3 and any("BODY 64 vox" in line and "contested voxels: 28" in line for line in ok)
    assert "unlinked label object orphan/RS.dcm" in p.stdout and "1 image series without labels" in p.stdout
    assert len(load_manifest(out).cases) == 3
    assert sum(tok in (p.stdout + p.stderr).lower() for tok in TOKENS) == 0
    clean = tmp_path / "clean"
    clean.mkdir()
    (root / "caseA").rename(clean / "caseA")
    (root / "caseB").rename(clean / "caseB")
    p = run_cli(
        "data",
        "import-dicom",
        str(clean),
        "--labels",
        "rtstruct",
        "--out",
        str(tmp_path / "c.json"),
        "--case-ids",
        "folder",
        "--val-fraction",
        "0.5",
    )
    assert [line.split(":")[0] for line in p.stdout.splitlines() if ": ok " in line] == ["caseA", "caseB"]
    assert "--out is deprecated" in p.stderr
    assert {c.split for c in load_manifest(tmp_path / "c.json").cases} == {"train", "val"}
    p = run_cli("data", "import-dicom", str(clean), "--labels", "contours", "--output", "x.json", check=False)
    assert p.returncode == 2 and "choose rtstruct or seg" in p.stderr


@pytest.mark.skipif(not IBSI.is_dir(), reason="shared IBSI data not available")
def test_a_file_that_stops_the_folder_scan_loses_only_its_own_folder(tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    for case in ("STS_002", "STS_008"):
        shutil.copytree(IBSI / case / "CT", root / case / "CT")
    rs = root / "STS_008" / "CT" / "mask" / "RS.dcm"
    rs.chmod(0o644)
    rs.write_bytes(rs.read_bytes()[: rs.stat().st_size // 2])  # implicit VR, defined lengths: pydicom raises
    (tmp_path / "map.yaml").write_text("labels:\n  tumour: ['GTV*']\n")
    result = import_dicom(root, tmp_path / "two.json", ImportOptions("rtstruct", tmp_path / "map.yaml"))
    assert [(c.status, c.record["labels"]) for c in result.cases] == [("ok", {"tumour": 17090})]
    assert len(result.unreadable) == 1 and not result.ok
    assert result.unreadable[0].startswith("<redacted>/CT/mask/RS.dcm: "), result.unreadable  # STS_008 is the PatientID
    assert "unreadable" in result.unreadable[0]
    report = json.loads(result.report_path.read_text())
    assert report["unreadable_folders"] == result.unreadable and "sts_008" not in result.report_path.read_text().lower()


@pytest.mark.skipif(not DCMQI.is_dir(), reason="shared dcmqi SEG data not available")
def test_cli_imports_the_dcmqi_seg_through_the_roi_map(tmp_path: Path) -> None:
    roi_map = tmp_path / "map.yaml"
    roi_map.write_text("labels:\n  liver_organ: ['liv*']\n")
    out = tmp_path / "liver.json"
    p = run_cli(
        "data",
        "import-dicom",
        str(DCMQI),
        "--labels",
        "seg",
        "--roi-map",
        str(roi_map),
        "--output",
        str(out),
        "--case-ids",
        "folder",
    )
    line = next(line for line in p.stdout.splitlines() if line.startswith("ct-3slice: "))
    assert line.startswith("ct-3slice: ok liver_organ 107098 vox") and "placed by their patient positions" in line
    m = load_manifest(out)
    assert m.labels == {"background": 0, "liver_organ": 1} and [c.id for c in m.cases] == ["ct-3slice"]
    ours = nib.load(m.label_path(m.cases[0]))
    image = nib.load(m.image_paths(m.cases[0])[0])
    assert np.array_equal(ours.affine, image.affine)
    nrrd = sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))  # dcmqi's own label map of the same segment
    assert np.allclose(nrrd.GetOrigin(), np.diag([-1, -1, 1]) @ ours.affine[:3, 3], atol=1e-3)
    assert np.array_equal(np.asarray(ours.dataobj).transpose(2, 1, 0), sitk.GetArrayFromImage(nrrd))
    case_map = json.loads((tmp_path / "liver_case_map.json").read_text())["cases"]
    assert case_map["ct-3slice"]["folder"] == "ct-3slice" and case_map["ct-3slice"]["label_objects"] == ["liver.dcm"]


# ---- the real sarcoma data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ibsi(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImportResult, float]:
    """All 18 IBSI cases imported once for the module with the sarcoma preset's committed ROI map
    (``data_manifests/sarcoma_roi_map.yaml``: ``tumour: ["GTV*"]``)."""
    if not IBSI.is_dir():
        pytest.skip(f"real data not found at {IBSI}")
    out = tmp_path_factory.mktemp("ibsi")
    roi_map = Path(__file__).resolve().parents[2] / "data_manifests" / "sarcoma_roi_map.yaml"
    t0 = time.perf_counter()
    result = import_dicom(IBSI, out / "sts.json", ImportOptions("rtstruct", roi_map, 0.2, 0.2))
    return result, time.perf_counter() - t0


def test_ibsi_all_cases_import(ibsi: tuple[ImportResult, float]) -> None:
    result, seconds = ibsi
    print(f"imported 18 IBSI cases in {seconds:.1f} s")
    assert [c.status for c in result.cases] == ["ok"] * 18 and not result.unlinked and not result.without_labels
    m = load_manifest(result.manifest.path)
    assert m.labels == {"background": 0, "tumour": 1} and m.channel_names == {"0": "CT"}
    assert {s: len(m.split(s)) for s in ("train", "val", "test")} == {"train": 10, "val": 4, "test": 4}
    assert all(c.record["unmatched_rois"] == [] and c.record["warnings"] == [] for c in result.cases)


def test_ibsi_labels_and_images_agree_with_the_published_nifti(ibsi: tuple[ImportResult, float]) -> None:
    result, _ = ibsi
    m = result.manifest
    cases = json.loads(result.case_map_path.read_text())["cases"]
    dice, extra = {}, {}
    for cid, entry in cases.items():
        source = IBSI / entry["folder"].split("/")[0] / "nifti"
        ref, ours = nib.load(source / "CT_mask.nii.gz"), nib.load(m.label_path(m.case(cid)))
        assert ours.shape == ref.shape and np.allclose(ours.affine, ref.affine, atol=1e-3)
        a, b = np.asarray(ref.dataobj) > 0, np.asarray(ours.dataobj) > 0
        dice[cid] = 2 * float((a & b).sum()) / float(a.sum() + b.sum())
        extra[cid] = int(b.sum()) - int(a.sum())
        if (source / "CT_image.nii.gz").is_file():  # all but STS_030
            image = np.asarray(nib.load(m.image_paths(m.case(cid))[0]).dataobj)
            assert np.array_equal(image, np.asarray(nib.load(source / "CT_image.nii.gz").dataobj)), cid
    print("per-case Dice:", {cases[c]["folder"].split("/")[0]: round(d, 4) for c, d in dice.items()})
    assert len(dice) == 18 and min(dice.values()) >= 0.98
    # The measured fact the README states: the centre-inside rule gives the publisher's masks voxel for voxel.
    assert set(dice.values()) == {1.0} and set(extra.values()) == {0}


def test_imported_cases_train_through_the_real_trainer(ibsi: tuple[ImportResult, float], tmp_path: Path) -> None:
    result, _ = ibsi
    m = result.manifest
    small = sorted(m.cases, key=lambda c: nib.load(m.image_paths(c)[0]).header.get_data_shape())[:2]
    two = Manifest(
        name="sts2",
        labels=m.labels,
        cases=[Case(c.id, c.image, c.label, split) for c, split in zip(small, ("train", "val"))],
        channel_names=m.channel_names,
    )
    two.save(m.path.parent / "two.json")
    cfg = load_config(
        "sarcoma_ct_unet3d",
        [
            f"data.manifest={two.path}",
            f"train.output_dir={tmp_path}",
            "train.run_name=t",
            "train.epochs=1",
            "train.val_every=1",
            "data.patch_size=[32, 32, 16]",
            "model.params.channels=[4, 8, 16, 32]",
            "data.samples_per_volume=1",
            "tracking.backend=none",
            "train.device=cpu",
            "train.hd95_every=0",
            "train.overlay_cases=0",
            "data.augment=false",
            "data.spacing=[3.0, 3.0, 3.27]",
            "inference.overlap=0.0",
        ],
    )
    fit = Trainer(cfg, load_manifest(two.path)).fit()
    assert fit.epochs_run == 1 and set(fit.best_per_class) == {"tumour"}
    history = (tmp_path / "t" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "val_dice_tumour" in history[0]
