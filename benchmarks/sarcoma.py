"""Soft-tissue sarcoma CT end to end through the real CLI beside a plain MONAI script of the same budget.

    .venv/bin/python benchmarks/sarcoma.py --workdir /tmp/sarcoma_bench

1. ``medseg data import-dicom ../shared/data/ibsi_sts_ct --labels rtstruct --roi-map
   data_manifests/sarcoma_roi_map.yaml --val-fraction 0.2 --test-fraction 0.2 --seed 0``: the 18 CT series with
   their RTSTRUCT GTV rasterised (NIfTI beside the manifest), split 10 train / 4 val / 4 test.
2. ``medseg data plan`` (printed).
3. At the same time, one OpenMP thread each (one core per contender: the same compute for the same wall time), or
   with ``--one-after-other --threads 2`` each alone on the machine in turn (the issue's "20 CPU minutes" on 2 cores):
   ``medseg train sarcoma_ct_unet3d`` (its ``train.max_minutes``; best epoch chosen on the 4 val cases) and
   ``benchmarks/plain_sarcoma.py --minutes`` the same (MONAI tutorial style: same network and patches per step, its
   own 1.5 x 1.5 x 3.27 mm grid and 96 x 96 x 32 patches; trains on the same 10 cases, scores its last weights).
4. ``medseg predict --split test`` and ``medseg evaluate --split test`` (the scan's own grid).

Prints per-case GTV Dice and HD95 (mm) of both on the 4 held-out cases, means and medians, iterations, wall times
and peak memory; JSON in ``WORKDIR/benchmark.json``. Exit status 1 unless medseg's mean Dice is >= 0.05 above the
plain script's and its mean HD95 at most half of it (the goal of the benchmark).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from cli_stages import (
    REPO,
    child_env,
    predict_and_evaluate,
    run_stage,
    seed_run_dirs,
    splits_of,
    train_beside_plain_and_score,
    write_json,
)

DATA = REPO.parent / "shared" / "data" / "ibsi_sts_ct"
ROI_MAP = REPO / "data_manifests" / "sarcoma_roi_map.yaml"
SPLIT_ARGS = ["--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "0"]


def plain_argv(cfg: dict, manifest: Path, minutes: float, out: Path, threads: int = 1) -> list[str]:
    """``plain_sarcoma.py`` with the preset's network and volumes per step; its own grid and patch (1.5 x 1.5 x
    3.27 mm, 96 x 96 x 32: the script's defaults, what a tutorial user picks for these crops)."""
    p, d = cfg["model"]["params"], cfg["data"]
    return [
        sys.executable,
        str(REPO / "benchmarks" / "plain_sarcoma.py"),
        "--manifest",
        str(manifest),
        "--minutes",
        str(minutes),
        "--threads",
        str(threads),
        "--seed",
        str(cfg["train"].get("seed", 0)),
        "--output",
        str(out),
        "--batch",
        str(d["batch_size"]),
        "--channels",
        ",".join(map(str, p["channels"])),
        "--strides",
        ",".join(map(str, p["strides"])),
        "--res-units",
        str(p.get("num_res_units", 0)),
    ]


