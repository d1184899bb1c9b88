"""Nightly batch prediction: ``python -m pipelines.nightly_predict nightly.yaml``.

The YAML names the model, the input (NIfTI file/folder, manifest or DICOM folder), the output folder and
optionally the device, shard (``I/N``), log file, resume flag, MLflow URI and experiment, whether to save
probabilities, and inference overrides. Logs
go to the log file (default ``OUTPUT/nightly.log``). A lock (``fcntl.flock``) on the output folder stops a
second run on the same folder and shard: it exits 2 with a message saying so. Exit codes are the CLI's:
0 all ok, 3 some cases failed, 2 usage error (bad config, locked), 1 input/model error.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medseg.errors import ConfigError, MedsegError
from pipelines import locking
from pipelines.locking import LockedError


class NightlyConfig(BaseModel):
    """The nightly run's config file."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: Path
    output: Path
    device: str = "auto"
    shard: str | None = None
    log_file: Path | None = None
    resume: bool = True
    tracking_uri: str | None = None
    mlflow_experiment: str | None = None  # one MLflow run per nightly batch (counts and timing only)
    save_probabilities: bool = False
    inference: list[str] = []  # inference.KEY=VALUE overrides


class UsageError(MedsegError):
    """The config file or its values are wrong (exit 2)."""


def lock_path(output: Path, shard: tuple[int, int] | None) -> Path:
    """The lock file of a run on ``output`` (one per shard, so shards of one batch run side by side)."""
    return Path(output) / (f".nightly-{shard[0]}of{shard[1]}.lock" if shard else ".nightly.lock")


def exclusive_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel even if the process is killed)."""
    return locking.exclusive_lock(path, what="nightly run")


def load_nightly_config(path: Path) -> NightlyConfig:
    """Parse and validate the YAML config (``MedsegError`` naming the file and key on problems)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return NightlyConfig.model_validate(raw)
    except OSError as e:
        raise UsageError(f"{path}: cannot read config ({e.__class__.__name__})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise UsageError(f"{path}: invalid nightly config: {msgs}") from None


def _log_to_file(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(log_file)], force=True)
    for noisy in ("mlflow", "alembic", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(config_path: Path) -> int:
    """Run the nightly batch described by ``config_path``; returns the exit code."""
    from medseg.inference.options import resolve_shard
    from medseg.workflows import PredictionOptionError, describe_prediction, run_prediction

    cfg = load_nightly_config(config_path)
    try:
        shard = resolve_shard(cfg.shard)
    except ValueError as e:
        raise UsageError(f"{config_path}: shard: {e}") from None
    log_file = cfg.log_file or cfg.output / "nightly.log"
    with exclusive_lock(lock_path(cfg.output, shard)):
        _log_to_file(log_file)
        log = logging.getLogger("medseg.nightly")
        log.info("nightly run: model %s, input %s, output %s, shard %s", cfg.model, cfg.input, cfg.output, shard)
        try:
            report = run_prediction(cfg.model, cfg.input, cfg.output, device=cfg.device, resume=cfg.resume, shard=shard,
                                    overrides=cfg.inference, tracking_uri=cfg.tracking_uri,
                                    save_probabilities=cfg.save_probabilities,
                                    mlflow_experiment=cfg.mlflow_experiment, progress=False)
        except PredictionOptionError as e:
            raise UsageError(f"{config_path}: {e.option}: {e.message}") from None
        log.info("%d predicted, %d already done, %d failed; summary %s", len(report.done), len(report.skipped),
                 len(report.failed), report.summary)
        for cid, err in report.failed.items():
            log.error("failed %s: %s", cid, err)
    print(f"{describe_prediction(report, cfg.output)} (log {log_file})")
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one argument, the YAML config."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\nusage: python -m pipelines.nightly_predict CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        return run(Path(args[0]))
    except LockedError as e:
        print(f"nightly_predict: {e}", file=sys.stderr)
        return 2
    except (UsageError, ConfigError) as e:
        print(f"nightly_predict: error: {e}", file=sys.stderr)
        return 2
    except MedsegError as e:  # unreadable input or model
        print(f"nightly_predict: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
