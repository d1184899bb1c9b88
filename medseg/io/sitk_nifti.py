"""SimpleITK (LPS) <-> NIfTI (RAS) image conversion with the geometry kept exactly, in memory."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def image_affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 RAS voxel-to-world affine (NIfTI convention) of a 3D SimpleITK image (LPS)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return affine


def sitk_to_nifti(image: sitk.Image) -> nib.Nifti1Image:
    """Convert a 3D scalar SimpleITK image (LPS) to NIfTI (RAS), as ``sitk.WriteImage`` would write it."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"need a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    affine = image_affine_ras(image)
    nii = nib.Nifti1Image(sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine)
    nii.set_qform(affine, code=1)  # scanner coordinates, like ITK
    nii.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    return nii


def nifti_to_sitk(nii: nib.Nifti1Image) -> sitk.Image:
    """Convert a 3D NIfTI image (RAS affine) to SimpleITK (LPS origin/spacing/direction)."""
    data = np.asanyarray(nii.dataobj)
    if data.ndim != 3:
        raise ValueError(f"need a 3D NIfTI image, got shape {data.shape}")
    lps = _LPS_TO_RAS @ nii.affine[:3, :]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(x) for x in spacing))
    image.SetOrigin(tuple(float(x) for x in lps[:, 3]))
    image.SetDirection(tuple(float(x) for x in (lps[:, :3] / spacing).ravel()))
    return image
