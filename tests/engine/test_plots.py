"""Training plots (``medseg.engine.plots``): learning curve and overlay PNGs, the slice an overlay shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.engine.plots import learning_curve, middle_slices, overlay


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
