"""The CamVid preset on the real SegNet CamVid files: it takes planning's intensity and void settings for the train
split of a manifest imported with the committed class list, and its (half-resolution) crop fits the resized images.
The full-size figure is ``benchmarks/camvid.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.config import load_config
from tests.helpers import REPO, SHARED_DATA, run_cli


def test_preset_agrees_with_plan_of_the_real_train_split(tmp_path: Path) -> None:
    src = SHARED_DATA / "camvid"
    if not (src / "trainannot").is_dir():
        pytest.skip(f"real data not found at {src}")
    out = tmp_path / "camvid.json"
    run_cli("data", "import-images", str(src), "--format", "camvid", "--void", "11", "--classes",
            str(REPO / "data_manifests" / "camvid_classes.txt"), "--output", str(out))
    p = run_cli("data", "plan", str(out))
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("suggested overrides:"))
    suggested = line.removeprefix("suggested overrides:").split()
    cfg = load_config("camvid_unet2d")
    planned = load_config("camvid_unet2d", suggested)
    assert planned.data.intensity == cfg.data.intensity and planned.data.ignore_index == cfg.data.ignore_index == 255
    assert "class_weights" not in cfg.loss.params  # measured to cost mIoU at this budget (see the preset)
    # the crop fits the resized images and the network's total stride; the inference window covers a whole image
    stride = 2 ** len(cfg.model.params["strides"])
    assert cfg.data.resize is not None
    assert all(p <= r and p % stride == 0 for p, r in zip(cfg.data.patch_size, cfg.data.resize, strict=True))
    assert all(w >= r and w % stride == 0 for w, r in zip(cfg.roi_size, cfg.data.resize, strict=True))
    assert cfg.optimizer.schedule_span == "time_budget" and cfg.train.max_minutes is not None
