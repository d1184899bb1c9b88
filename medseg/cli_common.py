"""What every ``medseg`` command shares: run state, deprecated-flag handling, deferred warnings, logging."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

STATE: dict = {"debug": False, "defer_warnings": False, "warnings": []}

# Old flag spellings, kept working (hidden from --help and the CLI reference) for one release; each command
# merges one into its new name with ``renamed``, which warns on stderr.
OldOut = Annotated[Optional[Path], typer.Option("--out", hidden=True, help="deprecated: old name of --output")]


MODEL_HELP = (
    "model package folder, run folder, medseg export folder (ONNX, TorchScript), or models:/NAME/VERSION,"
    " models:/NAME@ALIAS, runs:/ID/model"
)


def renamed(new: Optional[Path], old: Optional[Path], old_flag: str, new_flag: str) -> Optional[Path]:
    """The value given under ``new_flag`` or, with a deprecation warning, under its old name ``old_flag``."""
    if old is None:
        return new
    if new is not None:
        raise typer.BadParameter(f"give only {new_flag} ({old_flag} is its deprecated old name)", param_hint=old_flag)
    warn(f"{old_flag} is deprecated, use {new_flag} (the old name goes in the next release)")
    return old


def warn(message: str) -> None:
    """A warning on stderr; under ``main`` it is printed once the command has run, so that a failing command's
    stderr stays the one line ``medseg: error: ...``."""
    line = f"medseg: warning: {message}"
    if STATE["defer_warnings"]:
        STATE["warnings"].append(line)
    else:
        typer.echo(line, err=True)


def flush_warnings() -> None:
    """Print the deferred warnings (after the command has run)."""
    for line in STATE["warnings"]:
        print(line, file=sys.stderr)
    STATE["warnings"].clear()


def setup_logging(verbose: bool = True) -> None:
    """Log lines through rich (INFO, or WARNING when not verbose); third-party chatter at WARNING."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "dicomweb_client", "pynetdicom"):  # their INFO quotes UIDs
        logging.getLogger(noisy).setLevel(logging.WARNING)
