"""Prediction on real, untidy DICOM exports: what is not a scan is skipped and listed, UID-less and SOPClassUID-less
copies of a real series still predict (with a warning), and a case's status always agrees with its files on disk.

The image series are the real MR series in ../shared/data (small hippocampus crops); the non-image objects are a real
RTSTRUCT (ibsi_sts_ct), a real DICOM-SEG (dcmqi), and an SR, a KO, a PR and a DICOMDIR written here with pydicom.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medseg.inference.batch import run_batch
from medseg.inference.inputs import discover
from medseg.inference.predictor import Predictor
from tests.helpers import SHARED_DATA, oracle_model, phantom_package, run_cli

MR = SHARED_DATA / "dicom_mr_series"
SERIES = {"hippo_a": MR / "Study1" / "13_HCropVolume", "hippo_b": MR / "Study3" / "11_HCropVolume"}
RTSTRUCT = SHARED_DATA / "ibsi_sts_ct" / "STS_002" / "CT" / "mask" / "RS.dcm"
SEG = SHARED_DATA / "dicom_ct_transfer_syntaxes" / "dcmqi_ct3slice_SEG" / "liver.dcm"
pytestmark = pytest.mark.skipif(not (MR.is_dir() and RTSTRUCT.is_file() and SEG.is_file()), reason="no shared data")


@pytest.fixture(scope="module")
def package(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory):
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg


def _minimal(path: Path, sop_class: str, modality: str, **attrs) -> Path:
    """A small non-image DICOM object (no pixel data) saved to ``path``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _export(root: Path) -> dict[str, Path]:
    """A PACS-like export: two real image series and six objects that are not scans."""
    for name, src in SERIES.items():
        shutil.copytree(src, root / name)
    others = {
        "rtstruct": shutil.copy(RTSTRUCT, root / "hippo_b" / "RS.dcm"),
        "seg": shutil.copy(SEG, root / "hippo_a" / "liver_seg.dcm"),
        "sr": _minimal(root / "reports" / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.11", "SR"),
        "ko": _minimal(root / "reports" / "ko.dcm", "1.2.840.10008.5.1.4.1.1.88.59", "KO"),
        "pr": _minimal(root / "reports" / "pr.dcm", "1.2.840.10008.5.1.4.1.1.11.1", "PR"),
    }
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.3.10", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir = pydicom.Dataset()
    dicomdir.file_meta = meta
    dicomdir.FileSetID, dicomdir.DirectoryRecordSequence = "EXPORT", []
    dicomdir.save_as(root / "DICOMDIR", enforce_file_format=True)
    return {**{k: Path(v) for k, v in others.items()}, "dicomdir": root / "DICOMDIR"}


def test_mixed_export_predicts_every_series_and_lists_the_rest(package, tmp_path: Path) -> None:
    """CLI on a mixed export: exit 0, both series predicted, six objects skipped and listed; no library noise."""
    export = tmp_path / "export"
    objects = _export(export)
    found = discover(export)
    assert sorted(c.id for c in found.cases) == sorted(SERIES)
    assert sorted(o.path for o in found.not_scans) == sorted(objects.values())
    out = tmp_path / "out"
    p = run_cli("predict", "--model", str(package.path), "--input", str(export), "--output", str(out),
                "--device", "cpu", check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 predicted" in p.stdout and "6 non-image objects skipped" in p.stdout
    for case in SERIES:
        record = json.loads((out / f"{case}.json").read_text())
        assert record["status"] == "ok" and all((out / n).is_file() for n in record["outputs"])
        assert f"{case}.seg.dcm" in record["outputs"]
    with (out / "skipped_objects.csv").open() as fh:
        listed = {row["file"]: row["what"] for row in csv.DictReader(fh)}
    assert set(listed) == {o.relative_to(export).as_posix() for o in objects.values()}
    assert listed["hippo_b/RS.dcm"] == "RT Structure Set Storage" and listed["DICOMDIR"].startswith("DICOMDIR")
    noise = [line for line in p.stderr.splitlines() if "pydicom" in line or "highdicom" in line]
    assert not noise, noise[:5]


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(dst / f.name)
    return dst


def _predict(package, folder: Path, out: Path):
    found = discover(folder)
    report = run_batch(package, found.cases, out, device="cpu", progress=False,
                       predictor=Predictor(package, device="cpu", model=oracle_model()))
    (case,) = found.cases
    return report, case, json.loads((out / f"{case.id}.json").read_text())


def test_series_without_series_uid_predicts_with_a_warning(package, tmp_path: Path) -> None:
    """Anonymised files without SeriesInstanceUID: grouped, predicted; the mask equals the intact series' mask;
    no DICOM-SEG (it could reference no series), said in the record, which lists only the files on disk."""
    src = SERIES["hippo_a"]
    uid_less = _rewrite(src, tmp_path / "uidless" / "scan", lambda ds: delattr(ds, "SeriesInstanceUID"))
    report, case, record = _predict(package, uid_less, tmp_path / "out")
    assert report.done == [case.id] and not report.failed and case.series.uid_missing
    assert any("no SeriesInstanceUID" in w for w in record["warnings"])
    assert any(w.startswith("no DICOM output") for w in record["warnings"])
    assert record["outputs"] == [f"{case.id}.nii.gz"] and not list((tmp_path / "out").glob("*.dcm"))
    _, intact, _ = _predict(package, src, tmp_path / "intact")
    a, b = nib.load(tmp_path / "out" / f"{case.id}.nii.gz"), nib.load(tmp_path / "intact" / f"{intact.id}.nii.gz")
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_empty_sop_class_is_derived_from_modality(package, tmp_path: Path) -> None:
    """SOPClassUID (and the file meta's copy) blanked: derived from Modality MR; the DICOM-SEG is written."""

    def blank(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = ""
        ds.file_meta.MediaStorageSOPClassUID = ""

    folder = _rewrite(SERIES["hippo_a"], tmp_path / "blank" / "scan", blank)
    report, case, record = _predict(package, folder, tmp_path / "out")
    assert report.done == [case.id]
    assert any("derived MR Image Storage from Modality MR" in w for w in record["warnings"])
    seg = pydicom.dcmread(tmp_path / "out" / f"{case.id}.seg.dcm")
    refs = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {str(r.ReferencedSOPClassUID) for r in refs} == {"1.2.840.10008.5.1.4.1.1.4"}


def test_failed_dicom_output_leaves_an_ok_case_that_agrees_with_disk(package, tmp_path: Path) -> None:
    """No SOPClassUID and no usable Modality: the NIfTI mask is written, the SEG cannot be: status ok, a warning
    saying why, the record lists only the mask, and no SEG (or temp file) is left on disk."""

    def blank(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID, ds.Modality = "", "OT"
        ds.file_meta.MediaStorageSOPClassUID = ""

    folder = _rewrite(SERIES["hippo_a"], tmp_path / "broken" / "scan", blank)
    report, case, record = _predict(package, folder, tmp_path / "out")
    assert report.done == [case.id] and record["status"] == "ok"
    assert any(w.startswith("no DICOM output") for w in record["warnings"]), record["warnings"]
    assert record["outputs"] == [f"{case.id}.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([f"{case.id}.nii.gz", f"{case.id}.json",
                                                                             "summary.csv"])


def test_unreadable_slice_fails_only_its_series(package, tmp_path: Path) -> None:
    """A truncated file in one series' folder fails that series (naming the file), the other series is predicted,
    and a truncated file in a folder of its own is listed with the skipped objects."""
    export = tmp_path / "export"
    for name, src in SERIES.items():
        shutil.copytree(src, export / name)
    broken = sorted((export / "hippo_a").iterdir())[5]
    broken.write_bytes(broken.read_bytes()[:300])
    (export / "stray").mkdir()
    stray = export / "stray" / "x.dcm"
    stray.write_bytes(broken.read_bytes())
    found = discover(export)
    assert [o.path for o in found.not_scans] == [stray]
    report = run_batch(package, found.cases, tmp_path / "out", device="cpu", progress=False,
                       predictor=Predictor(package, device="cpu", model=oracle_model()), not_scans=found.not_scans)
    assert report.done == ["hippo_b"] and list(report.failed) == ["hippo_a"] and report.exit_code == 3
    error = report.failed["hippo_a"]
    assert error.startswith(f"{broken}: ") and "truncated" in error and "series may be incomplete" in error
