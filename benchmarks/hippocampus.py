"""Reproduce the hippocampus figure end to end with the real CLI: import -> plan -> train -> predict -> evaluate.

    .venv/bin/python benchmarks/hippocampus.py --workdir /tmp/hippo_bench

1. ``medseg data import-msd`` of ``../shared/data/hippocampus`` (MSD Task04, 220 labelled cases) with the
   committed split (``--val-fraction 0.1 --test-fraction 0.2 --seed 0``: 154 train / 22 val / 44 test);
   the split is checked against ``data_manifests/hippocampus.json``.
2. ``medseg data plan`` on the training split (the suggested overrides are printed).
3. ``medseg train hippocampus_unet3d`` (its own ``train.max_minutes`` time budget; the best epoch is
   chosen on the val split), MLflow into a SQLite store in the work folder.
4. ``medseg predict --split test`` and ``medseg evaluate --split test``: the 44 test cases are never
   trained on nor used to choose the model.

Prints the per-structure Dice / IoU / HD95 (mean and 95% bootstrap CI over the test cases), the mean
Dice over both structures against ``--target``, epochs done, the wall time of each stage, and the peak
resident memory of each stage's process (psutil, sampled every 0.2 s), and the mean Dice of the same model
without the preset's mirror TTA (a second prediction, not counted in the total). A JSON
copy goes to ``WORKDIR/benchmark.json``. Exit status 1 if the mean Dice is below ``--target``.

``--seeds N`` (N > 1) trains N seeds of the preset at the same time, one thread each, in the same wall-clock budget,
joins them with ``medseg ensemble`` (mean softmax) and scores the ensemble; the first seed alone is scored beside it.

``--threads N`` sets ``OMP_NUM_THREADS`` for the child processes: on a machine whose cores are shared
with other jobs, one intra-op thread per process avoids the oversubscription slowdown of PyTorch's
OpenMP pool (several times slower per step when its threads wait on descheduled siblings).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from cli_stages import (
    MEDSEG,
    REPO,
    child_env,
    predict_and_evaluate,
    run_stage,
    run_stages,
    seed_run_dirs,
    splits_of,
    write_json,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
COMMITTED = REPO / "data_manifests" / "hippocampus.json"
SPLIT_ARGS = ["--val-fraction", "0.1", "--test-fraction", "0.2", "--seed", "0"]


def mean_dice(preds: Path) -> tuple[dict, float]:
    """``medseg evaluate``'s summary of a prediction folder and its mean Dice over the structures."""
    summary = json.loads((preds / "evaluation" / "summary.json").read_text())
    organs = summary["organs"]
    return summary, sum(o["dice"]["mean"] for o in organs.values()) / len(organs)


def train_models(a: argparse.Namespace, manifest: Path, work: Path, env: dict[str, str], logs: Path,
                 stages: dict) -> tuple[Path, Path, bool]:
    """Train the preset (or ``--seeds`` of it at once, one thread each, then ``medseg ensemble`` them).

    Returns (the model to predict with, the first run's folder, whether the model is an ensemble)."""
    common = [f"data.manifest={manifest}", f"train.output_dir={work / 'runs'}"]
    if a.seeds <= 1:
        stages["train"] = run_stage("train", ["train", a.preset, *common, "train.run_name=bench",
                                              f"tracking.uri=sqlite:///{work / 'mlflow.db'}", *a.overrides], env, REPO, logs)
        return work / "runs" / "bench", work / "runs" / "bench", False
    runs = seed_run_dirs(work, a.seeds)
    # One SQLite store per seed keeps each seed's experiment apart (one shared store works too since medseg sets a new
    # SQLite store up under a file lock: medseg.io.store_lock).
    argv = {f"train_seed{k}": [*MEDSEG, "train", a.preset, *common, f"train.run_name={r.name}", f"train.seed={k}",
                                "train.num_threads=1", f"tracking.uri=sqlite:///{work / f'mlflow_seed{k}.db'}",
                                *a.overrides] for k, r in enumerate(runs)}
    trained = run_stages(argv, child_env(1), REPO, logs)
    stages["train"] = {"wall_s": max(t["wall_s"] for t in trained.values()),
                       "peak_rss_mib": sum(t["peak_rss_mib"] for t in trained.values())}
    ensemble = work / "ensemble"
    stages["ensemble"] = run_stage("ensemble", ["ensemble", *map(str, runs), "--output", str(ensemble)], env, REPO, logs)
    return ensemble, runs[0], True


