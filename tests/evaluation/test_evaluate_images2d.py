"""``medseg evaluate`` on 2D natural-image predictions: real index PNGs written with Pillow, hand-computed
confusion matrices, void pixels, bad inputs through the real CLI, a real MLflow server, and agreement with
training-time validation of a (tiny, really trained) image model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from medseg.errors import InputError
from medseg.evaluation.images2d import evaluate_images
from medseg.io.images2d import import_voc
from medseg.io.images2d.common import Pair, build_manifest, write_index_png
from medseg.io.images2d.voc import VOC_CLASSES
from medseg.io.manifest import load_manifest
from medseg.io.metric_names import flat_metrics
from medseg.metrics.confusion import cm_scores
from tests.conftest import run_cli
from tests.images2d_data import rgb_for, write_voc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = {"background": 0, "a": 1, "b": 2}
# Two 2x4 images, truth and prediction (255 = void). Confusion matrices (rows truth, columns prediction):
# A: [[2, 1, 0], [1, 2, 0], [0, 0, 1]] (void pixel left out), B: [[4, 0, 0], [0, 0, 0], [2, 0, 2]];
# pooled: [[6, 1, 0], [1, 2, 0], [2, 0, 3]].
TRUTH = {"A": np.array([[0, 0, 1, 1], [0, 2, 1, 255]]), "B": np.array([[2, 2, 2, 2], [0, 0, 0, 0]])}
PRED = {"A": np.array([[0, 1, 1, 1], [0, 2, 0, 2]]), "B": np.array([[2, 2, 0, 0], [0, 0, 0, 0]])}


def _dataset(root: Path, truth: dict[str, np.ndarray], labels: dict[str, int]) -> Path:
    """RGB images + index-PNG labels + a manifest (every case in val); returns the manifest path."""
    (root / "images").mkdir(parents=True)
    pairs = []
    for cid, lab in truth.items():
        Image.fromarray(rgb_for(lab)).save(root / "images" / f"{cid}.png")
        write_index_png(root / "labels" / f"{cid}.png", lab)
        pairs.append(Pair(cid, root / "images" / f"{cid}.png", root / "labels" / f"{cid}.png", "val"))
    return build_manifest("toy", labels, pairs, root / "toy.json", 0.0, 0, "hand-made").path


def _write_preds(folder: Path, preds: dict[str, np.ndarray]) -> Path:
    for cid, p in preds.items():
        write_index_png(folder / f"{cid}.png", p)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dataset(tmp_path_factory.mktemp("toy2d"), TRUTH, LABELS)


def test_hand_computed_pooled_and_per_image_metrics(toy: Path, tmp_path: Path) -> None:
    doc = evaluate_images(_write_preds(tmp_path / "pred", PRED), toy, tmp_path / "eval")
    assert doc["confusion_matrix"] == [[6, 1, 0], [1, 2, 0], [2, 0, 3]] and doc["n_images"] == 2
    p = doc["pooled"]
    assert p["pixel_accuracy"] == pytest.approx(11 / 15)
    assert p["iou"] == pytest.approx({"background": 6 / 10, "a": 2 / 4, "b": 3 / 5})
    assert p["dice"] == pytest.approx({"background": 12 / 16, "a": 4 / 6, "b": 6 / 8})
    assert p["miou"] == pytest.approx(17 / 30) and p["dice_mean"] == pytest.approx((12 / 16 + 4 / 6 + 6 / 8) / 3)
    # the same numbers as training-time validation computes from the same matrix
    val = cm_scores(np.array(doc["confusion_matrix"]), LABELS, "val_")
    assert val["val_pixel_accuracy"] == p["pixel_accuracy"] and val["val_miou"] == p["miou"]
    assert val["val_dice_mean"] == p["dice_mean"]
    assert all(val[f"val_{m}_{c}"] == p[m][c] for m in ("iou", "dice") for c in LABELS)

    with (tmp_path / "eval" / "metrics_per_image.csv").open() as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    a, b = rows["A"], rows["B"]
    assert float(a["pixel_accuracy"]) == pytest.approx(5 / 7) and float(b["pixel_accuracy"]) == pytest.approx(6 / 8)
    assert [float(a[f"iou_{c}"]) for c in LABELS] == pytest.approx([2 / 4, 2 / 4, 1.0])
    assert float(b["iou_background"]) == pytest.approx(4 / 6) and math.isnan(float(b["iou_a"]))  # a: in neither
    assert float(b["dice_b"]) == pytest.approx(4 / 6) and float(b["miou"]) == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert float(a["miou"]) == pytest.approx(2 / 3)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    per_image = summary["per_image"]["pixel_accuracy"]
    assert per_image["mean"] == pytest.approx((5 / 7 + 6 / 8) / 2) and per_image["n"] == 2
    assert per_image["ci_low"] <= per_image["mean"] <= per_image["ci_high"]
    assert summary["per_image"]["miou"]["median"] == pytest.approx((2 / 3 + 7 / 12) / 2)
    assert summary["pooled"]["miou"] == pytest.approx(17 / 30)  # pooled != mean of per-image mIoU (0.625)
    assert (tmp_path / "eval" / "plots" / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC


def test_void_pixels_change_nothing(toy: Path, tmp_path: Path) -> None:
    base = evaluate_images(_write_preds(tmp_path / "p1", PRED), toy, tmp_path / "e1")
    other = {k: v.copy() for k, v in PRED.items()}
    other["A"][1, 3] = 255  # anything may be predicted on the void pixel, even a value outside the classes
    changed = evaluate_images(_write_preds(tmp_path / "p2", other), toy, tmp_path / "e2")
    for key in ("pooled", "per_image", "confusion_matrix"):
        assert changed[key] == base[key]
    assert (tmp_path / "e1" / "metrics_per_image.csv").read_text() == (tmp_path / "e2" / "metrics_per_image.csv").read_text()
    # ... and the test can see a difference where one exists: the same change on a scored pixel
    other["A"][1, 2] = 1  # truth 1, was predicted 0
    assert evaluate_images(_write_preds(tmp_path / "p3", other), toy, tmp_path / "e3")["pooled"] != base["pooled"]
    # counting void as a class instead (ignore_index None) is refused: 255 is not in the label map
    with pytest.raises(InputError, match="label values \\[255\\]"):
        evaluate_images(tmp_path / "p1", toy, tmp_path / "e4", ignore_index=None)


def test_void_listed_in_the_label_map_is_no_class(toy: Path, tmp_path: Path) -> None:
    # the SegNet CamVid layout: void is a value of the label map (after the classes) instead of 255
    labels = {**LABELS, "void": 3}
    manifest = _dataset(tmp_path / "data", {k: np.where(v == 255, 3, v) for k, v in TRUTH.items()}, labels)
    doc = evaluate_images(_write_preds(tmp_path / "pred", PRED), manifest, tmp_path / "eval", ignore_index=3)
    base = evaluate_images(tmp_path / "pred", toy, tmp_path / "eval255")  # void 255 outside the label map
    assert doc["classes"] == LABELS and set(doc["pooled"]["iou"]) == set(LABELS)  # no IoU of void
    for key in ("pooled", "per_image", "confusion_matrix"):
        assert doc[key] == base[key]
    assert doc["pooled"]["miou"] == pytest.approx(17 / 30)  # the mean over the three real classes
    assert "void" not in (tmp_path / "eval" / "metrics_per_image.csv").read_text()
    # void listed below a class value would leave a hole among the outputs: refused, naming the manifest
    holed = _dataset(tmp_path / "holed", TRUTH, {"background": 0, "void": 1, "a": 2})
    with pytest.raises(InputError, match=r"void must be above every class value") as e:
        evaluate_images(tmp_path / "pred", holed, tmp_path / "e", ignore_index=1)
    assert e.value.path == str(holed)


def test_prediction_value_outside_the_label_map_names_the_file(toy: Path, tmp_path: Path) -> None:
    bad = {k: v.copy() for k, v in PRED.items()}
    bad["B"][0, 0] = 7
    _write_preds(tmp_path / "pred", bad)
    with pytest.raises(InputError, match="prediction values \\[7\\]") as e:
        evaluate_images(tmp_path / "pred", toy, tmp_path / "eval")
    assert e.value.path == str(tmp_path / "pred" / "B.png")
    assert not (tmp_path / "eval" / "summary.json").exists()


def test_cli_size_mismatch_and_missing_predictions(toy: Path, tmp_path: Path) -> None:
    preds = _write_preds(tmp_path / "pred", PRED)
    write_index_png(preds / "B.png", np.zeros((3, 4), np.int64))  # one row too many
    p = run_cli("evaluate", "--pred", str(preds), "--manifest", str(toy), "--out", str(tmp_path / "eval"), check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr
    assert "B.png" in err[0] and "prediction size 4x3 != ground truth size 4x2" in err[0]
    assert not (tmp_path / "eval").exists()  # sizes are checked before anything is computed or written

    # no prediction for any case: an error naming the folder (as for NIfTI predictions)
    (tmp_path / "empty").mkdir()
    p = run_cli("evaluate", "--pred", str(tmp_path / "empty"), "--manifest", str(toy), check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "empty") in p.stderr and "no predictions named <case id>.png" in p.stderr

    # some cases without a prediction: evaluated without them, listed and noted (as for NIfTI predictions)
    (preds / "B.png").unlink()
    p = run_cli("evaluate", "--pred", str(preds), "--manifest", str(toy), "--out", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["missing_predictions"] == ["B"] and summary["n_images"] == 1
    assert summary["pooled"]["pixel_accuracy"] == pytest.approx(5 / 7)
    assert "1 labelled case(s) have no prediction" in p.stdout


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("voc_eval")
    labels = write_voc(root / "VOC", n=6, val=(4, 5))
    return import_voc(root / "VOC", root / "voc.json").path, labels


def _damaged_voc_preds(folder: Path, labels: dict[str, np.ndarray]) -> Path:
    """Each object box predicted two pixels too far right (void predicted as background)."""
    for cid, lab in labels.items():
        pred = np.where(lab == 255, 0, lab)
        write_index_png(folder / f"{cid}.png", np.roll(pred, 2, axis=1))
    return folder


def test_cli_end_to_end_and_mlflow(voc: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, mlflow_server: str) -> None:
    manifest, labels = voc
    preds = _damaged_voc_preds(tmp_path / "pred", labels)
    p = run_cli("evaluate", "--pred", str(preds), "--manifest", str(manifest), "--split", "val",
                "--mlflow-experiment", "eval-images2d-test", "--tracking-uri", mlflow_server)
    out = preds / "evaluation"
    assert "mIoU" in p.stdout and f"outputs: {out}" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    val_ids = [c.id for c in load_manifest(manifest).split("val")]
    with (out / "metrics_per_image.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == val_ids and summary["n_images"] == 2 and summary["split"] == "val"
    assert {f"iou_{c}" for c in VOC_CLASSES} <= set(rows[0])
    # pixel accuracy recomputed here from the files themselves
    right = total = 0
    for cid in val_ids:
        truth, pred = labels[cid], np.asarray(Image.open(preds / f"{cid}.png"))
        keep = truth != 255
        right, total = right + int((pred[keep] == truth[keep]).sum()), total + int(keep.sum())
    assert summary["pooled"]["pixel_accuracy"] == pytest.approx(right / total) and right < total
    assert (out / "plots" / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC

    run_id = p.stdout.split("mlflow run id:")[1].split()[0]
    run = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    logged = flat_metrics(run.data.metrics)
    assert "eval/miou" in run.data.metrics and "eval_iou/person" in run.data.metrics  # sectioned in MLflow
    assert logged["eval_pixel_accuracy"] == pytest.approx(summary["pooled"]["pixel_accuracy"])
    assert logged["eval_miou"] == pytest.approx(summary["pooled"]["miou"])
    for c in ("background", "bicycle", "person"):  # the classes of the two val images
        assert logged[f"eval_iou_{c}"] == pytest.approx(summary["pooled"]["iou"][c])
        assert logged[f"eval_dice_{c}"] == pytest.approx(summary["pooled"]["dice"][c])
    assert "eval_iou_cat" not in logged  # NaN (in neither truth nor prediction): not logged
    assert logged["eval_per_image_miou_mean"] == pytest.approx(summary["per_image"]["miou"]["mean"])
    assert run.data.tags["eval.ignore_index"] == "255" and "eval.tolerance_mm" not in run.data.tags
    client = MlflowClient(tracking_uri=mlflow_server)
    arts = {a.path for a in client.list_artifacts(run_id, "evaluation/val")}
    assert {"evaluation/val/summary.json", "evaluation/val/metrics_per_image.csv", "evaluation/val/plots"} <= arts
    logged_summary = json.loads(Path(client.download_artifacts(run_id, "evaluation/val/summary.json", str(tmp_path))).read_text())
    assert "manifest" not in logged_summary and "predictions" not in logged_summary  # no local paths


def test_cli_refuses_volume_only_options_for_images(voc: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    manifest, labels = voc
    preds = _damaged_voc_preds(tmp_path / "pred", labels)
    for extra in (["--lesions"], ["--compare", str(preds)]):
        p = run_cli("evaluate", "--pred", str(preds), "--manifest", str(manifest), *extra, check=False)
        assert p.returncode == 1 and "not supported for 2D image manifests" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_pooled_metrics_equal_training_validation(voc: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """Train a tiny image model for one epoch, predict the val split into PNGs, evaluate: the pooled numbers
    are the best epoch's validation metrics stored in the model package."""
    from medseg.config import load_config
    from medseg.engine.trainer import Trainer
    from medseg.inference.images2d import ImagePredictor
    from medseg.inference.model_package import load_package

    manifest_path, _ = voc
    cfg = load_config("voc_unet2d", ["data.patch_size=[32, 32]", "model.params.channels=[4, 8, 16]",
                                     "model.params.strides=[2, 2]", "data.batch_size=4", "data.num_workers=0",
                                     "inference.roi_size=[32, 32]", "train.device=cpu", f"data.manifest={manifest_path}",
                                     "train.epochs=1", "tracking.backend=none", f"train.output_dir={tmp_path}",
                                     "train.run_name=tiny"])
    manifest = load_manifest(manifest_path)
    run_dir = Trainer(cfg, manifest).fit().run_dir
    package = load_package(run_dir)
    predictor = ImagePredictor(package, device="cpu")
    for case in manifest.split("val"):
        write_index_png(tmp_path / "pred" / f"{case.id}.png", predictor.predict(manifest.image_paths(case)[0]))
    doc = evaluate_images(tmp_path / "pred", manifest_path, tmp_path / "eval", split="val", ignore_index=cfg.data.ignore_index)
    val = package.metadata["val_metrics"]
    p = doc["pooled"]
    assert p["pixel_accuracy"] == pytest.approx(val["val_pixel_accuracy"])
    assert p["miou"] == pytest.approx(val["val_miou"]) and p["dice_mean"] == pytest.approx(val["val_dice_mean"])
    for m in ("iou", "dice"):
        for c in VOC_CLASSES:
            expected = val[f"val_{m}_{c}"]
            assert (math.isnan(expected) and math.isnan(p[m][c])) or p[m][c] == pytest.approx(expected), (m, c)
