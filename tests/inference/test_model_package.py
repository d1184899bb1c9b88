"""Model packages carry weights, config, model card and (when planned) the dataset plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg.config import load_config
from medseg.errors import InputError
from medseg.inference.model_package import load_package, save_package
from medseg.io.manifest import load_manifest
from medseg.models import build_model


def _save(tmp_path: Path, manifest_path: Path, plans: dict | None) -> Path:
    cfg = load_config("phantom_unet3d", [f"data.manifest={manifest_path}", "model.params.channels=[4, 8, 16, 32]"])
    m = load_manifest(manifest_path)
    net = build_model("unet", 3, m.num_channels, m.num_classes, cfg.model.params)
    return save_package(tmp_path / "pkg", net, cfg, m, {"run_id": "abc"}, plans=plans)


def test_package_round_trip_with_plans(tiny_phantom: Path, tmp_path: Path) -> None:
    plans = {"target_spacing": None, "patch_size": [40, 56, 40], "normalization": {"mode": "zscore"}}
    out = _save(tmp_path, tiny_phantom, plans)
    assert json.loads((out / "plans.json").read_text()) == plans
    pkg = load_package(out)
    assert pkg.metadata["plans"] == "plans.json" and pkg.metadata["run_id"] == "abc"
    assert pkg.labels == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
    net = pkg.build("cpu")
    assert not net.training
    assert net(torch.zeros(1, 1, 32, 32, 16)).shape == (1, 4, 32, 32, 16)


def test_package_without_plans_and_run_folder_lookup(tiny_phantom: Path, tmp_path: Path) -> None:
    out = _save(tmp_path, tiny_phantom, None)
    assert not (out / "plans.json").exists() and "plans" not in load_package(out).metadata
    assert load_package(tmp_path).path == out  # a run folder holding model/ resolves to the package


def test_tampered_weights_are_a_clear_error(tiny_phantom: Path, tmp_path: Path) -> None:
    out = _save(tmp_path, tiny_phantom, None)
    (out / "model.pt").write_bytes(b"\x80\x04 not a torch file")
    with pytest.raises(InputError, match="model.pt: cannot load weights"):
        load_package(out).build("cpu")
