"""CamVid end to end through the real CLI beside a plain PyTorch + MONAI loop of the same network and budget.

    .venv/bin/python benchmarks/camvid.py --workdir /tmp/camvid_bench

1. ``medseg data import-images ../shared/data/camvid --format camvid --void 11 --classes
   data_manifests/camvid_classes.txt``: 147 train / 101 val images (the folder's own split). The class list is
   checked against the dataset's own: ``label_colours`` in ``source_docs/test_segmentation_camvid.py`` (its
   PROVENANCE.md says so). Void (11) is stored as 255: neither a network output nor scored.
2. ``medseg data plan`` (patch size, median-frequency class weights; printed).
3. At the same time, one OpenMP thread each (the machine's two cores, one per contender, so both get the same
   compute for the same wall time): ``medseg train camvid_unet2d`` (its ``train.max_minutes``) and
   ``benchmarks/plain_camvid.py --minutes`` the same, with the preset's network and the plain loop's own data
   (random 256 x 256 crops of the full-resolution images, 8 per step, flips: the loop the issue's user wrote).
4. ``medseg predict --split val`` and ``medseg evaluate --split val``.

Prints per-class IoU, mIoU over the 11 classes and pixel accuracy of both, iterations and seconds per
iteration, wall times and peak memory; JSON in ``WORKDIR/benchmark.json``. The val split is where both are
scored (CamVid's test split is not in the folder); neither picks an epoch on it (the preset validates at the end).
Exit status 1 if medseg's mIoU is not above the plain loop's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from pathlib import Path

import yaml
from cli_stages import REPO, child_env, run_stage, train_beside_plain_and_score, write_json

DATA = REPO.parent / "shared" / "data" / "camvid"
CLASSES = REPO / "data_manifests" / "camvid_classes.txt"


def dataset_class_list(data: Path) -> list[str]:
    """The class order of SegNet's own script (``label_colours = np.array([Sky, Building, ...])``)."""
    script = (data / "source_docs" / "test_segmentation_camvid.py").read_text()
    m = re.search(r"label_colours\s*=\s*np\.array\(\[([^\]]*)\]\)", script)
    if m is None:
        sys.exit(f"{data}: no label_colours list in source_docs/test_segmentation_camvid.py")
    return [n.strip() for n in m.group(1).split(",")]


def committed_classes() -> list[str]:
    """``data_manifests/camvid_classes.txt`` without its comment lines."""
    return [ln.strip() for ln in CLASSES.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def preset(name: str) -> dict:
    """The preset's YAML (for the settings the plain loop must share)."""
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


def plain_argv(cfg: dict, manifest: Path, minutes: float, out: Path, seed: int) -> list[str]:
    """``plain_camvid.py`` with the preset's network; its own crops (256 x 256 at full resolution, 8 per step)."""
    p = cfg["model"]["params"]
    return [
        sys.executable,
        str(REPO / "benchmarks" / "plain_camvid.py"),
        "--manifest",
        str(manifest),
        "--minutes",
        str(minutes),
        "--threads",
        "1",
        "--seed",
        str(seed),
        "--output",
        str(out),
        "--channels",
        ",".join(map(str, p["channels"])),
        "--strides",
        ",".join(map(str, p["strides"])),
        "--res-units",
        str(p.get("num_res_units", 0)),
        "--norm",
        str(p.get("norm", "instance")),
    ]


def medseg_result(work: Path, run_dir: Path, cfg: dict, n_train: int) -> dict:
    """mIoU, per-class IoU and pixel accuracy of ``medseg evaluate``; iterations from the run's history."""
    summary = json.loads((work / "predictions" / "evaluation" / "summary.json").read_text())
    with (run_dir / "history.csv").open() as fh:
        history = list(csv.DictReader(fh))
    steps = math.ceil(n_train / cfg["data"]["batch_size"]) * len(history)
    train_s = sum(float(r["time_epoch_s"]) for r in history)
    pooled = summary["pooled"]
    return {
        "miou": pooled["miou"],
        "pixel_accuracy": pooled["pixel_accuracy"],
        "iou": pooled["iou"],
        "iterations": steps,
        "epochs": len(history),
        "s_per_iter": train_s / max(steps, 1),
    }


def print_table(ms: dict, plain: dict) -> None:
    """Per-class IoU side by side, then the summary lines."""
    print("\nval split, 101 images; IoU per class (medseg | plain)")
    for name, v in ms["iou"].items():
        print(f"  {name:<11} {v:6.3f} | {plain['iou'].get(name) or float('nan'):6.3f}")
    print(f"  {'mIoU':<11} {ms['miou']:6.3f} | {plain['miou']:6.3f}")
    print(f"  {'pixel acc':<11} {ms['pixel_accuracy']:6.3f} | {plain['pixel_accuracy']:6.3f}")
    print(
        f"  iterations  {ms['iterations']} ({ms['s_per_iter']:.2f} s) | {plain['iterations']} "
        f"({plain['s_per_iter']:.2f} s)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("camvid_benchmark"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--preset", default="camvid_unet2d")
    ap.add_argument("--minutes", type=float, default=None, help="budget of both (default: the preset's max_minutes)")
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE training overrides for medseg")
    a = ap.parse_args()
    work = a.workdir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = preset(a.preset)
    minutes = a.minutes or float(cfg["train"]["max_minutes"])
    env, t_start = child_env(1), time.perf_counter()
    if dataset_class_list(a.data) != committed_classes():
        sys.exit(f"{CLASSES}: differs from the dataset's own class list {dataset_class_list(a.data)}")
    manifest, run_dir = work / "camvid.json", work / "runs" / "bench"
    stages = {
        "import": run_stage(
            "import",
            [
                "data",
                "import-images",
                str(a.data),
                "--format",
                "camvid",
                "--void",
                "11",
                "--classes",
                str(CLASSES),
                "--output",
                str(manifest),
            ],
            env,
            REPO,
            logs,
        )
    }
    stages["plan"] = run_stage("plan", ["data", "plan", str(manifest)], env, REPO, logs)
    print("  " + next(ln for ln in (logs / "plan.log").read_text().splitlines() if ln.startswith("suggested")))
    plain_json = work / "plain.json"
    stages.update(
        train_beside_plain_and_score(
            a.preset,
            manifest,
            work,
            plain_argv(cfg, manifest, minutes, plain_json, int(cfg["train"].get("seed", 0))),
            "val",
            minutes,
            a.overrides,
            env,
            logs,
        )
    )
    n_train = len([e for e in json.loads(manifest.read_text())["training"] if e["split"] == "train"])
    ms = medseg_result(work, run_dir, cfg, n_train)
    pj = json.loads(plain_json.read_text())
    plain = {
        **pj["metrics"],
        "iterations": pj["timing"]["iterations"],
        "s_per_iter": pj["timing"]["seconds_per_iteration"],
    }
    print_table(ms, plain)
    won = ms["miou"] > plain["miou"]
    print(
        f"medseg {'beats' if won else 'does NOT beat'} the plain loop at {minutes:g} min each; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    write_json(
        work / "benchmark.json",
        {
            "preset": a.preset,
            "minutes": minutes,
            "overrides": a.overrides,
            "medseg": ms,
            "plain": plain,
            "stages": stages,
            "medseg_wins": won,
        },
    )
    return 0 if won else 1


if __name__ == "__main__":
    sys.exit(main())
