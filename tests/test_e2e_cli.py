"""End to end through the real CLI (subprocesses): phantom -> train -> predict -> evaluate, tracked on a
real MLflow server on 127.0.0.1, then read back through the MLflow client by organ name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from mlflow.tracking import MlflowClient

from medseg.io.metric_names import mlflow_key
from tests.conftest import run_cli

ORGANS = ("liver", "spleen", "kidney")
EPOCHS = 3


def test_train_predict_evaluate_with_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    data = tmp_path / "phantom"
    run_cli("data", "phantom", str(data), "--cases", "5", "--val-fraction", "0.4")
    manifest = data / "dataset.json"

    p = run_cli("train", "phantom_unet3d", f"data.manifest={manifest}", f"train.output_dir={tmp_path / 'runs'}",
                "train.run_name=e2e", f"train.epochs={EPOCHS}", "train.val_every=1", "data.samples_per_volume=1",
                # a coarse grid and small patches: the CLI chain and MLflow record are under test, not accuracy
                "data.spacing=[4.0, 4.0, 6.0]", "data.patch_size=[32, 32, 16]",
                "model.params.channels=[8, 16, 32, 64]", "tracking.experiment=e2e",
                "--tracking-uri", mlflow_server)
    run_dir = tmp_path / "runs" / "e2e"
    assert (run_dir / "model" / "model.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert run_id in p.stdout

    # --- MLflow: per-organ metrics by name, per epoch; params, tags, artifacts -----------------------
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for organ in ORGANS:
        for metric in ("dice", "iou"):
            hist = client.get_metric_history(run_id, mlflow_key(f"val_{metric}_{organ}"))
            assert [m.step for m in hist] == list(range(EPOCHS)), (organ, metric)
            assert all(0.0 <= m.value <= 1.0 for m in hist)
    assert len(client.get_metric_history(run_id, mlflow_key("train_loss"))) == EPOCHS
    assert len(client.get_metric_history(run_id, mlflow_key("val_dice_mean"))) == EPOCHS
    params = run.data.params
    assert params["train.epochs"] == str(EPOCHS) and params["model.name"] == "unet"
    assert params["model.params.channels"] == "[8, 16, 32, 64]"
    tags = run.data.tags
    assert len(tags["dataset_fingerprint"]) == 16 and tags["git_commit"]
    assert tags["torch_version"] and tags["device"] == "cpu"
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config", "data", "model", "metrics"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/model.pt", "model/config.yaml", "model/metadata.json"}

    # --- predict: masks in each scan's own geometry ----------------------------------------------------
    preds = tmp_path / "preds"
    p = run_cli("predict", "--model", str(run_dir), "--input", str(manifest), "--split", "val", "--output", str(preds))
    val_ids = [c["id"] for c in json.loads(manifest.read_text())["training"] if c["split"] == "val"]
    assert len(val_ids) == 2 and "2 predicted" in p.stdout
    for cid in val_ids:
        mask, scan = nib.load(preds / f"{cid}.nii.gz"), nib.load(data / "imagesTr" / f"{cid}.nii.gz")
        assert mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)
        record = json.loads((preds / f"{cid}.json").read_text())
        assert record["status"] == "ok" and set(record["organs"]) == set(ORGANS)
        assert record["organs"]["liver"]["volume_ml"] > 0
    # resume skips finished cases
    p = run_cli("predict", "--model", str(run_dir / "model"), "--input", str(manifest), "--split", "val",
                "--output", str(preds), "--resume")
    assert "0 predicted, 2 already done" in p.stdout

    # --- evaluate -----------------------------------------------------------------------------------------
    p = run_cli("evaluate", "--pred", str(preds), "--manifest", str(manifest), "--out", str(tmp_path / "eval"))
    assert "--out is deprecated, use --output" in p.stderr  # the old spelling still works, with a warning
    rows = list(csv.DictReader((tmp_path / "eval" / "metrics_per_case.csv").open()))
    assert {(r["case"], r["organ"]) for r in rows} == {(c, o) for c in val_ids for o in ORGANS}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and set(summary["organs"]) == set(ORGANS)
    assert "liver" in p.stdout
    p = run_cli("evaluate", "--pred", str(preds), "--manifest", str(manifest), "--output", str(tmp_path / "eval2"))
    assert "deprecated" not in p.stderr
    assert json.loads((tmp_path / "eval2" / "summary.json").read_text())["n_cases"] == 2


# ---- one flag vocabulary: --output everywhere, old spellings hidden and deprecated ------------------------------
RENAMED = {("data", "import-msd"): "--out", ("data", "import-images"): "--out", ("data", "plan"): "--out",
           ("evaluate",): "--out"}


def test_help_shows_output_not_the_hidden_old_names() -> None:
    import re

    from typer.testing import CliRunner

    from medseg.cli import app

    for cmd, old in RENAMED.items():
        res = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert "--output" in res.output, cmd
        assert not re.search(rf"{old}\b(?!put)", res.output), f"{' '.join(cmd)} --help shows {old}"
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "cli-reference" not in res.output


def test_output_and_its_old_name_out(phantom_copy: Path, tmp_path: Path) -> None:
    new = run_cli("data", "plan", str(phantom_copy), "--max-cases", "2", "--output", str(tmp_path / "new.json"))
    assert json.loads((tmp_path / "new.json").read_text())["plans"] and "deprecated" not in new.stderr
    old = run_cli("data", "plan", str(phantom_copy), "--max-cases", "2", "--out", str(tmp_path / "old.json"))
    assert json.loads((tmp_path / "old.json").read_text())["plans"]
    assert old.stderr.strip().splitlines()[-1] == ("medseg: warning: --out is deprecated, use --output "
                                                   "(the old name goes in the next release)")
    both = run_cli("data", "plan", str(phantom_copy), "--output", str(tmp_path / "a.json"), "--out",
                   str(tmp_path / "b.json"), check=False)
    assert both.returncode == 2 and "give only --output" in both.stderr
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
