"""MLflow's own UI, in a real headless Chromium (Debian's ``chromium``, installed by ``make setup-system``), shows a
medseg run's metrics in sections: per-organ Dice in one, IoU in another, the losses in a third.

The run is logged through medseg's tracker with the flat names a training logs (``val_dice_liver``...), so what is
checked is the section naming (``medseg.io.metric_names``) as the UI renders it, not a name typed in the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from medseg.tracking import MlflowTracker

ORGANS = ("liver", "spleen", "kidney")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (as root on Debian: make setup-system, or apt-get install chromium)")
    return found


def _page_text(browser: str, url: str, profile: Path) -> list[str]:
    """The text nodes of ``url`` after its scripts ran (``--dump-dom`` of the rendered page), one per line."""
    p = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    html = re.sub(r"<(style|script)\b.*?</\1>", "", p.stdout, flags=re.S)
    return [t.strip() for t in re.split(r"<[^>]+>", html) if t.strip()]


def _sections(lines: list[str]) -> dict[str, int]:
    """Chart sections of the run page: a title line followed by its chart count ``(n)`` and ``Add chart``."""
    return {
        lines[i]: int(lines[i + 1].strip("()"))
        for i in range(len(lines) - 2)
        if re.fullmatch(r"\(\d+\)", lines[i + 1]) and lines[i + 2] == "Add chart"
    }


def test_run_page_shows_metric_sections(mlflow_server: str, tmp_path: Path) -> None:
    browser = _chromium()
    tracker = MlflowTracker(mlflow_server, f"ui-{uuid.uuid4().hex[:8]}")
    run_id = tracker.start(run_name="ui-sections")
    for epoch in range(3):
        flat = {"train_loss": 1.0 - 0.1 * epoch, "val_loss": 0.9 - 0.1 * epoch, "lr": 0.01 / (epoch + 1)}
        for metric in ("dice", "iou"):
            flat.update({f"val_{metric}_{organ}": 0.5 + 0.1 * epoch for organ in (*ORGANS, "mean")})
        tracker.log_metrics(flat, step=epoch)
    tracker.end()
    url = f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs/{run_id}/model-metrics"

    sections: dict[str, int] = {}
    for attempt in range(3):  # a slow machine may dump the page before the charts are laid out: look again
        lines = _page_text(browser, url, tmp_path / f"profile{attempt}")
        sections = _sections(lines)
        if "val_dice" in sections:
            break
    assert sections.get("val_dice") == len(ORGANS) + 1, (sections, lines[:80])  # each organ and the mean
    assert sections.get("val_iou") == len(ORGANS) + 1
    assert sections.get("loss") == 2 and sections.get("train") == 1  # train/val loss; the learning rate
    assert "Model training" in lines  # the experiment opens as model training, not a GenAI experiment
