"""Training runs of an experiment side by side (``medseg runs compare``): per-organ validation metrics at each
run's best epoch, the duration, and the config keys (params) whose values differ between the runs.

The best epoch is the one the trainer selected (the run tag ``best_epoch``); a run without it (still training,
or stopped before its end) gets the epoch of the highest ``val_dice_mean``, the trainer's selection metric (the
first of equal values, as the trainer keeps the first). A metric a run did not log at that epoch (HD95 is
computed every ``train.hd95_every`` epochs only) is shown as ``-``. All values come from the tracking server:
``MlflowClient.search_runs``, one ``get_metric_history`` per metric and run; nothing is read from run folders.
Metric names are read sectioned (``val_dice/liver``) or flat (``val_dice_liver``, runs logged before sections):
``medseg.io.metric_names``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medseg.errors import MedsegError
from medseg.io.metric_names import flat_key, metric_history
from medseg.tracking import MlflowTracker, resolve_tracking_uri

SELECTION_METRIC = "val_dice_mean"  # what the trainer selects the best epoch by (engine/trainer.py)
DEFAULT_METRICS = ("dice",)


@dataclass
class RunRow:
    """One run: its identity, best epoch, duration, the metrics at the best epoch and its params."""

    run_id: str
    name: str
    status: str
    best_epoch: int | None
    duration_s: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # ``<metric>_<organ>`` -> value at the best epoch
    params: dict[str, str] = field(default_factory=dict)


def best_epoch(client: Any, run: Any) -> int | None:
    """The run's best epoch: its ``best_epoch`` tag, else the step of the highest ``val_dice_mean``."""
    tag = run.data.tags.get("best_epoch")
    if tag is not None and int(tag) >= 0:
        return int(tag)
    history = metric_history(client, run.info.run_id, SELECTION_METRIC)
    if not history:
        return None
    return min(history, key=lambda m: (-m.value, m.step)).step


def organ_metrics(client: Any, run: Any, metrics: Sequence[str], epoch: int | None) -> dict[str, float]:
    """``<metric>_<organ>`` -> the value of ``val_<metric>_<organ>`` at ``epoch`` (organs: those the run logged)."""
    out: dict[str, float] = {}
    if epoch is None:
        return out
    for key in sorted(run.data.metrics, key=lambda k: "/" not in k):  # sectioned names first: they win
        flat = flat_key(key)
        metric = next((m for m in metrics if flat.startswith(f"val_{m}_")), None)
        if metric is None or flat.removeprefix("val_") in out:
            continue
        at = [m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == epoch]
        if at:
            out[flat.removeprefix("val_")] = float(at[-1])
    return out


def duration_s(run: Any, now_ms: int | None = None) -> float | None:
    """Seconds from the run's start to its end (to now while it runs)."""
    start, end = run.info.start_time, run.info.end_time or (now_ms or int(time.time() * 1000))
    return (end - start) / 1000.0 if start else None


def collect_runs(
    experiment: str, metrics: Sequence[str] = DEFAULT_METRICS, run_ids: Sequence[str] = (), uri: str | None = None
) -> list[RunRow]:
    """The training runs of ``experiment`` (or just ``run_ids``), newest first, with what ``compare_table`` shows."""
    tracking_uri = resolve_tracking_uri(uri)
    client = MlflowTracker(tracking_uri, experiment).client  # bounded HTTP retries
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise MedsegError(f"{tracking_uri}: no MLflow experiment named {experiment!r}")
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"])
    if run_ids:
        by_id = {r.info.run_id: r for r in runs}
        missing = [i for i in run_ids if i not in by_id]
        if missing:
            raise MedsegError(f"{tracking_uri}: no run {', '.join(missing)} in experiment {experiment!r}")
        runs = [by_id[i] for i in run_ids]
    else:  # training runs only: evaluation or prediction runs logged here have no validation metrics
        runs = [r for r in runs if any(flat_key(k).startswith("val_") for k in r.data.metrics)]
    rows = []
    for run in runs:
        epoch = best_epoch(client, run)
        rows.append(
            RunRow(
                run.info.run_id,
                run.info.run_name or "",
                run.info.status,
                epoch,
                duration_s(run),
                organ_metrics(client, run, metrics, epoch),
                dict(run.data.params),
            )
        )
    return rows


def differing_params(rows: Sequence[RunRow]) -> list[str]:
    """The param keys whose value is not the same in every run (a key a run lacks counts as a difference)."""
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def compare_table(rows: Sequence[RunRow]) -> Any:
    """A ``rich`` table with one column per run: status, best epoch (1-based), duration, the metrics at the best
    epoch and the params that differ."""
    from rich.table import Table

    table = Table(title="runs compared at their best epoch (by val_dice_mean)")
    table.add_column("", style="bold")
    for r in rows:
        table.add_column(f"{r.name}\n{r.run_id[:8]}", justify="right")
    table.add_row("status", *(r.status for r in rows))
    table.add_row("best epoch", *("-" if r.best_epoch is None else str(r.best_epoch + 1) for r in rows))
    table.add_row("duration", *("-" if r.duration_s is None else f"{r.duration_s:.1f} s" for r in rows))
    for key in sorted({k for r in rows for k in r.metrics}):
        table.add_row(key, *(f"{r.metrics[key]:.4f}" if key in r.metrics else "-" for r in rows))
    for key in differing_params(rows):
        table.add_row(f"param {key}", *(r.params.get(key, "-") for r in rows))
    return table
