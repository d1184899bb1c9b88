"""Workflows shared by the entry points (``medseg predict`` and ``pipelines/nightly_predict.py``).

A workflow is the orchestration of one user-level task over the layers below: the entry points parse their
own input (command-line flags, a YAML file), call the workflow, and turn its result and errors into their
own output (echoed lines, a log file, exit codes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import MedsegError

if TYPE_CHECKING:  # the inference stack (torch, MONAI) is imported only when a prediction runs
    from medseg.inference.records import BatchReport

log = logging.getLogger(__name__)


class PredictionOptionError(MedsegError):
    """An option of a prediction run cannot be honoured for this batch; ``option`` names it
    (``"save_probabilities"``), so each entry point can report it in its own vocabulary (a flag, a YAML key)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """``LOCAL_RANK`` as torchrun sets it (the GPU of this process on its node), or None."""
    value = (os.environ if env is None else env).get("LOCAL_RANK", "")
    return int(value) if value.isdigit() else None


def run_prediction(
    model: str,
    source: str | Path,
    output: str | Path,
    *,
    split: str | None = None,
    device: str = "auto",
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
    save_probabilities: bool = False,
    mlflow_experiment: str | None = None,
    progress: bool = False,
    local_rank: int | None = None,
) -> BatchReport:
    """Segment every input case of ``source`` with ``model`` into ``output``; the report of the batch.

    Steps: discover the inputs (``inference.inputs.discover``: NIfTI file/folder, manifest, optionally
    one ``split``, DICOM folder, 2D images), load the model package (a folder, run folder or ``models:/``,
    ``runs:/`` reference through ``tracking_uri``) with ``overrides`` (``inference.KEY=VALUE``) applied,
    check ``save_probabilities`` against the whole batch, keep only ``shard`` ``(I, N)`` of the cases (give the
    already resolved shard: the caller parses ``I/N`` or reads torchrun's environment), and run the batch
    (``inference.batch.run_batch``; ``mlflow_experiment`` logs one MLflow run for it). ``local_rank`` None:
    from ``LOCAL_RANK``.

    Failed cases do not raise: they are in ``report.failed`` and ``report.exit_code`` is 3. Unreadable inputs
    or models raise ``MedsegError`` subclasses; a ``save_probabilities`` that cannot be honoured raises
    ``PredictionOptionError`` before any case is segmented.
    """
    from medseg.inference.batch import check_probabilities_option, run_batch
    from medseg.inference.inputs import discover
    from medseg.inference.model_package import load_package
    from medseg.inference.options import apply_inference_overrides
    from medseg.inference.shard import select_shard

    found = discover(source, split)
    cases = found.cases
    package = apply_inference_overrides(load_package(model, tracking_uri), list(overrides))
    if save_probabilities:
        try:
            check_probabilities_option(package, cases)
        except ValueError as e:
            raise PredictionOptionError("save_probabilities", str(e)) from None
    if shard is not None:
        cases = select_shard(cases, *shard)
    log.debug("predicting %d cases with %s into %s (shard %s)", len(cases), model, output, shard)
    return run_batch(
        package,
        cases,
        Path(output),
        device=device,
        resume=resume,
        progress=progress,
        model_ref=model,
        local_rank=local_rank_from_env() if local_rank is None else local_rank,
        save_probabilities=save_probabilities,
        mlflow_experiment=mlflow_experiment,
        tracking_uri=tracking_uri,
        shard=shard,
        not_scans=found.not_scans,
    )


def describe_prediction(report: BatchReport, output: str | Path) -> str:
    """The one-line outcome of a prediction run: ``N predicted, M already done, K failed -> OUTPUT``."""
    line = f"{len(report.done)} predicted, {len(report.skipped)} already done, {len(report.failed)} failed"
    if report.not_scans:
        line += f", {len(report.not_scans)} non-image objects skipped (listed in skipped_objects.csv)"
    return f"{line} -> {output}"
