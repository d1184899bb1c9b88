"""``medseg ensemble``: several trained models (seeds, folds) as one package predicting their mean probability."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medseg.cli_common import MODEL_HELP


def ensemble(
    models: Annotated[list[str], typer.Argument(help=f"two or more models; each: {MODEL_HELP}")],
    output: Annotated[Path, typer.Option(help="new folder for the ensemble package (never overwritten)")],
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI for models:/ and runs:/ references")] = None,
) -> None:
    """Join MODELS into one package whose prediction is the mean of their softmax probabilities (nnU-Net's fold
    ensembling). They must share the label map, channels and preprocessing; the first one's config (window, TTA,
    post-processing) is the ensemble's. `medseg predict --model OUTPUT` and `medseg export OUTPUT` take it."""
    from medseg.inference.ensemble import create_ensemble

    out = create_ensemble(list(models), output, tracking_uri)
    typer.echo(f"wrote an ensemble of {len(models)} models -> {out}")
