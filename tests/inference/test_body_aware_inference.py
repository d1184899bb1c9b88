"""Body-aware inference gives, inside the body, what a plain whole-volume MONAI call gives.

A real (untrained, instance-norm) U-Net from a model package segments a synthetic CT whose body fills only
part of the field of view. The reference is ``sliding_window_inference`` on the whole windowed volume with
the same network (contiguous layout), ROI, overlap and blending. medseg crops on the window grid, skips
body-free windows, runs channels-last, and in memory-bounded mode also keeps the scan in int16 and streams
the blending: inside the body all of that must change nothing but float rounding.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.inference.label_maps import argmax_classes
from medseg.inference.options import apply_inference_overrides
from medseg.inference.predictor import Predictor
from tests.helpers import LOWER, UPPER, expected_mask, oracle_model, phantom_package

SHAPE = (72, 64, 40)


def synthetic_ct(affine: np.ndarray) -> nib.Nifti1Image:
    """int16 HU: air around an off-centre elliptic body with two organs (air-only windows exist)."""
    x, y, z = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    body = ((x - 24) / 20.0) ** 2 + ((y - 22) / 16.0) ** 2 <= 1
    vol = np.full(SHAPE, -1000, np.int16)
    vol[np.broadcast_to(body & (z >= 4) & (z < 30), SHAPE)] = 40
    vol[((x - 20) ** 2 + (y - 20) ** 2 + (z - 14) ** 2) <= 49] = 120
    vol[((x - 30) ** 2 + (y - 26) ** 2 + (z - 20) ** 2) <= 16] = 200
    rng = np.random.default_rng(0)
    vol[vol > -1000] += rng.integers(-15, 16, size=int((vol > -1000).sum()), dtype=np.int16)
    return nib.Nifti1Image(vol, affine)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, tiny_phantom: Path):
    tmp = tmp_path_factory.mktemp("bodypkg")
    torch.manual_seed(0)
    pkg, _ = phantom_package(tmp, tiny_phantom, ["data.spacing=null", "inference.overlap=0.25", "inference.sw_batch_size=3"])
    return pkg


def _plain(vol: np.ndarray, net: torch.nn.Module, cfg) -> torch.Tensor:
    x = ((torch.from_numpy(vol).float().clamp(LOWER, UPPER) - LOWER) / (UPPER - LOWER))[None, None]
    with torch.inference_mode():
        logits = sliding_window_inference(x, cfg.roi_size, cfg.inference.sw_batch_size, net, overlap=cfg.inference.overlap,
                                          mode=cfg.inference.blend_mode)
    return torch.softmax(logits, 1)[0]


def test_standard_path_equals_plain_call_inside_the_body(package, tmp_path: Path) -> None:
    img = synthetic_ct(np.diag([1.0, 1.0, 2.0, 1.0]))
    vol = np.asanyarray(img.dataobj)
    body = vol > -500
    predictor = Predictor(apply_inference_overrides(package, ["inference.window_grid=whole"]), device="cpu")
    plain = _plain(vol, copy.deepcopy(predictor.model).to(memory_format=torch.contiguous_format), package.config)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    probs, _ = predictor.probabilities([path])
    diff = (probs - plain).abs().amax(0)
    assert float(diff[torch.from_numpy(body)].max()) < 1e-4
    pred = predictor.predict([path])
    assert pred.windows["skipped"] > 0 and pred.windows["run"] > 0, pred.windows
    # The label-only path (argmax before inversion, no resampling) equals the argmax of the inverted probabilities.
    assert np.array_equal(pred.labels, argmax_classes(probs).numpy())
    plain_labels = plain.argmax(0).numpy()
    assert len(np.unique(plain_labels[body])) > 1, "an untrained net that answers one class everywhere proves nothing"
    agree = (pred.labels == plain_labels)[body].mean()
    assert agree > 0.999, agree


@pytest.mark.parametrize("grid", ["body", "whole"])
@pytest.mark.parametrize("flip", [False, True], ids=["ras", "flipped_x"])
def test_memory_bounded_equals_standard_path_inside_the_body(package, flip: bool, grid: str) -> None:
    # Without resampling, memory-bounded mode crops the int16 scan on the same window grid, normalises per
    # window and streams the blending: its label map must be the standard path's inside the body.
    affine = np.diag([-1.0 if flip else 1.0, 1.0, 2.0, 1.0])
    img = synthetic_ct(affine)
    vol = np.asanyarray(img.dataobj)
    body = vol > -500
    pkg = apply_inference_overrides(package, [f"inference.window_grid={grid}"])
    standard = Predictor(pkg, device="cpu").predict(img, name="ct")
    bounded = Predictor(apply_inference_overrides(pkg, ["inference.memory_bounded=true"]), device="cpu").predict(img, name="ct")
    assert bounded.labels.dtype == np.uint8 and bounded.labels.shape == vol.shape
    assert bounded.windows == standard.windows and bounded.windows["run"] > 0
    assert bounded.windows["skipped"] > 0 or grid == "body"  # the tight body box of this scan has no body-free window
    assert len(np.unique(standard.labels[body])) > 1
    agree = (bounded.labels == standard.labels)[body].mean()
    assert agree > 0.999, agree


@pytest.mark.parametrize("bounded", [False, True], ids=["standard", "memory_bounded"])
def test_body_grid_runs_fewer_windows_and_keeps_geometry(tiny_phantom: Path, tmp_path: Path, bounded: bool) -> None:

    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null", f"inference.memory_bounded={str(bounded).lower()}"])
    path = m.image_paths(m.cases[3])[0]  # the oblique case
    whole = Predictor(apply_inference_overrides(pkg, ["inference.window_grid=whole"]), device="cpu", model=oracle_model()).predict([path])
    body = Predictor(apply_inference_overrides(pkg, ["inference.window_grid=body"]), device="cpu", model=oracle_model()).predict([path])
    raw = np.asanyarray(nib.load(path).dataobj)
    assert np.array_equal(body.labels, expected_mask(raw)) and np.array_equal(whole.labels, expected_mask(raw))
    assert body.windows["run"] + body.windows["skipped"] <= whole.windows["run"] + whole.windows["skipped"]
