"""Kills at any moment: SIGKILL during a checkpoint write, a prediction batch and an evaluation; SIGTERM during
training. Every process here is a real subprocess (the real CLI, or a script calling ``save_checkpoint``), killed
while it works; moments are found by polling files and log lines, never by sleeping a fixed time.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from medseg.errors import InputError
from medseg.io.atomic import is_output_file
from medseg.io.metric_names import mlflow_key
from medseg.runtime.checkpoint import load_checkpoint
from tests.helpers import MEDSEG, REPO, copy_phantom_scans, free_port, phantom_package, run_cli

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # log lines unwrapped
WAIT_S = 600  # generous: the machine is shared and slow; nothing here asserts on durations


def _start(args: list[str], log: Path, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    """Start ``args`` with stdout and stderr to ``log`` (a file, so a full pipe never blocks the child)."""
    with log.open("ab") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env or ENV, cwd=REPO, **kw)


def _wait_for(proc: subprocess.Popen, what: str, ready: Callable[[], bool], log: Path, poll_s: float = 0.002) -> None:
    """Poll ``ready()`` until it is true; fail (killing ``proc``) if the process ends first or after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{what}: never happened (exit {proc.returncode})\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)


def _kill(proc: subprocess.Popen, sig: signal.Signals = signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=WAIT_S)


def _temps(folder: Path) -> list[Path]:
    """What ``atomic_path`` leaves when its process is killed mid-write: hidden ``.NAME.XXXX.tmp*`` files."""
    return sorted(p for p in folder.rglob(".*") if ".tmp" in p.name)


def _train_overrides(manifest: Path, out: Path, name: str, epochs: int, samples: int = 2) -> list[str]:
    return [f"data.manifest={manifest}", f"train.output_dir={out}", f"train.run_name={name}", f"train.epochs={epochs}",
            "data.spacing=[3.0, 3.0, 4.0]", "train.val_every=1", "train.hd95_every=0", "train.overlay_cases=0",
            "data.patch_size=[32, 32, 16]", f"data.samples_per_volume={samples}", "model.params.channels=[4, 8, 16, 32]",
            "inference.sw_batch_size=1", "tracking.registered_model_name=", "tracking.experiment=kill-test"]


def _history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "history.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _ckpt_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


# ---- a. SIGKILL during a checkpoint write ---------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch
    from medseg.runtime.checkpoint import load_checkpoint, save_checkpoint
    path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = load_checkpoint(path)
    for i in range(first, first + count):  # rewrite the real checkpoint with a large padding, marked i throughout
        state["kill_test_i"] = i
        state["kill_test_padding"] = [torch.full((256 * 1024,), float(i)) for _ in range(32)]  # 32 MiB
        save_checkpoint(path, state)
