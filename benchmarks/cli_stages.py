"""Shared by the end-to-end benchmark scripts: run a stage (the real ``medseg`` CLI or a plain baseline script) as
a child process with its wall time and peak resident memory, alone or two side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEDSEG = [sys.executable, "-m", "medseg.cli"]


def child_env(threads: int | None) -> dict[str, str]:
    """The children's environment: unbuffered output, the repo importable, ``threads`` OpenMP/MKL threads."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_stages(stages: dict[str, list[str]], env: dict[str, str], cwd: Path, log_dir: Path) -> dict[str, dict]:
    """Run the commands of ``stages`` (name -> argv) at the same time; wait for all; exit naming a failed one.

    Returns per stage its wall time and peak RSS (MiB, sampled with psutil every 0.2 s). Each stage's output
    goes to ``log_dir/NAME.log``."""
    import psutil

    procs, peaks, walls, handles = {}, dict.fromkeys(stages, 0), {}, []
    t0 = time.perf_counter()
    for name, argv in stages.items():
        fh = (log_dir / f"{name}.log").open("w")
        handles.append(fh)
        procs[name] = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    while len(walls) < len(procs):
        for name, proc in procs.items():
            if name in walls:
                continue
            if proc.poll() is not None:
                walls[name] = time.perf_counter() - t0
                continue
            try:
                peaks[name] = max(peaks[name], psutil.Process(proc.pid).memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.2)
    for fh in handles:
        fh.close()
    for name, proc in procs.items():
        if proc.returncode != 0:
            log = log_dir / f"{name}.log"
            sys.exit(f"{name} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    out = {n: {"wall_s": round(walls[n], 1), "peak_rss_mib": round(peaks[n] / 2**20, 1)} for n in stages}
    for name, s in out.items():
        print(f"  {name:<14} {s['wall_s']:8.1f} s   peak RSS {s['peak_rss_mib']:7.0f} MiB", flush=True)
    return out


def run_stage(name: str, args: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> dict[str, float]:
    """Run ``medseg ARGS`` alone (see ``run_stages``)."""
    return run_stages({name: [*MEDSEG, *args]}, env, cwd, log_dir)[name]


def medseg_train_argv(
    preset: str, manifest: Path, run_dir: Path, db: Path, threads: int, minutes: float, overrides: list[str]
) -> list[str]:
    """``medseg train PRESET`` into ``run_dir`` with its own SQLite MLflow store ``db``, ``threads`` threads and a
    ``minutes`` budget, ``overrides`` last."""
    return [
        *MEDSEG,
        "train",
        preset,
        f"data.manifest={manifest}",
        f"train.output_dir={run_dir.parent}",
        f"train.run_name={run_dir.name}",
        f"tracking.uri=sqlite:///{db}",
        f"train.num_threads={threads}",
        f"train.max_minutes={minutes}",
        *overrides,
    ]


def seed_run_dirs(work: Path, seeds: int) -> list[Path]:
    """The run folders of the ``seeds`` members of a seed ensemble trained under ``work``."""
    return [work / "runs" / f"bench_seed{k}" for k in range(seeds)]


def train_beside_plain_and_score(
    preset: str,
    manifest: Path,
    work: Path,
    plain: list[str],
    split: str,
    minutes: float,
    overrides: list[str],
    env: dict[str, str],
    logs: Path,
    threads: int = 1,
    one_after_other: bool = False,
    seeds: int = 1,
) -> dict[str, dict]:
    """``medseg train PRESET`` (``threads`` threads, ``minutes``) and the ``plain`` baseline command side by side
    (or, with ``one_after_other``, medseg first, then the baseline: each then has the whole machine for its
    budget), then ``medseg predict`` and ``medseg evaluate`` of ``split``: run in ``WORK/runs/bench``, masks in
    ``WORK/predictions``. Returns the stages' wall times and peak memory (``train`` and ``plain_baseline``
    as measured, side by side or alone).

    ``seeds`` > 1: medseg's budget is split into that many trainings of seeds 0, 1, ... one after the other
    (``minutes / seeds`` each, in ``WORK/runs/bench_seedK``), joined by ``medseg ensemble`` into ``WORK/runs/bench``
    (mean softmax): the whole recipe stays inside ``minutes``."""
    if seeds > 1 and not one_after_other:
        sys.exit("seeds > 1 trains the members one after the other: use it with one_after_other")
    run_dir, preds = work / "runs" / "bench", work / "predictions"
    db = work / "mlflow.db"
    if seeds <= 1:
        train_steps = [{"train": medseg_train_argv(preset, manifest, run_dir, db, threads, minutes, overrides)}]
    else:
        members = seed_run_dirs(work, seeds)
        train_steps = [
            {
                f"train_seed{k}": medseg_train_argv(
                    preset, manifest, m, db, threads, minutes / seeds, [*overrides, f"train.seed={k}"]
                )
            }
            for k, m in enumerate(members)
        ]
        train_steps.append({"ensemble": [*MEDSEG, "ensemble", *map(str, members), "--output", str(run_dir)]})
    stages: dict[str, dict] = {}
    if one_after_other:
        for step in train_steps:
            stages.update(run_stages(step, env, REPO, logs))
        stages.update(run_stages({"plain_baseline": plain}, env, REPO, logs))
    else:
        stages.update(run_stages({**train_steps[0], "plain_baseline": plain}, env, REPO, logs))
    stages.update(predict_and_evaluate(run_dir, manifest, split, preds, env, logs))
    return stages


def predict_and_evaluate(
    model: Path,
    manifest: Path,
    split: str,
    preds: Path,
    env: dict[str, str],
    logs: Path,
    tag: str = "",
    predict_options: tuple[str, ...] = (),
) -> dict[str, dict]:
    """``medseg predict`` of ``split`` with ``model`` into ``preds`` (``predict_options`` appended, e.g.
    ``("--set", "inference.tta_mirror=false")``), then ``medseg evaluate`` of it: stages ``predict{tag}`` and
    ``evaluate{tag}`` with their wall times and peak memory."""
    predict = ["predict", "--model", str(model), "--input", str(manifest), "--split", split, "--output", str(preds)]
    return {
        f"predict{tag}": run_stage(f"predict{tag}", [*predict, *predict_options], env, REPO, logs),
        f"evaluate{tag}": run_stage(
            f"evaluate{tag}",
            ["evaluate", "--pred", str(preds), "--manifest", str(manifest), "--split", split],
            env,
            REPO,
            logs,
        ),
    }


def splits_of(manifest: Path) -> dict[str, list[str]]:
    """Case ids per split of a manifest file."""
    doc = json.loads(manifest.read_text())
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for e in doc["training"]:
        out[e["split"]].append(e["id"])
    return out


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
