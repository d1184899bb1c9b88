"""Trainings started together on a new local SQLite MLflow store all get their run (no creation race).

MLflow creates a new SQLite store's tables when the first client opens it; four processes doing that at the same
moment (released together by a file) made some of them fail with ``table ... already exists`` or with the
experiment existing already, before ``medseg.io.store_lock``. Each process here is a real ``MlflowTracker`` on
a real SQLite file, as ``medseg train`` makes it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.helpers import REPO

N_PROCESSES = 4
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    go, uri, k = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    from medseg.tracking import MlflowTracker  # imports done before the start signal: only the store set-up races
    (go.parent / f"ready{k}").touch()
    while not go.exists():
        time.sleep(0.005)
    tracker = MlflowTracker(uri, "race-test")
    tracker.start(run_name=f"run{k}")
    tracker.log_metrics({"loss": float(k)}, step=0)
    tracker.end()
    """
)


def test_processes_creating_one_new_sqlite_store_at_once_all_log_their_run(tmp_path: Path) -> None:
    db, go = tmp_path / "store" / "mlflow.db", tmp_path / "go"
    uri = f"sqlite:///{db}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(go), uri, str(k)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in range(N_PROCESSES)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(N_PROCESSES)) and time.monotonic() < deadline:
        time.sleep(0.05)  # every child has imported MLflow and waits for the file
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    failed = [(p.returncode, out[-1500:]) for p, out in zip(procs, outputs, strict=True) if p.returncode != 0]
    assert not failed, failed
    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == "race-test"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run{k}" for k in range(N_PROCESSES)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.metrics["loss"] for r in runs) == [float(k) for k in range(N_PROCESSES)]