""")


def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(tiny_phantom: Path, tmp_path: Path) -> None:
    epochs = 3
    run_cli("train", "phantom_unet3d", *_train_overrides(tiny_phantom, tmp_path, "run", epochs - 1),
            "tracking.backend=none")
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.pt"
    cfg = run_dir / "config.yaml"  # resumed with one more epoch than it was trained for
    cfg.write_text(cfg.read_text().replace(f"epochs: {epochs - 1}\n", f"epochs: {epochs}\n", 1))
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    subprocess.run([sys.executable, str(script), str(ckpt), "0", "1"], check=True, env=ENV, timeout=WAIT_S)
    full_size, last, left_behind = ckpt.stat().st_size, 0, []  # last: the mark of the last complete write
    # kill moments: as soon as the temp file exists; once a third / two thirds / nearly all bytes are in it
    for round_, fraction in enumerate((0.0, 1 / 3, 2 / 3, 0.97)):
        first = 100 * (round_ + 1)  # this writer's marks
        log = tmp_path / f"writer_{round_}.log"
        before = set(_temps(ckpt.parent))  # left by the kills before: never cleaned by save_checkpoint itself
        proc = _start([sys.executable, str(script), str(ckpt), str(first), "40"], log)

        def mid_write() -> bool:
            try:
                return any(t.stat().st_size >= full_size * fraction for t in set(_temps(ckpt.parent)) - before)
            except FileNotFoundError:  # renamed onto last.pt meanwhile
                return False

        _wait_for(proc, f"a temp file {fraction:.0%} written", mid_write, log, poll_s=0.0005)
        assert _kill(proc) == -signal.SIGKILL
        state = load_checkpoint(ckpt)  # the last complete write: the previous one, or one before the kill
        i = int(state["kill_test_i"])
        assert i == last or first <= i < first + 40, f"mark {i}: not the last complete write"
        pad = torch.cat(state["kill_test_padding"])
        assert pad.numel() == 32 * 256 * 1024 and bool((pad == float(i)).all()), "a mix of two writes"
        assert int(state["epoch"]) == epochs - 2 and "model" in state and "optimizer" in state
        temps = sorted(set(_temps(ckpt.parent)) - before)
        assert len(temps) <= 1 and all(t.name.startswith(".last.pt.") for t in temps)
        if temps and temps[0].stat().st_size < full_size * 0.9:  # cut short: not a loadable checkpoint
            with pytest.raises(InputError, match="cannot load checkpoint|empty file"):
                load_checkpoint(temps[0])
        left_behind += temps
        last = i
    assert left_behind, "no kill hit a write in progress"
    assert ckpt.is_file()

    # a resumed training removes the temp files of killed writes and continues from the checkpoint
    run_cli("train", "--resume", str(run_dir))
    assert not _temps(run_dir), "temp files of the killed writes are left"
    assert [int(r["epoch"]) for r in _history(run_dir)] == list(range(epochs))
    assert _ckpt_epoch(ckpt) == epochs - 1
    assert "kill_test_i" not in torch.load(ckpt, map_location="cpu", weights_only=True)


# ---- b. SIGKILL during batch inference, then --resume ------------------------------------------------------------
def _records(out: Path) -> dict[str, dict]:
    return {p.name[: -len(".json")]: json.loads(p.read_text()) for p in out.glob("*.json") if is_output_file(p)}


def test_sigkill_during_batch_inference_then_resume(tiny_phantom: Path, tmp_path: Path) -> None:
    phantom_package(tmp_path, tiny_phantom, [])
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans")  # 6 scans, 2 more under other names
    for i, p in enumerate(sorted(scans.glob("*.nii.gz"))[:2]):
        shutil.copy(p, scans / f"extra_{i}.nii.gz")
    ids = sorted(p.name[: -len(".nii.gz")] for p in scans.glob("*.nii.gz"))
    assert len(ids) == 8
    out = tmp_path / "out"
    args = [*MEDSEG, "predict", "--model", str(tmp_path / "pkg"), "--input", str(scans), "--output", str(out),
            "--save-probabilities"]
    log = tmp_path / "predict.log"
    proc = _start(args, log)
    _wait_for(proc, "two finished cases", lambda: len(_records(out)) >= 2, log)
    assert _kill(proc) == -signal.SIGKILL
    done_before = _records(out)
    assert 2 <= len(done_before) < len(ids), "the kill did not land mid-batch"
    assert all(r["status"] == "ok" for r in done_before.values())
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if is_output_file(p)}
    for cid in done_before:  # a record is written after its case's outputs: they are all there, whole
        for name in done_before[cid]["outputs"]:
            assert name in kept
    left = _temps(out)  # what the kill interrupted (if it was writing): hidden, never read as an output

    run_cli("predict", *args[len(MEDSEG) + 1:], "--resume")
    records = _records(out)
    assert sorted(records) == ids and all(r["status"] == "ok" for r in records.values())
    names = sorted(p.name for p in out.iterdir() if is_output_file(p) and p.is_file())
    expected = sorted({n for r in records.values() for n in r["outputs"]} | {f"{c}.json" for c in ids} | {"summary.csv"})
    assert names == expected, "every case's outputs exactly once, nothing else"
    for name, (ino, mtime) in kept.items():  # finished before the kill: skipped, not rewritten
        if name.split(".")[0].removesuffix("_probs") in done_before:
            st = (out / name).stat()
            assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), f"{name} was rewritten"
    assert not _temps(out), f"temp files left: {_temps(out)} (after the kill: {left})"
    with (out / "summary.csv").open(newline="") as fh:
        summary = {r["case"]: r for r in csv.DictReader(fh)}
    assert sorted(summary) == ids and {r["status"] for r in summary.values()} == {"ok"}
    for cid, rec in records.items():  # each recorded status agrees with the files on disk
        assert all((out / n).stat().st_size > 0 for n in rec["outputs"])
        assert rec["outputs"] == [f"{cid}.nii.gz", f"{cid}_probs.nii.gz"]


# ---- c. SIGKILL during evaluation, then the same command again ---------------------------------------------------
def test_sigkill_during_evaluation_then_rerun(tiny_phantom: Path, tmp_path: Path) -> None:
    import nibabel as nib

    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(0)
    for p in sorted((tiny_phantom.parent / "labelsTr").glob("*.nii.gz")):  # labels with noise as predictions
        img = nib.load(p)
        arr = np.asarray(img.dataobj).astype(np.uint8)
        flip = rng.random(arr.shape) < 0.02
        arr[flip] = rng.integers(0, 4, int(flip.sum()))
        nib.save(nib.Nifti1Image(arr, img.affine), pred / p.name)
    reference = tmp_path / "reference"
    run_cli("evaluate", "--pred", str(pred), "--manifest", str(tiny_phantom), "--output", str(reference))
    outputs = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert {"metrics_per_case.csv", "summary.json"} <= set(outputs)

    out = tmp_path / "evaluation"
    args = ["evaluate", "--pred", str(pred), "--manifest", str(tiny_phantom), "--output", str(out)]
    # kill moments: the first file (or temp file) appears in the output folder (the CSV is being written); the
    # first plot appears (CSV and JSON written, plots partly)
    for moment, folder in enumerate((out, out / "plots")):
        log = tmp_path / f"evaluate_{moment}.log"
        shutil.rmtree(out, ignore_errors=True)
        proc = _start([*MEDSEG, *args], log)
        _wait_for(proc, f"a file in {folder}", lambda: folder.is_dir() and any(p.is_file() for p in folder.iterdir()),
                  log, poll_s=0.0005)
        assert _kill(proc) == -signal.SIGKILL
        visible = [p for p in out.rglob("*") if p.is_file() and is_output_file(p)]
        for p in visible:  # whatever is there is whole: atomic writes
            if p.suffix == ".json":
                json.loads(p.read_text())
            if p.suffix == ".csv":
                assert p.read_text() == (reference / p.relative_to(out)).read_text()
        run_cli(*args)
        got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert got == outputs, f"after the kill at moment {moment} and a rerun (temp files left: {_temps(out)})"
        assert (out / "metrics_per_case.csv").read_text() == (reference / "metrics_per_case.csv").read_text()
        assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())


# ---- d. SIGTERM during training --------------------------------------------------------------------------------
def _logged(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.is_file() and text in log.read_text()


def test_sigterm_during_training_saves_the_epoch_and_resumes(tiny_phantom: Path, tmp_path: Path,
                                                            mlflow_server: str) -> None:
    epochs = 3
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    args = [*MEDSEG, "train", "phantom_unet3d", *_train_overrides(tiny_phantom, tmp_path, "run", epochs, samples=4),
            "--tracking-uri", mlflow_server]
    proc = _start(args, log)
    _wait_for(proc, "epoch 1 logged", _logged(log, f"epoch 1/{epochs}"), log)  # epoch 2 is training now
    assert _kill(proc, signal.SIGTERM) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped on SIGTERM" in text and f"epoch 2/{epochs} is saved" in " ".join(text.split())
    assert "Traceback" not in text
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert int(ckpt["epoch"]) == 1, "last.pt holds the epoch that was training when the signal came"
    history = _history(run_dir)
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert history[0]["val_dice_mean"] != "" and history[1]["val_dice_mean"] == "", "the stopped epoch skips validation"
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(run_id).info.status == "KILLED"

    p = run_cli("train", "--resume", str(run_dir), "--tracking-uri", mlflow_server)
    assert run_id in p.stdout
    assert [int(r["epoch"]) for r in _history(run_dir)] == list(range(epochs))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key, steps in (("train_loss", [0, 1, 2]), ("val_dice_mean", [0, 2])):
        got = sorted(m.step for m in client.get_metric_history(run_id, mlflow_key(key)))
        assert got == steps, f"{key}: every epoch's metric exactly once"
    assert (run_dir / "model" / "model.pt").is_file()


def test_second_sigterm_stops_at_once(tiny_phantom: Path, tmp_path: Path, mlflow_server: str) -> None:
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    args = [*MEDSEG, "train", "phantom_unet3d", *_train_overrides(tiny_phantom, tmp_path, "run", 3, samples=16),
            "--tracking-uri", mlflow_server]  # long epochs: both signals land in the training steps of epoch 2
    proc = _start(args, log)
    _wait_for(proc, "epoch 1 logged", _logged(log, "epoch 1/3"), log)
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "the first SIGTERM noted", _logged(log, "SIGTERM received"), log)
    assert _kill(proc, signal.SIGTERM) == 143, log.read_text()[-3000:]
    assert int(load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"]) == 0, "the previous last.pt stays"
    assert not _temps(run_dir)
    assert [int(r["epoch"]) for r in _history(run_dir)] == [0]
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert MlflowClient(tracking_uri=mlflow_server).get_run(run_id).info.status == "KILLED"


def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_epoch(tiny_phantom: Path, tmp_path: Path) -> None:
    # the environment torchrun gives its workers, set by hand so that the signal goes to one rank only
    port, run_dir = free_port(), tmp_path / "ddp"
    args = [*MEDSEG, "train", "phantom_unet3d", *_train_overrides(tiny_phantom, tmp_path, "ddp", 3, samples=4),
            "tracking.backend=none"]
    procs, logs = [], []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(tmp_path / f"rank{rank}.log")
        procs.append(_start(args, logs[-1], env=env))
    try:
        _wait_for(procs[0], "epoch 1 logged by rank 0", _logged(logs[0], "epoch 1/3"), logs[0])
        procs[1].send_signal(signal.SIGTERM)  # rank 0 is never signalled
        rcs = [p.wait(timeout=WAIT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rcs == [143, 143], [lg.read_text()[-2000:] for lg in logs]
    assert _ckpt_epoch(run_dir / "checkpoints" / "last.pt") == 1
    assert [int(r["epoch"]) for r in _history(run_dir)] == [0, 1]
    assert "stopped on SIGTERM" in logs[0].read_text()
