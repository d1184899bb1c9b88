"""Training data (``medseg.engine.train_data``): a manifest split as MONAI case dictionaries, and the datasets
of a run (no run without training cases; the DDP shares run under torchrun in tests/runtime/test_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.data import Dataset

from medseg.config import load_config
from medseg.data.kinds import data_kind
from medseg.engine.train_data import TrainData, case_dicts
from medseg.errors import MedsegError
from medseg.io.manifest import Case, Manifest, load_manifest

LABELS = {"background": 0, "organ": 1}


def _manifest(tmp_path: Path, cases: list[Case]) -> Manifest:
    return Manifest("m", LABELS, cases, root="data", channel_names={"0": "CT", "1": "PET"},
                    path=tmp_path / "ds.json")


def test_case_dicts_of_a_split_in_manifest_order(tmp_path: Path) -> None:
    m = _manifest(tmp_path, [
        Case("a", ("img/a_0000.nii.gz", "img/a_0001.nii.gz"), "lab/a.nii.gz", "train"),
        Case("b", ("img/b_0000.nii.gz", "img/b_0001.nii.gz"), "lab/b.nii.gz", "val"),
        Case("c", ("img/c_0000.nii.gz",), "lab/c.nii.gz", "train"),
    ])
    root = (tmp_path / "data").resolve()
    assert case_dicts(m, "train") == [
        {"image": [str(root / "img/a_0000.nii.gz"), str(root / "img/a_0001.nii.gz")],  # one file per channel
         "label": str(root / "lab/a.nii.gz"), "id": "a", "index": 0},
        {"image": str(root / "img/c_0000.nii.gz"), "label": str(root / "lab/c.nii.gz"), "id": "c", "index": 1},
    ]
    assert [d["id"] for d in case_dicts(m, "val")] == ["b"] and case_dicts(m, "val")[0]["index"] == 0
    assert case_dicts(m, "test") == []


def test_train_data_refuses_a_manifest_without_training_cases(tmp_path: Path) -> None:
    m = _manifest(tmp_path, [Case("b", ("img/b.nii.gz",), "lab/b.nii.gz", "val")])
    cfg = load_config("phantom_unet3d", ["tracking.backend=none"])
    with pytest.raises(MedsegError, match=rf"^{tmp_path / 'ds.json'}: no cases with split 'train'$"):
        TrainData(cfg, m, data_kind(cfg), 2, tmp_path / "run")


def test_train_data_holds_the_train_and_val_cases_of_the_manifest(tiny_phantom: Path, tmp_path: Path) -> None:
    cfg = load_config("phantom_unet3d", [f"data.manifest={tiny_phantom}", "data.cache=none", "data.num_workers=0",
                                         "tracking.backend=none"])
    m = load_manifest(tiny_phantom)
    cases = json.loads(tiny_phantom.read_text())["training"]
    train_ids = [c["id"] for c in cases if c["split"] == "train"]
    val_ids = [c["id"] for c in cases if c["split"] == "val"]
    assert train_ids and val_ids
    data = TrainData(cfg, m, data_kind(cfg), m.num_classes, tmp_path)
    assert isinstance(data.train_ds, Dataset) and [d["id"] for d in data.train_ds.data] == train_ids
    assert [d["id"] for d in data.val_ds.data] == val_ids and data.num_val_cases == len(val_ids)
    assert data.sampler is None and data.train_loader.batch_size == cfg.data.batch_size  # one process: no shards
