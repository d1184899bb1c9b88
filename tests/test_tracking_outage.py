"""A tracking outage never stalls training: bounded MLflow retries, the run folder's spool, `medseg runs sync`.

A real `mlflow server` on 127.0.0.1 (own process: stopped and started again on the same port and backend
store) goes away in the middle of a real training run and at the start of another; every epoch's metrics
must still arrive on it exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medseg.config import load_config
from medseg.engine.trainer import Trainer
from medseg.io.manifest import load_manifest
from medseg.io.metric_names import mlflow_key
from medseg.io.tracking_spool import SPOOL_NAME, SpoolingTracker, TrackingSpool, sync_spool
from medseg.tracking import HTTP_SETTINGS, MlflowTracker, bounded_http
from tests.helpers import MlflowServer, free_port, run_cli

TINY = [
    "data.patch_size=[16, 16, 8]",
    "model.params.channels=[4, 8, 16]",
    "model.params.strides=[2, 2]",
    "data.spacing=[3.0, 3.0, 4.0]",
    "data.samples_per_volume=1",
    "train.device=cpu",
    "data.augment=false",
    "train.hd95_every=0",
    "train.overlay_cases=0",
    "tracking.experiment=outage-test",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The module's server, not started: each test starts or stops it (a start costs ~10 s, so they are few)."""
    srv = MlflowServer(tmp_path_factory.mktemp("outage_server"))
    yield srv
    srv.stop()


def _retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum("Retrying" in r.getMessage() for r in caplog.records if r.name.startswith("urllib3"))


def test_medseg_calls_use_bounded_retries_and_keep_what_the_user_set(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for key in HTTP_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own setting
    with bounded_http():
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 1 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
        assert MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER.get() is False
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    # Against a port nobody listens on: one retry, then an error in well under a second (MLflow's own
    # defaults, 7 retries with back-off, take minutes here).
    caplog.set_level(logging.WARNING, logger="urllib3")
    dead = MlflowTracker(f"http://127.0.0.1:{free_port()}", "nowhere")
    t0 = time.monotonic()
    with pytest.raises(MlflowException, match="Max retries exceeded"):
        dead.start(run_name="x")
    assert time.monotonic() - t0 < 5 and _retries(caplog) == 1
    caplog.clear()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a user's value wins over medseg's
    with pytest.raises(MlflowException):
        dead.start(run_name="x")
    assert _retries(caplog) == 0


def test_spool_file_records_acknowledgements_and_a_cut_last_line(tmp_path: Path) -> None:
    spool = TrackingSpool(tmp_path)
    spool.append({"op": "open", "uri": "http://x", "experiment": "e", "run_id": None})
    a = spool.append({"op": "start", "run_name": "r", "run_id": None, "ts": 1})
    b = spool.append({"op": "metrics", "step": 0, "ts": 2, "metrics": {"loss": 1.0}})
    spool.ack(a, run_id="abc")
    with spool.path.open("a") as fh:
        fh.write('{"id": "cut", "op": "met')  # a crash in the middle of an append
    state = spool.read()
    assert [r["id"] for r in state.pending] == [b] and state.run_id == "abc" and state.has_start
    assert (state.uri, state.experiment, state.n_sent) == ("http://x", "e", 1)
    assert len({json.loads(line)["id"] for line in spool.path.read_text().splitlines()[:3]}) == 3


def test_run_started_with_server_down_trains_and_runs_sync_sends_it_once(
    server: MlflowServer, tiny_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"down-{uuid.uuid4().hex[:8]}"
    server.stop()
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps log lines at the terminal width
    p = run_cli(
        "train",
        "phantom_unet3d",
        *TINY,
        f"data.manifest={tiny_phantom}",
        f"train.output_dir={tmp_path}",
        "train.run_name=down",
        "train.epochs=2",
        "train.val_every=2",
        f"tracking.registered_model_name={name}",
        "--tracking-uri",
        server.uri,
    )
    run_dir = tmp_path / "down"
    spool_lines = [line for line in (p.stdout + p.stderr).splitlines() if "unreachable" in line]
    assert len(spool_lines) == 1 and str(run_dir / SPOOL_NAME) in spool_lines[0], p.stdout + p.stderr
    assert (run_dir / "model" / "model.pt").is_file() and not (run_dir / "mlflow_run_id.txt").exists()
    pending = len(TrackingSpool(run_dir).read().pending)
    assert pending >= 8  # start, params, tags, metrics x2, artifacts, register, end
    server.start()
    t_synced = time.time() * 1000
    done: list[subprocess.CompletedProcess] = []
    syncs = [
        threading.Thread(target=lambda: done.append(run_cli("runs", "sync", str(run_dir), check=False)))
        for _ in range(2)
    ]  # two at once: the spool's lock lets each record go once
    for t in syncs:
        t.start()
    for t in syncs:
        t.join()
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    sent = sorted(int(re.search(r"sent (\d+) tracking records", d.stdout).group(1)) for d in done)
    assert sent == [0, pending]
    assert "sent 0 tracking records" in run_cli("runs", "sync", str(run_dir)).stdout
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "down" and run.data.params["train.epochs"] == "2"
    assert run.info.start_time < t_synced  # created at the sync, dated when the run trained
    for key in ("train_loss", "val_dice_mean"):
        steps = [m.step for m in client.get_metric_history(run_id, mlflow_key(key))]
        assert sorted(steps) == ([0, 1] if key == "train_loss" else [1]), key
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/model.pt", "model/config.yaml"}
    assert [v.run_id for v in client.search_model_versions(f"name = '{name}'")] == [run_id]


def test_a_step_already_on_the_server_is_not_sent_again(server: MlflowServer, tmp_path: Path) -> None:
    # A batch whose reply was lost (sent, then spooled) and epochs replayed on a resume during an outage: the
    # spooled copy of a step the server has is acknowledged, not sent.
    server.start()
    tracker = SpoolingTracker(MlflowTracker(server.uri, "outage-test"), tmp_path)
    tracker.start(run_name="replay")
    tracker.log_metrics({"train_loss": 0.5, "lr": 0.1}, step=0)
    spool = TrackingSpool(tmp_path)
    spool.append({"op": "open", "uri": server.uri, "experiment": "outage-test", "run_id": tracker.run_id})
    for step in (0, 1, 1):
        spool.append({"op": "metrics", "step": step, "ts": int(time.time() * 1000), "metrics": {"train_loss": 0.4}})
    assert sync_spool(tmp_path) == (3, 0)
    history = MlflowClient(tracking_uri=server.uri).get_metric_history(tracker.run_id, mlflow_key("train_loss"))
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.4)]


