"""``medseg evaluate`` end to end: the real CLI (subprocesses) on prediction folders made from the tiny
phantom's own labels with known damage, a real MLflow server on 127.0.0.1, and the report's modules."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import ndimage

from medseg.evaluation.compare import compare_rows
from medseg.evaluation.plots import boxplot_png
from medseg.evaluation.report import evaluate
from medseg.evaluation.tracking_io import evaluation_metrics
from medseg.io.manifest import load_manifest
from medseg.metrics import volumetric as M
from tests.conftest import run_cli

ORGANS = ("liver", "spleen", "kidney")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHIFT = 2  # voxels the spleen is moved along the first array axis


def _save_like(data: np.ndarray, ref: nib.Nifti1Image, path: Path, affine: np.ndarray | None = None) -> None:
    img = nib.Nifti1Image(data.astype(np.uint8), ref.affine if affine is None else affine, ref.header.copy())
    if affine is not None:
        img.set_sform(affine, 1)
        img.set_qform(affine, 1)
    nib.save(img, str(path))


def _damage(labels: np.ndarray) -> np.ndarray:
    """Liver eroded by one voxel, spleen shifted by SHIFT voxels, kidneys dropped."""
    out = np.zeros_like(labels)
    out[ndimage.binary_erosion(labels == 1)] = 1
    out[np.roll(labels == 2, SHIFT, axis=0) & (out == 0)] = 2
    return out


@pytest.fixture(scope="module")
def preds(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prediction folders: ``perfect`` (the labels), ``damaged`` (see _damage), ``bad_affine``, ``bad_shape``."""
    root = tmp_path_factory.mktemp("preds")
    folders = {k: root / k for k in ("perfect", "damaged", "bad_affine", "bad_shape")}
    for f in folders.values():
        f.mkdir()
    m = load_manifest(tiny_phantom)
    for i, c in enumerate(m.cases):
        src = m.label_path(c)
        img = nib.load(str(src))
        lab = np.asarray(img.dataobj)
        for k in ("perfect", "bad_affine", "bad_shape"):
            shutil.copy(src, folders[k] / f"{c.id}.nii.gz")
        _save_like(_damage(lab), img, folders["damaged"] / f"{c.id}.nii.gz")
        if i == 3:  # one case per bad folder: moved by 5 mm / one slice short
            moved = img.affine.copy()
            moved[:3, 3] += 5.0
            _save_like(lab, img, folders["bad_affine"] / f"{c.id}.nii.gz", affine=moved)
            _save_like(lab[..., :-1], img, folders["bad_shape"] / f"{c.id}.nii.gz")
    return folders


