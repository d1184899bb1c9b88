"""The embedded demo: synthetic phantom -> train -> predict -> evaluate, on CPU in minutes."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from medseg.components import load_checked_config
from medseg.data.phantom import write_phantom
from medseg.engine.trainer import Trainer
from medseg.evaluation.report import evaluate
from medseg.evaluation.tables import print_summary
from medseg.inference.batch import run_batch
from medseg.inference.inputs import discover_inputs
from medseg.inference.model_package import load_package
from medseg.runtime.checkpoint import load_checkpoint
from medseg.tracking import resolve_tracking_uri

PRESET = "phantom_unet3d"


def run_demo(workdir: str | Path, epochs: int | None = None, cases: int = 16, tracking_uri: str | None = None) -> dict:
    """Run the whole pipeline in ``workdir`` and print where to look; returns the evaluation summary."""
    console = Console()
    work = Path(workdir).resolve()
    t0 = time.time()
    console.rule("[bold]medseg demo")
    manifest = write_phantom(work / "phantom", cases=cases, seed=0)
    if manifest.path is None:  # write_phantom saves the manifest, so it always has a file
        raise RuntimeError("the phantom manifest has no file path")
    manifest_path = manifest.path
    console.print(f"phantom: {len(manifest.cases)} cases ({len(manifest.split('val'))} val) -> {manifest.path}")
    uri = resolve_tracking_uri(tracking_uri, None, work)
    overrides = [f"data.manifest={manifest.path}", f"train.output_dir={work / 'runs'}", "train.run_name=demo"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    cfg = load_checked_config(PRESET, overrides)
    run_dir = work / "runs" / "demo"
    last = run_dir / "checkpoints" / "last.pt"
    done_epochs = int(load_checkpoint(last)["epoch"]) + 1 if last.is_file() else 0
    if done_epochs >= cfg.train.epochs and (run_dir / "model").is_dir():
        console.print(f"training already complete in {run_dir} ({done_epochs} epochs); delete it to retrain")
    else:  # a demo killed mid-training continues where it stopped
        result = Trainer(cfg, manifest, run_dir=run_dir, tracking_uri=uri, resume=done_epochs > 0).fit()
        console.print(
            f"trained {result.epochs_run} epochs; best epoch {result.best_epoch + 1} (val mean Dice {result.best_metric:.3f})"
        )
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip() if (run_dir / "mlflow_run_id.txt").is_file() else None
    package = load_package(run_dir / "model")
    pred_dir = work / "predictions"
    report = run_batch(package, discover_inputs(manifest_path, split="val"), pred_dir, progress=False)
    console.print(f"predicted {len(report.done)} val scans in their original geometry -> {pred_dir}")
    summary = evaluate(pred_dir, manifest_path, work / "evaluation", split="val")
    print_summary(summary)
    dice = [v["dice"]["mean"] for v in summary["organs"].values()]
    console.print(
        f"mean Dice over organs: [bold]{sum(dice) / len(dice):.3f}[/bold]   (wall time {time.time() - t0:.0f} s)"
    )
    console.print(f"per-case metrics: {work / 'evaluation' / 'metrics_per_case.csv'}")
    console.print(
        f"MLflow run {run_id}: open the UI with\n  mlflow ui --backend-store-uri {uri} --port 5000\n"
        f"then http://127.0.0.1:5000 -> experiment '{cfg.tracking.experiment}' -> run 'demo'"
    )
    return summary