def score_single(run_dir: Path, manifest: Path, work: Path, env: dict[str, str], logs: Path) -> float:
    """Mean test Dice of one ensemble member alone (the ensemble's gain), not counted in the total."""
    preds = work / "predictions_first_seed"
    predict_and_evaluate(run_dir, manifest, "test", preds, env, logs, tag="_first_seed")
    return mean_dice(preds)[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("hippocampus_benchmark"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD Task04 folder with dataset.json")
    ap.add_argument("--preset", default="hippocampus_unet3d")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the child processes")
    ap.add_argument("--target", type=float, default=0.89, help="mean test Dice over both structures to reach")
    ap.add_argument("--seeds", type=int, default=1,
                    help="N > 1: train N seeds at once (one thread each, the same budget) and predict with their "
                         "`medseg ensemble`; the first seed alone is scored too")
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE overrides for training (e.g. train.max_minutes=5)")
    a = ap.parse_args()

    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = child_env(a.threads)
    manifest, preds = work / "hippocampus.json", work / "predictions"
    stages: dict[str, dict[str, float]] = {}
    t_start = time.perf_counter()
    print(f"hippocampus benchmark in {work} (preset {a.preset}, threads {a.threads or 'default'})", flush=True)

    stages["import"] = run_stage("import", ["data", "import-msd", str(a.data), "--output", str(manifest), *SPLIT_ARGS], env, REPO, logs)
    split = splits_of(manifest)
    if COMMITTED.is_file() and splits_of(COMMITTED) != split:
        sys.exit(f"{manifest}: split differs from the committed {COMMITTED}")
    print(f"  split: {len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test (held out)")

    stages["plan"] = run_stage("plan", ["data", "plan", str(manifest)], env, REPO, logs)
    print("  " + next(ln for ln in (logs / "plan.log").read_text().splitlines() if ln.startswith("suggested")))

    model, run_dir, is_ensemble = train_models(a, manifest, work, env, logs, stages)
    stages.update(predict_and_evaluate(model, manifest, "test", preds, env, logs))
    total = time.perf_counter() - t_start
    # Ablation at no training cost: the same model without the preset's mirror TTA (not counted in the total).
    plain_preds = work / "predictions_no_tta"
    predict_and_evaluate(model, manifest, "test", plain_preds, env, logs, tag="_no_tta",
                         predict_options=("--set", "inference.tta_mirror=false"))
    no_tta = mean_dice(plain_preds)[1]
    first_seed = score_single(run_dir, manifest, work, env, logs) if is_ensemble else None

    with (run_dir / "history.csv").open() as fh:
        history = list(csv.DictReader(fh))
    meta = json.loads((run_dir / "model" / "metadata.json").read_text())
    summary, mean = mean_dice(preds)
    organs = summary["organs"]

    print(f"\nheld-out TEST split: {summary['n_cases']} cases (mean [95% bootstrap CI])")
    print(f"{'structure':<11} {'Dice':>22} {'IoU':>22} {'HD95 (mm)':>22}")
    for name, o in organs.items():
        cells = [f"{o[m]['mean']:.3f} [{o[m]['ci_low']:.3f}, {o[m]['ci_high']:.3f}]" for m in ("dice", "iou", "hd95")]
        print(f"{name:<11} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22}")
    ok = mean >= a.target
    print(f"mean Dice over structures: {mean:.4f} (target {a.target}: {'reached' if ok else 'NOT reached'}); "
          f"without mirror TTA {no_tta:.4f}")
    print(f"epochs done: {len(history)} (best epoch {int(meta.get('epoch', -1)) + 1}, "
          f"val mean Dice {meta.get('val_metrics', {}).get('val_dice_mean', float('nan')):.4f})")
    if first_seed is not None:
        print(f"ensemble of {a.seeds} seeds; the first seed alone: mean Dice {first_seed:.4f}")
    print(f"wall time: train {stages['train']['wall_s']:.0f} s, predict {stages['predict']['wall_s']:.0f} s, "
          f"evaluate {stages['evaluate']['wall_s']:.0f} s, total {total:.0f} s")
    print(f"peak memory: train {stages['train']['peak_rss_mib']:.0f} MiB, predict {stages['predict']['peak_rss_mib']:.0f} MiB")

    result = {"preset": a.preset, "threads": a.threads, "overrides": a.overrides,
              "split": {k: len(v) for k, v in split.items()},
              "test": {n: {m: organs[n][m] for m in ("dice", "iou", "hd95")} for n in organs}, "mean_dice": mean,
              "mean_dice_without_tta": no_tta, "seeds": a.seeds, "mean_dice_first_seed_alone": first_seed,
              "target": a.target, "reached": ok, "epochs_done": len(history), "best_epoch": meta.get("epoch"),
              "stages": stages, "total_wall_s": round(total, 1)}
    write_json(work / "benchmark.json", result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
