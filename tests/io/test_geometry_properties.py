"""Property-based tests (hypothesis) of image geometry through medseg's NIfTI code.

For random voxel-to-world affines (spacing 0.2-5 mm per axis, any rotation incl. oblique, axis flips, origins
within +-500 mm) and small random shapes, checked on real files written by nibabel and by ITK:

* ``save_label_like``: a label map saved "like" a reference scan has the reference's shape, affine, q/s-form
  codes and world coordinates exactly, and ITK (SimpleITK) reads both files onto the same grid;
* ``sitk_to_nifti`` / ``nifti_to_sitk``: round trips keep the geometry and the voxel-to-voxel correspondence, and
  agree with ITK's own NIfTI reader and writer.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from medseg.io.nifti import load_nifti, read_array, save_label_like, voxel_spacing
from medseg.io.sitk_nifti import image_affine_ras, nifti_to_sitk, sitk_to_nifti

LPS = np.diag([-1.0, -1.0, 1.0])
SETTINGS = settings(max_examples=15, deadline=None)


@st.composite
def affines(draw: st.DrawFn) -> np.ndarray:
    """A 4x4 RAS affine: rotation (uniform over SO(3), so almost always oblique) x flips x spacing, plus origin."""
    quat = draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1))
    axis_aligned = draw(st.booleans())  # half the examples: a permutation of the axes (the common scanner case)
    if axis_aligned:
        rot = np.eye(3)[list(draw(st.permutations([0, 1, 2])))]
    else:
        rot = Rotation.from_quat(quat).as_matrix()
    flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    spacing = np.diag([draw(st.floats(0.2, 5.0)) for _ in range(3)])
    affine = np.eye(4)
    affine[:3, :3] = rot @ flips @ spacing
    affine[:3, 3] = [draw(st.floats(-500, 500)) for _ in range(3)]
    return affine


shapes = st.tuples(*[st.integers(2, 7)] * 3)


def _labels(shape: tuple[int, ...], seed: int, n_labels: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_labels, size=shape)


def _reference_file(folder: Path, shape: tuple[int, ...], affine: np.ndarray, seed: int) -> nib.Nifti1Image:
    """A scan as it reaches medseg: written by nibabel (int16 CT values, qform and sform set), loaded back."""
    data = np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(folder / "scan.nii.gz"))
    return load_nifti(folder / "scan.nii.gz")


def _itk_grid(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    image = sitk.ReadImage(str(path))
    return (np.array(image.GetOrigin()), np.array(image.GetSpacing()), np.array(image.GetDirection()), image.GetSize())


@SETTINGS
@given(affine=affines(), shape=shapes, seed=st.integers(0, 2**16), many=st.booleans())
def test_label_saved_like_a_reference_overlays_it(
    affine: np.ndarray, shape: tuple[int, ...], seed: int, many: bool, tmp_path_factory
) -> None:
    folder = tmp_path_factory.mktemp("like")
    reference = _reference_file(folder, shape, affine, seed)
    labels = _labels(shape, seed, 300 if many else 4)
    out = save_label_like(labels, reference, folder / "label.nii.gz")
    label = load_nifti(out)
    assert label.shape == reference.shape
    assert np.array_equal(label.affine, reference.affine)  # bit-exact: the header geometry is copied
    (sform, scode), (ref_sform, ref_scode) = label.get_sform(coded=True), reference.get_sform(coded=True)
    assert int(scode) == int(ref_scode) and np.array_equal(sform, ref_sform)
    # The qform is set again from its matrix, so nibabel re-derives the quaternion, which NIfTI stores as float32:
    # equal to float32 precision (6e-8 measured for an improper symmetric rotation; 3e-16 for most), not bit for
    # bit. The sform, which medseg reads, is exact (above).
    (qform, qcode), (ref_qform, ref_qcode) = label.get_qform(coded=True), reference.get_qform(coded=True)
    assert int(qcode) == int(ref_qcode) and np.allclose(qform, ref_qform, rtol=0, atol=1e-6)
    stored = read_array(label, out)
    # uint16 only when a value needs it (a small array drawn from 300 labels may still hold none above 255)
    assert stored.dtype == (np.uint16 if labels.max() > 255 else np.uint8) and np.array_equal(stored, labels)
    assert np.allclose(voxel_spacing(label.affine), np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-6)
    ijk = np.argwhere(np.ones(shape, bool))  # every voxel centre maps to the same world point in both files
    assert np.array_equal(nib.affines.apply_affine(label.affine, ijk), nib.affines.apply_affine(reference.affine, ijk))
    ref_grid, label_grid = _itk_grid(folder / "scan.nii.gz"), _itk_grid(out)
    assert label_grid[3] == ref_grid[3]
    for a, b in zip(label_grid[:3], ref_grid[:3]):
        assert np.array_equal(a, b)  # ITK-based viewers put the label on the scan's grid too


@SETTINGS
@given(affine=affines(), shape=shapes, seed=st.integers(0, 2**16))
def test_nifti_to_sitk_and_back_keeps_geometry_and_voxels(
    affine: np.ndarray, shape: tuple[int, ...], seed: int
) -> None:
    data = _labels(shape, seed, 1000).astype(np.int16)
    nii = nib.Nifti1Image(data, affine)
    image = nifti_to_sitk(nii)
    assert image.GetSize() == shape
    assert np.allclose(image.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-12)
    assert np.allclose(image_affine_ras(image), affine, atol=1e-9)
    # index (i, j, k) is the same voxel, at the same point (LPS in ITK, RAS in NIfTI)
    rng = np.random.default_rng(seed)
    for ijk in rng.integers(0, shape, size=(5, 3)):
        idx = tuple(int(x) for x in ijk)
        assert image[idx] == data[idx]
        lps = np.array(image.TransformIndexToPhysicalPoint(idx))
        assert np.allclose(LPS @ lps, nib.affines.apply_affine(affine, ijk), atol=1e-9)
    back = sitk_to_nifti(image)
    assert np.allclose(back.affine, affine, atol=1e-9) and np.array_equal(np.asarray(back.dataobj), data)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 1


@SETTINGS
@given(affine=affines(), shape=shapes, seed=st.integers(0, 2**16))
def test_sitk_to_nifti_agrees_with_itk_writer_and_reader(
    affine: np.ndarray, shape: tuple[int, ...], seed: int, tmp_path_factory
) -> None:
    """What ITK writes for an image, ``sitk_to_nifti`` builds in memory; what ITK reads, ``nifti_to_sitk`` gives."""
    folder = tmp_path_factory.mktemp("itk")
    image = nifti_to_sitk(nib.Nifti1Image(_labels(shape, seed, 100).astype(np.int16), affine))
    sitk.WriteImage(image, str(folder / "itk.nii.gz"))
    written = nib.load(str(folder / "itk.nii.gz"))
    ours = sitk_to_nifti(image)
    assert np.allclose(written.affine, ours.affine, atol=1e-4)  # ITK stores float32 srows
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(ours.dataobj))
    nib.save(ours, str(folder / "ours.nii.gz"))
    reread, converted = sitk.ReadImage(str(folder / "ours.nii.gz")), nifti_to_sitk(load_nifti(folder / "ours.nii.gz"))
    assert reread.GetSize() == converted.GetSize()
    assert np.allclose(reread.GetOrigin(), converted.GetOrigin(), atol=1e-4)
    assert np.allclose(reread.GetSpacing(), converted.GetSpacing(), rtol=1e-5)
    assert np.allclose(reread.GetDirection(), converted.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(reread), sitk.GetArrayFromImage(converted))
