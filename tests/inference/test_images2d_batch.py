"""2D image prediction through the batch runner: the real CLI on real PNGs (one truncated), per-image JSON
records and ``summary.csv``, ``--resume``, ``--shard``, ``--save-probabilities`` and a batch MLflow run on the
real server fixture.

The model package is a tiny 2D U-Net with untrained (seeded) weights and the ``voc_unet2d`` preprocessing,
working on images resized to half size, so masks and probabilities must be resized back to each input's
own size; what is tested is the batch behaviour, not the segmentation quality.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.config import load_config
from medseg.errors import InputError
from medseg.inference.batch import run_batch
from medseg.inference.images2d import ImagePredictor
from medseg.inference.inputs import discover_inputs
from medseg.inference.model_package import load_package, save_package
from medseg.inference.shard import select_shard
from medseg.io.images2d.common import Pair, build_manifest, write_index_png
from medseg.io.manifest import load_manifest
from medseg.models import build_model
from tests.conftest import MEDSEG, run_cli
from tests.helpers import phantom_package
from tests.images2d_data import rgb_for

LABELS = {"background": 0, "a": 1, "b": 2}
# (height, width) of each test image: none square, none the size the model works at
SIZES = {"img_0": (40, 56), "img_1": (33, 47), "img_2": (24, 64), "img_3": (50, 30), "img_4": (41, 41)}


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    lab = np.zeros((h, w), np.int64)
    lab[h // 4:h // 2, w // 5:w // 2] = 1
    lab[h // 2:, w // 2 + seed % 3:] = 2
    return lab


def _write_images(folder: Path, sizes: dict[str, tuple[int, int]], names: dict[str, str] | None = None) -> Path:
    """RGB PNGs (colour follows a class scene) named ``<id>.png`` (or ``names[id]``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (cid, (h, w)) in enumerate(sizes.items()):
        Image.fromarray(rgb_for(_scene(h, w, i), i)).save(folder / (names or {}).get(cid, f"{cid}.png"))
    return folder


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained image2d package (3 classes, images resized to 20x28, 16x16 windows)."""
    root = tmp_path_factory.mktemp("pkg2d")
    images = _write_images(root / "images", {"t0": (40, 56), "t1": (40, 56)})
    pairs = []
    for cid in ("t0", "t1"):
        write_index_png(root / "labels" / f"{cid}.png", _scene(40, 56, 0))
        pairs.append(Pair(cid, images / f"{cid}.png", root / "labels" / f"{cid}.png", "val"))
    manifest = load_manifest(build_manifest("toy2d", LABELS, pairs, root / "toy.json", 0.0, 0, "test").path)
    cfg = load_config("voc_unet2d", [f"data.manifest={manifest.path}", "data.patch_size=[16, 16]",
                                     "data.resize=[20, 28]", "inference.roi_size=[16, 16]",
                                     "model.params.channels=[4, 8, 16]", "model.params.strides=[2, 2]"])
    torch.manual_seed(3)
    net = build_model(cfg.model.name, 2, manifest.num_channels, manifest.num_classes, cfg.model.params)
    return save_package(root / "pkg", net, cfg, manifest)


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if not p.name.startswith(".")}


def _summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_corrupt_image_is_recorded_and_the_rest_are_written(package_dir: Path, tmp_path: Path) -> None:
    images = _write_images(tmp_path / "images", SIZES)
    (images / "broken.png").write_bytes((images / "img_0.png").read_bytes()[:300])  # truncated PNG
    out = tmp_path / "out"
    p = run_cli("predict", "--model", str(package_dir), "--input", str(images), "--output", str(out),
                "--device", "cpu", check=False)
    assert p.returncode == 3, p.stderr
    assert f"{len(SIZES)} predicted, 0 already done, 1 failed -> {out}" in p.stdout
    assert "failed broken" in p.stderr

    records = _records(out)
    assert sorted(records) == sorted([*SIZES, "broken"])
    bad = records["broken"]
    assert bad["status"] == "failed" and "broken.png" in bad["error"] and "not a readable image" in bad["error"]
    assert not (out / "broken.png").exists()
    for cid, (h, w) in SIZES.items():
        mask = np.asarray(Image.open(out / f"{cid}.png"))
        assert mask.shape == (h, w) and mask.max() < len(LABELS)  # exactly the input's size
        r = records[cid]
        assert r["status"] == "ok" and r["kind"] == "image2d" and r["shape"] == [h, w]
        assert r["outputs"] == [f"{cid}.png"] and r["inputs"] == [f"{cid}.png"]
        for name, v in LABELS.items():
            n = int((mask == v).sum())
            assert r["classes"][name] == {"pixels": n, "fraction": pytest.approx(n / (h * w), abs=1e-6)}
        assert r["input_sha256"] == hashlib.sha256((images / f"{cid}.png").read_bytes()).hexdigest()
        assert r["runtime_s"] > 0 and r["peak_rss_mb"] > 0 and r["model"]["path"] == str(package_dir)

    rows = _summary(out)
    assert [r["case"] for r in rows] == sorted([*SIZES, "broken"])
    assert {f"{c}_{k}" for c in LABELS for k in ("pixels", "fraction")} <= set(rows[0])
    assert not [k for k in rows[0] if k.endswith(("_ml", "_voxels"))]
    by_id = {r["case"]: r for r in rows}
    assert by_id["broken"]["status"] == "failed" and by_id["broken"]["background_pixels"] == ""
    for cid in SIZES:
        assert int(by_id[cid]["a_pixels"]) == records[cid]["classes"]["a"]["pixels"]
        assert sum(int(by_id[cid][f"{c}_pixels"]) for c in LABELS) == SIZES[cid][0] * SIZES[cid][1]


def test_resume_skips_exactly_the_finished_images(package_dir: Path, tmp_path: Path) -> None:
    images = _write_images(tmp_path / "images", SIZES)
    out = tmp_path / "out"
    first = run_batch(load_package(package_dir), discover_inputs(images), out, device="cpu", progress=False)
    assert sorted(first.done) == sorted(SIZES) and not first.failed
    (out / "img_1.png").unlink()  # mask lost after its record: incomplete
    (out / "img_3.json").unlink()  # killed between mask and record: incomplete
    (out / ".img_2.png.abc123.tmp.png").write_bytes(b"half")  # a killed run's temp file
    kept = {cid: (out / f"{cid}.json").stat().st_mtime_ns for cid in ("img_0", "img_2", "img_4")}

    p = run_cli("predict", "--model", str(package_dir), "--input", str(images), "--output", str(out),
                "--device", "cpu", "--resume")
    assert f"2 predicted, 3 already done, 0 failed -> {out}" in p.stdout
    for cid, mtime in kept.items():  # not redone
        assert (out / f"{cid}.json").stat().st_mtime_ns == mtime
    names = sorted(q.name for q in out.iterdir())
    assert names == sorted([f"{c}.{ext}" for c in SIZES for ext in ("png", "json")] + ["summary.csv"])
    for cid in ("img_1", "img_3"):
        assert json.loads((out / f"{cid}.json").read_text())["status"] == "ok"
        assert np.asarray(Image.open(out / f"{cid}.png")).shape == SIZES[cid]
    assert [r["case"] for r in _summary(out)] == sorted(SIZES)


def test_two_shards_cover_every_image_once_with_probabilities(package_dir: Path, tmp_path: Path) -> None:
    images = _write_images(tmp_path / "images", SIZES)
    out = tmp_path / "out"
    package = load_package(package_dir)
    cases = discover_inputs(images)
    mine = run_batch(package, select_shard(cases, 1, 2), out, device="cpu", progress=False, save_probabilities=True)
    # shard 0 by the CLI under torchrun's environment (no --shard given)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "PYTHONUNBUFFERED": "1"}
    other = subprocess.run([*MEDSEG, "predict", "--model", str(package_dir), "--input", str(images), "--output",
                            str(out), "--device", "cpu", "--save-probabilities"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert other.returncode == 0, other.stderr
    assert "3 predicted, 0 already done, 0 failed" in other.stdout and "(shard 0/2)" in other.stdout
    assert sorted(mine.done) == ["img_1", "img_3"]
    masks = sorted(q.stem for q in out.glob("*.png"))
    assert masks == sorted(SIZES)  # every image exactly once (names are unique per folder)
    assert [r["case"] for r in _summary(out)] == sorted(SIZES)  # the last shard's summary covers both

    predictor = ImagePredictor(package, device="cpu")
    classes_seen: set[int] = set()
    for cid, (h, w) in SIZES.items():
        probs = np.load(out / f"{cid}_probs.npy", allow_pickle=False)
        mask = np.asarray(Image.open(out / f"{cid}.png"))
        assert probs.dtype == np.uint8 and probs.shape == (len(LABELS), h, w)
        assert (probs.sum(0, dtype=np.int32) == 255).all()  # sums to 1 in steps of 1/255
        assert np.array_equal(probs.argmax(0), mask)
        classes_seen |= set(np.unique(mask).tolist())
        assert json.loads((out / f"{cid}.json").read_text())["outputs"] == [f"{cid}.png", f"{cid}_probs.npy"]
        # the quantised probabilities are within a step of the predictor's own (resized-back) softmax
        exact = predictor.probabilities(predictor.transform({"image": str(images / f"{cid}.png")})["image"])
        exact = torch.nn.functional.interpolate(exact, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
        assert np.abs(probs / 255.0 - exact).max() <= 4 / 255 + 1e-6
        assert 0.0 < probs.max(0).min() < 255  # real probabilities, not one-hot
    assert len(classes_seen) > 1  # the argmax check above is not about a constant mask


def test_model_trained_on_the_other_kind_is_a_one_line_error(package_dir: Path, tiny_phantom: Path,
                                                             tmp_path: Path) -> None:
    volume_pkg, _ = phantom_package(tmp_path / "vol", tiny_phantom, ["data.spacing=null"])
    images = _write_images(tmp_path / "images", {"img_0": (40, 56)})
    p = run_cli("predict", "--model", str(volume_pkg.path), "--input", str(images), "--output", str(tmp_path / "o"),
                "--device", "cpu", check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr
    assert str(volume_pkg.path) in err[0] and "trained on volumes" in err[0] and "img_0.png" in err[0]
    assert not (tmp_path / "o").exists()

    scans = discover_inputs(tiny_phantom.parent / "imagesTr")
    with pytest.raises(InputError, match="trained on 2D images .* cannot segment volumes"):
        run_batch(load_package(package_dir), scans, tmp_path / "o2", device="cpu", progress=False)
    assert not (tmp_path / "o2").exists()


def test_batch_mlflow_run_has_counts_and_no_image_names(package_dir: Path, tmp_path: Path, mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    names = {"img_0": "doe_john_19650203.png", "img_1": "roe_jane_19720811.jpg"}
    images = _write_images(tmp_path / "ward7_photos", {k: SIZES[k] for k in names}, names)
    (images / "smith_anna_19800101.png").write_bytes((images / names["img_0"]).read_bytes()[:200])  # corrupt
    out = tmp_path / "out"
    p = run_cli("predict", "--model", str(package_dir), "--input", str(images), "--output", str(out), "--device", "cpu",
                "--shard", "0/1", "--mlflow-experiment", "images2d-batch", "--tracking-uri", mlflow_server, check=False)
    assert p.returncode == 3, p.stderr
    run_id = p.stdout.split("mlflow run id:")[1].split()[0]
    run = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    m = run.data.metrics
    assert (m["n_cases"], m["n_ok"], m["n_failed"], m["n_skipped"]) == (3, 2, 1, 0)
    assert m["total_seconds"] > 0 and m["mean_seconds_per_case"] > 0 and m["peak_rss_mib"] > 0
    assert run.info.status == "FINISHED" and run.data.tags["medseg.batch_result"] == "some_failed"
    assert run.data.tags["medseg.data_kind"] == "image2d"
    assert run.data.params["shard"] == "0/1" and run.data.params["model"] == package_dir.name
    assert sorted(_records(out)) == ["doe_john_19650203", "roe_jane_19720811", "smith_anna_19800101"]

    secrets = ["doe", "john", "roe_", "jane", "smith", "anna", "1965", "1972", "1980", "ward7", str(tmp_path)]
    assert run.info.run_name is None or not any(s in run.info.run_name.lower() for s in secrets)
    for items in (run.data.params, run.data.tags, run.data.metrics):
        for k, v in items.items():
            assert not [s for s in secrets if s.lower() in f"{k}={v}".lower()], (k, v)
