"""Training on 2D natural images: the real CLI on a synthetic VOC-style set with tracking to a real MLflow
server (pixel accuracy, per-class IoU/Dice, mIoU per epoch), PNG prediction, the image2d presets, and void pixels
(ignore_index) that change neither the loss nor the metrics, also when the label map lists void itself."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from medseg.config import CONFIG_DIR, InferenceConfig, load_config
from medseg.engine.trainer import Trainer
from medseg.engine.validation import CaseInference, PixelScorer, validate
from medseg.inference.images2d import ImagePredictor
from medseg.inference.model_package import load_package
from medseg.io.images2d import import_voc
from medseg.io.images2d.common import Pair, build_manifest, write_index_png
from medseg.io.images2d.voc import VOC_CLASSES
from medseg.io.manifest import load_manifest
from medseg.io.metric_names import mlflow_key
from medseg.losses import LOSSES, build_loss
from medseg.runtime.device import Precision
from tests.conftest import run_cli
from tests.images2d_data import H, W, rgb_for, write_voc

IMAGE_PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if load_config(p).data.kind == "image2d")
# Tiny network, the preset's own architecture family / loss / augmentations otherwise.
TINY = ["data.patch_size=[32, 32]", "model.params.channels=[4, 8, 16]", "model.params.strides=[2, 2]",
        "data.batch_size=4", "data.num_workers=0", "inference.roi_size=[32, 32]", "train.device=cpu"]


@pytest.fixture(scope="module")
def voc_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("voc2d")
    write_voc(root / "VOC", n=6, val=(4, 5))
    return import_voc(root / "VOC", root / "voc.json").path


def test_image_presets_exist() -> None:
    assert "voc_unet2d" in IMAGE_PRESETS


@pytest.mark.parametrize("preset", IMAGE_PRESETS)
def test_image_preset_trains_and_packages(preset: str, voc_manifest: Path, tmp_path: Path) -> None:
    # the model works on images resized to half size; its masks must still come out at the input size
    cfg = load_config(preset, [*TINY, f"data.manifest={voc_manifest}", "train.epochs=1", "tracking.backend=none",
                               f"train.output_dir={tmp_path}", "train.run_name=smoke", "data.resize=[20, 28]",
                               "inference.roi_size=[16, 16]"])
    assert cfg.model.spatial_dims == 2 and cfg.data.kind == "image2d"
    manifest = load_manifest(voc_manifest)
    result = Trainer(cfg, manifest).fit()
    header = (result.run_dir / "history.csv").read_text().splitlines()[0].split(",")
    assert {"val_pixel_accuracy", "val_miou", "val_iou_background", "val_dice_person"} <= set(header)
    assert (result.run_dir / "model").is_dir() and set(result.best_per_class) == set(VOC_CLASSES)
    image = manifest.image_paths(manifest.split("val")[0])[0]
    mask = ImagePredictor(load_package(result.run_dir), device="cpu").predict(image)
    assert mask.shape == np.asarray(Image.open(image)).shape[:2] and mask.max() < len(VOC_CLASSES)


def test_cli_train_logs_image_metrics_to_mlflow(voc_manifest: Path, tmp_path: Path, mlflow_server: str) -> None:
    epochs = 2
    p = run_cli("train", "voc_unet2d", *TINY, f"data.manifest={voc_manifest}", f"train.epochs={epochs}", "train.val_every=1",
                f"train.output_dir={tmp_path}", "train.run_name=voc", "tracking.experiment=images2d-test",
                "tracking.registered_model_name=null", "--tracking-uri", mlflow_server, cwd=tmp_path)
    run_id = p.stdout.split("mlflow run id:")[1].split()[0]
    client = MlflowClient(tracking_uri=mlflow_server)
    with (tmp_path / "voc" / "history.csv").open() as fh:
        history = list(csv.DictReader(fh))
    names = ["val_pixel_accuracy", "val_miou", "val_dice_mean", *(f"val_{m}_{c}" for m in ("iou", "dice") for c in VOC_CLASSES)]
    for name in names:
        hist = sorted(client.get_metric_history(run_id, mlflow_key(name)), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(epochs)), name
        for m, row in zip(hist, history, strict=True):
            csv_value = float(row[name])
            assert (math.isnan(m.value) and math.isnan(csv_value)) or m.value == pytest.approx(csv_value), name
    # every class present in the validation images has a finite IoU in [0, 1]; mIoU is their mean
    last = {name: sorted(client.get_metric_history(run_id, mlflow_key(name)), key=lambda m: m.step)[-1].value for name in names}
    present = ["background", "bicycle", "person"]  # val images 4 and 5: classes 1 + 4 % 3 = 2 and person (15)
    assert all(0.0 <= last[f"val_iou_{c}"] <= 1.0 for c in present)
    assert 0.0 <= last["val_pixel_accuracy"] <= 1.0
    ious = [last[f"val_iou_{c}"] for c in VOC_CLASSES if not math.isnan(last[f"val_iou_{c}"])]
    assert last["val_miou"] == pytest.approx(float(np.mean(ious)))

    # predict PNG masks with the packaged best model: same sizes, and the same pooled pixel accuracy on the
    # validation images as validation reported for the best epoch (same preprocessing and window)
    images = voc_manifest.parent / "VOC" / "JPEGImages"
    p = run_cli("predict", "--model", str(tmp_path / "voc"), "--input", str(images), "--output", str(tmp_path / "pred"),
                "--device", "cpu", cwd=tmp_path)
    assert "6 predicted, 0 already done, 0 failed" in p.stdout
    m = load_manifest(voc_manifest)
    best = load_package(tmp_path / "voc").metadata["val_metrics"]
    right = total = 0
    for case in m.cases:
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{case.id}.png"))
        truth = np.asarray(Image.open(m.label_path(case)))
        assert mask.shape == truth.shape and mask.max() < len(VOC_CLASSES)
        if case.split == "val":
            keep = truth != 255
            right, total = right + int((mask[keep] == truth[keep]).sum()), total + int(keep.sum())
    assert right / total == pytest.approx(best["val_pixel_accuracy"])


# ---- void pixels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_void_pixels_change_no_loss(name: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 10)
    target = torch.randint(0, 4, (2, 1, 8, 10))
    target[:, :, :, 7:] = 255  # three void columns
    loss = build_loss(name, 4, ignore_index=255)
    base = float(loss(logits, target))
    changed = logits.clone()
    changed[:, :, :, 7:] = torch.randn(2, 4, 8, 3) * 10  # anything may be predicted on void pixels
    assert float(loss(changed, target)) == pytest.approx(base, abs=1e-6)
    # ... and the loss is the plain loss of the non-void pixels (one pooled sample)
    plain = build_loss(name, 4)
    kept = plain(logits[:, :, :, :7].permute(1, 0, 2, 3).reshape(1, 4, -1), target[:, :, :, :7].reshape(1, 1, -1))
    assert base == pytest.approx(float(kept), abs=1e-6)
    assert float(loss(logits, torch.full_like(target, 255))) == 0.0


def test_void_pixels_change_no_metric() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)  # a real (untrained) network: its prediction follows the pixel colour
    label = torch.zeros(1, 12, 16, dtype=torch.int64)
    label[:, 2:8, 3:9] = 1
    label[:, 8:, 10:] = 2
    label[:, :, 14:] = 255  # void columns
    image = torch.rand(3, 12, 16)
    other = image.clone()
    other[:, :, 14:] = torch.rand(3, 12, 2)  # different colours (so predictions) only where the label is void

    def run(img: torch.Tensor, lab: torch.Tensor, ignore: int | None) -> dict[str, float]:
        cases = [{"image": img, "label": lab, "id": "x", "index": 0}]
        run = CaseInference(model, model, (12, 16), InferenceConfig(), torch.device("cpu"), Precision(None, False), 3)
        scorer = PixelScorer({"background": 0, "a": 1, "b": 2}, 3, build_loss("dice_ce", 3, ignore_index=ignore), ignore)
        return validate(run, cases, scorer).summary

    base = run(image, label, 255)
    assert run(other, label, 255) == base
    with_void_as_background = run(other, torch.where(label == 255, 0, label), None)
    # the test can see a difference where one exists: void counted as background changes the scores
    assert with_void_as_background["val_pixel_accuracy"] != base["val_pixel_accuracy"]
    assert with_void_as_background["val_iou_background"] != base["val_iou_background"]
    with torch.no_grad():
        pred = model(image[None]).argmax(1)[0]
    keep = label[0] != 255
    assert base["val_pixel_accuracy"] == pytest.approx(float((pred[keep] == label[0][keep]).float().mean()))


# ---- void as a value of the label map (SegNet CamVid: classes 0..10, void 11) ---------------------------
VOID_IN_MAP = {"sky": 0, "road": 1, "void": 2}


def _void_in_map_manifest(root: Path) -> Path:
    """Four sky-over-road images whose labels mark a left strip with the label map's own void value 2."""
    (root / "images").mkdir(parents=True)
    pairs = []
    for i in range(4):
        lab = np.zeros((H, W), np.int64)
        lab[H // 2:] = 1
        lab[:, :3 + 2 * i] = 2
        Image.fromarray(rgb_for(lab, i)).save(root / "images" / f"c{i}.png")
        write_index_png(root / "labels" / f"c{i}.png", lab)
        pairs.append(Pair(f"c{i}", root / "images" / f"c{i}.png", root / "labels" / f"c{i}.png", "val" if i == 3 else "train"))
    return build_manifest("void-in-map", VOID_IN_MAP, pairs, root / "m.json", 0.0, 0, "void listed in the label map").path


def test_void_in_the_label_map_is_neither_an_output_nor_scored(tmp_path: Path) -> None:
    path = _void_in_map_manifest(tmp_path / "data")
    cfg = load_config("voc_unet2d", [*TINY, f"data.manifest={path}", "data.ignore_index=2", "train.epochs=1",
                                     "tracking.backend=none", f"train.output_dir={tmp_path}", "train.run_name=void"])
    manifest = load_manifest(path)
    trainer = Trainer(cfg, manifest)
    result = trainer.fit()
    with torch.no_grad():  # sky and road: no output channel for void
        assert trainer.model.cpu().eval()(torch.zeros(1, 3, 32, 32)).shape[1] == 2
    with (result.run_dir / "history.csv").open() as fh:
        last = list(csv.DictReader(fh))[-1]
    assert {"val_iou_sky", "val_iou_road", "val_dice_sky", "val_dice_road"} <= set(last)
    assert not [k for k in last if "void" in k]  # no val_iou_void / val_dice_void
    ious = [float(last[f"val_iou_{c}"]) for c in ("sky", "road")]
    assert float(last["val_miou"]) == pytest.approx(float(np.nanmean(ious)))  # the mean over the real classes only
    assert set(result.best_per_class) == {"sky", "road"}
    package = load_package(result.run_dir)  # prediction never writes void
    assert package.labels == {"sky": 0, "road": 1} and package.num_classes == 2
    image = manifest.image_paths(manifest.split("val")[0])[0]
    assert ImagePredictor(package, device="cpu").predict(image).max() <= 1