def medseg_cases(preds: Path) -> list[dict]:
    """Per-case Dice / HD95 of the tumour from ``medseg evaluate``'s ``metrics_per_case.csv``."""
    with (preds / "evaluation" / "metrics_per_case.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["organ"] == "tumour"]
    return [{"id": r["case"], "dice": float(r["dice"]), "hd95_mm": float(r["hd95"])} for r in rows]


def stats(cases: list[dict]) -> dict:
    """Mean / median Dice and HD95 (NaN HD95 left out)."""
    d = [c["dice"] for c in cases]
    h = [c["hd95_mm"] for c in cases if c["hd95_mm"] is not None and c["hd95_mm"] == c["hd95_mm"]]  # None/NaN: empty
    return {
        "dice_mean": statistics.fmean(d),
        "dice_median": statistics.median(d),
        "hd95_mean_mm": statistics.fmean(h) if h else float("nan"),
        "hd95_median_mm": statistics.median(h) if h else float("nan"),
        "hd95_nan_cases": len(d) - len(h),
    }


def print_table(ms_cases: list[dict], plain_cases: list[dict], ms: dict, pl: dict) -> None:
    """Per case side by side, then means and medians."""
    plain_by_id = {c["id"]: c for c in plain_cases}
    print("\nheld-out test cases: GTV Dice and HD95 mm (medseg | plain)")
    for c in ms_cases:
        p = plain_by_id.get(c["id"], {"dice": float("nan"), "hd95_mm": float("nan")})
        hd = [float("nan") if x is None else x for x in (c["hd95_mm"], p["hd95_mm"])]  # empty prediction: no HD95
        print(f"  {c['id']:<20} {c['dice']:.3f} | {p['dice']:.3f}    {hd[0]:7.2f} | {hd[1]:7.2f}")
    for k in ("dice_mean", "dice_median", "hd95_mean_mm", "hd95_median_mm"):
        print(f"  {k:<20} {ms[k]:7.3f} | {pl[k]:7.3f}")


def epochs_of(run_dir: Path) -> int:
    """Epochs a training run recorded (rows of its ``history.csv``)."""
    with (run_dir / "history.csv").open() as fh:
        return len(list(csv.DictReader(fh)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("sarcoma_benchmark"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--preset", default="sarcoma_ct_unet3d")
    ap.add_argument("--minutes", type=float, default=None, help="budget of both (default: the preset's max_minutes)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of each contender (default 1)")
    ap.add_argument(
        "--one-after-other",
        action="store_true",
        help="train medseg, then the plain script (each alone on the machine; default: side by side)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="K > 1: medseg trains K seeds in turn (budget / K each, needs --one-after-other) and predicts with their "
        "`medseg ensemble`; the first seed alone is scored beside it",
    )
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE training overrides for medseg")
    a = ap.parse_args()
    if a.seeds > 1 and not a.one_after_other:
        ap.error("--seeds K > 1 trains the members in turn: add --one-after-other")
    work = a.workdir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((REPO / "configs" / f"{a.preset}.yaml").read_text())
    minutes = a.minutes or float(cfg["train"]["max_minutes"])
    env, t_start = child_env(a.threads), time.perf_counter()
    manifest, preds, run_dir = work / "sarcoma_ct.json", work / "predictions", work / "runs" / "bench"
    stages = {
        "import": run_stage(
            "import",
            [
                "data",
                "import-dicom",
                str(a.data),
                "--labels",
                "rtstruct",
                "--roi-map",
                str(ROI_MAP),
                "--output",
                str(manifest),
                *SPLIT_ARGS,
            ],
            env,
            REPO,
            logs,
        )
    }
    split = splits_of(manifest)
    print(f"  split: {len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test (held out)")
    stages["plan"] = run_stage("plan", ["data", "plan", str(manifest)], env, REPO, logs)
    plain_json = work / "plain.json"
    stages.update(
        train_beside_plain_and_score(
            a.preset,
            manifest,
            work,
            plain_argv(cfg, manifest, minutes, plain_json, a.threads),
            "test",
            minutes,
            a.overrides,
            env,
            logs,
            threads=a.threads,
            one_after_other=a.one_after_other,
            seeds=a.seeds,
        )
    )
    ms_cases, pj = medseg_cases(preds), json.loads(plain_json.read_text())
    ms, pl = stats(ms_cases), stats(pj["cases"])
    print_table(ms_cases, pj["cases"], ms, pl)
    members = seed_run_dirs(work, a.seeds) if a.seeds > 1 else [run_dir]
    epochs = [epochs_of(m) for m in members]
    first_seed = None
    if a.seeds > 1:  # the ensemble's gain: its first member alone, scored the same way
        alone = work / "predictions_seed0"
        predict_and_evaluate(members[0], manifest, "test", alone, env, logs, tag="_seed0")
        first_seed = stats(medseg_cases(alone))
        print(f"  first seed alone: Dice {first_seed['dice_mean']:.3f}, HD95 {first_seed['hd95_mean_mm']:.1f} mm")
    won = ms["dice_mean"] >= pl["dice_mean"] + 0.05 and ms["hd95_mean_mm"] <= 0.5 * pl["hd95_mean_mm"]
    print(
        f"medseg {epochs} epochs | plain {pj['training']['iterations']} iterations; goal "
        f"{'met' if won else 'NOT met'} at {minutes:g} min each; total {time.perf_counter() - t_start:.0f} s"
    )
    write_json(
        work / "benchmark.json",
        {
            "preset": a.preset,
            "minutes": minutes,
            "threads": a.threads,
            "one_after_other": a.one_after_other,
            "overrides": a.overrides,
            "split": {k: len(v) for k, v in split.items()},
            "medseg": ms,
            "medseg_cases": ms_cases,
            "seeds": a.seeds,
            "medseg_epochs": epochs if a.seeds > 1 else epochs[0],
            "medseg_first_seed_alone": first_seed,
            "plain": pl,
            "plain_cases": pj["cases"],
            "plain_training": pj["training"],
            "stages": stages,
            "goal_met": won,
        },
    )
    return 0 if won else 1


if __name__ == "__main__":
    sys.exit(main())
