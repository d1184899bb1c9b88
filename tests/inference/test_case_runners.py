"""Per-case runners of a batch (``medseg.inference.case_runners``): one per data kind; the volume runner writes
the mask (and probabilities) of a NIfTI scan in its geometry and returns its organ volumes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.kinds import DATA_KINDS
from medseg.inference.case_runners import CASE_RUNNERS, ImageCases, VolumeCases
from medseg.inference.inputs import discover_inputs
from medseg.inference.predictor import Predictor
from tests.helpers import copy_phantom_scans, expected_mask, oracle_model, phantom_package


def test_one_case_runner_per_data_kind() -> None:
    assert CASE_RUNNERS.names() == DATA_KINDS.names() == ["image2d", "volume"]
    assert CASE_RUNNERS.get("volume") is VolumeCases and CASE_RUNNERS.get("image2d") is ImageCases


def test_volume_runner_writes_the_mask_and_returns_organ_volumes(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])  # no resampling: the oracle is exact
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", {1: "flipped.nii.gz"})
    [case] = discover_inputs(scans)
    runner = CASE_RUNNERS.get("volume")(pkg, Predictor(pkg, device="cpu", model=oracle_model()))
    out = tmp_path / "out"
    out.mkdir()
    fields = runner.run(case, out, {"name": "m", "version": "1"}, probabilities=True, checksum=None)

    scan = nib.load(scans / "flipped.nii.gz")
    raw = np.asanyarray(scan.dataobj)
    truth = expected_mask(raw)
    mask = nib.load(out / "flipped.nii.gz")
    assert np.array_equal(np.asanyarray(mask.dataobj), truth) and np.array_equal(mask.affine, scan.affine)
    probs = nib.load(out / "flipped_probs.nii.gz")
    assert probs.shape == (*raw.shape, 4) and np.array_equal(probs.get_fdata().argmax(-1), truth)
    assert sorted(p.name for p in out.iterdir()) == ["flipped.nii.gz", "flipped_probs.nii.gz"]

    voxel_ml = float(np.prod(np.linalg.norm(scan.affine[:3, :3], axis=0))) / 1000
    counts = np.bincount(truth.ravel(), minlength=4)
    names = {v: k for k, v in pkg.labels.items()}
    assert fields["organs"] == {names[v]: {"voxels": int(counts[v]), "volume_ml": round(counts[v] * voxel_ml, 4)}
                                for v in (1, 2, 3)}
    assert all(fields["organs"][names[v]]["voxels"] > 0 for v in (1, 2, 3))  # every organ is in the scan
    assert fields["shape"] == list(raw.shape)
    assert fields["input_sha256"] == hashlib.sha256((scans / "flipped.nii.gz").read_bytes()).hexdigest()
