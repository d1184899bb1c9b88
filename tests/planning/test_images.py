"""``medseg data plan`` on 2D image manifests: real PNGs, hand-computed class statistics and median-frequency
weights, the suggested overrides accepted by the image preset, bad labels naming the file, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.config import load_config
from medseg.errors import InputError
from medseg.io.images2d.common import Pair, build_manifest, write_index_png
from medseg.io.manifest import load_manifest
from medseg.planning.images import median_frequency_weights, plan_images
from tests.conftest import run_cli
from tests.images2d_data import rgb_for

LABELS = {"background": 0, "road": 1, "car": 2, "sign": 3}


def _labels() -> dict[str, np.ndarray]:
    """A: 40x60, B: 40x60, C: 50x70 (sizes vary); void (255) in A only; 'sign' never appears."""
    a = np.zeros((40, 60), np.int64)
    a[:20] = 1          # road 1200 px
    a[30:, :10] = 2     # car 100 px
    a[0, :] = 255       # 60 void px (over road)
    b = np.zeros((40, 60), np.int64)
    b[:10] = 1          # road 600 px, background 1800
    c = np.full((50, 70), 2, np.int64)  # car everywhere: 3500 px
    return {"A": a, "B": b, "C": c}


def _write(root: Path, labels: dict[str, np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    pairs = []
    for cid, lab in labels.items():
        Image.fromarray(rgb_for(np.where(lab == 255, 0, lab))).save(root / "images" / f"{cid}.png")
        write_index_png(root / "labels" / f"{cid}.png", lab)
        pairs.append(Pair(cid, root / "images" / f"{cid}.png", root / "labels" / f"{cid}.png", "train"))
    return build_manifest("toy", LABELS, pairs, root / "toy.json", 0.0, 0, "hand-made").path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("plan2d"), _labels())


def test_class_statistics_and_median_frequency_weights_by_hand(manifest: Path) -> None:
    doc = plan_images(load_manifest(manifest), max_patch_pixels=32 * 32)
    fp, plans = doc["fingerprint"], doc["plans"]
    labs = _labels()
    road = 1200 - 60 + 600
    car = 100 + 3500
    bg = (2400 - 1200 - 100) + 1800
    assert fp["n_images"] == 3 and fp["shape"]["distinct"] == 2 and plans["sizes_vary"]
    assert fp["void_fraction"] == pytest.approx(60 / sum(v.size for v in labs.values()))
    cls = fp["classes"]
    assert (cls["road"]["pixels"], cls["car"]["pixels"], cls["background"]["pixels"], cls["sign"]["pixels"]) == (road, car, bg, 0)
    assert (cls["road"]["images_present"], cls["car"]["images_present"], cls["sign"]["images_present"]) == (2, 2, 0)
    # freq_c = pixels of c / labelled pixels of the images containing c
    f = {"background": bg / (2340 + 2400), "road": road / (2340 + 2400), "car": car / (2340 + 3500)}
    median = float(np.median(list(f.values())))
    want = {n: round(median / v, 4) for n, v in f.items()} | {"sign": 0.0}
    assert plans["class_weights"] == want
    w = plans["class_weights"]  # background holds the median frequency; the rarer road weighs more, car less
    assert w["background"] == 1.0 and w["road"] > 1.0 > w["car"]
    # the crop fits the budget and the network's divisor; the image preset accepts every suggested override
    k = plans["patch_divisor"]
    assert np.prod(plans["patch_size"]) <= 32 * 32 and all(s % k == 0 for s in plans["patch_size"])
    cfg = load_config("voc_unet2d", [f"data.manifest={manifest}", *doc["overrides"]])
    assert list(cfg.data.patch_size) == plans["patch_size"] and cfg.data.ignore_index == 255
    assert cfg.loss.params["class_weights"] == list(want.values())


def test_weights_without_any_labelled_class_are_zero() -> None:
    assert median_frequency_weights({"a": {"pixels": 0, "pixels_of_images_present": 0}}) == {"a": 0.0}


def test_label_value_outside_the_map_names_the_file(tmp_path: Path) -> None:
    labels = _labels()
    labels["B"][5, 5] = 7
    with pytest.raises(InputError, match=r"B\.png.*label values \[7\]"):
        plan_images(load_manifest(_write(tmp_path, labels)))


def test_cli_plans_an_image_manifest(manifest: Path, tmp_path: Path) -> None:
    target = tmp_path / "plans.json"
    p = run_cli("data", "plan", str(manifest), "--out", str(target))
    assert p.returncode == 0, p.stderr
    assert "3 images" in p.stdout and "loss.params.class_weights=[" in p.stdout
    doc = json.loads(target.read_text())
    assert doc["fingerprint"]["kind"] == "image2d" and doc["plans"]["class_weights"]["sign"] == 0.0
