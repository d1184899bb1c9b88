"""DDP through the real launcher: `torchrun --nproc_per_node 2 -m medseg.cli train` on gloo (CPU).

Checks that only rank 0 tracks and writes (one MLflow run, each epoch logged once), that validation is
split over the ranks and gathered (every val case exactly once), and that the run completes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from medseg.io.metric_names import mlflow_key

EPOCHS = 2


def test_torchrun_two_processes_gloo(tiny_phantom: Path, tmp_path: Path, mlflow_server: str) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "medseg.cli", "train", "phantom_unet3d",
           f"data.manifest={tiny_phantom}", f"train.output_dir={tmp_path}", "train.run_name=ddp", f"train.epochs={EPOCHS}",
           "data.spacing=[3.0, 3.0, 4.0]", "train.val_every=1", "train.hd95_every=1", "train.overlay_cases=0", "data.patch_size=[32, 32, 16]",
           "data.samples_per_volume=1", "model.params.channels=[4, 8, 16, 32]", "tracking.experiment=ddp-test",
           "tracking.registered_model_name=", "--tracking-uri", mlflow_server]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, f"torchrun exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    run_dir = tmp_path / "ddp"
    assert sorted(d.name for d in tmp_path.iterdir() if d.is_dir()) == ["ddp"], "one run folder, agreed by both ranks"
    assert (run_dir / "model" / "model.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    assert not list(run_dir.rglob("*.tmp*")), "no half-written files (a second writer would race on them)"

    manifest = json.loads(tiny_phantom.read_text())
    val_ids = sorted(c["id"] for c in manifest["training"] if c["split"] == "val")
    assert len(val_ids) >= 2  # one per rank at least
    rows = list(csv.DictReader((run_dir / "val_cases_best.csv").open()))
    assert sorted(r["case"] for r in rows) == val_ids, "val metrics gathered from both ranks, each case once"
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [int(r["epoch"]) for r in history] == list(range(EPOCHS))
    assert all(float(r["val_hd95_liver"]) > 0 for r in history)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("ddp-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "only rank 0 tracks"
    run = runs[0]
    assert run.info.run_id == (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, mlflow_key("val_dice_mean"))]
    assert steps == list(range(EPOCHS)), "each epoch logged once, not once per rank"
    # the logged value is the mean over all val cases, gathered from both ranks
    best = max(history, key=lambda r: float(r["val_dice_mean"]))
    per_case_liver = sum(float(r["dice_liver"]) for r in rows) / len(rows)
    assert abs(float(best["val_dice_liver"]) - per_case_liver) < 1e-9
