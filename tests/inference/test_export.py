"""``medseg export``: the exported network (ONNX Runtime / ``torch.jit.load``) gives the package's logits on the same
windows, with a free batch axis, and ``medseg.json`` carries what serving needs; for a 3D U-Net and a 2D U-Net
(slice-wise on volumes), through the API and the real CLI.

Tolerance: the exported network and torch differ by float rounding only. Measured here (torch 2.13 CPU, onnxruntime
1.32, six windows of a phantom scan, logits up to ~10 in magnitude): ONNX at most 7.4e-6 (3D U-Net) and 5.0e-6 (2D
U-Net), ONNX Runtime having its own convolution kernels; TorchScript 0 (torch's kernels). The tests allow
``ONNX_ATOL = 1e-4`` and ``TORCHSCRIPT_ATOL = 1e-6``, far below what a wrong export (a layer missing, weights mixed
up) changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.inference.export import (
    CHECK_TOLERANCE,
    MEDSEG_JSON,
    ExportError,
    Logits,
    export_package,
)
from medseg.inference.model_package import ModelPackage, load_package, save_package
from medseg.io.manifest import load_manifest
from medseg.models import build_model
from tests.helpers import LOWER, UPPER, phantom_package, run_cli

ONNX_ATOL, TORCHSCRIPT_ATOL = 1e-4, 1e-6

onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxscript, onnxruntime)")


def package_2d(tmp_path: Path, manifest_path: Path) -> ModelPackage:
    """A small 2D U-Net package of the slice-wise preset (untrained weights, fixed by a seed)."""
    cfg = load_config("unet2d_slicewise", [f"data.manifest={manifest_path}", "data.patch_size=[32, 24]",
                                           "model.params.channels=[4, 8, 16]", "model.params.strides=[2, 2]"])
    m = load_manifest(manifest_path)
    torch.manual_seed(1)
    net = build_model(cfg.model.name, 2, m.num_channels, m.num_classes, cfg.model.params)
    save_package(tmp_path / "pkg2d", net, cfg, m)
    return load_package(tmp_path / "pkg2d")


def scan_windows(manifest_path: Path, roi: tuple[int, ...], count: int) -> torch.Tensor:
    """``count`` windows of a phantom scan, windowed to [0, 1] as the preset's intensity step does; a 2D ``roi``
    takes axial slices. Windows of real data, not noise: the ranges the network sees in prediction."""
    m = load_manifest(manifest_path)
    raw = np.asanyarray(nib.load(m.image_paths(m.cases[0])[0]).dataobj).astype(np.float32)
    x = np.clip((raw - LOWER) / (UPPER - LOWER), 0.0, 1.0)
    out = []
    for i in range(count):
        if len(roi) == 3:
            o = [(i * 7) % (n - r + 1) for n, r in zip(x.shape, roi)]
            out.append(x[o[0]: o[0] + roi[0], o[1]: o[1] + roi[1], o[2]: o[2] + roi[2]])
        else:
            o = [(i * 5) % (n - r + 1) for n, r in zip(x.shape[:2], roi)]
            out.append(x[o[0]: o[0] + roi[0], o[1]: o[1] + roi[1], (i * 3) % x.shape[2]])
    return torch.from_numpy(np.stack(out)[:, None].copy())


def torch_logits(package: ModelPackage, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return Logits(package.build("cpu")).eval()(x).numpy()


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x.numpy()})[0]


def check_medseg_json(record: dict, package: ModelPackage, out: Path, fmt: str) -> None:
    on_disk = json.loads((out / MEDSEG_JSON).read_text())
    assert on_disk == json.loads(json.dumps(record))  # what export_package returns is what it wrote
    cfg = package.config
    assert on_disk["model_format"] == fmt and (out / on_disk["file"]).is_file()
    assert on_disk["labels"] == package.labels and on_disk["num_classes"] == package.num_classes
    assert on_disk["in_channels"] == 1 and on_disk["channel_names"] == package.metadata["channel_names"]
    assert on_disk["input"]["shape"] == ["batch", 1, *cfg.roi_size]
    assert on_disk["output"]["shape"] == ["batch", package.num_classes, *cfg.roi_size]
    pre, win = on_disk["preprocessing"], on_disk["window"]
    assert pre["intensity"]["mode"] == "ct_window" and (pre["intensity"]["lower"], pre["intensity"]["upper"]) == (
        LOWER, UPPER)
    assert pre["spacing_mm"] == (list(cfg.data.spacing) if cfg.data.spacing else None)
    assert pre["orientation"] == cfg.data.orientation
    assert (win["roi_size"], win["overlap"], win["blend_mode"]) == (list(cfg.roi_size), cfg.inference.overlap,
                                                                     cfg.inference.blend_mode)
    check = on_disk["check"]
    assert check["batches"] == [1, 3] and check["max_abs_logit_diff"] <= CHECK_TOLERANCE
    assert check["argmax_agreement"] > 0.999


def test_onnx_export_of_a_3d_unet_runs_in_onnxruntime_like_torch(tiny_phantom: Path, tmp_path: Path) -> None:
    import onnx

    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=[2.0, 2.0, 2.0]"])
    record = export_package(pkg, "onnx", tmp_path / "onnx")
    check_medseg_json(record, pkg, tmp_path / "onnx", "onnx")
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert record["export"]["opset"] == opset and record["export"]["exporter"] == "dynamo"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32, 16]  # batch axis free, rest fixed
    assert not record["slice_wise"] and record["spatial_dims"] == 3
    for batch in (1, 5):  # neither is the batch the export traced (2)
        x = scan_windows(tiny_phantom, (32, 32, 16), batch)
        want, got = torch_logits(pkg, x), run_onnx(tmp_path / "onnx" / "model.onnx", x)
        assert got.shape == want.shape == (batch, pkg.num_classes, 32, 32, 16)
        assert np.abs(got - want).max() <= ONNX_ATOL
        assert np.array_equal(got.argmax(1), want.argmax(1)) or (got.argmax(1) == want.argmax(1)).mean() > 0.9999


def test_torchscript_export_of_a_3d_unet_loads_and_gives_torchs_logits(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    record = export_package(pkg, "torchscript", tmp_path / "ts")
    check_medseg_json(record, pkg, tmp_path / "ts", "torchscript")
    assert record["export"]["method"] == "torch.jit.trace"
    loaded = torch.jit.load(str(tmp_path / "ts" / "model.torchscript.pt"))
    for batch in (1, 4):
        x = scan_windows(tiny_phantom, (32, 32, 16), batch)
        with torch.no_grad():
            got = loaded(x).numpy()
        assert np.abs(got - torch_logits(pkg, x)).max() <= TORCHSCRIPT_ATOL


def test_2d_model_exports_through_the_cli_in_both_formats(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg = package_2d(tmp_path, tiny_phantom)
    p = run_cli("export", str(pkg.path), "--format", "onnx", "--output", str(tmp_path / "onnx2d"))
    assert "model.onnx" in p.stdout and "argmax agreement" in p.stdout, p.stdout
    record = json.loads((tmp_path / "onnx2d" / MEDSEG_JSON).read_text())
    check_medseg_json(record, pkg, tmp_path / "onnx2d", "onnx")
    assert record["slice_wise"] and record["spatial_dims"] == 2 and record["window"]["input_window"] == [32, 24, 1]
    x = scan_windows(tiny_phantom, (32, 24), 3)
    assert x.shape == (3, 1, 32, 24)
    want = torch_logits(pkg, x)
    assert np.abs(run_onnx(tmp_path / "onnx2d" / "model.onnx", x) - want).max() <= ONNX_ATOL

    run_cli("export", str(pkg.path), "--format", "torchscript", "--output", str(tmp_path / "ts2d"))
    check_medseg_json(json.loads((tmp_path / "ts2d" / MEDSEG_JSON).read_text()), pkg, tmp_path / "ts2d", "torchscript")
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "ts2d" / "model.torchscript.pt"))(x).numpy()
    assert np.abs(got - want).max() <= TORCHSCRIPT_ATOL
    assert not [f.name for f in (tmp_path / "ts2d").iterdir() if f.name.startswith(".")]  # no temp files left


def test_bad_format_and_missing_model_are_one_line_errors(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    with pytest.raises(ExportError, match="expected one of onnx, torchscript"):
        export_package(pkg, "tflite", tmp_path / "out")
    p = run_cli("export", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("medseg: error:") and "model not found" in p.stderr
    assert not (tmp_path / "out" / MEDSEG_JSON).exists()
