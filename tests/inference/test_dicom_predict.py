"""DICOM series in, NIfTI mask and DICOM-SEG out, on the real MR series in ../shared/data.

The oracle network of ``test_geometry`` thresholds intensities, so the expected mask is known exactly:
the thresholds applied to the series' own voxels. The NIfTI mask must equal it voxel for voxel in the
geometry SimpleITK gives the series (what a viewer shows), and the DICOM-SEG must read back (highdicom)
to the same labels in slice order.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.inference.batch import run_batch
from medseg.inference.dicom_input import seg_label_array
from medseg.inference.inputs import discover_inputs
from medseg.inference.options import apply_inference_overrides
from medseg.inference.predictor import Predictor
from medseg.io.dicom_seg import read_dicom_seg
from medseg.io.dicom_series import read_series
from medseg.io.sitk_nifti import sitk_to_nifti
from tests.helpers import expected_mask, oracle_model, phantom_package


@pytest.fixture(scope="module")
def package(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory):
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg


@pytest.mark.parametrize("series, bounded", [("Study3/11-T1post-18670", False), ("Study3/11-T1post-18670", True),
                                             ("Study1/13_HCropVolume", False)],
                         ids=["oblique", "oblique-memory-bounded", "hippocrop"])
def test_dicom_series_mask_and_seg_overlay(package, dicom_dir: Path, tmp_path: Path, series: str, bounded: bool) -> None:
    pkg = apply_inference_overrides(package, [f"inference.memory_bounded={str(bounded).lower()}"])
    cases = discover_inputs(dicom_dir / series)
    assert len(cases) == 1 and cases[0].series is not None
    case, info = cases[0], cases[0].series
    out = tmp_path / "out"
    report = run_batch(pkg, cases, out, device="cpu", progress=False,
                       predictor=Predictor(pkg, device="cpu", model=oracle_model()))
    assert report.done == [case.id] and not report.failed

    image = read_series(info)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if "T1post" in series:  # the case this test is about: an oblique stack
        assert np.abs(direction - np.round(direction)).max() > 0.01
    itk_nifti = tmp_path / "series.nii.gz"  # the series as SimpleITK writes it for a viewer
    sitk.WriteImage(image, str(itk_nifti))
    viewer = nib.load(itk_nifti)
    mask = nib.load(out / f"{case.id}.nii.gz")
    assert mask.shape == viewer.shape
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(viewer.affine)
    np.testing.assert_allclose(mask.affine, viewer.affine, atol=1e-4)

    raw = np.asanyarray(sitk_to_nifti(image).dataobj)
    assert np.array_equal(raw, np.asanyarray(viewer.dataobj))
    want = expected_mask(raw)
    got = np.asanyarray(mask.dataobj)
    assert len(np.unique(want)) >= 3  # the check is not trivial
    assert np.array_equal(got, want), f"{int((got != want).sum())} voxels differ"

    organs = {k: v for k, v in pkg.labels.items() if v != 0}
    seg = read_dicom_seg(out / f"{case.id}.seg.dcm", info, label_map=organs)
    assert seg.shape == (info.n_slices, *image.GetSize()[1::-1])
    assert np.array_equal(seg, seg_label_array(got))
    assert np.array_equal(seg, expected_mask(sitk.GetArrayFromImage(image)))  # (slice, row, column) from the series itself

    record = json.loads((out / f"{case.id}.json").read_text())
    assert record["status"] == "ok" and record["kind"] == "dicom"
    assert record["outputs"] == [f"{case.id}.nii.gz", f"{case.id}.seg.dcm"]
    assert record["organs"]["liver"]["voxels"] == int((want == 1).sum())
    assert record["peak_rss_mb"] > 0 and isinstance(record["warnings"], list)
    assert record["windows"]["run"] > 0 and record["windows"]["skipped"] >= 0
    assert len(record["input_sha256"]) == 64


def test_bad_series_is_a_failed_case_and_the_batch_goes_on(package, dicom_dir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "dicom"
    shutil.copytree(dicom_dir / "Study1" / "13_HCropVolume", root / "good")
    shutil.copytree(dicom_dir / "Study2" / "14_HCropVolume", root / "gappy")
    info = next(c.series for c in discover_inputs(root) if c.id == "gappy")
    info.files[len(info.files) // 2].unlink()  # a missing slice in the middle
    cases = discover_inputs(root)
    report = run_batch(package, cases, tmp_path / "out", device="cpu", progress=False,
                       predictor=Predictor(package, device="cpu", model=oracle_model()))
    assert report.done == ["good"]
    assert "missing slice" in report.failed["gappy"]
    assert json.loads((tmp_path / "out" / "gappy.json").read_text())["status"] == "failed"
    assert not (tmp_path / "out" / "gappy.nii.gz").exists()
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("case,status,") and len(rows) == 3
    assert rows[1].startswith("gappy,failed,") and "missing slice" in rows[1]
    assert rows[2].startswith("good,ok,")
