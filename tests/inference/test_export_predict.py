"""``medseg predict --model EXPORT_DIR``: the folder ``medseg export --format onnx`` writes runs in medseg's own
predictor through ONNX Runtime, and its masks are the torch package's, through the real CLI.

The model is a tiny phantom 3D U-Net trained for a few dozen Adam steps here (``trained_package``), so its masks
hold every class (asserted) rather than an untrained net's near-constant answer. Torch and ONNX Runtime differ by
float rounding in the logits (export check: ~6e-6), which can flip a voxel whose two best logits tie that closely;
the masks must agree on ``MIN_AGREEMENT`` of the voxels. Measured here (torch 2.13 CPU, onnxruntime 1.32): 100.0 %
(every voxel of both scans equal).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.inference.export import MEDSEG_JSON, ExportError, export_package
from medseg.inference.model_package import ModelPackage, load_package, save_package
from medseg.inference.onnx_network import ExportedNetworkError
from medseg.inference.options import apply_inference_overrides
from medseg.inference.predictor import Predictor
from medseg.io.manifest import load_manifest
from tests.helpers import LOWER, UPPER, copy_phantom_scans, phantom_package, run_cli

onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxscript, onnxruntime)")

MIN_AGREEMENT = 0.999
TRAIN_STEPS, PATCH = 50, (16, 16, 16)


def trained_package(root: Path, manifest_path: Path) -> ModelPackage:
    """The phantom preset's tiny U-Net after ``TRAIN_STEPS`` Adam steps on random patches of the training scans
    (CT window as the preset's intensity step), saved as a package; plain torch: the trainer is not under test."""
    torch.manual_seed(0)  # the initial weights too: the same trained model every run
    pkg, m = phantom_package(root / "untrained", manifest_path, ["data.spacing=null"])
    cases = load_manifest(manifest_path).split("train")
    vols = [np.asanyarray(nib.load(m.image_paths(c)[0]).dataobj).astype(np.float32) for c in cases]
    labs = [np.asanyarray(nib.load(m.label_path(c)).dataobj).astype(np.int64) for c in cases]
    vols = [np.clip((v - LOWER) / (UPPER - LOWER), 0.0, 1.0) for v in vols]
    net = pkg.build("cpu").train()
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(TRAIN_STEPS):
        xs, ys = [], []
        for _ in range(2):
            i = int(rng.integers(len(vols)))
            fg = np.argwhere(labs[i] > 0)  # patches centred on a foreground voxel: the organs are ~7 % of a scan
            c = fg[rng.integers(len(fg))]
            o = [int(np.clip(k - p // 2, 0, n - p)) for k, n, p in zip(c, vols[i].shape, PATCH)]
            box = tuple(slice(a, a + p) for a, p in zip(o, PATCH))
            xs.append(vols[i][box][None])
            ys.append(labs[i][box])
        out = net(torch.from_numpy(np.stack(xs)))
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(np.stack(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_package(root / "pkg", net.eval(), pkg.config, m)
    return load_package(root / "pkg")


@pytest.fixture(scope="module")
def exported(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPackage, Path, Path]:
    """(trained package, its ONNX export, two phantom scans)."""
    root = tmp_path_factory.mktemp("export_predict")
    pkg = trained_package(root, tiny_phantom)
    export_package(pkg, "onnx", root / "onnx")  # what ``medseg export`` calls (its CLI: test_export.py)
    return pkg, root / "onnx", copy_phantom_scans(tiny_phantom, root / "scans", 2)


def _predict(model: Path, scans: Path, out: Path, *overrides: str) -> dict[str, dict]:
    sets = [a for o in ("inference.sw_batch_size=3", *overrides) for a in ("--set", o)]  # 3: not the export's 2
    run_cli("predict", "--model", str(model), "--input", str(scans), "--output", str(out), "--device", "cpu", *sets)
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in out.glob("*.json")}


def test_predict_with_an_onnx_export_gives_the_packages_masks(
    exported: tuple[ModelPackage, Path, Path], tmp_path: Path
) -> None:
    import onnx

    pkg, onnx_dir, scans = exported
    record = json.loads((onnx_dir / MEDSEG_JSON).read_text())
    assert (record["config"], record["model_card"]) == ("config.yaml", "metadata.json")  # travel with the export
    assert record["labels"] == pkg.labels and record["window"]["roi_size"] == list(pkg.config.roi_size)  # serving
    assert onnx.load(str(onnx_dir / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch free

    want = _predict(pkg.path, scans, tmp_path / "torch")
    # bf16 asked: an ONNX network runs in fp32 only; a warning in each case's record, not a failure
    got = _predict(onnx_dir, scans, tmp_path / "onnx", "inference.precision=bf16")
    assert sorted(want) == sorted(got) and len(want) == 2
    agreement = []
    for cid in want:
        assert want[cid]["status"] == got[cid]["status"] == "ok"
        assert want[cid]["network"] == {"backend": "torch", "precision_asked": "fp32", "precision": "fp32"}
        assert got[cid]["network"] == {"backend": "onnxruntime", "file": "model.onnx",
                                       "providers": ["CPUExecutionProvider"], "precision_asked": "bf16",
                                       "precision": "fp32"}
        notes = [w for w in got[cid]["warnings"] if w.startswith("PrecisionWarning")]
        assert len(notes) == 1 and "runs in fp32 only" in notes[0], got[cid]["warnings"]
        a, b = nib.load(tmp_path / "torch" / f"{cid}.nii.gz"), nib.load(tmp_path / "onnx" / f"{cid}.nii.gz")
        assert a.shape == b.shape and np.array_equal(a.affine, b.affine)
        ma, mb = np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)
        fractions = np.bincount(ma.ravel(), minlength=pkg.num_classes) / ma.size
        assert (fractions > 1e-4).all(), fractions  # trained: every class predicted (truth: 0.6-5 % each organ)
        agreement.append(float((ma == mb).mean()))
        assert got[cid]["windows"] == want[cid]["windows"]  # the same sliding windows ran
    print(f"ONNX vs torch label agreement per case: {agreement}")
    assert min(agreement) >= MIN_AGREEMENT


def test_torchscript_export_predicts_the_packages_labels(
    exported: tuple[ModelPackage, Path, Path], tmp_path: Path
) -> None:
    pkg, _, scans = exported
    export_package(pkg, "torchscript", tmp_path / "ts")
    ts = load_package(tmp_path / "ts")
    scan = sorted(scans.glob("*.nii.gz"))[:1]
    got, want = Predictor(ts, device="cpu").predict(scan), Predictor(pkg, device="cpu").predict(scan)
    assert got.network["backend"] == "torchscript" and np.array_equal(got.labels, want.labels)  # torch's kernels


def test_an_export_without_its_network_file_or_window_is_a_one_line_error(
    exported: tuple[ModelPackage, Path, Path], tmp_path: Path
) -> None:
    _, onnx_dir, scans = exported
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / "model.onnx").unlink()
    p = run_cli("predict", "--model", str(broken), "--input", str(scans), "--output", str(tmp_path / "o1"), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0] == f"medseg: error: {broken / 'model.onnx'}: the onnx export's network file is missing (medseg.json names it)"
    assert not (tmp_path / "o1").exists() or not list((tmp_path / "o1").iterdir())
    # a window the export was not made for: refused when the network is loaded, before any case
    pkg = apply_inference_overrides(load_package(onnx_dir), ["inference.roi_size=[16, 16, 16]"])
    with pytest.raises(ExportedNetworkError, match=r"is not the export's window \[32, 32, 16\]"):
        Predictor(pkg, device="cpu")
    with pytest.raises(ExportError, match="is an export already"):  # no export of an export
        export_package(load_package(onnx_dir), "onnx", tmp_path / "again")
