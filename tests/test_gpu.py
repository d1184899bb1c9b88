"""CUDA paths on a real GPU: AMP training with pinned-memory loading, GPU inference under autocast against the
CPU result, channels-last, memory-bounded mode on the GPU, DDP on NCCL through torchrun, and the out-of-memory
fallback of inference (a process memory limit makes the window batch, then the stitching, not fit).

Skipped where there is no CUDA device (this project's CI has none). On a GPU server:

    .venv/bin/python -m pytest -q -m gpu          # or: make test-gpu

They use the tiny phantom and run in a few minutes on one card.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.inference.batch import run_batch
from medseg.inference.inputs import discover_inputs
from medseg.inference.model_package import load_package
from medseg.inference.options import apply_inference_overrides
from medseg.inference.predictor import Predictor
from medseg.io.manifest import load_manifest
from tests.conftest import run_cli
from tests.helpers import phantom_package

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TRAIN = ["data.spacing=[3.0, 3.0, 4.0]", "data.patch_size=[32, 32, 16]", "data.samples_per_volume=2",
         "model.params.channels=[8, 16, 32, 64]", "train.val_every=1", "train.hd95_every=0", "train.overlay_cases=0",
         "tracking.registered_model_name="]


@pytest.fixture(scope="module")
def amp_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short fp16 AMP training on the GPU (GradScaler, pinned-memory loader, non-blocking copies)."""
    out = tmp_path_factory.mktemp("gpu_train")
    run_cli("train", "phantom_unet3d", f"data.manifest={tiny_phantom}", f"train.output_dir={out}", "train.run_name=amp",
            "train.epochs=4", "train.device=cuda", "train.amp=fp16", "data.num_workers=2", *TRAIN,
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", cwd=out)
    return out / "amp"


def test_amp_training_on_cuda_learns_and_packages_a_cpu_loadable_model(amp_run: Path) -> None:
    history = list(csv.DictReader((amp_run / "history.csv").open()))
    losses = [float(r["train_loss"]) for r in history]
    assert all(math.isfinite(v) for v in losses), "fp16 with GradScaler must not produce inf/NaN losses"
    assert losses[-1] < losses[0], f"the loss should fall over 4 epochs: {losses}"
    # the package was written from a CUDA model: it must load on a CPU-only machine (weights_only, map_location)
    package = load_package(amp_run / "model")
    net = package.build(torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_gpu_inference_under_autocast_matches_cpu(amp_run: Path, tiny_phantom: Path) -> None:
    package = load_package(amp_run / "model")
    manifest = load_manifest(tiny_phantom)
    case = manifest.split("val")[0]
    images = manifest.image_paths(case)
    cpu = Predictor(package, device="cpu").predict(images).labels
    gpu_predictor = Predictor(package, device="cuda")
    assert gpu_predictor.precision.dtype in (torch.float16, torch.bfloat16), "AMP is on for CUDA inference"
    gpu = gpu_predictor.predict(images).labels
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    assert float((gpu == cpu).mean()) > 0.995, "half-precision windows may flip only a few boundary voxels"
    last = Predictor(apply_inference_overrides(package, ["inference.channels_last=true"]), device="cuda").predict(images).labels
    assert float((last == gpu).mean()) > 0.999
    bounded = Predictor(apply_inference_overrides(package, ["inference.memory_bounded=true"]), device="cuda")
    assert float((bounded.predict(images).labels == gpu).mean()) > 0.99  # label map inverted with nearest: a voxel at most


def test_slab_resampling_on_cuda_equals_cpu() -> None:
    from monai import transforms as mt
    from monai.data import MetaTensor

    from medseg.inference.slab_resample import lazy_geometry, resample_in_slabs, spacing_settings

    affine = np.array([[-0.8, 0.05, 0.0, 10.0], [0.02, 0.8, 0.1, -5.0], [0.0, -0.05, 1.5, 3.0], [0, 0, 0, 1]])
    source = np.random.default_rng(0).integers(-1000, 1000, size=(1, 64, 60, 40)).astype(np.int16)
    spatial = mt.Compose([mt.Orientationd(keys="image", axcodes="RAS"), mt.Spacingd(keys="image", pixdim=(1.03, 1.17, 1.31))])
    grid_affine, grid_shape = lazy_geometry(spatial, MetaTensor(torch.zeros(1).expand(source.shape), affine=torch.as_tensor(affine)))
    settings = spacing_settings(spatial)
    cpu = resample_in_slabs(source, affine, grid_affine, grid_shape, **settings)
    gpu = resample_in_slabs(source, affine, grid_affine, grid_shape, device="cuda", **settings)
    assert gpu.device.type == "cpu" and float((gpu - cpu).abs().max()) < 1e-2


def test_predict_cli_on_cuda_writes_masks_in_the_input_geometry(amp_run: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    import nibabel as nib

    manifest = load_manifest(tiny_phantom)
    p = run_cli("predict", "--model", str(amp_run / "model"), "--input", str(tiny_phantom), "--split", "val",
                "--output", str(tmp_path / "pred"), "--device", "cuda")
    assert " 0 failed" in p.stdout
    for case in manifest.split("val"):
        src = nib.load(manifest.image_paths(case)[0])
        mask = nib.load(tmp_path / "pred" / f"{case.id}.nii.gz")
        assert mask.shape == src.shape[:3] and np.allclose(mask.affine, src.affine)
        record = json.loads((tmp_path / "pred" / f"{case.id}.json").read_text())
        assert record["status"] == "ok"


def test_torchrun_nccl_one_gpu(tiny_phantom: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(min(2, torch.cuda.device_count())), "-m", "medseg.cli",
           "train", "phantom_unet3d", f"data.manifest={tiny_phantom}", f"train.output_dir={tmp_path}", "train.run_name=nccl",
           "train.epochs=2", *TRAIN, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, f"torchrun exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    history = list(csv.DictReader((tmp_path / "nccl" / "history.csv").open()))
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert (tmp_path / "nccl" / "model" / "model.pt").is_file()


# ---- out-of-memory fallback -------------------------------------------------------------------------------------
@contextlib.contextmanager
def gpu_memory_limit(extra_bytes: int) -> Iterator[None]:
    """Let this process's CUDA allocator hold at most what it holds now plus ``extra_bytes`` (its cache emptied
    first, so nothing cached hides the limit)."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + extra_bytes) / total), 0)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def predict_one(pkg, scans: Path, out: Path) -> tuple[np.ndarray, dict, Predictor, int]:
    """Segment the one scan in ``scans`` on the GPU through the batch runner: (mask, case record, predictor, the
    most bytes the allocator held above what it held before)."""
    import nibabel as nib

    predictor = Predictor(pkg, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    report = run_batch(pkg, discover_inputs(scans), out, device="cuda", progress=False, predictor=predictor)
    peak = torch.cuda.max_memory_reserved() - before
    (cid,) = report.done
    record = json.loads((out / f"{cid}.json").read_text())
    return np.asanyarray(nib.load(out / f"{cid}.nii.gz").dataobj), record, predictor, peak


def write_scan(folder: Path, shape: tuple[int, int, int]) -> Path:
    """One int16 CT-like scan that is body everywhere (every window runs), noisy enough for varied labels."""
    import nibabel as nib

    folder.mkdir(parents=True)
    vol = np.random.default_rng(0).integers(-150, 250, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 1.5, 1.0])), folder / "scan.nii.gz")
    return folder


def same_labels(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal labels, up to the rare voxel whose two best classes tie within float rounding: cuDNN may pick another
    convolution algorithm for another window batch size, and the CPU adds the blended windows in its own kernels."""
    return a.shape == b.shape and float((a != b).mean()) <= 1e-5


def test_window_batch_that_does_not_fit_the_gpu_is_split(tiny_phantom: Path, tmp_path: Path) -> None:
    # 125 windows of 32x32x16 in one window batch: the network's activations are most of the memory used.
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null", "inference.precision=fp32",
                                                      "inference.sw_batch_size=256"])
    scans = write_scan(tmp_path / "scans", (128, 128, 64))
    want, _, _, peak = predict_one(pkg, scans, tmp_path / "free")
    with gpu_memory_limit(int(peak * 0.4)):
        got, record, predictor, _ = predict_one(pkg, scans, tmp_path / "limited")
    assert record["status"] == "ok" and same_labels(got, want)
    steps = [w for w in record["warnings"] if w.startswith("GpuMemoryWarning")]
    assert steps and all("CUDA out of memory in the network" in w for w in steps), record["warnings"]
    assert predictor.memory.windows_per_call is not None and predictor.memory.windows_per_call < 256


def test_stitching_that_does_not_fit_the_gpu_moves_to_the_cpu(tiny_phantom: Path, tmp_path: Path) -> None:
    # 256x256x160 voxels x 4 classes of float32 blended logits (168 MiB) and the count map: most of the memory used;
    # the windows (2 of 32x32x16 per call) need little.
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null", "inference.precision=fp32",
                                                      "inference.sw_batch_size=2"])
    scans = write_scan(tmp_path / "scans", (256, 256, 160))
    want, _, _, peak = predict_one(pkg, scans, tmp_path / "free")
    with gpu_memory_limit(peak // 2):
        got, record, predictor, _ = predict_one(pkg, scans, tmp_path / "limited")
    assert record["status"] == "ok" and same_labels(got, want)
    steps = [w for w in record["warnings"] if w.startswith("GpuMemoryWarning")]
    assert any("retrying with the stitching on the CPU" in w for w in steps), record["warnings"]
    assert predictor.memory.cpu_stitch_above is not None
