"""pipelines/train_evaluate_register.py on a real MLflow server and tiny phantom trainings.

Two kinds of training through the real trainer, with outcomes that cannot tie: a sabotaged one (cross-entropy
that weighs background only, at a large learning rate: after one epoch it segments nothing, Dice 0 on every
test case) and a real one (two epochs: some overlap with every test case's organs). The champion alias moves
only to the better; the worse becomes challenger; ``models:/NAME@champion`` then predicts through the CLI and
records the version it resolved to. Also: the lock, an unreachable server, a training failure, and --resume
of a killed run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines.locking import exclusive_lock
from pipelines.train_evaluate_register import LATEST, LOCK_NAME, LOG_NAME, main
from tests.helpers import REPO, run_cli

PIPELINE = [sys.executable, "-m", "pipelines.train_evaluate_register"]
TINY = [
    "data.spacing=null",
    "model.params.channels=[8, 16, 16]",
    "model.params.strides=[2, 2]",
    "model.params.num_res_units=0",
    "train.device=cpu",
    "data.augment=false",
    "train.hd95_every=0",
    "train.overlay_cases=0",
    "data.patch_size=[16, 16, 8]",
    "data.batch_size=2",
    "optimizer.scheduler=none",
    "train.val_every=1",
    "inference.roi_size=[48, 48, 24]",
    "tracking.experiment=pipeline-test",
]
# background-only cross-entropy at a large rate: every voxel is background after one epoch (Dice 0 everywhere)
SABOTAGED = [
    "train.epochs=1",
    "data.samples_per_volume=4",
    "loss.name=ce",
    "loss.params.class_weights=[1, 0, 0, 0]",
    "optimizer.lr=0.3",
]
TRAINED = [
    "train.epochs=2",
    "data.samples_per_volume=16",
    "loss.name=dice_ce",
    "data.class_ratios=[1, 1, 1, 1]",
    "optimizer.lr=0.1",
]
TEST_CASES = ("phantom_000", "phantom_001")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 7-case phantom with a labelled test split (2 cases), 1 val and 4 train cases; its manifest."""
    import dataclasses

    from medseg.data.phantom import write_phantom

    out = tmp_path_factory.mktemp("phantom_test_split")
    m = write_phantom(out, cases=7, seed=0, val_fraction=0.2, shape=(48, 48, 24), spacing=(3.0, 3.0, 4.0))
    m.cases = [dataclasses.replace(c, split="test") if c.id in TEST_CASES else c for c in m.cases]
    m.save(out / "dataset.json")
    assert {c.id for c in m.split("test")} == set(TEST_CASES) and m.split("train") and m.split("val")
    return out / "dataset.json"


def _args(phantom: Path, extra: list[str], output: Path, uri: str, name: str) -> list[str]:
    sets = [f"--set={s}" for s in [*TINY, f"data.manifest={phantom}", *extra]]
    return ["phantom_unet3d", *sets, "--output", str(output), "--tracking-uri", uri, "--model-name", name]


def _latest(output: Path) -> dict:
    return json.loads((output / LATEST).read_text())


