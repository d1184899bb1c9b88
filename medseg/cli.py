"""The ``medseg`` command line (thin: parse, build from config, call the engine).

User errors (bad files, bad config) print one line ``medseg: error: <file>: <cause>`` and exit 1;
usage errors exit 2; a batch with failed cases exits 3. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from medseg.errors import MedsegError

try:  # recent typer vendors its own click: its usage errors are not click.ClickException
    from typer._click.exceptions import ClickException as _VendoredClickException
except ImportError:  # pragma: no cover - typer with a plain click dependency
    _VendoredClickException = click.ClickException

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Medical image segmentation: train, predict, evaluate (MONAI + MLflow).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration presets.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: phantom, MSD and 2D image import, validation.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

_STATE = {"debug": False}


def _setup_logging(verbose: bool = True) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)], force=True)
    for noisy in ("mlflow", "alembic", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _STATE["debug"] = debug
    _setup_logging()


# ---- config -------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(preset: str, overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides")] = None) -> None:
    """Print the resolved config of PRESET (a name in configs/ or a YAML path) with overrides applied."""
    from medseg.config import load_config

    typer.echo(load_config(preset, overrides or []).to_yaml(), nl=False)


@config_app.command("list")
def config_list() -> None:
    """List the presets in configs/."""
    from medseg.config import CONFIG_DIR

    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        typer.echo(p.stem)


# ---- data ---------------------------------------------------------------------------------------
@data_app.command("phantom")
def data_phantom(out: Path, cases: Annotated[int, typer.Option(min=2)] = 12, seed: int = 0,
                 val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.25) -> None:
    """Write the deterministic synthetic multi-organ CT phantom (NIfTI + dataset.json manifest) to OUT."""
    from medseg.data.phantom import write_phantom

    m = write_phantom(out, cases=cases, seed=seed, val_fraction=val_fraction)
    typer.echo(f"wrote {len(m.cases)} cases and manifest {m.path}")


@data_app.command("import-msd")
def data_import_msd(msd_dir: Path, out: Annotated[Optional[Path], typer.Option(help="manifest path")] = None,
                    val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0) -> None:
    """Make a manifest from an MSD / nnU-Net dataset.json folder (data stays where it is)."""
    from medseg.io.manifest import import_msd

    target = out or Path("data_manifests") / f"{msd_dir.resolve().name.lower()}.json"
    m = import_msd(msd_dir, target, val_fraction, test_fraction, seed)
    counts = {s: len(m.split(s)) for s in ("train", "val", "test")}
    typer.echo(f"wrote {m.path}: {len(m.cases)} cases {counts}, labels {m.labels}")


@data_app.command("import-images")
def data_import_images(
    src: Annotated[Path, typer.Argument(help="dataset folder (COCO: also an instances_*.json file)")],
    format: Annotated[str, typer.Option("--format", help="voc, camvid, labelme or coco")],
    out: Annotated[Optional[Path], typer.Option(help="manifest path (default data_manifests/<src name>.json)")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="share of validation cases where the source has no split")] = 0.1,
    seed: int = 0,
    classes: Annotated[Optional[Path], typer.Option(help="text file, one class name per line, in index order")] = None,
    images: Annotated[Optional[Path], typer.Option(help="camvid/coco: images folder (relative to SRC)")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="camvid: labels folder (relative to SRC)")] = None,
) -> None:
    """Make a manifest from a 2D image dataset (VOC, CamVid-like, LabelMe, COCO); converted labels go beside it."""
    import inspect

    from medseg.io.images2d import IMPORTERS

    try:
        importer = IMPORTERS.get(format)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0]), param_hint="--format") from None
    options = {"classes": _read_class_names(classes) if classes else None, "images": images, "labels": labels}
    accepted = inspect.signature(importer).parameters
    for key, value in options.items():
        if value is not None and key not in accepted:
            raise typer.BadParameter(f"--{key} does not apply to --format {format}", param_hint=f"--{key}")
    target = out or Path("data_manifests") / f"{src.resolve().name.lower()}.json"
    m = importer(src, target, val_fraction=val_fraction, seed=seed,
                 **{k: v for k, v in options.items() if v is not None})
    counts = {s: len(m.split(s)) for s in ("train", "val", "test")}
    typer.echo(f"wrote {m.path}: {len(m.cases)} images {counts}, {len(m.labels)} classes")


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise MedsegError(f"{path}: class list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@data_app.command("validate")
def data_validate(manifest: Path) -> None:
    """Check every case of a manifest (files, shapes, affines, label values, NaN)."""
    from medseg.data.validation import validate_case
    from medseg.io.manifest import load_manifest

    m = load_manifest(manifest)
    if m.cases and m.cases[0].image[0].lower().endswith((".png", ".jpg", ".jpeg")):  # 2D images (void 255 allowed)
        from medseg.data.natural_images import validate_image_cases

        validate_image_cases(m, [c for c in m.cases if c.label], ignore_index=255)
    else:
        for c in m.cases:
            validate_case(m, c)
    typer.echo(f"{manifest}: {len(m.cases)} cases ok (fingerprint {m.fingerprint()})")


@data_app.command("plan")
def data_plan(manifest: Path, out: Annotated[Optional[Path], typer.Option(help="plans JSON (default MANIFEST_STEM.plans.json beside it)")] = None,
              split: Annotated[Optional[list[str]], typer.Option(help="split(s) to plan from (repeatable)")] = None,
              max_cases: Annotated[Optional[int], typer.Option(min=1, help="only the first N cases (quick look)")] = None,
              max_patch_voxels: Annotated[Optional[int], typer.Option(min=64, help="patch voxel budget (default 96*96*64; 2D images: pixels, default 256*256)")] = None,
              ignore_index: Annotated[Optional[int], typer.Option(min=0, max=255, help="2D images only: label value of void pixels (default 255)")] = None) -> None:
    """Fingerprint the training cases (spacing, shape, intensities, classes) and print suggested overrides.
    For 2D images: sizes, RGB statistics, void share, class frequencies and median-frequency class weights."""
    from medseg.io.atomic import write_json_atomic
    from medseg.io.manifest import load_manifest
    from medseg.planning import DEFAULT_MAX_PATCH_VOXELS, plan_dataset, plans_path_for
    from medseg.planning_images import DEFAULT_MAX_PATCH_PIXELS, VOID, describe, plan_images

    target = out or plans_path_for(manifest)
    m = load_manifest(manifest)
    if m.holds_images:
        doc = plan_images(m, tuple(split or ["train"]), max_cases, max_patch_voxels or DEFAULT_MAX_PATCH_PIXELS,
                          VOID if ignore_index is None else ignore_index)
        write_json_atomic(target, doc)
        typer.echo(describe(doc, target))
    else:
        if ignore_index is not None:
            raise MedsegError("--ignore-index applies to 2D image manifests only")
        doc = plan_dataset(manifest, target, tuple(split or ["train"]), max_cases, max_patch_voxels or DEFAULT_MAX_PATCH_VOXELS)
        p = doc["plans"]
        typer.echo(f"wrote {target}: {doc['fingerprint']['n_cases']} cases, median shape {p['median_shape_at_target']}, "
                   f"median spacing {p['median_spacing']}, {p['network_downsamplings']} downsamplings")
    typer.echo("suggested overrides: " + " ".join(doc["overrides"]))


# ---- train / predict / evaluate -----------------------------------------------------------------
@app.command()
def train(
    preset: Annotated[Optional[str], typer.Argument(help="preset name or YAML path")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides, e.g. train.epochs=5")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite mlflow.db here)")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="resume the run in this folder (same MLflow run)")] = None,
) -> None:
    """Train a model from a preset; checkpoints every epoch; the best model is packaged in RUN/model."""
    from medseg.config import config_from_yaml_text, load_config
    from medseg.engine.trainer import Trainer
    from medseg.io.manifest import load_manifest

    if resume is not None:
        cfg_file = resume / "config.yaml"
        if not cfg_file.is_file():
            raise MedsegError(f"{resume}: not a run folder (no config.yaml)")
        cfg = config_from_yaml_text(cfg_file.read_text(), str(cfg_file))
        if preset or overrides:
            raise MedsegError("--resume takes the run's own config; do not pass a preset or overrides")
    else:
        if preset is None:
            raise MedsegError("train needs a PRESET (see `medseg config list`) or --resume RUN_DIR")
        cfg = load_config(preset, overrides or [])
    manifest = load_manifest(cfg.data.manifest)
    result = Trainer(cfg, manifest, run_dir=resume, tracking_uri=tracking_uri, resume=resume is not None).fit()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    typer.echo(f"run folder: {result.run_dir}")
    typer.echo(f"best epoch {result.best_epoch + 1}: val mean Dice {result.best_metric:.4f}")
    if result.run_id:
        typer.echo(f"mlflow run id: {result.run_id}")


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="model package folder, run folder, or models:/NAME/VERSION, runs:/ID/model")],
    input: Annotated[Path, typer.Option("--input", help="NIfTI file, folder of NIfTI files, manifest .json, folder of DICOM series, or PNG/JPG image(s) for 2D image models")],
    output: Annotated[Path, typer.Option(help="output folder")],
    split: Annotated[Optional[str], typer.Option(help="with a manifest: only this split")] = None,
    device: str = "auto",
    resume: Annotated[bool, typer.Option(help="skip cases whose outputs are complete")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: process only shard I of N (0-based); default under torchrun: RANK/WORLD_SIZE")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="inference.KEY=VALUE override, e.g. inference.memory_bounded=true")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI for models:/ and runs:/ references and --mlflow-experiment")] = None,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="also write <id>_probs.nii.gz (softmax, uint8 steps of 1/255, classes on the last axis); 2D images: <id>_probs.npy, uint8 (C, H, W)")] = False,
    mlflow_experiment: Annotated[Optional[str], typer.Option(help="log one MLflow run per batch/shard (counts, timing; no case ids or file names)")] = None,
) -> None:
    """Segment scans or 2D images; masks (and DICOM-SEG for DICOM series) in each input's own geometry. Exit 3 if some cases failed."""
    from medseg.inference.shard import parse_shard, select_shard, shard_from_env

    try:  # checked before the heavy imports: a usage error should be quick
        shard_ix = parse_shard(shard) if shard else shard_from_env()
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shard") from None
    from medseg.inference.batch import check_probabilities_option, discover_inputs, run_batch
    from medseg.inference.model_package import load_package
    from medseg.inference.options import apply_inference_overrides

    cases = discover_inputs(input, split)
    package = apply_inference_overrides(load_package(model, tracking_uri), set_ or [])
    if save_probabilities:
        try:
            check_probabilities_option(package, cases)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--save-probabilities") from None
    if shard_ix is not None:
        cases = select_shard(cases, *shard_ix)
    report = run_batch(package, cases, output, device=device, resume=resume, progress=sys.stderr.isatty(), model_ref=model,
                       local_rank=_local_rank(), save_probabilities=save_probabilities,
                       mlflow_experiment=mlflow_experiment, tracking_uri=tracking_uri, shard=shard_ix)
    where = f" (shard {shard_ix[0]}/{shard_ix[1]})" if shard_ix else ""
    typer.echo(f"{len(report.done)} predicted, {len(report.skipped)} already done, {len(report.failed)} failed -> {output}{where}")
    if report.mlflow_run_id:
        typer.echo(f"mlflow run id: {report.mlflow_run_id}")
    for cid, err in report.failed.items():
        typer.echo(f"  failed {cid}: {err}", err=True)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _local_rank() -> Optional[int]:
    import os

    return int(os.environ["LOCAL_RANK"]) if os.environ.get("LOCAL_RANK", "").isdigit() else None


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option(help="folder of <case id>.nii.gz predictions (2D image manifests: <case id>.png)")],
    manifest: Annotated[Path, typer.Option(help="manifest with the ground truth")],
    out: Annotated[Optional[Path], typer.Option(help="output folder (default PRED/evaluation)")] = None,
    split: Annotated[Optional[str], typer.Option(help="only cases of this split (train/val/test)")] = None,
    tolerance_mm: Annotated[Optional[float], typer.Option(min=0.0, help="NSD tolerance in mm (volumes; default 2)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="parallel processes over cases")] = 1,
    compare: Annotated[Optional[Path], typer.Option(help="second prediction folder: paired differences, Wilcoxon p")] = None,
    lesions: Annotated[bool, typer.Option("--lesions", help="add lesion-wise precision/recall/F1/count error")] = False,
    mlflow_run_id: Annotated[Optional[str], typer.Option(help="log the results to this existing MLflow run")] = None,
    mlflow_experiment: Annotated[Optional[str], typer.Option(help="log the results to a new run in this experiment")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite mlflow.db here)")] = None,
    ignore_index: Annotated[Optional[int], typer.Option(min=0, max=255, help="2D images only: label value of void pixels, not scored (default 255)")] = None,
) -> None:
    """Per-case per-organ metrics (CSV), per-organ summaries with 95% CI (JSON), box plots; --compare for paired tests.
    For 2D images: pixel accuracy, per-class IoU/Dice and mIoU pooled over all images (as validation), confusion matrix."""
    from medseg.evaluation.images2d import evaluate_images, is_image_manifest
    from medseg.evaluation.report import evaluate as run_eval
    from medseg.io.manifest import load_manifest

    images = is_image_manifest(load_manifest(manifest))
    if images and (compare or lesions or tolerance_mm is not None):
        raise MedsegError("--compare, --lesions and --tolerance-mm are not supported for 2D image manifests")
    if not images and ignore_index is not None:
        raise MedsegError("--ignore-index applies to 2D image manifests only")
    if mlflow_run_id and mlflow_experiment:
        raise MedsegError("give only one of --mlflow-run-id and --mlflow-experiment")
    if tracking_uri and not (mlflow_run_id or mlflow_experiment):
        raise MedsegError("--tracking-uri needs --mlflow-run-id or --mlflow-experiment")
    target = None
    if mlflow_run_id or mlflow_experiment:  # check the MLflow target before a long evaluation, not after
        from medseg.evaluation.tracking_io import EvaluationLogger

        target = EvaluationLogger.open(tracking_uri, run_id=mlflow_run_id, experiment=mlflow_experiment)
    out_dir = out or pred / "evaluation"
    if images:
        doc = evaluate_images(pred, manifest, out_dir, split=split, ignore_index=255 if ignore_index is None else ignore_index,
                              progress=sys.stderr.isatty())
    else:
        doc = run_eval(pred, manifest, out_dir, split=split, tolerance_mm=2.0 if tolerance_mm is None else tolerance_mm,
                       workers=workers, lesions=lesions,
                       compare_dir=compare, progress=sys.stderr.isatty())
    _print_summary(doc)
    typer.echo(f"outputs: {out_dir}")
    if target is not None:
        typer.echo(f"mlflow run id: {target.log(doc, out_dir)}")


def _print_summary(doc: dict) -> None:
    from rich.console import Console

    from medseg.evaluation.images2d import summary_table as image_table
    from medseg.evaluation.tables import comparison_table, summary_table

    console = Console() if sys.stdout.isatty() else Console(width=200)  # logs and pipes: do not wrap at 80
    console.print(image_table(doc) if doc.get("kind") == "image2d" else summary_table(doc))
    if doc.get("comparison"):
        console.print(comparison_table(doc["comparison"]))
    for note in doc.get("notes", []):
        console.print(f"note: {note}", highlight=False)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the phantom, runs, predictions and MLflow store go")] = Path("demo_run"),
    epochs: Annotated[Optional[int], typer.Option(help="override the preset's epochs")] = None,
    cases: Annotated[int, typer.Option(min=4)] = 16,
    tracking_uri: Optional[str] = None,
) -> None:
    """Phantom -> train -> predict -> evaluate, then print the per-organ table and where to look."""
    from medseg.demo import run_demo

    run_demo(workdir, epochs=epochs, cases=cases, tracking_uri=tracking_uri)


def main() -> None:
    """Console entry point with one-line user errors."""
    debug = "--debug" in sys.argv
    try:
        rv = app(prog_name="medseg", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except (click.ClickException, _VendoredClickException) as e:  # usage errors: exit 2
        e.show()
        sys.exit(2)
    except MedsegError as e:
        if debug:
            raise
        print(f"medseg: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
