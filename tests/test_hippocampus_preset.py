"""The hippocampus preset on real MSD Task04 files: its manifest, its plan, and a tiny end-to-end CLI run.

The full-size figure (18-minute training, held-out test Dice) is ``benchmarks/hippocampus.py``; here the
preset runs one epoch with a tiny network on 4 real cases, so CI checks the path, not the accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import load_config
from medseg.io.manifest import Case, Manifest, load_manifest
from medseg.planning.volumes import plan_dataset
from tests.conftest import REPO, run_cli

MANIFEST = REPO / "data_manifests" / "hippocampus.json"


def test_committed_manifest_resolves_and_keeps_test_held_out(hippocampus_dir: Path) -> None:
    m = load_manifest(MANIFEST)
    assert not os.path.isabs(m.root) and m.root_dir == hippocampus_dir.resolve()  # works from a sibling checkout
    splits = {s: {c.id for c in m.split(s)} for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 154, "val": 22, "test": 44}
    assert not (splits["test"] & (splits["train"] | splits["val"])) and not (splits["train"] & splits["val"])
    for c in m.cases[:3]:
        assert m.image_paths(c)[0].is_file() and m.label_path(c).is_file()


def test_preset_agrees_with_plan_of_its_training_split(hippocampus_dir: Path, tmp_path: Path) -> None:
    cfg = load_config("hippocampus_unet3d")
    assert Path(cfg.data.manifest) == Path("data_manifests/hippocampus.json")
    doc = plan_dataset(MANIFEST, tmp_path / "plans.json")  # all 154 training cases, headers + label counts
    planned = load_config("hippocampus_unet3d", doc["overrides"])
    assert planned.data == cfg.data  # the preset's data section is exactly what planning suggests
    assert len(cfg.model.params["strides"]) == doc["plans"]["network_downsamplings"]
    assert cfg.train.max_minutes is not None and cfg.train.max_minutes <= 18


@pytest.fixture
def hippo_subset(hippocampus_dir: Path, tmp_path: Path) -> Path:
    """A 4-case manifest (2 train, 1 val, 1 test) over the real files, which stay where they are."""
    src = json.loads((hippocampus_dir / "dataset.json").read_text())
    entries = sorted(src["training"], key=lambda e: e["image"])[:4]
    cases = [Case(Path(e["image"]).name.removesuffix(".nii.gz"), (e["image"].removeprefix("./"),),
                  e["label"].removeprefix("./"), s) for e, s in zip(entries, ("train", "train", "val", "test"), strict=True)]
    out = tmp_path / "manifests" / "hippo4.json"
    out.parent.mkdir()
    m = Manifest(name="hippo4", labels={v: int(k) for k, v in src["labels"].items()}, cases=cases,
                 root=os.path.relpath(hippocampus_dir, out.parent), channel_names={"0": "MRI"})
    m.save(out)
    return out


def test_preset_trains_predicts_evaluates_on_real_cases(hippo_subset: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run_cli("train", "hippocampus_unet3d", f"data.manifest={hippo_subset}", "train.epochs=1", "train.val_every=1",
            "model.params.channels=[4,8,16,32]", f"train.output_dir={runs}", "train.run_name=ci",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    run = runs / "ci"
    meta = json.loads((run / "model" / "metadata.json").read_text())
    assert meta["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert meta["intensity"]["mode"] == "zscore" and meta["spacing"] is None
    assert meta["roi_size"] == [40, 56, 40]

    preds = tmp_path / "preds"
    run_cli("predict", "--model", str(run), "--input", str(hippo_subset), "--split", "test", "--output", str(preds), cwd=tmp_path)
    m = load_manifest(hippo_subset)
    (test_case,) = m.split("test")
    mask, scan = nib.load(preds / f"{test_case.id}.nii.gz"), nib.load(m.image_paths(test_case)[0])
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)  # overlays the input scan
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1, 2}
    assert sorted(p.name for p in preds.glob("*.nii.gz")) == [f"{test_case.id}.nii.gz"]  # only the test split

    p = run_cli("evaluate", "--pred", str(preds), "--manifest", str(hippo_subset), "--split", "test", cwd=tmp_path)
    summary = json.loads((preds / "evaluation" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and set(summary["organs"]) == {"anterior", "posterior"}
    for organ in summary["organs"].values():
        assert 0.0 <= organ["dice"]["mean"] <= 1.0 and 0.0 <= organ["iou"]["mean"] <= organ["dice"]["mean"] + 1e-9
    assert "anterior" in p.stdout and "posterior" in p.stdout
