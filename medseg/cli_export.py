"""``medseg export``: a model package's network as ONNX or TorchScript, with ``medseg.json`` for a serving stack."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from medseg.cli_common import MODEL_HELP


class ExportFormat(str, Enum):
    """The file formats ``medseg export`` writes."""

    onnx = "onnx"
    torchscript = "torchscript"


def export(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    output: Annotated[Path, typer.Option(help="output folder (model.onnx or model.torchscript.pt, medseg.json)")],
    format: Annotated[
        ExportFormat, typer.Option("--format", help="onnx (dynamic batch axis; needs the export extra) or torchscript")
    ] = ExportFormat.onnx,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow URI for models:/ and runs:/ references")] = None,
) -> None:
    """Export MODEL's network (fp32, one window batch in, logits out) and medseg.json: preprocessing, spacing,
    intensity, label map, window size and overlap, channels. The export is checked against the network first."""
    from medseg.inference.export import MEDSEG_JSON, export_package
    from medseg.inference.model_package import load_package

    record = export_package(load_package(model, tracking_uri), format.value, output)
    check = record["check"]
    checked = (
        f"checked: max |logit diff| {check['max_abs_logit_diff']:.2g}, argmax agreement {check['argmax_agreement']:.4f}"
        if "max_abs_logit_diff" in check
        else f"not checked: {check.get('skipped')}"
    )
    typer.echo(f"wrote {output / record['file']} and {output / MEDSEG_JSON} ({checked})")