def test_champion_moves_only_to_the_better_model_and_predicts_by_alias(
    phantom: Path, mlflow_server: str, tmp_path: Path
) -> None:
    name, out = "pipeline-promotion", tmp_path / "weekly"
    assert main(_args(phantom, SABOTAGED, out, mlflow_server, name)) == 0
    first = _latest(out)
    assert (first["version"], first["alias"], first["previous_champion"]) == ("1", "champion", None)
    assert first["decision"]["candidate_mean"] == 0.0  # the sabotaged model segments nothing

    assert main(_args(phantom, TRAINED, out, mlflow_server, name)) == 0
    second = _latest(out)
    assert (second["version"], second["alias"], second["previous_champion"]) == ("2", "champion", "1")
    d = second["decision"]
    assert d["promote"] and d["n_pairs"] == 2 and d["gain"] > 0 and d["champion_mean"] == 0.0
    evaluation = Path(second["evaluation"]) / "evaluation"
    compare = json.loads((evaluation / "compare.json").read_text())  # the paired per-case comparison, as evaluate
    assert compare["n_paired_cases"] == 2 and {r["organ"] for r in compare["rows"]} == {"liver", "spleen", "kidney"}

    assert main(_args(phantom, SABOTAGED, out, mlflow_server, name)) == 0
    third = _latest(out)
    assert (third["version"], third["alias"], third["previous_champion"]) == ("3", "challenger", "2")
    assert not third["decision"]["promote"] and third["decision"]["gain"] < 0

    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_registered_model(name).aliases == {"champion": "2", "challenger": "3"}
    v2 = client.get_model_version(name, "2")
    assert v2.run_id == second["run_id"] and v2.tags["pipeline.alias"] == "champion"
    assert v2.tags["pipeline.compared_with"] == f"models:/{name}/1"
    run = client.get_run(second["run_id"])  # the test scores are on the training run, as `evaluate --mlflow-run-id`
    assert run.data.tags["eval.split"] == "test" and "eval_dice/liver_mean" in run.data.metrics
    assert run.data.tags["registered_model"] == f"models:/{name}/2"
    assert (out / LOG_NAME).read_text().count(" start: pid ") == 3 and not (out / "pending_run.txt").exists()

    case = TEST_CASES[0]
    scan = phantom.parent / "imagesTr" / f"{case}.nii.gz"
    run_cli(
        "predict",
        "--model",
        f"models:/{name}@champion",
        "--tracking-uri",
        mlflow_server,
        "--input",
        str(scan),
        "--output",
        str(tmp_path / "nightly"),
        "--device",
        "cpu",
    )
    record = json.loads((tmp_path / "nightly" / f"{case}.json").read_text())
    assert record["model"]["name"] == name and record["model"]["version"] == "2"
    assert record["model"]["alias"] == "champion"
    ours = np.asarray(nib.load(tmp_path / "nightly" / f"{case}.nii.gz").dataobj)
    pipeline_pred = np.asarray(nib.load(Path(second["evaluation"]) / "candidate" / f"{case}.nii.gz").dataobj)
    assert np.array_equal(ours, pipeline_pred) and ours.any()  # the champion's own weights, not version 3's