def _rows(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    return {(r["case"], r["organ"]): {k: float(v) for k, v in r.items() if k not in ("case", "organ")}
            for r in csv.DictReader(path.open())}


def test_cli_per_case_metrics_summary_plots_and_lesions(preds: dict[str, Path], tiny_phantom: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    p = run_cli("evaluate", "--pred", str(preds["damaged"]), "--manifest", str(tiny_phantom), "--out", str(out),
                "--tolerance-mm", "2", "--workers", "2", "--lesions")
    m = load_manifest(tiny_phantom)
    rows = _rows(out / "metrics_per_case.csv")
    assert set(rows) == {(c.id, o) for c in m.cases for o in ORGANS}

    # every number equals the metric functions on the whole (uncropped) volumes with the header's spacing
    for c in m.cases:
        img = nib.load(str(m.label_path(c)))
        truth = np.asarray(img.dataobj)
        pred = np.asarray(nib.load(str(preds["damaged"] / f"{c.id}.nii.gz")).dataobj)
        spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
        for organ, v in m.foreground.items():
            got, p_mask, t_mask = rows[(c.id, organ)], pred == v, truth == v
            assert got["dice"] == pytest.approx(M.dice(p_mask, t_mask))
            assert got["volume_pred_ml"] == pytest.approx(M.volume_ml(p_mask, spacing))
            if organ != "kidney":
                assert got["hd95"] == pytest.approx(M.hd95(p_mask, t_mask, spacing))
                assert got["nsd"] == pytest.approx(M.nsd(p_mask, t_mask, spacing, 2.0))
    # and the damage shows as expected
    for c in m.cases:
        liver, spleen, kidney = (rows[(c.id, o)] for o in ORGANS)
        assert 0.3 < liver["dice"] < 1.0 and liver["precision"] == 1.0 and liver["volume_pred_ml"] < liver["volume_truth_ml"]
        assert liver["lesion_f1"] == 1.0 and liver["lesion_count_error"] == 0.0
        assert 0.0 < spleen["hd95"] <= SHIFT * 3.0 + 1e-6 and spleen["nsd"] < 1.0  # first-axis spacing is 3 mm
        assert kidney["dice"] == 0.0 and math.isnan(kidney["hd95"]) and math.isnan(kidney["assd"])
        assert kidney["lesion_recall"] == 0.0 and kidney["lesion_count_error"] == -kidney["lesion_n_truth"] < 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == len(m.cases) and summary["tolerance_mm"] == 2.0
    for organ in ORGANS:
        dice = summary["organs"][organ]["dice"]
        values = [rows[(c.id, organ)]["dice"] for c in m.cases]
        assert dice["mean"] == pytest.approx(np.mean(values)) and dice["median"] == pytest.approx(np.median(values))
        assert dice["ci_low"] <= dice["mean"] <= dice["ci_high"] and dice["n"] + dice["n_nan"] == len(m.cases)
    kid_hd = summary["organs"]["kidney"]["hd95"]
    assert kid_hd["n_nan"] == len(m.cases) and kid_hd["n"] == 0 and kid_hd["mean"] is None  # counted, not averaged
    assert summary["presence"]["kidney"] == {"cases": len(m.cases), "truth": len(m.cases), "pred": 0}
    assert "lesion_f1" in summary["organs"]["liver"]

    for metric in summary["metrics"]:
        png = out / "plots" / f"boxplot_{metric}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, metric
    import matplotlib.image

    assert matplotlib.image.imread(out / "plots" / "boxplot_dice.png").shape[2] in (3, 4)
    assert not [f for f in out.rglob(".*")]  # no temp files left behind
    assert "liver" in p.stdout and "kidney" in p.stdout and "NaN" in p.stdout


def test_cli_compare_gives_paired_differences_and_p_values(preds: dict[str, Path], tiny_phantom: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    p = run_cli("evaluate", "--pred", str(preds["damaged"]), "--compare", str(preds["perfect"]),
                "--manifest", str(tiny_phantom), "--out", str(out))
    n = len(load_manifest(tiny_phantom).cases)
    table = {(r["organ"], r["metric"]): r for r in csv.DictReader((out / "compare.csv").open())}
    liver_dice, spleen_hd = table[("liver", "dice")], table[("spleen", "hd95")]
    # damaged - perfect: lower Dice, larger HD95, on every case -> the smallest two-sided Wilcoxon p for n cases
    assert float(liver_dice["mean_diff"]) < 0 and float(liver_dice["ci_high"]) < 0
    assert float(spleen_hd["mean_diff"]) > 0 and float(spleen_hd["ci_low"]) > 0
    assert float(liver_dice["p_value"]) == pytest.approx(2 / 2**n) and float(spleen_hd["p_value"]) == pytest.approx(2 / 2**n)
    assert int(liver_dice["n"]) == n and int(liver_dice["n_nan"]) == 0
    kid_hd = table[("kidney", "hd95")]  # undefined on every damaged case: no pairs, nothing made up
    assert int(kid_hd["n"]) == 0 and int(kid_hd["n_nan"]) == n and kid_hd["p_value"] == "nan"
    doc = json.loads((out / "compare.json").read_text())
    assert doc["n_paired_cases"] == n and doc["only_in_pred"] == [] and doc["difference"] == "pred - compare"
    assert (out / "compare_to" / "metrics_per_case.csv").is_file()
    assert "paired comparison" in p.stdout and "spleen" in p.stdout


@pytest.mark.parametrize("folder, words", [("bad_affine", "affine"), ("bad_shape", "shape")])
def test_cli_geometry_mismatch_is_one_line_naming_the_case(preds: dict[str, Path], tiny_phantom: Path, tmp_path: Path,
                                                         folder: str, words: str) -> None:
    case_id = load_manifest(tiny_phantom).cases[3].id
    out = tmp_path / "eval"
    p = run_cli("evaluate", "--pred", str(preds[folder]), "--manifest", str(tiny_phantom), "--out", str(out),
                "--workers", "2", check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("medseg: error:") and case_id in lines[0] and words in lines[0] and "not resampled" in lines[0]
    assert not out.exists()  # checked before anything is computed or written


def test_cli_unreadable_prediction_in_a_worker_is_one_line(preds: dict[str, Path], tiny_phantom: Path, tmp_path: Path) -> None:
    folder = tmp_path / "truncated"
    shutil.copytree(preds["perfect"], folder)
    victim = folder / f"{load_manifest(tiny_phantom).cases[2].id}.nii.gz"
    raw = gzip.decompress(victim.read_bytes())
    victim.write_bytes(gzip.compress(raw[: 352 + 100]))  # header intact, voxels cut short
    p = run_cli("evaluate", "--pred", str(folder), "--manifest", str(tiny_phantom), "--workers", "2", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and victim.name in p.stderr and "voxel data" in p.stderr


def test_label_absent_from_the_whole_dataset(phantom_copy: Path, tmp_path: Path) -> None:
    doc = json.loads(phantom_copy.read_text())
    doc["labels"]["tumour"] = 9  # declared, never drawn in any ground truth
    phantom_copy.write_text(json.dumps(doc))
    pred_dir = phantom_copy.parent / "labelsTr"
    summary = evaluate(pred_dir, phantom_copy, tmp_path / "eval", metrics=("dice", "hd95", "nsd", "volume_pred_ml",
                                                                             "volume_truth_ml"), plots=False)
    n = summary["n_cases"]
    tumour = summary["organs"]["tumour"]
    assert tumour["dice"]["mean"] == 1.0 and tumour["nsd"]["mean"] == 1.0  # empty vs empty, documented in metrics.py
    assert tumour["hd95"]["n_nan"] == n and math.isnan(tumour["hd95"]["mean"])
    assert summary["presence"]["tumour"] == {"cases": n, "truth": 0, "pred": 0}
    assert any("tumour is absent from every ground truth" in note for note in summary["notes"])
    assert summary["organs"]["liver"]["dice"]["mean"] == 1.0 and summary["organs"]["liver"]["hd95"]["n_nan"] == 0


def test_missing_predictions_are_reported(preds: dict[str, Path], tiny_phantom: Path, tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    shutil.copytree(preds["perfect"], folder)
    gone = load_manifest(tiny_phantom).cases[0].id
    (folder / f"{gone}.nii.gz").unlink()
    summary = evaluate(folder, tiny_phantom, tmp_path / "eval", metrics=("dice",), plots=False)
    assert summary["missing_predictions"] == [gone] and summary["n_cases"] == 5
    assert any(gone in note for note in summary["notes"])


def test_compare_rows_pairs_by_case_id() -> None:
    a = [{"case": c, "organ": "liver", "dice": d} for c, d in (("a", 0.9), ("b", 0.8), ("c", 0.7), ("x", 0.1))]
    b = [{"case": c, "organ": "liver", "dice": d} for c, d in (("c", 0.5), ("b", 0.6), ("a", 0.7), ("y", 1.0))]
    cmp = compare_rows(a, b, ["dice"])
    (row,) = cmp.rows
    assert row["n"] == 3 and row["mean_diff"] == pytest.approx(0.2) and row["mean_pred"] == pytest.approx(0.8)
    assert cmp.n_paired_cases == 3 and cmp.only_a == ["x"] and cmp.only_b == ["y"]


def test_boxplot_with_an_all_nan_organ(tmp_path: Path) -> None:
    rows = [{"case": str(i), "organ": o, "hd95": (float("nan") if o == "kidney" else float(i))}
            for i in range(5) for o in ORGANS]
    path = boxplot_png(rows, "hd95", tmp_path / "hd95.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_mlflow_metric_names_skip_undefined_values() -> None:
    doc = {"organs": {"left kidney": {"hd95": {"mean": 3.5, "median": None, "n": 2.0, "n_nan": 1.0}}},
           "comparison": [{"organ": "left kidney", "metric": "hd95", "mean_diff": -1.0, "p_value": float("nan")}]}
    got = evaluation_metrics(doc)
    assert got == {"eval_hd95_left_kidney_mean": 3.5, "eval_hd95_left_kidney_n": 2.0, "eval_hd95_left_kidney_n_nan": 1.0,
                   "eval_compare_hd95_left_kidney_mean_diff": -1.0}


def test_cli_logs_to_mlflow_new_run_and_attached_run(preds: dict[str, Path], tiny_phantom: Path, tmp_path: Path,
                                                      mlflow_server: str) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    # a new run in an experiment
    out = tmp_path / "eval"
    p = run_cli("evaluate", "--pred", str(preds["damaged"]), "--manifest", str(tiny_phantom), "--out", str(out),
                "--mlflow-experiment", "eval-report-test", "--tracking-uri", mlflow_server)
    run_id = p.stdout.strip().splitlines()[-1].split()[-1]
    run = client.get_run(run_id)
    summary = json.loads((out / "summary.json").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluation"
    for organ in ORGANS:
        assert run.data.metrics[f"eval_dice/{organ}_mean"] == pytest.approx(summary["organs"][organ]["dice"]["mean"])
    assert run.data.metrics["eval_hd95/kidney_n_nan"] == summary["n_cases"] and "eval_hd95/kidney_mean" not in run.data.metrics
    assert run.data.tags["eval.dataset_fingerprint"] == summary["dataset_fingerprint"] == run.data.tags["dataset_fingerprint"]
    files = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/metrics_per_case.csv", "evaluation/summary.json", "evaluation/plots"} <= files
    assert "evaluation/plots/boxplot_dice.png" in {a.path for a in client.list_artifacts(run_id, "evaluation/plots")}
    logged = Path(client.download_artifacts(run_id, "evaluation/summary.json", str(tmp_path)))
    text = logged.read_text()
    assert str(tmp_path) not in text and str(tiny_phantom.parent) not in text  # no local paths in MLflow
    assert json.loads(text)["organs"]["liver"]["dice"]["mean"] == pytest.approx(summary["organs"]["liver"]["dice"]["mean"])
    assert not any(str(tmp_path) in v or str(tiny_phantom.parent) in v for v in run.data.tags.values())

    # attached to an existing (finished) run, e.g. the training run; a comparison and a split
    exp = client.get_experiment_by_name("eval-report-test").experiment_id
    train_run = client.create_run(exp, run_name="training").info.run_id
    client.set_terminated(train_run, "FINISHED")
    p = run_cli("evaluate", "--pred", str(preds["damaged"]), "--compare", str(preds["perfect"]), "--split", "val",
                "--manifest", str(tiny_phantom), "--out", str(tmp_path / "eval_val"),
                "--mlflow-run-id", train_run, "--tracking-uri", mlflow_server)
    assert f"mlflow run id: {train_run}" in p.stdout
    run = client.get_run(train_run)
    assert run.info.status == "FINISHED"  # left as it was
    assert run.data.metrics["eval_compare_dice/liver_mean_diff"] < 0 and run.data.tags["eval.split"] == "val"
    files = {a.path for a in client.list_artifacts(train_run, "evaluation/val")}
    assert {"evaluation/val/compare.csv", "evaluation/val/compare.json", "evaluation/val/metrics_per_case.csv"} <= files


def test_cli_unknown_mlflow_run_fails_before_evaluating(preds: dict[str, Path], tiny_phantom: Path, tmp_path: Path,
                                                         mlflow_server: str) -> None:
    out = tmp_path / "eval"
    p = run_cli("evaluate", "--pred", str(preds["perfect"]), "--manifest", str(tiny_phantom), "--out", str(out),
                "--mlflow-run-id", "0123456789abcdef0123456789abcdef", "--tracking-uri", mlflow_server, check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "no MLflow run" in p.stderr
    assert not out.exists()
