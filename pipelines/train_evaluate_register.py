"""Scheduled retraining: train -> evaluate on the test split -> register as champion or challenger.

    python -m pipelines.train_evaluate_register CONFIG [--set KEY=VALUE ...] [--output DIR] [--metric NAME]
        [--tracking-uri URI] [--model-name NAME] [--min-improvement X] [--resume]

1. Train CONFIG (a preset name or YAML path, ``--set`` overrides as ``medseg train`` takes them) with the real
   trainer into ``OUTPUT/runs/<run name>``, tracked in MLflow.
2. Segment the manifest's test split with the new model and with the current champion
   (``models:/NAME@champion``) and score both as ``medseg evaluate --compare`` does
   (``OUTPUT/evaluations/<run name>/``); the scores are also logged to the new model's training run.
3. Register the new model as a version of NAME (``--model-name``, default the config's
   ``tracking.registered_model_name``). It takes the alias ``champion`` if it beats the champion in a paired
   per-case comparison on ``--metric`` (default dice; ``pipelines.promotion``), or if there is no champion
   yet; otherwise it takes ``challenger`` and the champion stays.

Exit codes (for cron, SLURM, Kubernetes ``podFailurePolicy``):

    0  done: the new version is champion or challenger (OUTPUT/latest.json and the last stdout line say which)
    1  bad input: unreadable manifest, no labelled test case, 2D image data, registry refused a call
    2  usage: bad options, config file or --set override
    3  training failed (traceback in the log; --resume continues the run from its last checkpoint)
    4  evaluation failed: the new model or the champion could not segment or be scored on the test split
    5  MLflow tracking server unreachable (checked before training; or lost before registering): retry later
    6  lock held: another run is using OUTPUT (the message names its PID); nothing was done
  130  interrupted
  143  stopped by SIGTERM (a scheduler's pre-emption or time limit): the epoch in training is saved, nothing was
       evaluated or registered; --resume continues

OUTPUT (``--output``, default ``<train.output_dir>/train_evaluate_register``) holds ``train_evaluate_register.log``
(appended by every run), the lock ``.train_evaluate_register.lock``, ``pending_run.txt`` (the run folder of an
unfinished run, for ``--resume``), ``latest.json`` (the last finished run's outcome), ``runs/`` and
``evaluations/``. The tracking URI is picked as everywhere in medseg (``medseg.tracking.resolve_tracking_uri``):
``--tracking-uri``, else the config's ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///OUTPUT/mlflow.db``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from medseg.config import Config, load_config
from medseg.errors import ConfigError, MedsegError
from pipelines.locking import LockedError, exclusive_lock
from pipelines.pipeline_steps import (
    EXIT_LOCKED,
    EXIT_USAGE,
    PipelineError,
    UsageError,
    check_test_split,
    evaluate_on_test,
    log_to_file,
    open_registry,
    public_uri,
    register,
    train,
)

PROG = "train_evaluate_register"
LOG_NAME, LOCK_NAME = f"{PROG}.log", f".{PROG}.lock"
SIGTERM_EXIT = 143  # 128 + SIGTERM: medseg.engine.stop_signal.EXIT_CODE (a test checks they agree)
PENDING, LATEST = "pending_run.txt", "latest.json"
log = logging.getLogger("medseg.pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (argparse exits 2 on a usage error, 0 after ``--help``)."""
    from pipelines.promotion import METRICS

    p = argparse.ArgumentParser(
        prog=f"python -m pipelines.{PROG}",
        description="Train, evaluate on the test split, register; champion only if better (paired per case).",
        epilog="exit codes: 0 done, 1 bad input, 2 usage, 3 training failed, 4 evaluation failed, "
        "5 tracking unreachable, 6 lock held, 130 interrupted",
    )
    p.add_argument("config", help="preset name (configs/) or YAML path")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set train.epochs=50 (repeatable)",
    )
    p.add_argument("--output", type=Path, help="pipeline folder (default <train.output_dir>/train_evaluate_register)")
    p.add_argument("--metric", default="dice", choices=METRICS, help="metric of the paired comparison (default dice)")
    p.add_argument(
        "--min-improvement",
        type=float,
        default=0.0,
        help="promote only if the mean paired gain exceeds this (default 0: strictly better)",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, else $MLFLOW_TRACKING_URI)")
    p.add_argument("--model-name", help="registered model name (default the config's tracking.registered_model_name)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in OUTPUT (pending_run.txt) from its last checkpoint",
    )
    return p.parse_args(argv)


def new_run_dir(output: Path, cfg: Config) -> Path:
    """``OUTPUT/runs/<run_name or model>-<YYYYmmdd-HHMMSS>``, never an existing folder."""
    base = f"{cfg.train.run_name or cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cand, n = output / "runs" / base, 1
    while cand.exists():
        n += 1
        cand = output / "runs" / f"{base}-{n}"
    return cand


