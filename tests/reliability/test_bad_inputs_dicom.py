"""Broken DICOM series among good ones in one prediction batch: each fails alone with one line naming the file or
folder and the cause; two series sharing a folder are two cases, not one mixed volume.

The series are copies of a real MR series of the shared data (``dicom_mr_series``: 40 slices of 50x34), written
into a temp folder tree and damaged there; the batch runs the real predictor with the oracle network of
``tests.helpers`` (DICOM outputs off: they are not what is tested here).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg.inference.records import BatchReport
from tests.helpers import SHARED_DATA, oracle_batch, phantom_package

SERIES = SHARED_DATA / "dicom_mr_series" / "Study3" / "11_HCropVolume"
pytestmark = pytest.mark.skipif(not SERIES.is_dir(), reason=f"shared DICOM data not found at {SERIES}")


def _slices(folder: Path) -> list[Path]:
    """The folder's slices in position order (along the normal; this series is axial)."""
    return sorted(folder.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def _copy(root: Path, name: str, new_uids: bool = True) -> Path:
    """A copy of the real series in ``root / name``, as a series of its own (new series and instance UIDs)."""
    shutil.copytree(SERIES, root / name)
    if new_uids:
        uid = generate_uid()
        for p in (root / name).glob("*.dcm"):
            _edit(p, SeriesInstanceUID=uid, SOPInstanceUID=generate_uid())
    return root / name


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path)


def _missing_slice(root: Path) -> Path:
    folder = _copy(root, "missing_slice")
    _slices(folder)[20].unlink()
    return folder


def _inconsistent_orientation(root: Path) -> Path:
    folder = _copy(root, "inconsistent_orientation")
    a = np.radians(3.0)  # one slice tilted by 3 degrees in plane
    victim = _slices(folder)[17]
    _edit(
        victim,
        ImageOrientationPatient=[float(np.cos(a)), float(np.sin(a)), 0.0, -float(np.sin(a)), float(np.cos(a)), 0.0],
    )
    return victim


def _mixed_matrix(root: Path) -> Path:
    """One series UID, but a slice of another matrix size among its slices (two acquisitions merged)."""
    folder = _copy(root, "mixed_matrix")
    victim = _slices(folder)[9]
    ds = pydicom.dcmread(victim)
    crop = np.ascontiguousarray(ds.pixel_array[:40, :30])
    ds.Rows, ds.Columns, ds.PixelData = 40, 30, crop.tobytes()
    ds.save_as(victim)
    return victim


def _two_series_in_one_folder(root: Path) -> Path:
    """The good series and a second one (new UIDs, shifted 200 mm) share one folder."""
    folder = _copy(root, "two_series")
    uid = generate_uid()
    for p in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [float(v) + (200.0 if i == 2 else 0.0) for i, v in enumerate(ds.ImagePositionPatient)]
        ds.save_as(folder / f"second_{p.name}")
    return folder


@pytest.fixture(scope="module")
def batch(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[BatchReport, Path, dict, list]:
    root = tmp_path_factory.mktemp("bad_dicom") / "export"
    root.mkdir()
    _copy(root, "good_a")
    bad = {
        "missing_slice": _missing_slice(root),
        "inconsistent_orientation": _inconsistent_orientation(root),
        "mixed_matrix": _mixed_matrix(root),
    }
    exported_twice = root / "exported_twice"  # one series (same UIDs) in two folders: every position twice
    _copy(exported_twice, "first", new_uids=False)
    _copy(exported_twice, "second", new_uids=False)
    bad["exported_twice"] = exported_twice
    _two_series_in_one_folder(root)
    _copy(root, "zz_good")
    pkg, _ = phantom_package(
        tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null", "inference.dicom_output=none"]
    )
    out = tmp_path_factory.mktemp("out")
    report, records = oracle_batch(pkg, root, out)
    return report, out, bad, records


CAUSES = {
    "missing_slice": r"missing slice\(s\): a gap of 2 mm between \S+ and \S+ is 2x the median step 1 mm",
    "inconsistent_orientation": r"mixed orientations in series: ImageOrientationPatient differs from \S+ by up to "
    r"0\.0523",
    "mixed_matrix": r"mixed rows/columns in series: 40x30 here, 50x34 in \S+",
    "exported_twice": r"duplicate slice positions: \S+ and \S+ lie at the same position along the slice normal",
}


def _case_of(kind: str, report: BatchReport) -> str:
    """The case id of a kind: its folder's name, or (a series across folders) the UID-hash id."""
    if kind != "exported_twice":
        return kind
    return next(c for c in report.failed if c.startswith("series-"))


@pytest.mark.parametrize("kind", sorted(CAUSES))
def test_bad_series_fails_alone(kind: str, batch: tuple[BatchReport, Path, dict, list]) -> None:
    report, out, bad, log = batch
    cid = _case_of(kind, report)
    record = json.loads((out / f"{cid}.json").read_text())
    assert record["status"] == "failed" and report.failed[cid] == record["error"]
    error = record["error"]
    assert error.startswith(f"{bad[kind]}: ") and re.search(CAUSES[kind], error), error
    assert "\n" not in error and "Traceback" not in error and not re.search(r"object at 0x", error)
    logged = [r for r in log if r.getMessage().startswith(f"{cid}: ")]
    assert len(logged) == 1 and logged[0].exc_info is None
    assert not (out / f"{cid}.nii.gz").exists()


def test_two_series_in_one_folder_are_two_cases_and_the_batch_goes_on(
    batch: tuple[BatchReport, Path, dict, list],
) -> None:
    report, out, _, log = batch
    assert sorted(report.failed) == sorted(_case_of(k, report) for k in CAUSES)
    shared = [c for c in report.done if c.startswith("series-")]  # a folder holding two series names neither
    assert len(shared) == 2 and sorted(set(report.done) - set(shared)) == ["good_a", "zz_good"]
    for cid in report.done:
        record = json.loads((out / f"{cid}.json").read_text())
        assert (
            record["status"] == "ok" and record["n_slices"] == 40 and record["shape"] == [34, 50, 40]
        )  # (columns, rows, slices)
    assert not [r for r in log if r.exc_info]
