"""Bad input: each problem is a one-line error naming the file and the cause, at the CLI too."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.input_checks import check_case
from medseg.errors import InputError
from medseg.io.manifest import load_manifest
from tests.conftest import run_cli


def _first_case(manifest_path: Path):
    m = load_manifest(manifest_path)
    return m, m.cases[0]


def test_good_case_passes(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    info = check_case(m, c)
    assert info.label_values == (0, 1, 2, 3)


def test_missing_file(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    m.label_path(c).unlink()
    with pytest.raises(InputError, match="file not found") as e:
        check_case(m, c)
    assert e.value.path == str(m.label_path(c))


def test_unreadable_nifti(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    m.image_paths(c)[0].write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(InputError, match="not a readable NIfTI"):
        check_case(m, c)


def test_truncated_nifti(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    p = m.image_paths(c)[0]
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(InputError) as e:
        check_case(m, c)
    assert str(p) in str(e.value)


def test_shape_mismatch(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    lab = nib.load(m.label_path(c))
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj)[:-1], lab.affine), m.label_path(c))
    with pytest.raises(InputError, match="label shape .* != image shape"):
        check_case(m, c)


def test_affine_mismatch(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    lab = nib.load(m.label_path(c))
    aff = lab.affine.copy()
    aff[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), aff), m.label_path(c))
    with pytest.raises(InputError, match="label affine differs"):
        check_case(m, c)


def test_label_value_not_in_map(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    lab = nib.load(m.label_path(c))
    arr = np.asanyarray(lab.dataobj).copy()
    arr[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(arr, lab.affine), m.label_path(c))
    with pytest.raises(InputError, match=r"label values \[7\] not in the manifest's label map"):
        check_case(m, c)


def test_nan_in_image(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    img = nib.load(m.image_paths(c)[0])
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), m.image_paths(c)[0])
    with pytest.raises(InputError, match="NaN"):
        check_case(m, c)


def test_cli_reports_one_line_without_traceback(phantom_copy: Path) -> None:
    m, c = _first_case(phantom_copy)
    lab = nib.load(m.label_path(c))
    arr = np.asanyarray(lab.dataobj).copy()
    arr[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(arr, lab.affine), m.label_path(c))
    p = run_cli("data", "validate", str(phantom_copy), check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(m.label_path(c)) in lines[0] and "[9]" in lines[0]
    assert "Traceback" not in p.stderr
    # --debug shows the traceback for developers
    dbg = run_cli("--debug", "data", "validate", str(phantom_copy), check=False)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


def test_train_refuses_bad_data_before_training(phantom_copy: Path, tmp_path: Path) -> None:
    m, c = _first_case(phantom_copy)
    m.image_paths(c)[0].unlink()
    p = run_cli("train", "phantom_unet3d", f"data.manifest={phantom_copy}", f"train.output_dir={tmp_path}",
                "tracking.backend=none", check=False, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("medseg: error: ")
    assert "file not found" in p.stderr and "Traceback" not in p.stderr


def test_manifest_escape_at_cli(tmp_path: Path) -> None:
    man = tmp_path / "m.json"
    man.write_text(json.dumps({"labels": {"background": 0, "x": 1}, "training": [{"image": "../../etc/passwd", "label": "a.nii.gz"}]}))
    p = run_cli("data", "validate", str(man), check=False)
    assert p.returncode == 1 and "escapes the dataset root" in p.stderr