def training_config(args: argparse.Namespace, cfg: Config, output: Path) -> tuple[Config, Path, bool]:
    """The config to train, its run folder, and whether it resumes the unfinished run of ``pending_run.txt``."""
    from medseg.components import check_components
    from medseg.config import config_from_yaml_text

    pending = output / PENDING
    if args.resume and pending.is_file():
        run_dir = Path(pending.read_text().strip())
        if (run_dir / "checkpoints" / "last.pt").is_file():  # as `medseg train --resume`: the run's own config
            cfg_file = run_dir / "config.yaml"
            log.info("resuming %s from its last checkpoint (its own config.yaml; CONFIG and --set unused)", run_dir)
            return check_components(config_from_yaml_text(cfg_file.read_text(), str(cfg_file))), run_dir, True
        log.info("%s has no checkpoint to resume: starting a new run", run_dir)
    run_dir = new_run_dir(output, cfg)
    # the pipeline registers the model itself, after the evaluation: the trainer must not register it first
    extra = [f"train.output_dir={run_dir.parent}", f"train.run_name={run_dir.name}", "tracking.registered_model_name="]
    return load_config(args.config, [*args.overrides, *extra]), run_dir, False


def pipeline(args: argparse.Namespace, cfg: Config, output: Path) -> dict[str, Any]:
    """The three steps under the lock; the outcome (``latest.json``)."""
    from medseg.io.atomic import write_json_atomic, write_text_atomic
    from medseg.tracking import resolve_tracking_uri

    if cfg.tracking.backend != "mlflow":
        raise UsageError(f"{args.config}: tracking.backend is {cfg.tracking.backend!r}; the pipeline needs mlflow")
    name = args.model_name or cfg.tracking.registered_model_name
    if not name:
        raise UsageError(f"{args.config}: no model name: give --model-name or set tracking.registered_model_name")
    uri = resolve_tracking_uri(args.tracking_uri, cfg.tracking.uri, output)
    manifest_path = check_test_split(cfg)
    registry = open_registry(uri, cfg.tracking.experiment)
    champion = registry.call("look up the champion", lambda: registry.alias_version(name, "champion"))
    log.info("model %s, tracking %s, champion %s", name, public_uri(uri), f"version {champion}" if champion else "none")
    train_cfg, run_dir, resume = training_config(args, cfg, output)
    if resume:  # evaluated on the test split of the manifest it was trained from
        manifest_path = check_test_split(train_cfg)
    write_text_atomic(output / PENDING, f"{run_dir}\n")
    run_id = train(train_cfg, run_dir, uri, resume)
    eval_dir = output / "evaluations" / run_dir.name
    doc, decision = evaluate_on_test(run_dir / "model", manifest_path, eval_dir, name, champion, uri, args, train_cfg)
    version, alias = register(registry, run_id, name, champion, decision, doc, eval_dir, run_dir / "model")
    outcome = {
        "model": name, "version": version, "alias": alias, "ref": f"models:/{name}/{version}",
        "previous_champion": champion, "decision": decision.as_dict(), "run_dir": str(run_dir), "run_id": run_id,
        "evaluation": str(eval_dir), "tracking_uri": public_uri(uri),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    write_json_atomic(eval_dir / "outcome.json", outcome)
    write_json_atomic(output / LATEST, outcome)
    (output / PENDING).unlink(missing_ok=True)
    return outcome


def run(args: argparse.Namespace) -> int:
    """Load the config, take the output folder's lock, run the pipeline, print one line; the exit code."""
    cfg = load_config(args.config, args.overrides)  # light (no torch): a bad config or lock fails at once
    output = (args.output or Path(cfg.train.output_dir) / PROG).absolute()
    with exclusive_lock(output / LOCK_NAME, f"{PROG} run"), log_to_file(output / LOG_NAME):
        log.info("start: pid %d, config %s, overrides %s, output %s", os.getpid(), args.config, args.overrides, output)
        try:
            outcome = pipeline(args, cfg, output)
        except PipelineError as e:
            log.error("exit %d: %s", e.exit_code, e)
            raise
        except MedsegError as e:
            log.error("exit %d: %s", 2 if isinstance(e, ConfigError) else 1, e)
            raise
        except Exception:
            log.exception("unexpected error")
            raise
        d = outcome["decision"]
        line = f"registered {outcome['ref']} as {outcome['alias']}: {d['reason']}"
        log.info("%s", line)
    print(f"{PROG}: {line} (log {output / LOG_NAME})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit code of the module docstring."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), printed by argparse
        return EXIT_USAGE if e.code not in (0, None) else 0
    try:
        return run(args)
    except LockedError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except PipelineError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MedsegError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # medseg.engine.stop_signal.TrainingStopped (not imported: it brings torch) after a scheduler's SIGTERM:
        # the epoch is saved, nothing was evaluated or registered
        if getattr(e, "exit_code", None) == SIGTERM_EXIT:
            print(f"{PROG}: {e}; run the pipeline again with --resume", file=sys.stderr)
            return SIGTERM_EXIT
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
