"""The steps of ``pipelines.train_evaluate_register`` and the errors that map to its exit codes.

Each step raises a ``PipelineError`` whose ``exit_code`` says to a scheduler what went wrong; heavy imports
(torch, MONAI, MLflow) happen inside the steps, so a lock held or a server unreachable is reported at once.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from medseg.config import Config
from medseg.errors import MedsegError
from pipelines.promotion import CHALLENGER, CHAMPION, Decision, Registry, decide, per_case_scores

EXIT_INPUT, EXIT_USAGE, EXIT_TRAINING, EXIT_EVALUATION, EXIT_TRACKING, EXIT_LOCKED = 1, 2, 3, 4, 5, 6
log = logging.getLogger("medseg.pipeline")
T = TypeVar("T")


class PipelineError(MedsegError):
    """A step failed; ``exit_code`` is the pipeline's exit code for it (1: bad input)."""

    exit_code = EXIT_INPUT


class UsageError(PipelineError):
    """Options or config the pipeline cannot run with (exit 2)."""

    exit_code = EXIT_USAGE


class TrainingFailed(PipelineError):
    """The trainer raised, or ended without a model package (exit 3)."""

    exit_code = EXIT_TRAINING


class EvaluationFailed(PipelineError):
    """A model could not segment or be scored on the test split (exit 4)."""

    exit_code = EXIT_EVALUATION


class TrackingUnreachable(PipelineError):
    """The MLflow tracking server does not answer (exit 5)."""

    exit_code = EXIT_TRACKING


def one_line(e: BaseException) -> str:
    """``Class: first line of the message`` (200 characters at most)."""
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:200]}" if text else e.__class__.__name__


def public_uri(uri: str) -> str:
    """``uri`` without a password or token in it (``https://user:secret@host`` -> ``https://host``), for logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    netloc = parts.hostname or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{netloc}:{parts.port}" if parts.port else netloc))


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Append medseg's INFO log lines (trainer, tracking, this pipeline) to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("medseg")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


class TrackedRegistry(Registry):
    """``Registry`` whose calls turn MLflow failures into the pipeline's errors."""

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``; an outage is ``TrackingUnreachable`` (exit 5), any other MLflow refusal a ``PipelineError``."""
        from medseg.tracking import is_outage

        try:
            return fn()
        except MedsegError:
            raise
        except Exception as e:
            where = public_uri(self.uri)
            if is_outage(e):
                raise TrackingUnreachable(f"{where}: cannot {what}: tracking server unreachable ({one_line(e)})") from e
            raise PipelineError(f"{where}: cannot {what}: {one_line(e)}") from e


def open_registry(uri: str, experiment: str) -> TrackedRegistry:
    """The registry at ``uri``; ``TrackingUnreachable`` if an HTTP server gives no answer (before any training)."""
    from medseg.tracking import server_reachable

    if not server_reachable(uri):
        raise TrackingUnreachable(
            f"{public_uri(uri)}: MLflow tracking server unreachable (no answer within 2 s); nothing trained, retry later"
        )
    return TrackedRegistry(uri, experiment)


def check_test_split(cfg: Config) -> Path:
    """The manifest's path, once it is known to be a volume manifest with labelled test cases (before training)."""
    from medseg.io.manifest import load_manifest

    manifest = load_manifest(cfg.data.manifest)
    path = manifest.path or Path(cfg.data.manifest)
    if manifest.holds_images:
        raise PipelineError(f"{path}: 2D image manifests are not supported (the paired comparison is per volume)")
    if not [c for c in manifest.split("test") if c.label]:
        raise PipelineError(f"{path}: no labelled case in the test split: nothing to evaluate a new model on")
    return path


def train(cfg: Config, run_dir: Path, uri: str, resume: bool) -> str:
    """Train (or resume) the run with the real trainer; its MLflow run id once everything has reached the server."""
    from medseg.engine.trainer import Trainer
    from medseg.io.manifest import load_manifest
    from medseg.io.tracking_spool import TrackingSpool, sync_spool
    from medseg.tracking import RUN_ID_FILE

    log.info("training %s: %d epochs (%s)", run_dir, cfg.train.epochs, "resumed" if resume else "new run")
    try:
        result = Trainer(cfg, load_manifest(cfg.data.manifest), run_dir=run_dir, tracking_uri=uri, resume=resume).fit()
    except Exception as e:
        log.exception("training failed")
        raise TrainingFailed(f"training {run_dir} failed ({one_line(e)}); traceback in the log") from e
    if not (run_dir / "model" / "model.pt").is_file():
        raise TrainingFailed(f"{run_dir}: training ended without a model package")
    if TrackingSpool(run_dir).read().pending:  # the server went away during training: send what it missed
        try:
            sync_spool(run_dir, uri)
        except MedsegError as e:
            raise TrackingUnreachable(f"{e}; the model is trained: --resume registers it later") from e
    id_file = run_dir / RUN_ID_FILE
    run_id = result.run_id or (id_file.read_text().strip() if id_file.is_file() else None)
    if not run_id:
        raise TrackingUnreachable(f"{run_dir}: the training run has no MLflow run yet; --resume registers it later")
    log.info(
        "trained: best epoch %d, val mean Dice %.4f, MLflow run %s", result.best_epoch + 1, result.best_metric, run_id
    )
    return run_id