class OutageTrainer(Trainer):
    """Stops the server before epoch ``down`` and starts it again before epoch ``up`` (not timed); times epochs."""

    def __init__(self, *args, server: MlflowServer, down: int, up: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server, self.down, self.up, self.seconds = server, down, up, {}

    def _epoch(self, epoch: int) -> bool:
        if epoch == self.down:
            self.server.stop()
        if epoch == self.up:
            self.server.start()
        t0 = time.monotonic()
        stop = super()._epoch(epoch)
        self.seconds[epoch] = time.monotonic() - t0
        return stop


def test_server_stopped_mid_training_every_epoch_arrives_once(
    server: MlflowServer,
    tiny_phantom: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    epochs, down, up = 8, 2, 5
    monkeypatch.setenv("MEDSEG_TRACKING_COOLDOWN_S", "1")
    caplog.set_level(logging.INFO, logger="medseg")
    server.start()
    name = f"outage-{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        "phantom_unet3d",
        [
            *TINY,
            f"data.manifest={tiny_phantom}",
            f"train.output_dir={tmp_path}",
            "train.run_name=mid",
            f"train.epochs={epochs}",
            "train.val_every=4",
            f"tracking.registered_model_name={name}",
        ],
    )
    trainer = OutageTrainer(cfg, load_manifest(tiny_phantom), tracking_uri=server.uri, server=server, down=down, up=up)
    result = trainer.fit()
    assert result.epochs_run == epochs and isinstance(trainer.recorder.tracker, SpoolingTracker)
    messages = [r.getMessage() for r in caplog.records]
    back = [i for i, m in enumerate(messages) if "is back: sent" in m]
    last_epoch = max(i for i, m in enumerate(messages) if m.startswith(f"epoch {epochs}/{epochs}"))
    assert back and back[0] < last_epoch  # sent at a later epoch, while training went on
    assert sum("unreachable" in m for m in messages) == 1
    client = MlflowClient(tracking_uri=server.uri)
    for key in ("train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, mlflow_key(key))) == list(range(epochs)), key
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["registered_model"] == f"models:/{name}/1"
    state = TrackingSpool(result.run_dir).read()
    assert not state.pending and state.n_sent >= up - down  # the outage epochs went through the spool
    assert (result.run_dir / "mlflow_run_id.txt").read_text().strip() == result.run_id
    # A loose sanity bound only (timings are fragile): no epoch of the outage or of the catching up (validation
    # epochs among them) takes 30 s longer than the slowest epoch with the server up all along.
    normal = max(s for e, s in trainer.seconds.items() if e < down or e > up)
    assert max(trainer.seconds[e] for e in range(down, up + 1)) < normal + 30, trainer.seconds
