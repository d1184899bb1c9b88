"""Resume proof: SIGKILL a real `medseg train` mid-run, resume it, and compare with an uninterrupted run.

Deterministic mode on CPU: the resumed run must reproduce the uninterrupted run's per-epoch metrics exactly
(same seeds per epoch, restored optimizer/scheduler/RNG state), continue the same MLflow run, and leave
every epoch exactly once in history.csv and in MLflow's metric history.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from medseg.io.metric_names import mlflow_key
from tests.conftest import MEDSEG, run_cli

EPOCHS = 4
TIMING = ("time_epoch_s", "time_data_fraction")  # wall-clock measurements, not results


def _overrides(manifest: Path, out: Path, name: str) -> list[str]:
    return [f"data.manifest={manifest}", f"train.output_dir={out}", f"train.run_name={name}", f"train.epochs={EPOCHS}",
            "data.spacing=[3.0, 3.0, 4.0]", "train.val_every=1", "train.hd95_every=0", "train.overlay_cases=0", "train.deterministic=true",
            "data.patch_size=[32, 32, 16]", "data.samples_per_volume=2", "model.params.channels=[4, 8, 16, 32]",
            "inference.sw_batch_size=1", "tracking.experiment=resume-test"]


def _history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "history.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _ckpt_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1  # not there yet


def _kill_after_epoch(cmd: list[str], ckpt: Path, epoch: int, timeout: float = 300) -> tuple[int, int]:
    """Run ``cmd``; once ``ckpt`` holds ``epoch`` or later, SIGKILL the process. Returns (epoch seen, exit code)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.time() + timeout, -1
    try:
        while time.time() < deadline and proc.poll() is None:
            seen = _ckpt_epoch(ckpt) if ckpt.is_file() else -1
            if seen >= epoch:
                proc.send_signal(signal.SIGKILL)  # the next epoch is running now
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen >= epoch, f"training ended (rc {proc.returncode}) before epoch {epoch} was checkpointed: {proc.stderr.read()[-2000:]}"
    return seen, rc


def test_sigkill_resume_continues_same_mlflow_run_with_identical_metrics(tiny_phantom: Path, tmp_path: Path,
                                                                         mlflow_server: str) -> None:
    # Uninterrupted reference run (no tracking: it does not change what is trained).
    run_cli("train", "phantom_unet3d", *_overrides(tiny_phantom, tmp_path, "reference"), "tracking.backend=none")
    reference = _history(tmp_path / "reference")
    assert [int(r["epoch"]) for r in reference] == list(range(EPOCHS))

    run_dir = tmp_path / "killed"
    cmd = [*MEDSEG, "train", "phantom_unet3d", *_overrides(tiny_phantom, tmp_path, "killed"), "--tracking-uri", mlflow_server]
    seen, rc = _kill_after_epoch(cmd, run_dir / "checkpoints" / "last.pt", epoch=1)
    assert rc == -signal.SIGKILL
    kept = _ckpt_epoch(run_dir / "checkpoints" / "last.pt")
    assert seen <= kept < EPOCHS - 1, "at most the epoch in progress is lost, and the run was not finished"
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody closed the run

    p = run_cli("train", "--resume", str(run_dir), "--tracking-uri", mlflow_server)
    assert run_id in p.stdout

    # history.csv: every epoch exactly once, equal to the uninterrupted run (bit-identical on CPU here)
    resumed = _history(run_dir)
    assert [int(r["epoch"]) for r in resumed] == list(range(EPOCHS))
    assert set(resumed[0]) == set(reference[0])
    for a, b in zip(resumed, reference, strict=True):
        for key in set(a) - set(TIMING):
            assert float(a[key]) == float(b[key]), (a["epoch"], key, a[key], b[key])

    # MLflow: the same run, finished, each step once, values equal to history.csv; no second run created
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_epoch"] == str(kept + 1)
    runs = client.search_runs([run.info.experiment_id], filter_string="attributes.run_name = 'killed'")
    assert [r.info.run_id for r in runs] == [run_id]
    for key in ("train_loss", "val_dice_mean", "val_dice_liver", "lr"):
        hist = sorted(client.get_metric_history(run_id, mlflow_key(key)), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(EPOCHS)), key
        assert [m.value for m in hist] == [float(r[key]) for r in resumed], key
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert (run_dir / "model" / "model.pt").is_file()
