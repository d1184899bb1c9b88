"""Optional batch outputs: class probabilities in the input's geometry, and the batch's MLflow run.

Probabilities go through the real predictor with the oracle network of ``tests.helpers`` (resampled to
another spacing and back, so the saved probabilities are interpolated, not just 0/1). The MLflow run is
made by the real CLI against the ``mlflow_server`` fixture, with scans named like patients, and every
param, tag and metric of the run is searched for those names.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.inference.batch import run_batch
from medseg.inference.inputs import discover_inputs
from medseg.inference.model_package import load_package
from medseg.inference.predictor import Predictor
from tests.helpers import copy_phantom_scans, oracle_model, phantom_package, run_cli


def test_probabilities_overlay_input_and_resume_needs_them(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=[2.0, 2.0, 2.0]"])
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", {1: "flipped.nii.gz", 3: "oblique.nii.gz"})
    cases = discover_inputs(scans)
    predictor = Predictor(pkg, device="cpu", model=oracle_model())
    out = tmp_path / "out"
    report = run_batch(pkg, cases, out, device="cpu", progress=False, predictor=predictor, save_probabilities=True)
    assert sorted(report.done) == ["flipped", "oblique"] and not report.failed

    for cid in ("flipped", "oblique"):
        src = nib.load(scans / f"{cid}.nii.gz")
        probs_img, mask = nib.load(out / f"{cid}_probs.nii.gz"), nib.load(out / f"{cid}.nii.gz")
        assert probs_img.shape == (*src.shape, pkg.num_classes)
        assert np.array_equal(probs_img.affine, src.affine)
        assert int(probs_img.header["sform_code"]) == int(src.header["sform_code"])
        assert probs_img.get_data_dtype() == np.uint8  # stored compactly, read back as floats
        probs = probs_img.get_fdata(dtype=np.float32)
        assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(probs.argmax(-1), np.asanyarray(mask.dataobj))
        assert 0.0 < probs.max(-1).min() < 0.99  # interpolated at boundaries: real probabilities, not one-hot
        exact, _ = predictor.probabilities([scans / f"{cid}.nii.gz"])
        exact = np.moveaxis(exact.numpy(), 0, -1)
        inside = np.abs(exact.sum(-1) - 1) < 1e-4  # inside the foreground crop the softmax sums to 1 already
        assert inside.mean() > 0.3 and np.abs(probs[inside] - exact[inside]).max() <= 4 / 255 + 1e-5
        assert (probs[exact.sum(-1) < 1e-6, 0] == 1).all()  # outside the crop (zero-padded): background
        assert f"{cid}_probs.nii.gz" in json.loads((out / f"{cid}.json").read_text())["outputs"]

    (out / "oblique_probs.nii.gz").unlink()
    again = run_batch(pkg, cases, out, device="cpu", resume=True, progress=False, predictor=predictor,
                      save_probabilities=True)
    assert again.done == ["oblique"] and again.skipped == ["flipped"]
    assert (out / "oblique_probs.nii.gz").stat().st_size > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def package_dir(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg.path


def test_probabilities_with_memory_bounded_is_a_usage_error(package_dir: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", {0: "a.nii.gz"})
    p = run_cli("predict", "--model", str(package_dir), "--input", str(scans), "--output", str(tmp_path / "o"),
                "--device", "cpu", "--save-probabilities", "--set", "inference.memory_bounded=true", check=False)
    assert p.returncode == 2, p.stderr
    assert "memory_bounded" in p.stderr and "--save-probabilities" in p.stderr
    assert not (tmp_path / "o").exists()


def test_batch_mlflow_run_has_counts_and_no_patient_names(package_dir: Path, tiny_phantom: Path, tmp_path: Path,
                                                         mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    names = {0: "doe_john_19650203.nii.gz", 2: "roe_jane_19720811.nii.gz"}
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "ward7_nightly", names)
    (scans / "smith_anna_19800101.nii.gz").write_bytes((scans / names[0]).read_bytes()[:500])  # corrupt
    out = tmp_path / "out"
    common = ["predict", "--model", str(package_dir), "--input", str(scans), "--output", str(out), "--device", "cpu",
              "--mlflow-experiment", "nightly-privacy", "--tracking-uri", mlflow_server]
    first = run_cli(*common, "--shard", "0/1", check=False)
    assert first.returncode == 3, first.stderr
    second = run_cli(*common, "--resume", "--set", "inference.fill_holes=true", check=False)  # the corrupt case is retried, the others skipped
    assert second.returncode == 3, second.stderr

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("nightly-privacy")
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    assert len(runs) == 2
    assert [r.info.run_id for r in runs] == [line.split()[-1] for p in (first, second)
                                            for line in p.stdout.splitlines() if line.startswith("mlflow run id:")]
    m1, m2 = runs[0].data.metrics, runs[1].data.metrics
    assert (m1["n_cases"], m1["n_ok"], m1["n_failed"], m1["n_skipped"]) == (3, 2, 1, 0)
    assert (m2["n_cases"], m2["n_ok"], m2["n_failed"], m2["n_skipped"]) == (3, 0, 1, 2)
    assert m1["total_seconds"] > 0 and m1["mean_seconds_per_case"] > 0 and m1["peak_rss_mib"] > 0
    assert all(r.info.status == "FINISHED" for r in runs)
    p1 = runs[0].data.params
    assert p1["model"] == package_dir.name and p1["shard"] == "0/1" and runs[1].data.params["shard"] == "all"
    inference = load_package(package_dir).config.inference
    assert p1["device"] == "cpu" and p1["inference.overlap"] == str(inference.overlap)
    assert p1["inference.memory_bounded"] == "False" and runs[1].data.params["inference.fill_holes"] == "True"  # --set
    assert runs[0].data.tags["medseg.batch_result"] == "some_failed"
    assert runs[0].data.tags["medseg.data_kind"] == "volume"

    secrets = [n.removesuffix(".nii.gz") for n in [*names.values(), "smith_anna_19800101.nii.gz"]]
    secrets += ["doe", "roe_", "smith", "1965", "ward7", str(scans), str(tmp_path), str(package_dir.parent)]
    for run in runs:
        assert run.info.run_name is None or not any(s.lower() in run.info.run_name.lower() for s in secrets)
        for kind, items in (("param", run.data.params), ("tag", run.data.tags), ("metric", run.data.metrics)):
            for k, v in items.items():
                leaked = [s for s in secrets if s.lower() in f"{k}={v}".lower()]
                assert not leaked, f"{kind} {k}={v!r} contains {leaked}"
        assert not client.list_artifacts(run.info.run_id)
