"""``medseg runs compare`` on two real tiny trainings with different settings, logged to a real MLflow server."""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import pytest

from medseg.evaluation.run_compare import collect_runs, differing_params
from tests.helpers import run_cli

COMMON = (
    "data.spacing=[3.0, 3.0, 4.0]",
    "data.patch_size=[32, 32, 16]",
    "data.samples_per_volume=1",
    "train.overlay_cases=0",
    "train.val_every=1",
    "train.hd95_every=2",
)


@pytest.fixture(scope="module")
def two_runs(tiny_phantom: Path, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("compare")
    experiment = f"compare-{uuid.uuid4().hex[:8]}"
    settings = {
        "small": ("train.epochs=2", "optimizer.lr=0.003", "model.params.channels=[4, 8, 16, 32]"),
        "wide": ("train.epochs=3", "optimizer.lr=0.01", "model.params.channels=[8, 16, 32, 64]"),
    }
    ids = {}
    for name, extra in settings.items():
        run_cli(
            "train",
            "phantom_unet3d",
            f"data.manifest={tiny_phantom}",
            f"train.output_dir={out}",
            f"train.run_name={name}",
            *COMMON,
            *extra,
            f"tracking.experiment={experiment}",
            "--tracking-uri",
            mlflow_server,
        )
        ids[name] = (out / name / "mlflow_run_id.txt").read_text().strip()
    return {"out": out, "experiment": experiment, "ids": ids, "uri": mlflow_server}


def best_row(run_dir: Path) -> dict[str, str]:
    """The history.csv row of the epoch the run packaged (its best)."""
    epoch = json.loads((run_dir / "model" / "metadata.json").read_text())["epoch"]
    return next(r for r in csv.DictReader((run_dir / "history.csv").open()) if int(r["epoch"]) == epoch)


def test_collect_runs_reads_the_best_epoch_metrics_and_differing_params(two_runs: dict) -> None:
    rows = collect_runs(two_runs["experiment"], ["dice", "hd95"], uri=two_runs["uri"])
    assert [r.name for r in rows] == ["wide", "small"]  # newest first
    for r in rows:
        run_dir = two_runs["out"] / r.name
        want = best_row(run_dir)
        assert r.best_epoch == int(want["epoch"]) and r.status == "FINISHED"
        for organ in ("liver", "spleen", "kidney", "mean"):
            assert r.metrics[f"dice_{organ}"] == pytest.approx(float(want[f"val_dice_{organ}"]), abs=1e-9)
            hd = want[f"val_hd95_{organ}"]  # every 2nd epoch (and the last) only: absent elsewhere
            assert (f"hd95_{organ}" in r.metrics) == (hd not in ("", "nan"))
        assert not any(k.startswith("iou_") for k in r.metrics)  # only the metrics asked for
        assert 0 < r.duration_s < 600
    diff = differing_params(rows)
    assert {"train.epochs", "optimizer.lr", "model.params.channels", "train.run_name"} <= set(diff)
    assert "data.patch_size" not in diff and "train.val_every" not in diff


def test_cli_table_and_run_selection(two_runs: dict, tmp_path: Path) -> None:
    args = ("runs", "compare", "--experiment", two_runs["experiment"], "--tracking-uri", two_runs["uri"])
    p = run_cli(*args, "--metric", "dice", "--metric", "iou", cwd=tmp_path)
    rows = collect_runs(two_runs["experiment"], ["dice", "iou"], uri=two_runs["uri"])
    text = p.stdout
    for r in rows:
        assert r.run_id[:8] in text and f"{r.metrics['iou_liver']:.4f}" in text
    for line in ("param train.epochs", "param model.params.channels", "dice_kidney", "iou_mean", "best epoch"):
        assert line in text
    assert "param data.patch_size" not in text
    one = run_cli(*args, "--runs", two_runs["ids"]["small"], cwd=tmp_path).stdout
    assert two_runs["ids"]["small"][:8] in one and two_runs["ids"]["wide"][:8] not in one
    assert "param " not in one  # one run: nothing differs
    bad = run_cli(*args, "--runs", "0" * 32, cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "no run 000" in bad.stdout + bad.stderr
    missing = run_cli(
        "runs", "compare", "--experiment", "no-such-exp", "--tracking-uri", two_runs["uri"], cwd=tmp_path, check=False
    )
    assert missing.returncode != 0 and "no MLflow experiment named 'no-such-exp'" in missing.stdout + missing.stderr


def test_a_run_logged_with_the_old_flat_names_is_read_alike(mlflow_server: str) -> None:
    """Runs logged before metric sections (``val_dice_liver``, no ``best_epoch`` tag) still compare."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, experiment = MlflowClient(tracking_uri=mlflow_server), f"old-names-{uuid.uuid4().hex[:8]}"
    run = client.create_run(client.create_experiment(experiment), run_name="old")
    values = {0: {"val_dice_mean": 0.4, "val_dice_liver": 0.5}, 1: {"val_dice_mean": 0.8, "val_dice_liver": 0.9},
              2: {"val_dice_mean": 0.6, "val_dice_liver": 0.7}}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, step) for step, m in values.items() for k, v in m.items()])
    client.set_terminated(run.info.run_id)
    (row,) = collect_runs(experiment, ["dice"], uri=mlflow_server)
    assert row.best_epoch == 1 and row.metrics == {"dice_liver": 0.9, "dice_mean": 0.8}
