"""The notebooks run: a tiny real training run tracked on the MLflow server fixture, then the review notebook
executed with nbclient in this venv's python3 kernel, with its parameters cell replaced."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from tests.conftest import REPO, run_cli

NOTEBOOKS = REPO / "notebooks"
ORGANS = ("liver", "spleen", "kidney")


def _inject_parameters(nb: nbformat.NotebookNode, **params: object) -> None:
    """Replace the cell tagged ``parameters`` (papermill's convention) with ``NAME = repr(value)`` lines."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())


def _output_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.extend(str(out.data.get(k, "")) for k in ("text/plain", "text/html"))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def trained_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> tuple[str, str]:
    """Two tiny training runs through the real CLI (the second registered, its version aliased ``champion``);
    returns (experiment name, the registered run's id)."""
    out = tmp_path_factory.mktemp("nb_runs")
    experiment = "notebook-review"
    common = ("phantom_unet3d", f"data.manifest={tiny_phantom}", f"train.output_dir={out}", "train.val_every=1",
              "data.samples_per_volume=1", "model.params.channels=[8,16,32,64]", "train.overlay_cases=1",
              f"tracking.experiment={experiment}", "--tracking-uri", mlflow_server)
    run_cli("train", *common, "train.run_name=nb_short", "train.epochs=1", "optimizer.lr=0.001")
    p = run_cli("train", *common, "train.run_name=nb", "train.epochs=2", "tracking.registered_model_name=nb-review")
    run_id = (out / "nb" / "mlflow_run_id.txt").read_text().strip()
    assert run_id in p.stdout
    MlflowClient(tracking_uri=mlflow_server).set_registered_model_alias("nb-review", "champion", "1")
    return experiment, run_id


def test_review_experiment_notebook_runs(trained_run: tuple[str, str], mlflow_server: str, tmp_path: Path) -> None:
    experiment, run_id = trained_run
    nb = nbformat.read(NOTEBOOKS / "review_experiment.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    _inject_parameters(nb, TRACKING_URI=mlflow_server, EXPERIMENT=experiment, RUN_ID=run_id, CURVE_RUNS=None, WORST=1,
                       MAX_RUNS=50)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('kernel python:', sys.executable)"))
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    text = _output_text(nb)
    assert f"kernel python: {sys.executable}" in text  # the kernel is this venv's interpreter
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    tags = client.get_run(run_id).data.tags
    assert run_id in text and tags["dataset_fingerprint"] in text and tags["git_commit"] in text
    assert "2 training runs" in text and all(f"({r.info.run_id[:8]})" in text for r in runs)  # side by side
    assert "param optimizer.lr" in text and "param train.epochs" in text  # the config keys that differ
    for organ in ORGANS:
        assert f"dice_{organ}" in text  # the cross-run table and the best epoch's per-case table
    assert "validation dice per epoch" in text and "validation iou per epoch" in text
    assert "worst 1:" in text and "plots/val_worst_1.png" in text  # the worst case and its overlay
    assert "registered model 'nb-review': 1 versions" in text and "champion" in text
    assert "model.params.channels" in text  # config params
    figures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) >= 3, "learning curves, per-organ curves and the worst overlay"
    nbformat.validate(nb)  # the executed notebook is still a valid notebook