def predict_test(who: str, model: str, manifest: Path, out: Path, device: str, uri: str | None) -> Path:
    """Segment the test split with ``model`` into ``out``; ``EvaluationFailed`` if it cannot, or a case fails."""
    from medseg.workflows import run_prediction

    log.info("segmenting the test split with %s (%s)", who, model)
    try:
        report = run_prediction(model, manifest, out, split="test", device=device, tracking_uri=uri)
    except Exception as e:  # an unloadable model or an unreadable case: no comparison, no promotion
        log.exception("%s cannot segment the test split", who)
        raise EvaluationFailed(f"{who} ({model}) cannot segment the test split: {one_line(e)}") from e
    if report.failed:
        case, error = next(iter(report.failed.items()))
        raise EvaluationFailed(f"{who}: {len(report.failed)} test case(s) failed, e.g. {case}: {error}")
    return out


def evaluate_on_test(
    model_dir: Path, manifest: Path, out: Path, name: str, champion: str | None, uri: str, args: Any, cfg: Config
) -> tuple[dict[str, Any], Decision]:
    """Score the new model (and the champion) on the test split as ``medseg evaluate --compare``; the decision."""
    from medseg.evaluation.report import evaluate

    device = cfg.train.device
    cand = predict_test("the new model", str(model_dir), manifest, out / "candidate", device, None)
    champ = predict_test("the champion", f"models:/{name}/{champion}", manifest, out / "champion", device, uri) \
        if champion else None  # fmt: skip
    scores = out / "evaluation"
    try:
        doc = evaluate(cand, manifest, scores, split="test", compare_dir=champ)
    except Exception as e:
        log.exception("scoring the test split failed")
        raise EvaluationFailed(f"scoring the test split failed: {one_line(e)}") from e
    if champ is None:
        mean = [v for v in per_case_scores(scores / "metrics_per_case.csv", args.metric).values() if v == v]
        decision = Decision(True, "no champion yet: the first version becomes champion", args.metric, len(mean),
                            candidate_mean=sum(mean) / len(mean) if mean else float("nan"))  # fmt: skip
    else:
        decision = decide(scores / "metrics_per_case.csv", scores / "compare_to" / "metrics_per_case.csv",
                          args.metric, args.min_improvement)  # fmt: skip
    log.info("test split: %s", decision.reason)
    return doc, decision


def register(
    registry: TrackedRegistry, run_id: str, name: str, champion: str | None, decision: Decision,
    doc: dict[str, Any], eval_dir: Path, package: Path,
) -> tuple[str, str]:  # fmt: skip
    """Log the test scores to the training run, register the model, give it its alias; ``(version, alias)``."""
    from medseg.evaluation.tracking_io import EvaluationLogger

    registry.call(
        "log the test evaluation",
        lambda: EvaluationLogger.open(registry.uri, run_id=run_id).log(doc, eval_dir / "evaluation"),
    )
    version = registry.call("register the model", lambda: registry.register(run_id, name, package))
    alias = CHAMPION if decision.promote else CHALLENGER
    now = registry.call("look up the champion", lambda: registry.alias_version(name, CHAMPION))
    if alias == CHAMPION and now != champion:  # another pipeline moved it meanwhile: this one was not compared
        alias = CHALLENGER
        decision.promote = False
        decision.reason += f"; but the champion changed to version {now} during this run: not promoted"
    tags = {f"pipeline.{k}": v for k, v in decision.as_dict().items()}
    tags["pipeline.compared_with"] = f"models:/{name}/{champion}" if champion else "none"
    tags["pipeline.alias"] = alias
    registry.call(f"set the alias {alias}", lambda: registry.mark(name, version, alias, tags))
    log.info("registered models:/%s/%s with alias %s", name, version, alias)
    return version, alias
