"""``medseg ensemble``: trained packages joined into one that predicts their mean probability, through the real CLI.

Members are tiny phantom U-Nets with different random weights (seeds 0 and 1): an ensemble of two copies of one
network could not tell a mean from either member. Their window (128x128x64) holds a whole resampled phantom scan, so
each scan is one window and the ensemble's probabilities must be the members' mean exactly (up to uint8 steps);
with overlapping windows the mean is taken per window, before the windows are blended, which differs slightly from
averaging two finished predictions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.errors import InputError
from medseg.inference.ensemble import create_ensemble
from medseg.inference.ensemble_network import EnsembleNetwork
from medseg.inference.model_package import ModelPackage, load_package
from medseg.inference.predictor import Predictor
from tests.helpers import copy_phantom_scans, phantom_package, run_cli

NO_TTA = ["inference.tta_mirror=false", "inference.roi_size=[128, 128, 64]", "inference.overlap=0"]


def _member(root: Path, manifest: Path, seed: int, overrides: list[str] | None = None) -> ModelPackage:
    torch.manual_seed(seed)
    return phantom_package(root / f"m{seed}", manifest, NO_TTA + (overrides or []))[0]


@pytest.fixture(scope="module")
def members(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPackage, ModelPackage]:
    root = tmp_path_factory.mktemp("ensemble_members")
    return _member(root, tiny_phantom, 0), _member(root, tiny_phantom, 1)


def test_ensemble_network_softmax_is_the_members_mean_probability() -> None:
    torch.manual_seed(0)
    nets = [torch.nn.Conv3d(1, 3, 3, padding=1) for _ in range(3)]
    x = torch.randn(2, 1, 8, 8, 8)
    got = torch.softmax(EnsembleNetwork(nets)(x), dim=1)
    want = torch.stack([torch.softmax(n(x), dim=1) for n in nets]).mean(0)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, torch.softmax(nets[0](x), dim=1), atol=1e-3)  # members differ: a real mean


def test_ensemble_package_predicts_the_mean_of_its_members(
    members: tuple[ModelPackage, ModelPackage], tiny_phantom: Path, tmp_path: Path
) -> None:
    a, b = members
    out = create_ensemble([str(a.path), str(b.path)], tmp_path / "ens")
    record = json.loads((out / "ensemble.json").read_text())
    assert record["format"] == "medseg-ensemble/1" and [m["path"] for m in record["members"]] == ["members/0", "members/1"]
    assert [m["weights_sha256"] for m in record["members"]] == [a.metadata["weights_sha256"], b.metadata["weights_sha256"]]
    ens = load_package(out)
    assert ens.members is not None and len(ens.members) == 2 and ens.labels == a.labels
    assert load_package(tmp_path).path == out  # a folder holding the ensemble resolves to it, not to a member

    scan = sorted(copy_phantom_scans(tiny_phantom, tmp_path / "scans", 1).glob("*.nii.gz"))
    predictors = [Predictor(p, device="cpu") for p in (a, b, ens)]
    (pa, ref_a), (pb, _), (pe, ref_e) = (p.probabilities(scan) for p in predictors)  # on the scan's grid, float
    assert float((pa - pb).abs().max()) > 0.05  # the members disagree somewhere
    assert torch.allclose(pe, (pa + pb) / 2, atol=1e-5)
    assert np.array_equal(ref_e.affine, ref_a.affine) and pe.shape == pa.shape
    assert [p.predict(scan).windows["run"] for p in predictors] == [1, 1, 1]  # one window: no blending in between


def test_cli_ensemble_then_predict_writes_masks_on_the_scans_grid(
    members: tuple[ModelPackage, ModelPackage], tiny_phantom: Path, tmp_path: Path
) -> None:
    a, b = members
    p = run_cli("ensemble", str(a.path), str(b.path), "--output", str(tmp_path / "ens"))
    assert "ensemble of 2 models" in p.stdout
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 2)
    run_cli("predict", "--model", str(tmp_path / "ens"), "--input", str(scans), "--output", str(tmp_path / "out"),
            "--device", "cpu")
    for scan in sorted(scans.glob("*.nii.gz")):
        cid = scan.name.removesuffix(".nii.gz")
        assert json.loads((tmp_path / "out" / f"{cid}.json").read_text())["status"] == "ok"
        mask, img = nib.load(tmp_path / "out" / f"{cid}.nii.gz"), nib.load(scan)
        assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)


def test_members_that_disagree_on_preprocessing_are_refused_before_anything_is_written(
    members: tuple[ModelPackage, ModelPackage], tiny_phantom: Path, tmp_path: Path
) -> None:
    a, _ = members
    other = _member(tmp_path, tiny_phantom, 2, ["data.intensity.mode=zscore"])
    p = run_cli("ensemble", str(a.path), str(other.path), "--output", str(tmp_path / "ens"), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert str(other.path) in lines[0] and "intensity" in lines[0], lines[0]
    assert not (tmp_path / "ens").exists() and not list(tmp_path.glob(".ens.*"))
    with pytest.raises(InputError, match="at least two"):
        create_ensemble([str(a.path)], tmp_path / "one")
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists"):
        create_ensemble([str(a.path), str(a.path)], tmp_path / "taken")


def test_a_changed_member_or_a_member_path_outside_the_folder_is_refused(
    members: tuple[ModelPackage, ModelPackage], tmp_path: Path
) -> None:
    a, b = members
    out = create_ensemble([str(a.path), str(b.path)], tmp_path / "ens")
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    weights = damaged / "members" / "1" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(InputError, match="checksum mismatch") as e:
        load_package(damaged).build("cpu")
    assert str(weights) in str(e.value)
    record = json.loads((out / "ensemble.json").read_text())
    record["members"][1]["path"] = "../../m0/pkg"
    (out / "ensemble.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="not a folder inside the ensemble"):
        load_package(out)


def test_an_ensemble_exports_as_one_network(members: tuple[ModelPackage, ModelPackage], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxscript, onnxruntime)")
    from medseg.inference.export import export_package

    a, b = members
    ens = load_package(create_ensemble([str(a.path), str(b.path)], tmp_path / "ens"))
    check = export_package(ens, "onnx", tmp_path / "onnx")["check"]
    # log-probabilities near the 1e-12 floor magnify float rounding: ~1e-4 measured, still the same argmax
    assert check["max_abs_logit_diff"] < 1e-2 and check["argmax_agreement"] > 0.999, check
    assert load_package(tmp_path / "onnx").labels == a.labels
