"""The ``medseg`` command line (thin: parse, build from config, call the engine).

User errors (bad files, bad config) print one line ``medseg: error: <file>: <cause>`` and exit 1;
usage errors exit 2; a batch with failed cases exits 3. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from medseg.cli_common import MODEL_HELP, STATE, OldOut, flush_warnings, renamed, setup_logging
from medseg.cli_data import data_app
from medseg.cli_ensemble import ensemble
from medseg.cli_export import export
from medseg.cli_pacs import pacs_app
from medseg.cli_runs import runs_app
from medseg.errors import MedsegError

try:  # recent typer vendors its own click: its usage errors are not click.ClickException
    from typer._click.exceptions import ClickException as _VendoredClickException
except ImportError:  # pragma: no cover - typer with a plain click dependency
    _VendoredClickException = click.ClickException  # type: ignore[misc,assignment]  # same class where click is not vendored

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Medical image segmentation: train, predict, evaluate (MONAI + MLflow).",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration presets.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
app.add_typer(pacs_app, name="pacs")
app.command("export")(export)
app.command("ensemble")(ensemble)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    STATE["debug"] = debug
    setup_logging()


# ---- config -------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(
    preset: str, overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides")] = None
) -> None:
    """Print the resolved config of PRESET (a name in configs/ or a YAML path) with overrides applied."""
    from medseg.components import load_checked_config

    typer.echo(load_checked_config(preset, overrides or []).to_yaml(), nl=False)


@config_app.command("list")
def config_list() -> None:
    """List the presets in configs/."""
    from medseg.config import CONFIG_DIR

    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        typer.echo(p.stem)


@app.command()
def train(
    preset: Annotated[Optional[str], typer.Argument(help="preset name or YAML path")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides, e.g. train.epochs=5")] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (default: tracking.uri, $MLFLOW_TRACKING_URI, mlflow.db)")
    ] = None,
    resume: Annotated[Optional[Path], typer.Option(help="resume the run in this folder (same MLflow run)")] = None,
) -> None:
    """Train a model from a preset; checkpoints every epoch; the best model is packaged in RUN/model."""
    from medseg.components import check_components, load_checked_config
    from medseg.config import config_from_yaml_text
    from medseg.engine.stop_signal import EXIT_CODE, TrainingStopped
    from medseg.engine.trainer import Trainer
    from medseg.io.manifest import load_manifest

    if resume is not None:
        cfg_file = resume / "config.yaml"
        if not cfg_file.is_file():
            raise MedsegError(f"{resume}: not a run folder (no config.yaml)")
        cfg = check_components(config_from_yaml_text(cfg_file.read_text(), str(cfg_file)), str(cfg_file))
        if preset or overrides:
            raise MedsegError("--resume takes the run's own config; do not pass a preset or overrides")
    else:
        if preset is None:
            raise MedsegError("train needs a PRESET (see `medseg config list`) or --resume RUN_DIR")
        cfg = load_checked_config(preset, overrides or [])
    manifest = load_manifest(cfg.data.manifest)
    try:
        result = Trainer(cfg, manifest, run_dir=resume, tracking_uri=tracking_uri, resume=resume is not None).fit()
    except TrainingStopped:  # SIGTERM: 128 + 15, as if the signal had ended the process; last.pt is valid
        raise typer.Exit(EXIT_CODE) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    typer.echo(f"run folder: {result.run_dir}")
    typer.echo(f"best epoch {result.best_epoch + 1}: val mean Dice {result.best_metric:.4f}")
    if result.run_id:
        typer.echo(f"mlflow run id: {result.run_id}")


class DicomOutput(str, Enum):
    """What ``medseg predict`` writes beside the NIfTI mask of a DICOM series."""

    seg = "seg"
    rtstruct = "rtstruct"
    both = "both"
    none = "none"


@app.command()
def predict(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            help="NIfTI file, folder of NIfTI files, manifest .json, folder of DICOM series, or PNG/JPG image(s) for 2D image models",
        ),
    ],
    output: Annotated[Path, typer.Option(help="output folder")],
    split: Annotated[Optional[str], typer.Option(help="with a manifest: only this split")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    resume: Annotated[bool, typer.Option(help="skip cases whose outputs are complete")] = False,
    shard: Annotated[
        Optional[str],
        typer.Option(help="I/N: process only shard I of N (0-based); default under torchrun: RANK/WORLD_SIZE"),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="inference.KEY=VALUE override, e.g. inference.memory_bounded=true"),
    ] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow URI for models:/ and runs:/ references and --mlflow-experiment")
    ] = None,
    save_probabilities: Annotated[
        bool,
        typer.Option(
            "--save-probabilities",
            help="also write <id>_probs.nii.gz (softmax, uint8 steps of 1/255, classes on the last axis); 2D images: <id>_probs.npy, uint8 (C, H, W)",
        ),
    ] = False,
    mlflow_experiment: Annotated[
        Optional[str],
        typer.Option(help="log one MLflow run per batch/shard (counts, timing; no case ids or file names)"),
    ] = None,
    dicom_output: Annotated[
        Optional[DicomOutput],
        typer.Option(
            help="DICOM series: also write a DICOM-SEG, an RTSTRUCT, both or none (default: the model's, seg)"
        ),
    ] = None,
) -> None:
    """Segment scans or 2D images; masks (and DICOM-SEG / RTSTRUCT for DICOM series) in each input's own geometry.

    Objects of a DICOM export that are not image series (RTSTRUCT, SEG, SR, KO, PR, RT plan/dose, DICOMDIR) are
    skipped and listed in skipped_objects.csv. Exit 3 if some cases failed."""
    from medseg.inference.shard import parse_shard, shard_from_env

    try:  # checked before the heavy imports: a usage error should be quick
        shard_ix = parse_shard(shard) if shard else shard_from_env()
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shard") from None
    from medseg.workflows import PredictionOptionError, describe_prediction, run_prediction

    try:
        report = run_prediction(
            model,
            input,
            output,
            split=split,
            device=device,
            resume=resume,
            shard=shard_ix,
            overrides=[*(set_ or []), *([f"inference.dicom_output={dicom_output.value}"] if dicom_output else [])],
            tracking_uri=tracking_uri,
            save_probabilities=save_probabilities,
            mlflow_experiment=mlflow_experiment,
            progress=sys.stderr.isatty(),
        )
    except PredictionOptionError as e:
        raise typer.BadParameter(e.message, param_hint="--" + e.option.replace("_", "-")) from None
    where = f" (shard {shard_ix[0]}/{shard_ix[1]})" if shard_ix else ""
    typer.echo(f"{describe_prediction(report, output)}{where}")
    if report.mlflow_run_id:
        typer.echo(f"mlflow run id: {report.mlflow_run_id}")
    for cid, err in report.failed.items():
        typer.echo(f"  failed {cid}: {err}", err=True)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command()
def evaluate(
    pred: Annotated[
        Path, typer.Option(help="folder of <case id>.nii.gz predictions (2D image manifests: <case id>.png)")
    ],
    manifest: Annotated[Path, typer.Option(help="manifest with the ground truth")],
    output: Annotated[Optional[Path], typer.Option(help="output folder (default PRED/evaluation)")] = None,
    split: Annotated[Optional[str], typer.Option(help="only cases of this split (train/val/test)")] = None,
    tolerance_mm: Annotated[
        Optional[float], typer.Option(min=0.0, help="NSD tolerance in mm (volumes; default 2)")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="parallel processes over cases")] = 1,
    compare: Annotated[
        Optional[Path], typer.Option(help="second prediction folder: paired differences, Wilcoxon p")
    ] = None,
    lesions: Annotated[bool, typer.Option("--lesions", help="add lesion-wise precision/recall/F1/count error")] = False,
    mlflow_run_id: Annotated[Optional[str], typer.Option(help="log the results to this existing MLflow run")] = None,
    mlflow_experiment: Annotated[
        Optional[str], typer.Option(help="log the results to a new run in this experiment")
    ] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db here)")
    ] = None,
    ignore_index: Annotated[
        Optional[int],
        typer.Option(min=0, max=255, help="2D images only: label value of void pixels, not scored (default 255)"),
    ] = None,
    out_old: OldOut = None,
) -> None:
    """Per-case per-organ metrics (CSV), per-organ summaries with 95% CI (JSON), box plots; --compare for paired tests.
    For 2D images: pixel accuracy, per-class IoU/Dice and mIoU pooled over all images (as validation), confusion matrix."""
    from medseg.data.kinds import manifest_kind
    from medseg.evaluation.kinds import EvaluationOptions, evaluator_for
    from medseg.evaluation.tables import print_summary
    from medseg.io.manifest import load_manifest

    output = renamed(output, out_old, "--out", "--output")
    evaluator = evaluator_for(manifest_kind(load_manifest(manifest)).name)
    options = EvaluationOptions(
        split=split,
        tolerance_mm=tolerance_mm,
        workers=workers,
        compare=compare,
        lesions=lesions,
        ignore_index=ignore_index,
        progress=sys.stderr.isatty(),
    )
    evaluator.check(options)
    if mlflow_run_id and mlflow_experiment:
        raise MedsegError("give only one of --mlflow-run-id and --mlflow-experiment")
    if tracking_uri and not (mlflow_run_id or mlflow_experiment):
        raise MedsegError("--tracking-uri needs --mlflow-run-id or --mlflow-experiment")
    target = None
    if mlflow_run_id or mlflow_experiment:  # check the MLflow target before a long evaluation, not after
        from medseg.evaluation.tracking_io import EvaluationLogger

        target = EvaluationLogger.open(tracking_uri, run_id=mlflow_run_id, experiment=mlflow_experiment)
    out_dir = output or pred / "evaluation"
    doc = evaluator.evaluate(pred, manifest, out_dir, options)
    print_summary(doc)
    typer.echo(f"outputs: {out_dir}")
    if target is not None:
        typer.echo(f"mlflow run id: {target.log(doc, out_dir)}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the phantom, runs, predictions and MLflow store go")] = Path(
        "demo_run"
    ),
    epochs: Annotated[Optional[int], typer.Option(help="override the preset's epochs")] = None,
    cases: Annotated[int, typer.Option(min=4, help="phantom cases")] = 16,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite mlflow.db in WORKDIR)")
    ] = None,
) -> None:
    """Phantom -> train -> predict -> evaluate, then print the per-organ table and where to look."""
    from medseg.demo import run_demo

    run_demo(workdir, epochs=epochs, cases=cases, tracking_uri=tracking_uri)


# ---- CLI reference (README "## CLI reference") ---------------------------------------------------------------
@app.command("cli-reference", hidden=True)
def cli_reference_command(
    readme: Annotated[
        Optional[Path], typer.Option(help="rewrite this file's '## CLI reference' section instead of printing")
    ] = None,
) -> None:
    """Print the CLI reference (Markdown), or write it into README's "## CLI reference" section."""
    from medseg.cli_reference import cli_reference, replace_readme_section

    text = cli_reference(typer.main.get_command(app))
    if readme is None:
        typer.echo(text, nl=False)
        return
    from medseg.io.atomic import write_text_atomic

    write_text_atomic(readme, replace_readme_section(readme.read_text(), text))
    typer.echo(f"wrote the CLI reference into {readme}")


def main() -> None:
    """Console entry point with one-line user errors."""
    debug = "--debug" in sys.argv
    STATE["defer_warnings"] = True
    try:
        rv = app(prog_name="medseg", standalone_mode=False)
    except click.exceptions.Exit as e:  # a command that ran to its end (e.g. predict: exit 3, some cases failed)
        flush_warnings()
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
    flush_warnings()
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
