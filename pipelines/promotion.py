"""Champion/challenger: the paired per-case decision, and the MLflow registry calls that record it.

Decision. Both models segment the same test cases; ``medseg evaluate --compare`` scores them
(``metrics_per_case.csv`` of each, ``medseg.evaluation.report``). Per case, the chosen metric is averaged over
the organs (NaN organs left out, as in ``nanmean``); the paired differences ``candidate - champion`` over the
cases both have a value for go to ``medseg.metrics.stats.paired_comparison`` (mean, 95% bootstrap CI,
Wilcoxon p). For a metric where lower is better (distances, volume errors) the sign is flipped, so a positive
``gain`` always means "the candidate is better". The candidate is promoted when ``gain > min_improvement``
(default 0: strictly better on average; a tie keeps the champion). The CI and p-value are recorded, not
required: a test split of a handful of cases rarely reaches significance, and a scheduler still needs a rule.

Registry. The candidate becomes a new version of the registered model (``MlflowTracker.register_model``, as
``medseg train`` registers), and the alias ``champion`` or ``challenger`` is set on it (an alias names one
version at a time, so the previous challenger loses it). The version gets tags with the decision.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

CHAMPION, CHALLENGER = "champion", "challenger"
HIGHER_IS_BETTER = ("dice", "iou", "precision", "recall", "nsd")
LOWER_IS_BETTER = ("hd95", "assd", "volume_abs_error_ml", "volume_rel_error")
METRICS = HIGHER_IS_BETTER + LOWER_IS_BETTER


@dataclass
class Decision:
    """Whether the candidate takes the champion alias, and the paired comparison it rests on."""

    promote: bool
    reason: str
    metric: str
    n_pairs: int = 0
    gain: float = math.nan  # mean paired difference, signed so that > 0 means the candidate is better
    ci_low: float = math.nan  # 95% bootstrap CI of ``gain``
    ci_high: float = math.nan
    p_value: float = math.nan  # two-sided Wilcoxon signed-rank
    candidate_mean: float = math.nan
    champion_mean: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def per_case_scores(csv_path: Path, metric: str) -> dict[str, float]:
    """Case id -> the metric averaged over the organs with a value (NaN where no organ has one)."""
    values: dict[str, list[float]] = defaultdict(list)
    try:
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                raw = row.get(metric)
                if raw is None:
                    raise MedsegError(f"{csv_path}: no column {metric!r} (metrics: {', '.join(row)})")
                values[row["case"]].append(float(raw) if raw else math.nan)  # "nan" parses as NaN too
    except OSError as e:
        raise MedsegError(f"{csv_path}: cannot read per-case metrics ({e.__class__.__name__})") from None
    out = {}
    for case, vals in values.items():
        finite = [v for v in vals if not math.isnan(v)]
        out[case] = sum(finite) / len(finite) if finite else math.nan
    return out


def decide(candidate_csv: Path, champion_csv: Path, metric: str, min_improvement: float = 0.0) -> Decision:
    """The paired per-case decision between the candidate's and the champion's ``metrics_per_case.csv``."""
    import numpy as np

    from medseg.metrics.stats import paired_comparison

    if metric not in METRICS:
        raise MedsegError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    a, b = per_case_scores(candidate_csv, metric), per_case_scores(champion_csv, metric)
    cases = sorted(set(a) & set(b))
    sign = 1.0 if metric in HIGHER_IS_BETTER else -1.0
    x = np.asarray([a[c] for c in cases], dtype=float)
    y = np.asarray([b[c] for c in cases], dtype=float)
    res = paired_comparison(sign * x, sign * y)
    both = ~(np.isnan(x) | np.isnan(y))
    n = int(res["n"])
    decision = Decision(
        promote=False,
        reason="",
        metric=metric,
        n_pairs=n,
        gain=float(res["mean_diff"]),
        ci_low=float(res["ci_low"]),
        ci_high=float(res["ci_high"]),
        p_value=float(res["p_value"]),
        candidate_mean=float(x[both].mean()) if n else math.nan,
        champion_mean=float(y[both].mean()) if n else math.nan,
    )
    if n == 0:
        decision.reason = f"no test case has a {metric} for both models: the champion stays"
    elif decision.gain > min_improvement:
        decision.promote = True
        decision.reason = f"better {metric} by {decision.gain:+.4f} on average over {n} paired test cases"
    else:
        decision.reason = (
            f"{metric} {decision.gain:+.4f} on average over {n} paired test cases "
            f"(needs > {min_improvement:+.4f}): the champion stays"
        )
    return decision


class Registry:
    """The MLflow model registry calls of the pipeline (each under ``medseg.tracking.bounded_http``)."""

    def __init__(self, uri: str, experiment: str) -> None:
        from medseg.tracking import MlflowTracker

        self.uri, self.experiment = uri, experiment
        self.tracker = MlflowTracker(uri, experiment)  # its client runs every call with bounded HTTP retries
        self.client = self.tracker.client

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points at, or None (no such registered model, or no such alias)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
                return None
            raise
        version = (model.aliases or {}).get(alias)
        return None if version is None else str(version)

    def register(self, run_id: str, name: str, package: Path) -> str:
        """A new version of ``name`` from the run's ``model`` artifacts; its number. The local ``package`` is
        uploaded first if the run lacks them (a training process killed between its last epoch and the upload)."""
        self.tracker.run_id = run_id  # attach to the finished run: register_model tags it, status unchanged
        if not self.client.list_artifacts(run_id, "model"):
            self.tracker.log_artifact(package, "model")
        version = self.tracker.register_model("model", name)
        if version is None:
            raise MedsegError(f"MLflow did not register a version of {name!r}")
        return version

    def mark(self, name: str, version: str, alias: str, tags: dict[str, Any]) -> None:
        """Point ``alias`` at ``version`` and tag the version (the decision, for the registry's history)."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, "" if value is None else str(value))
        self.client.set_registered_model_alias(name, alias, version)  # last: the alias is the decision's commit
