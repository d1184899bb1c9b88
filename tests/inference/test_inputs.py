"""What a batch predicts on: NIfTI files and folders, image folders, manifests (one split), duplicate ids, and
the checksums recorded for each case."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.errors import InputError
from medseg.inference.inputs import (
    InputCase,
    case_sha256,
    discover_images,
    discover_inputs,
    is_image_input,
    sha256_file,
)


def _nifti(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(-100, 100, (4, 3, 2)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (5, 6, 3), dtype=np.uint8)).save(path)
    return path


def test_folder_of_nifti(tmp_path: Path) -> None:
    for i, name in enumerate(["b.nii.gz", "a_0000.nii.gz", "c.NII"]):
        _nifti(tmp_path / name, i)
    (tmp_path / ".b.nii.gz.x.tmp.nii.gz").write_bytes(b"")  # an in-flight temp: not a case
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _nifti(tmp_path / "sub" / "deeper.nii.gz")  # NIfTI folders are not searched recursively
    cases = discover_inputs(tmp_path)
    assert [(c.id, c.images[0].name, c.kind, c.data_kind) for c in cases] == [
        ("a", "a_0000.nii.gz", "nifti", "volume"), ("b", "b.nii.gz", "nifti", "volume"), ("c", "c.NII", "nifti", "volume")]
    assert [c.id for c in discover_inputs(tmp_path / "b.nii.gz")] == ["b"]


def test_duplicate_ids_are_refused_naming_the_input(tmp_path: Path) -> None:
    _nifti(tmp_path / "scans" / "a.nii.gz")
    _nifti(tmp_path / "scans" / "a_0000.nii.gz")  # the channel suffix is dropped: also case "a"
    with pytest.raises(InputError, match="'a'") as err:
        discover_inputs(tmp_path / "scans")
    assert err.value.path == str(tmp_path / "scans")
    _png(tmp_path / "images" / "x y.png")
    _png(tmp_path / "images" / "x_y.jpg")  # both become the output name x_y
    with pytest.raises(InputError, match="x_y") as err:
        discover_inputs(tmp_path / "images")
    assert err.value.path == str(tmp_path / "images")


def test_image_folder(tmp_path: Path) -> None:
    for i, name in enumerate(["b.PNG", "a.jpg", "c d.jpeg"]):
        _png(tmp_path / "imgs" / name, i)
    cases = discover_inputs(tmp_path / "imgs")
    assert [(c.id, c.images[0].name, c.kind, c.data_kind) for c in cases] == [
        ("a", "a.jpg", "image2d", "image2d"), ("b", "b.PNG", "image2d", "image2d"), ("c_d", "c d.jpeg", "image2d", "image2d")]
    assert discover_images(tmp_path / "imgs" / "a.jpg") == [("a", tmp_path / "imgs" / "a.jpg")]
    _nifti(tmp_path / "imgs" / "scan.nii.gz")  # scans with stray pictures: the volume path
    assert not is_image_input(tmp_path / "imgs")
    assert [c.id for c in discover_inputs(tmp_path / "imgs")] == ["scan"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no NIfTI"):
        discover_inputs(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        discover_inputs(tmp_path / "absent")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(InputError, match="expected a NIfTI file"):
        discover_inputs(tmp_path / "x.txt")


def test_manifest_and_one_split(tmp_path: Path) -> None:
    for name in ("t.nii.gz", "v.nii.gz", "u_0000.nii.gz", "u_0001.nii.gz"):
        _nifti(tmp_path / "imagesTr" / name)
    doc = {"labels": {"background": 0, "organ": 1}, "training": [
        {"id": "t", "image": "imagesTr/t.nii.gz", "label": "labelsTr/t.nii.gz", "split": "train"},
        {"id": "v", "image": "imagesTr/v.nii.gz", "label": "labelsTr/v.nii.gz", "split": "val"},
        {"id": "u", "image": ["imagesTr/u_0000.nii.gz", "imagesTr/u_0001.nii.gz"], "split": "val"}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    assert [c.id for c in discover_inputs(tmp_path / "m.json")] == ["t", "v", "u"]
    val = discover_inputs(tmp_path / "m.json", split="val")
    assert [c.id for c in val] == ["v", "u"]
    assert val[1].images == (tmp_path / "imagesTr" / "u_0000.nii.gz", tmp_path / "imagesTr" / "u_0001.nii.gz")
    assert discover_inputs(tmp_path / "m.json", split="test") == []


def test_checksums_are_the_files_sha256(tmp_path: Path) -> None:
    a, b = _nifti(tmp_path / "a_0000.nii.gz", 1), _nifti(tmp_path / "a_0001.nii.gz", 2)
    assert sha256_file(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert sha256_file(a) != sha256_file(b)
    assert case_sha256(InputCase("a", (a, b))) == sha256_file(a)  # the first channel file
    png = _png(tmp_path / "p.png")
    assert case_sha256(InputCase("p", (png,))) == hashlib.sha256(png.read_bytes()).hexdigest()
