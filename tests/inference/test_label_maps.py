"""Label maps and class probabilities (``medseg.inference.label_maps``): the uint8 argmax and its ties,
probability quantisation and files, the stored type kept when resampling, inversion to the scan's grid,
the overlay check and organ volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Orientationd

from medseg.inference.label_maps import (
    argmax_classes,
    check_overlay,
    invert_label_map,
    organ_volumes,
    quantize_probabilities,
    resampled_dtype,
    save_probabilities_like,
)


def test_quantized_probabilities_keep_argmax_and_sum() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 30, 20, 10, generator=g) * 3, dim=0)
    probs[:, 0, 0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0])  # an exact tie
    q = quantize_probabilities(probs)
    assert q.dtype == np.uint8 and q.shape == (30, 20, 10, 4)
    assert (q.sum(-1, dtype=np.int32) == 255).all()
    assert np.array_equal(q.argmax(-1), probs.argmax(0).numpy())
    err = np.abs(q / 255.0 - np.moveaxis(probs.numpy(), 0, -1))
    top2 = np.sort(probs.numpy(), axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 2 / 255  # away from near-ties every class is within one step
    assert err[clear].max() <= 1 / 255 + 1e-6 and err.max() <= 4 / 255
    assert q[0, 0, 0, 0] > q[0, 0, 0, 1]  # the tie goes to the lower class, as argmax does


def test_quantized_probabilities_by_hand() -> None:
    # in steps of 1/255: (100.4, 100.7, 53.9) floors to 100+100+53 = 253, the 2 missing steps go to the largest
    # remainders (.9, .7); (100.1, 100.2, 54.7) floors to 254, the step goes to class 2, which leaves class 0
    # tied with the most probable class 1 and winning the argmax: class 0 gives a step to class 1;
    # a voxel with no probability at all is background.
    probs = torch.tensor([[100.4, 100.1, 0.0], [100.7, 100.2, 0.0], [53.9, 54.7, 0.0]]) / 255
    assert quantize_probabilities(probs).tolist() == [[100, 101, 54], [99, 101, 55], [255, 0, 0]]


def test_argmax_classes_matches_torch_argmax_including_ties() -> None:
    torch.manual_seed(4)
    scores = torch.randint(0, 3, (5, 7, 6, 4)).float()  # many exact ties
    assert torch.equal(argmax_classes(scores).long(), scores.argmax(0))
    assert argmax_classes(scores).dtype == torch.uint8


def test_argmax_classes_ties_go_to_the_lower_class_by_hand() -> None:
    # (C=3, 5 voxels): a clear winner, and ties between classes 0-1, 1-2, all three, and all-negative 0-1
    scores = torch.tensor([[1.0, 0.0, 3.0, 0.0, -1.0],
                           [1.0, 2.0, 3.0, 1.0, -1.0],
                           [0.0, 2.0, 3.0, 5.0, -2.0]])
    assert argmax_classes(scores).tolist() == [0, 1, 0, 2, 0]


def test_resampled_dtype_keeps_stored_integers_when_they_fit() -> None:
    assert resampled_dtype(np.zeros(4, np.int16)) == torch.int16 and resampled_dtype(np.zeros(4, np.uint8)) == torch.uint8
    assert resampled_dtype(np.array([0, 4095], np.uint16)) == torch.int16  # 12-bit data: half the bytes of float32
    assert resampled_dtype(np.array([0, 40000], np.uint16)) == torch.float32
    assert resampled_dtype(np.zeros(4, np.float32)) == torch.float32


def _reference(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> nib.Nifti1Image:
    """A scan whose axes are rotated 90 degrees in-plane (spacing must come from the column norms)."""
    sx, sy, sz = spacing
    affine = np.array([[0.0, -sy, 0.0, 10.0], [sx, 0.0, 0.0, -5.0], [0.0, 0.0, sz, 2.0], [0.0, 0.0, 0.0, 1.0]])
    return nib.Nifti1Image(np.zeros(shape, np.int16), affine)


def test_organ_volumes_by_hand() -> None:
    labels = np.zeros((4, 3, 2), np.uint8)
    labels[0, :, :] = 1  # 6 voxels of liver
    labels[1, 0, :] = 2  # 2 voxels of spleen; no kidney at all
    ref = _reference(labels.shape, (2.0, 1.5, 4.0))  # 12 mm^3 = 0.012 ml per voxel
    got = organ_volumes(labels, ref, {"background": 0, "liver": 1, "spleen": 2, "kidney": 3})
    assert got == {"liver": {"voxels": 6, "volume_ml": 0.072}, "spleen": {"voxels": 2, "volume_ml": 0.024},
                   "kidney": {"voxels": 0, "volume_ml": 0.0}}


def test_check_overlay_refuses_a_mask_of_another_shape(tmp_path: Path) -> None:
    ref = _reference((4, 3, 2), (1.0, 1.0, 1.0))
    check_overlay(np.zeros((4, 3, 2), np.uint8), ref, tmp_path / "a.nii.gz")
    with pytest.raises(RuntimeError, match=r"a.nii.gz: prediction shape \(3, 4, 2\) does not match input \(4, 3, 2\)"):
        check_overlay(np.zeros((3, 4, 2), np.uint8), ref, tmp_path / "a.nii.gz")


def test_saved_probabilities_read_back_in_the_input_geometry(tmp_path: Path) -> None:
    ref = _reference((4, 3, 2), (2.0, 1.5, 4.0))
    q = np.zeros((4, 3, 2, 2), np.uint8)
    q[..., 0], q[..., 1] = 255, 0
    q[1, 2, 1] = (51, 204)  # 0.2 / 0.8
    out = save_probabilities_like(q, ref, tmp_path / "p.nii.gz")
    back = nib.load(out)
    assert np.array_equal(back.affine, ref.affine) and back.get_data_dtype() == np.uint8
    probs = back.get_fdata()
    assert probs.shape == (4, 3, 2, 2) and probs[1, 2, 1] == pytest.approx([0.2, 0.8])
    assert probs[0, 0, 0] == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="do not fit reference shape"):
        save_probabilities_like(q.astype(np.float32), ref, tmp_path / "f.nii.gz")
    with pytest.raises(ValueError, match="do not fit reference shape"):
        save_probabilities_like(q[:3], ref, tmp_path / "s.nii.gz")


def test_invert_label_map_takes_labels_back_to_the_scan_grid() -> None:
    raw = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS: reorienting to RAS flips the first two axes
    spatial = Compose([Orientationd(keys="image", axcodes="RAS")])
    data = spatial({"image": MetaTensor(torch.from_numpy(raw)[None], affine=torch.from_numpy(affine))})
    on_model_grid = data["image"][0].as_tensor()
    assert torch.equal(on_model_grid, torch.from_numpy(raw[::-1, ::-1].copy()))
    labels = (on_model_grid > 11).to(torch.uint8) + (on_model_grid > 19).to(torch.uint8)
    invert = Invertd(keys="pred", transform=spatial, orig_keys="image", nearest_interp=True, to_tensor=True)
    back = invert_label_map(invert, data, labels)
    assert back.dtype == np.uint8 and np.array_equal(back, (raw > 11).astype(np.uint8) + (raw > 19))
    assert data == {}  # the preprocessed scan and label map are dropped
