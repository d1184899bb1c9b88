"""``medseg runs``: work with training run folders after (or while) they train.

``runs sync`` sends what the tracking server missed during an outage (the run folder's tracking spool, see
``medseg.io.tracking_spool``). ``runs compare`` puts an experiment's training runs side by side (their best
epoch's per-organ metrics, duration and differing params; ``medseg.evaluation.run_compare``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medseg.errors import InputError

runs_app = typer.Typer(no_args_is_help=True, help="Work with training run folders and their MLflow runs.")


@runs_app.command("sync")
def runs_sync(
    run_folder: Annotated[Path, typer.Argument(help="the run folder (train.output_dir/run_name)")],
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (default: the one the run logged to)")
    ] = None,
) -> None:
    """Send the run's spooled tracking records (metrics, params, tags, artifacts) to MLflow; nothing twice."""
    from medseg.io.tracking_spool import sync_spool
    from medseg.tracking import RUN_ID_FILE

    if not run_folder.is_dir():
        raise InputError(run_folder, "no such run folder")
    sent, pending = sync_spool(run_folder, tracking_uri)
    typer.echo(f"sent {sent} tracking records from {run_folder}" + (f"; {pending} still pending" if pending else ""))
    run_id = run_folder / RUN_ID_FILE
    if sent and run_id.is_file():
        typer.echo(f"mlflow run id: {run_id.read_text().strip()}")


@runs_app.command("compare")
def runs_compare(
    experiment: Annotated[str, typer.Option(help="the MLflow experiment (tracking.experiment)")],
    metric: Annotated[
        Optional[list[str]], typer.Option(help="validation metric per organ, e.g. dice, iou, hd95 (default: dice)")
    ] = None,
    runs: Annotated[Optional[list[str]], typer.Option(help="only these run ids (default: every training run)")] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db here)")
    ] = None,
) -> None:
    """Training runs side by side: per-organ metrics at each run's best epoch, duration, params that differ."""
    from rich.console import Console

    from medseg.evaluation.run_compare import DEFAULT_METRICS, collect_runs, compare_table

    rows = collect_runs(experiment, metric or DEFAULT_METRICS, runs or (), tracking_uri)
    if not rows:
        typer.echo(f"no training runs in experiment {experiment!r}")
        return
    Console(width=max(100, 24 * (len(rows) + 1))).print(compare_table(rows))
