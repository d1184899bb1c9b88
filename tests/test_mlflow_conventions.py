"""MLflow conventions of a real training run on a real server: where runs go (``MLFLOW_TRACKING_URI``), the
experiment's kind, the manifest as a dataset input, and the ``python_function`` flavour of the logged model.

One tiny ``medseg train`` (subprocess, the server given only by ``MLFLOW_TRACKING_URI``) is shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medseg.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker, resolve_tracking_uri
from tests.helpers import MEDSEG

TRAIN = (
    "data.spacing=[3.0, 3.0, 4.0]",
    "train.val_every=1",
    "data.patch_size=[32, 32, 16]",
    "data.samples_per_volume=1",
    "model.params.channels=[4, 8, 16, 32]",
    "train.overlay_cases=0",
)


def medseg_env(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``medseg ARGS`` in a subprocess with ``env`` added to the environment (MLFLOW_TRACKING_URI removed first)."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    p = subprocess.run(
        [*MEDSEG, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**base, "PYTHONUNBUFFERED": "1", **env},
    )
    assert p.returncode == 0, f"medseg {args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def env_run(tiny_phantom: Path, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("conventions")
    experiment, name = f"conv-{uuid.uuid4().hex[:8]}", f"conv-model-{uuid.uuid4().hex[:8]}"
    medseg_env(
        [
            "train",
            "phantom_unet3d",
            f"data.manifest={tiny_phantom}",
            f"train.output_dir={work / 'runs'}",
            "train.run_name=conv",
            "train.epochs=1",
            *TRAIN,
            f"tracking.experiment={experiment}",
            f"tracking.registered_model_name={name}",
            "tracking.system_metrics=true",
            "tracking.system_metrics_interval_s=0.5",
        ],
        cwd=work,
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    run_dir = work / "runs" / "conv"
    return {
        "work": work,
        "run_dir": run_dir,
        "run_id": (run_dir / "mlflow_run_id.txt").read_text().strip(),
        "client": MlflowClient(tracking_uri=mlflow_server),
        "uri": mlflow_server,
        "experiment": experiment,
        "model_name": name,
        "manifest": tiny_phantom,
    }


def test_resolve_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env.example:5000")
    assert resolve_tracking_uri("http://cli:1", "http://cfg:2") == "http://cli:1"
    assert resolve_tracking_uri(None, "http://cfg:2") == "http://cfg:2"
    assert resolve_tracking_uri(None, None, tmp_path) == "http://env.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_train_logs_to_the_server_named_by_the_environment(env_run: dict) -> None:
    run = env_run["client"].get_run(env_run["run_id"])  # the run is on the server given only by the variable
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    exp = env_run["client"].get_experiment(run.info.experiment_id)
    assert exp.name == env_run["experiment"]
    assert not (env_run["work"] / "mlflow.db").exists()  # not the local fallback store


@pytest.fixture(scope="module")
def predicted(env_run: dict) -> dict:
    """``medseg predict`` of the val split with the trained package, a batch run logged via the variable only."""
    work = env_run["work"]
    p = medseg_env(
        [
            "predict",
            "--model",
            str(env_run["run_dir"] / "model"),
            "--input",
            str(env_run["manifest"]),
            "--split",
            "val",
            "--output",
            str(work / "preds"),
            "--mlflow-experiment",
            "conv-predict",
        ],
        cwd=work,
        env={"MLFLOW_TRACKING_URI": env_run["uri"]},
    )
    return {"preds": work / "preds", "batch_id": p.stdout.split("mlflow run id: ")[1].split()[0]}


def test_predict_and_evaluate_follow_the_environment(env_run: dict, predicted: dict) -> None:
    work, env = env_run["work"], {"MLFLOW_TRACKING_URI": env_run["uri"]}
    assert env_run["client"].get_run(predicted["batch_id"]).data.metrics["n_failed"] == 0
    e = medseg_env(
        [
            "evaluate",
            "--pred",
            str(work / "preds"),
            "--manifest",
            str(env_run["manifest"]),
            "--split",
            "val",
            "--mlflow-run-id",
            env_run["run_id"],
        ],
        cwd=work,
        env=env,
    )
    assert "outputs:" in e.stdout
    metrics = env_run["client"].get_run(env_run["run_id"]).data.metrics
    assert any(k.startswith("eval_dice/") for k in metrics)
    assert not (work / "mlflow.db").exists()


def test_system_metrics_are_logged_when_asked(env_run: dict) -> None:
    metrics = env_run["client"].get_run(env_run["run_id"]).data.metrics  # tracking.system_metrics=true
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    steps = env_run["client"].get_metric_history(env_run["run_id"], "system/cpu_utilization_percentage")
    assert steps and all(0 <= m.value <= 100 * os.cpu_count() for m in steps)


def test_experiment_kind_is_classic_model_training(env_run: dict, mlflow_server: str) -> None:
    exp = env_run["client"].get_experiment_by_name(env_run["experiment"])
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    client = env_run["client"]  # an experiment made elsewhere is tagged when medseg first uses it ...
    bare = f"bare-{uuid.uuid4().hex[:8]}"
    client.create_experiment(bare)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment_by_name(bare).tags
    MlflowTracker(mlflow_server, bare).start(run_name="x")
    assert client.get_experiment_by_name(bare).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    kept = f"kept-{uuid.uuid4().hex[:8]}"  # ... and a kind someone set stays
    client.create_experiment(kept, tags={EXPERIMENT_KIND_TAG: "forecasting"})
    MlflowTracker(mlflow_server, kept).start(run_name="x")
    assert client.get_experiment_by_name(kept).tags[EXPERIMENT_KIND_TAG] == "forecasting"


def test_manifest_is_the_training_dataset_input(env_run: dict) -> None:
    run = env_run["client"].get_run(env_run["run_id"])
    [inp] = run.inputs.dataset_inputs
    fingerprint = json.loads((env_run["run_dir"] / "model" / "metadata.json").read_text())["dataset_fingerprint"]
    assert inp.dataset.digest == fingerprint == run.data.tags["dataset_fingerprint"]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert json.loads(inp.dataset.source)["uri"] == str(env_run["manifest"].resolve())
    manifest = json.loads(env_run["manifest"].read_text())
    assert inp.dataset.name == manifest["name"]
    profile = json.loads(inp.dataset.profile)
    cases = manifest["training"]
    assert profile["num_cases"] == len(cases) + len(manifest.get("test", []))
    assert profile["num_val"] == sum(c["split"] == "val" for c in cases) > 0
    logged = json.dumps(inp.dataset.to_dictionary())
    for case in cases:  # no case ids nor file names in the dataset record
        assert case["id"] not in logged and Path(case["image"]).name not in logged


def test_pyfunc_model_predicts_like_medseg_predict(env_run: dict, predicted: dict) -> None:
    preds = predicted["preds"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(env_run["uri"])
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{env_run['run_id']}/model")
        card = mlflow.models.Model.load(f"models:/{env_run['model_name']}/1")
    finally:
        mlflow.set_tracking_uri(previous)
    assert {"medseg", "python_function"} <= set(card.flavors) and card.signature is not None
    assert card.saved_input_example_info["artifact_path"] == "input_example.json"
    manifest = json.loads(env_run["manifest"].read_text())
    val = [c for c in manifest["training"] if c["split"] == "val"]
    paths = [str(env_run["manifest"].parent / c["image"]) for c in val]
    expected = [np.asanyarray(nib.load(preds / f"{c['id']}.nii.gz").dataobj) for c in val]
    assert len(val) >= 2 and all(e.any() for e in expected)  # masks with foreground: the comparison can fail
    for path, want in zip(paths, expected):
        labels = model.predict(path)  # one NIfTI path: one label map
        assert labels.shape == want.shape and np.array_equal(labels, want)
    together = model.predict(paths)  # a list of paths: one label map each
    assert len(together) == len(val) and all(np.array_equal(a, b) for a, b in zip(together, expected))


def test_mlflow_models_serve_answers_a_request(env_run: dict, predicted: dict, tmp_path: Path) -> None:
    """``mlflow models serve`` (this venv: ``--env-manager local``) of the registered model answers an
    ``/invocations`` request with a NIfTI path with the same label map as ``medseg predict`` wrote."""
    import urllib.request

    from tests.helpers import free_port

    port = free_port()
    venv_bin = str(Path(MEDSEG[0]).parent)  # the server starts `uvicorn` by name: the venv as if activated
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    base["PATH"] = f"{venv_bin}{os.pathsep}{base.get('PATH', '')}"
    mlflow_cli = str(Path(venv_bin) / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/{env_run['model_name']}/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env={**base, "MLFLOW_TRACKING_URI": env_run["uri"]},
        stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):  # the model is downloaded and loaded first
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        manifest = json.loads(env_run["manifest"].read_text())
        case = next(c for c in manifest["training"] if c["split"] == "val")
        body = json.dumps({"inputs": [str(env_run["manifest"].parent / case["image"])]}).encode()
        request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=60)
    want = np.asanyarray(nib.load(predicted["preds"] / f"{case['id']}.nii.gz").dataobj)
    got = np.asarray(answer["predictions"])
    assert want.any() and got.shape == want.shape and np.array_equal(got, want)