def test_second_run_on_the_same_output_exits_with_the_lock_code_at_once(
    phantom: Path, mlflow_server: str, tmp_path: Path
) -> None:
    out = tmp_path / "weekly"
    args = _args(phantom, TRAINED, out, mlflow_server, "pipeline-lock")
    first = subprocess.Popen([*PIPELINE, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / LOCK_NAME
        deadline = time.time() + 60
        while time.time() < deadline and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, "the first run ended before it was seen holding the lock"
            time.sleep(0.1)
        assert lock.read_text().strip() == str(first.pid)
        t0 = time.time()
        second = subprocess.run([*PIPELINE, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        took = time.time() - t0
        assert second.returncode == 6, second.stderr
        assert f"pid {first.pid}" in second.stderr and str(out) in second.stderr
        assert took < 20, f"the second run took {took:.1f} s to give up"
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.terminate()
        first.wait(timeout=60)
    with exclusive_lock(out / LOCK_NAME):  # killed, the holder's lock went with it
        pass
    assert (out / LOG_NAME).read_text().count(" start: pid ") == 1  # the second run wrote nothing


def test_resume_continues_a_killed_run_then_evaluates_and_registers_it(
    phantom: Path, mlflow_server: str, tmp_path: Path
) -> None:
    out, name = tmp_path / "weekly", "pipeline-resume"
    args = _args(phantom, [*SABOTAGED, "train.epochs=4"], out, mlflow_server, name)
    first = subprocess.Popen([*PIPELINE, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("runs/*/checkpoints/last.pt")):
            assert first.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        first.kill()  # as a preempted job: no clean-up
        first.wait(timeout=60)
    (run_dir,) = out.glob("runs/*")
    assert (out / "pending_run.txt").read_text().strip() == str(run_dir) and not (out / LATEST).exists()
    killed_at = len((run_dir / "history.csv").read_text().splitlines()) - 1
    assert 1 <= killed_at < 4

    assert main([*args, "--resume"]) == 0
    outcome = _latest(out)
    assert outcome["run_dir"] == str(run_dir) and list(out.glob("runs/*")) == [run_dir]  # the same run, continued
    assert outcome["run_id"] == (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert [int(r.split(",")[0]) for r in (run_dir / "history.csv").read_text().splitlines()[1:]] == [0, 1, 2, 3]
    assert (outcome["version"], outcome["alias"]) == ("1", "champion") and not (out / "pending_run.txt").exists()
    assert f"resuming {run_dir}" in (out / LOG_NAME).read_text()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_exits_5_with_one_line(phantom: Path, tmp_path: Path) -> None:
    out, uri = tmp_path / "weekly", f"http://127.0.0.1:{_closed_port()}"
    p = subprocess.run(
        [*PIPELINE, *_args(phantom, SABOTAGED, out, uri, "pipeline-offline")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 5, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("train_evaluate_register")]
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0] and "nothing trained" in lines[0]
    assert not (out / "runs").exists()
    assert "exit 5" in (out / LOG_NAME).read_text()


def test_training_failure_exits_3_and_a_bad_option_2(
    phantom: Path, mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, uri = tmp_path / "weekly", mlflow_server
    # three stride-2 levels need multiples of 8: the trainer's start-up check refuses a [12, 12, 6] patch
    bad_net = [
        *SABOTAGED,
        "model.params.channels=[4, 8, 16, 32]",
        "model.params.strides=[2, 2, 2]",
        "data.patch_size=[12, 12, 6]",
    ]
    assert main(_args(phantom, bad_net, out, uri, "pipeline-fails")) == 3
    err = capsys.readouterr().err
    assert "train_evaluate_register: error: training" in err and "data.patch_size" in err
    assert (out / "pending_run.txt").is_file() and not (out / LATEST).exists()
    assert "Traceback" in (out / LOG_NAME).read_text()  # the details are in the log

    assert main(_args(phantom, ["tracking.registered_model_name="], out, uri, "")) == 2
    assert "no model name" in capsys.readouterr().err
    assert main(["phantom_unet3d", "--metric", "accuracy"]) == 2


def test_an_alias_ref_records_the_version_it_resolved_to(phantom: Path, mlflow_server: str, tmp_path: Path) -> None:
    from medseg.errors import InputError
    from medseg.inference.model_package import load_package, resolve_model_alias
    from medseg.inference.records import model_identity
    from tests.helpers import phantom_package

    pkg, _ = phantom_package(tmp_path, phantom, [])
    assert resolve_model_alias(str(pkg.path)) == str(pkg.path) and pkg.resolved_ref is None
    pkg.resolved_ref = "models:/lungs/7"
    ident = model_identity(pkg, "models:/lungs@champion")
    assert (ident["name"], ident["version"], ident["alias"]) == ("lungs", "7", "champion")
    assert (
        "alias" not in model_identity(pkg, "models:/lungs/7")
        and model_identity(pkg, "models:/lungs/7")["version"] == "7"
    )
    with pytest.raises(InputError, match="cannot resolve alias 'champion' of model 'no-such-model'"):
        load_package("models:/no-such-model@champion", mlflow_server)


def test_a_sigterm_stop_of_training_exits_143_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The trainer's ``TrainingStopped`` (tests/reliability/test_kills.py sends the real SIGTERM to training)
    becomes the pipeline's exit 143, not a traceback: a scheduler sees a pre-emption, not a failure."""
    import pipelines.train_evaluate_register as ter
    from medseg.engine.stop_signal import EXIT_CODE, TrainingStopped

    def stopped(args: object) -> int:
        raise TrainingStopped("stopped on SIGTERM: epoch 2/5 is saved")

    monkeypatch.setattr(ter, "run", stopped)
    assert ter.SIGTERM_EXIT == EXIT_CODE == 143
    assert ter.main(["configs/x.yaml"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train_evaluate_register: stopped on SIGTERM: epoch 2/5 is saved; run the pipeline again with --resume"]
