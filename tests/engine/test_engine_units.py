"""Small engine pieces: CPU fallbacks of the GPU paths, size checks, history CSV, plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.runtime.device import resolve_device, resolve_precision
from medseg.engine.history import read_rows_csv, write_rows_csv
from medseg.engine.plots import learning_curve, middle_slices, overlay
from medseg.engine.trainer import Trainer
from medseg.errors import ConfigError
from medseg.io.manifest import load_manifest


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_settings_fall_back_to_cpu_cleanly() -> None:
    cpu = resolve_device("auto", local_rank=1)
    assert cpu.type == "cpu"
    for amp in ("auto", "fp16", "bf16", "off"):
        p = resolve_precision(amp, cpu)
        assert p.dtype is None and not p.use_scaler
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # what the trainer builds on CPU: a pass-through
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler.scale((w * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.tensor([-1.0, -1.0]))


def test_precision_on_cuda_device_object() -> None:
    cuda = torch.device("cuda", 0)  # no card needed: the choice is made from the device type
    assert resolve_precision("fp16", cuda).use_scaler and resolve_precision("fp16", cuda).dtype == torch.float16
    assert resolve_precision("bf16", cuda).dtype == torch.bfloat16 and not resolve_precision("bf16", cuda).use_scaler
    assert resolve_precision("off", cuda).dtype is None


def test_patch_that_does_not_fit_the_network_is_a_config_error(tiny_phantom: Path, tmp_path: Path) -> None:
    cfg = load_config("vnet_dice_focal", [f"data.manifest={tiny_phantom}", f"train.output_dir={tmp_path}",
                                          "data.patch_size=[24, 24, 16]", "tracking.backend=none"])
    trainer = Trainer(cfg, load_manifest(tiny_phantom))
    with pytest.raises(ConfigError, match=r"data.patch_size \[24, 24, 16\] does not fit model 'vnet'"):
        trainer._model()


def test_history_csv_is_whole_and_rereadable(tmp_path: Path) -> None:
    rows = [{"epoch": 0, "train_loss": 1.5}, {"epoch": 1, "train_loss": 1.2, "val_dice_liver": 0.5}]
    write_rows_csv(tmp_path / "h.csv", rows)
    write_rows_csv(tmp_path / "h.csv", rows)  # rewriting (a resumed epoch) never duplicates rows
    back = read_rows_csv(tmp_path / "h.csv")
    assert [r["epoch"] for r in back] == [0.0, 1.0] and back[1]["val_dice_liver"] == 0.5
    assert math.isnan(back[0]["val_dice_liver"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_plots_write_png(tmp_path: Path) -> None:
    history = [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "val_dice_a": 0.2, "val_dice_mean": 0.2},
               {"epoch": 1, "train_loss": 0.8, "val_loss": float("nan"), "val_dice_a": 0.4, "val_dice_mean": 0.4}]
    png = learning_curve(history, ["a"], tmp_path / "lc.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    truth = np.zeros((8, 8, 5), np.uint8)
    truth[2:5, 2:5, 3] = 1
    img, t, p = middle_slices(np.random.default_rng(0).random((8, 8, 5)), truth, truth)
    assert t.sum() == 9  # the slice with the most foreground
    assert overlay(img, t, p, 2, tmp_path / "ov.png").read_bytes()[:4] == b"\x89PNG"
