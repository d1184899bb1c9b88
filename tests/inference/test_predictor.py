"""Predictor inputs and modes: an in-memory image gives the same mask as its file; memory-bounded mode keeps geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.inference.options import apply_inference_overrides
from medseg.inference.predictor import Predictor
from medseg.metrics.volumetric import dice
from tests.helpers import expected_mask, oracle_model, phantom_package


@pytest.mark.parametrize("case_index", [1, 3], ids=["flip_x", "oblique"])
def test_in_memory_image_equals_file(tiny_phantom: Path, tmp_path: Path, case_index: int) -> None:
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    path = m.image_paths(m.cases[case_index])[0]
    predictor = Predictor(pkg, device="cpu", model=oracle_model())
    from_file = predictor.predict([path])
    img = nib.load(path)
    in_memory = predictor.predict(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), name="mem")
    assert np.array_equal(from_file.labels, in_memory.labels)
    assert np.array_equal(from_file.labels, expected_mask(np.asanyarray(img.dataobj)))


@pytest.mark.parametrize("case_index", [0, 2, 3], ids=["ras", "flip_xy", "oblique"])
def test_memory_bounded_mask_overlays_input_exactly(tiny_phantom: Path, tmp_path: Path, case_index: int) -> None:
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    pkg = apply_inference_overrides(pkg, ["inference.memory_bounded=true"])
    path = m.image_paths(m.cases[case_index])[0]
    pred = Predictor(pkg, device="cpu", model=oracle_model()).predict([path])
    raw = np.asanyarray(nib.load(path).dataobj)
    assert pred.labels.shape == raw.shape and pred.labels.dtype == np.uint8
    assert np.array_equal(pred.labels, expected_mask(raw)), f"{int((pred.labels != expected_mask(raw)).sum())} differ"


@pytest.mark.parametrize("stored", ["int16", "uint16_scaled"])
def test_memory_bounded_with_resampling_matches_truth(tiny_phantom: Path, tmp_path: Path, stored: str) -> None:
    # As test_geometry's resampling case: a noise-free scan whose oracle answer is the ground truth.
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=[2.0, 2.0, 2.0]"])
    pkg = apply_inference_overrides(pkg, ["inference.memory_bounded=true"])
    case = m.cases[3]
    src = nib.load(m.image_paths(case)[0])
    truth = np.asanyarray(nib.load(m.label_path(case)).dataobj)
    body = np.asanyarray(src.dataobj) > -500
    clean = np.where(body, np.choose(truth, [20, 60, 110, 180]), -1000).astype(np.int16)
    image = nib.Nifti1Image(clean, src.affine, src.header)
    if stored == "uint16_scaled":  # as dcm2niix writes CT: unsigned stored values, scl_inter -1024
        image = nib.Nifti1Image((clean.astype(np.int32) + 1024).astype(np.uint16), src.affine)
        image.header.set_slope_inter(1.0, -1024.0)
        path = tmp_path / "scaled.nii.gz"
        nib.save(image, path)
        image = nib.load(path)
    pred = Predictor(pkg, device="cpu", model=oracle_model()).predict(image)
    assert pred.labels.shape == src.shape
    # The label map (not the probabilities) is resampled back with nearest interpolation, so boundaries of the
    # small organs move by up to a voxel (Dice ~0.77-0.83 on the 300-voxel spleen); a geometric error (flip,
    # shift, transpose) would drop the large liver far below 0.95.
    assert dice(pred.labels == 1, truth == 1) > 0.95
    for value in (2, 3):
        assert dice(pred.labels == value, truth == value) > 0.7, value


def test_postprocessing_applies_in_predict(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    path = m.image_paths(m.cases[0])[0]
    raw = np.asanyarray(nib.load(path).dataobj)
    plain = Predictor(pkg, device="cpu", model=oracle_model()).predict([path]).labels
    pkg = apply_inference_overrides(pkg, ["inference.keep_largest_component=true"])
    kept = Predictor(pkg, device="cpu", model=oracle_model()).predict([path]).labels
    assert np.array_equal(plain, expected_mask(raw))
    from scipy import ndimage

    for value in (1, 2, 3):
        n_kept = ndimage.label(kept == value, structure=np.ones((3, 3, 3)))[1]
        assert n_kept <= 1
    assert (kept != plain).any() and np.all((kept == plain) | (kept == 0))  # only removals


@pytest.mark.parametrize("grid", ["body", "whole"])
def test_memory_bounded_reads_scaled_ct_as_stored_integers(tiny_phantom: Path, tmp_path: Path, grid: str) -> None:
    # dcm2niix-style CT: uint16 stored values with scl_inter -1024. nibabel would scale them into float64
    # (4x the stored bytes); memory-bounded mode keeps the integers and applies the scaling per window, so
    # thresholds, body crop and intensities must all still be in HU.
    from medseg.io.nifti import read_unscaled

    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null", f"inference.window_grid={grid}"])
    src = nib.load(m.image_paths(m.cases[3])[0])  # oblique
    hu = np.asanyarray(src.dataobj).astype(np.int32)
    stored = nib.Nifti1Image((hu + 1024).astype(np.uint16), src.affine)
    stored.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "scaled_ct.nii.gz"
    nib.save(stored, path)
    raw, slope, inter = read_unscaled(nib.load(path), path)
    assert raw.dtype == np.uint16 and (slope, inter) == (1.0, -1024.0)
    bounded = Predictor(apply_inference_overrides(pkg, ["inference.memory_bounded=true"]), device="cpu", model=oracle_model())
    pred = bounded.predict([path])
    assert np.array_equal(pred.labels, expected_mask(hu)), f"{int((pred.labels != expected_mask(hu)).sum())} differ"
    assert pred.windows["run"] > 0


@pytest.mark.parametrize("case_index", [1, 3], ids=["flip_x", "oblique"])
def test_resampled_labels_equal_argmax_of_monai_invertd(tiny_phantom: Path, tmp_path: Path, case_index: int) -> None:
    # predict() takes probabilities back slab by slab (slab_resample); probabilities() is MONAI's whole-volume
    # Invertd: their argmax must agree wherever the top two classes are not within float noise of each other.
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=[2.0, 2.0, 2.0]"])
    path = m.image_paths(m.cases[case_index])[0]
    predictor = Predictor(pkg, device="cpu", model=oracle_model())
    labels = predictor.predict([path]).labels
    exact, _ = predictor.probabilities([path])
    top2 = torch.topk(exact, 2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-4).numpy() & (exact.sum(0) > 0.5).numpy()  # Invertd zero-pads outside the crop
    assert clear.mean() > 0.9
    assert np.array_equal(labels[clear], exact.argmax(0).numpy()[clear])
