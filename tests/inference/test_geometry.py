"""Geometry round trip: a predicted mask overlays its input scan voxel for voxel.

A fixed "oracle" network (a 1x1 convolution whose argmax thresholds the windowed intensity) goes through
the real predictor: preprocessing (reorientation, resampling, foreground crop), sliding windows,
inversion and NIfTI writing. Its output must equal the same thresholds applied directly to the raw input
array in the file's own voxel order; any flip, transpose, shift or crop left un-inverted breaks equality.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.inference.predictor import Predictor
from medseg.io.nifti import save_label_like
from medseg.metrics.volumetric import dice
from tests.helpers import expected_mask, oracle_model, phantom_package


@pytest.mark.parametrize("case_index", [0, 1, 2, 3], ids=["ras", "flip_x", "flip_xy", "oblique"])
def test_mask_overlays_input_exactly(tiny_phantom: Path, tmp_path: Path, case_index: int) -> None:
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    case = m.cases[case_index]
    image_path = m.image_paths(case)[0]
    pred = Predictor(pkg, device="cpu", model=oracle_model()).predict([image_path])
    out = save_label_like(pred.labels, pred.reference, tmp_path / "mask.nii.gz")

    src, mask = nib.load(image_path), nib.load(out)
    assert mask.shape == src.shape
    assert np.array_equal(mask.affine, src.affine)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(src.affine)
    assert int(mask.header["qform_code"]) == int(src.header["qform_code"])
    assert int(mask.header["sform_code"]) == int(src.header["sform_code"])
    want = expected_mask(np.asanyarray(src.dataobj))
    got = np.asanyarray(mask.dataobj)
    assert got.dtype == np.uint8
    assert np.array_equal(got, want), f"{int((got != want).sum())} voxels differ"


@pytest.mark.parametrize("case_index", [0, 1, 3], ids=["ras", "flip_x", "oblique"])
def test_mask_overlays_after_resampling(tiny_phantom: Path, tmp_path: Path, case_index: int) -> None:
    # Resampled to another (isotropic) spacing and back. A noise-free scan (each organ one HU value, from
    # the ground truth) makes the oracle's answer the ground truth itself, so any geometric error shows up
    # as lost overlap; interpolation alone only moves boundaries by a fraction of a voxel.
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=[2.0, 2.0, 2.0]"])
    case = m.cases[case_index]
    src = nib.load(m.image_paths(case)[0])
    truth = np.asanyarray(nib.load(m.label_path(case)).dataobj)
    body = np.asanyarray(src.dataobj) > -500
    clean = np.where(body, np.choose(truth, [20, 60, 110, 180]), -1000).astype(np.int16)
    clean_path = tmp_path / "clean.nii.gz"
    nib.save(nib.Nifti1Image(clean, src.affine, src.header), clean_path)
    pred = Predictor(pkg, device="cpu", model=oracle_model()).predict([clean_path])
    assert pred.labels.shape == src.shape
    assert np.array_equal(expected_mask(clean), truth)
    for value in (1, 2, 3):
        assert dice(pred.labels == value, truth == value) > 0.9, value


@pytest.mark.parametrize("axes", ["null", "[0]", "[1, 2]"])
def test_mirror_tta_is_flipped_back(tiny_phantom: Path, tmp_path: Path, axes: str) -> None:
    # The oracle is voxel-wise, so it commutes with flips: mirrored copies flipped back must agree exactly.
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null", "inference.tta_mirror=true", f"inference.tta_axes={axes}"])
    image_path = m.image_paths(m.cases[3])[0]
    pred = Predictor(pkg, device="cpu", model=oracle_model()).predict([image_path])
    assert np.array_equal(pred.labels, expected_mask(np.asanyarray(nib.load(image_path).dataobj)))
