"""DICOM series as prediction inputs: read a series into memory, checksum it, order a mask for its DICOM objects.

The series becomes an in-memory NIfTI image with ``sitk_to_nifti`` (no temporary file), so the NIfTI mask
written for it overlays the NIfTI form of the series exactly. Its voxel array is (x=column, y=row,
z=slice); a DICOM-SEG label array is (slice, row, column) in ``SeriesInfo`` slice order, hence the
transpose in ``seg_label_array`` (used by ``dicom_output``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.io.dicom_series import SeriesInfo, read_series
from medseg.io.sitk_nifti import sitk_to_nifti


def load_series_image(info: SeriesInfo) -> nib.Nifti1Image:
    """Validate and read a series (``InputError`` naming the file or folder if it is not a regular stack)."""
    return sitk_to_nifti(read_series(info))


def series_sha256(info: SeriesInfo, chunk: int = 1 << 20) -> str:
    """sha256 over the series' files in slice order (identifies the exact input without naming the patient)."""
    h = hashlib.sha256()
    for path in info.files:
        with Path(path).open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def seg_label_array(labels_xyz: np.ndarray) -> np.ndarray:
    """A mask in the series' NIfTI voxel order (x, y, z) as a DICOM-SEG label array (slice, row, column)."""
    return np.ascontiguousarray(labels_xyz.transpose(2, 1, 0))
