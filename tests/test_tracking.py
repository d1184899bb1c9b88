"""The experiment record of a real training run, read back through the MLflow client from a real server.

One tiny `medseg train` (subprocess) is shared by the tests in this module.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from medseg.config import TrackingConfig
from medseg.io.metric_names import mlflow_key
from medseg.tracking import MlflowTracker, NullTracker, make_tracker
from tests.conftest import run_cli

ORGANS = ("liver", "spleen", "kidney")
EPOCHS = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tracked_run(tiny_phantom: Path, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("tracked")
    name = f"medseg-test-{uuid.uuid4().hex[:8]}"
    run_cli("train", "phantom_unet3d", f"data.manifest={tiny_phantom}", f"train.output_dir={out}", "train.run_name=tracked",
            f"train.epochs={EPOCHS}", "data.spacing=[3.0, 3.0, 4.0]", "train.val_every=1", "train.hd95_every=2", "train.overlay_cases=2",
            "data.patch_size=[32, 32, 16]", "data.samples_per_volume=1", "model.params.channels=[4, 8, 16, 32]",
            "tracking.experiment=tracking-test", f"tracking.registered_model_name={name}", "--tracking-uri", mlflow_server)
    run_dir = out / "tracked"
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    return {"run_dir": run_dir, "run_id": run_id, "model_name": name, "client": MlflowClient(tracking_uri=mlflow_server),
            "uri": mlflow_server, "manifest": tiny_phantom, "out": out}


def _download_text(client: MlflowClient, run_id: str, path: str, dst: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(dst))).read_bytes()


def test_per_epoch_metrics_by_organ_name_and_hd95_every_k(tracked_run: dict) -> None:
    client, run_id = tracked_run["client"], tracked_run["run_id"]
    logged = set(client.get_run(run_id).data.metrics)  # grouped into the UI's sections by the part before "/"
    assert {"val_dice/liver", "val_iou/spleen", "val_hd95/kidney", "loss/train", "loss/val", "train/lr"} <= logged
    assert not {"val_dice_liver", "train_loss"} & logged
    for organ in (*ORGANS, "mean"):
        for metric in ("dice", "iou"):
            hist = client.get_metric_history(run_id, mlflow_key(f"val_{metric}_{organ}"))
            assert sorted(m.step for m in hist) == list(range(EPOCHS)) and all(0 <= m.value <= 1 for m in hist)
        hd = client.get_metric_history(run_id, mlflow_key(f"val_hd95_{organ}"))  # hd95_every=2: only at epoch 2 (step 1)
        assert [m.step for m in hd] == [1] and hd[0].value > 0
    for key in ("train_loss", "val_loss", "lr", "time_data_fraction"):
        assert sorted(m.step for m in client.get_metric_history(run_id, mlflow_key(key))) == list(range(EPOCHS)), key
    # the logged value is the mean over the val cases of the per-case HD95 (mm) in the best-epoch table
    hd_liver = client.get_metric_history(run_id, mlflow_key("val_hd95_liver"))[0].value
    rows = list(csv.DictReader((tracked_run["run_dir"] / "val_cases_best.csv").open()))
    assert abs(np.nanmean([float(r["hd95_liver"]) for r in rows]) - hd_liver) < 1e-6


def test_params_and_tags(tracked_run: dict) -> None:
    run = tracked_run["client"].get_run(tracked_run["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.epochs"] == str(EPOCHS) and p["model.name"] == "unet" and p["data.patch_size"] == "[32, 32, 16]"
    t = run.data.tags
    manifest_fp = json.loads((tracked_run["run_dir"] / "model" / "metadata.json").read_text())["dataset_fingerprint"]
    assert t["dataset_fingerprint"] == manifest_fp
    assert t["git_commit"] and t["mlflow.source.git.commit"] == t["git_commit"]
    assert t["torch_version"] == torch.__version__ and t["monai_version"]
    assert t["cuda_version"] == (torch.version.cuda or "none")
    assert t["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))
    assert t["registered_model"] == f"models:/{tracked_run['model_name']}/1"


def test_artifacts_config_manifest_plots_and_best_case_metrics(tracked_run: dict, tmp_path: Path) -> None:
    client, run_id = tracked_run["client"], tracked_run["run_id"]
    cfg = _download_text(client, run_id, "config/config.yaml", tmp_path).decode()
    assert "registered_model_name: " + tracked_run["model_name"] in cfg
    manifest = json.loads(_download_text(client, run_id, "data/manifest.json", tmp_path))
    val_ids = sorted(c["id"] for c in manifest["training"] if c["split"] == "val")
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/val_overlay_00.png", "plots/val_overlay_01.png",
                     "plots/val_worst_1.png", "plots/val_worst_2.png"}  # overlay_cases=2: the first 2, the worst 2
    for path in plots:
        assert _download_text(client, run_id, path, tmp_path / "p")[:8] == PNG_MAGIC
    table = _download_text(client, run_id, "metrics/val_cases_best.csv", tmp_path).decode()
    rows = list(csv.DictReader(io.StringIO(table)))
    assert sorted(r["case"] for r in rows) == val_ids
    assert {f"{m}_{o}" for m in ("dice", "iou", "hd95") for o in ORGANS} <= set(rows[0])
    history = list(csv.DictReader(io.StringIO(_download_text(client, run_id, "metrics/history.csv", tmp_path).decode())))
    assert [int(r["epoch"]) for r in history] == list(range(EPOCHS))


def test_registered_model_predicts_through_models_uri(tracked_run: dict, tmp_path: Path) -> None:
    client, name = tracked_run["client"], tracked_run["model_name"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", tracked_run["run_id"])]
    from mlflow.models import Model

    from medseg.inference.model_package import load_package

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env_before = {k: os.environ.get(k) for k in keys}
    pkg = load_package(f"models:/{name}/1", tracking_uri=tracked_run["uri"])
    assert pkg.metadata["run_id"] == tracked_run["run_id"]
    # no process-wide URI left behind: a later training in (a subprocess of) this process registers where it is told
    assert {k: os.environ.get(k) for k in keys} == env_before
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracked_run["uri"])  # Model.load resolves models:/ through the global URI
    try:
        card = Model.load(f"models:/{name}/1")
    finally:
        mlflow.set_tracking_uri(previous)
    assert card.flavors["medseg"]["weights"] == "model.pt" and card.run_id == tracked_run["run_id"]
    preds = tmp_path / "preds"
    p = run_cli("predict", "--model", f"models:/{name}/1", "--tracking-uri", tracked_run["uri"],
                "--input", str(tracked_run["manifest"]), "--split", "val", "--output", str(preds), cwd=tmp_path)
    assert "0 failed" in p.stdout
    manifest = json.loads(tracked_run["manifest"].read_text())
    for case in (c for c in manifest["training"] if c["split"] == "val"):
        scan = nib.load(tracked_run["manifest"].parent / case["image"])
        mask = nib.load(preds / f"{case['id']}.nii.gz")
        assert mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)


def test_make_tracker_backends_and_logged_steps(mlflow_server: str) -> None:
    assert isinstance(make_tracker(TrackingConfig(backend="none")), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(), enabled=False), NullTracker)
    t = make_tracker(TrackingConfig(experiment="tracker-unit"), mlflow_server)
    assert isinstance(t, MlflowTracker)
    t.start(run_name="unit")
    t.log_metrics({"a": 1.0, "b": float("nan")}, step=0)
    t.log_metrics({"a": 2.0}, step=3)
    assert t.logged_steps("a") == {0, 3} and t.logged_steps("b") == set()
    t.log_params({"x": 1})
    t.log_params({"x": 1, "y": 2})  # re-logging an existing param (resume) is not an MLflow error
    t.end()
    run = MlflowClient(tracking_uri=mlflow_server).get_run(t.run_id)
    assert run.data.params == {"x": "1", "y": "2"} and run.info.status == "FINISHED"


def test_batches_over_mlflow_limits_are_logged_whole(mlflow_server: str) -> None:
    # 250 params (limit 100 per request) and 2,500 metrics (limit 1,000) in one call each: MlflowClient.log_batch
    # splits them, medseg does not
    t = make_tracker(TrackingConfig(experiment="tracker-limits"), mlflow_server)
    t.start(run_name="limits")
    t.log_params({f"p{i:03d}": i for i in range(250)} | {"long": "x" * 7000})
    t.log_metrics({f"m{i:04d}": float(i) for i in range(2500)}, step=1)
    t.end()
    data = MlflowClient(tracking_uri=mlflow_server).get_run(t.run_id).data
    assert {k: v for k, v in data.params.items() if k != "long"} == {f"p{i:03d}": str(i) for i in range(250)}
    assert data.params["long"] == "x" * 6000  # cut to MLflow's param length limit, not rejected
    assert data.metrics == {f"m{i:04d}": float(i) for i in range(2500)}
