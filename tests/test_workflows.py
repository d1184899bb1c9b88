"""``medseg.workflows.run_prediction``: the one prediction orchestration behind ``medseg predict`` and the
nightly pipeline, called directly on the tiny phantom with a small untrained package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.workflows import PredictionOptionError, describe_prediction, local_rank_from_env, run_prediction
from tests.helpers import copy_phantom_scans, phantom_package


@pytest.fixture(scope="module")
def package_dir(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg.path


def test_run_prediction_segments_a_folder_then_resumes(package_dir: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 2)
    out = tmp_path / "out"
    report = run_prediction(str(package_dir), scans, out, device="cpu")
    ids = sorted(p.name.removesuffix(".nii.gz") for p in scans.glob("*.nii.gz"))
    assert sorted(report.done) == ids and not report.failed and report.exit_code == 0
    for cid in ids:
        assert json.loads((out / f"{cid}.json").read_text())["status"] == "ok"
        assert (out / f"{cid}.nii.gz").stat().st_size > 0
    assert describe_prediction(report, out) == f"2 predicted, 0 already done, 0 failed -> {out}"

    again = run_prediction(str(package_dir), scans, out, device="cpu", resume=True)
    assert again.done == [] and sorted(again.skipped) == ids


def test_run_prediction_takes_one_shard_of_a_manifest_split(package_dir: Path, tiny_phantom: Path,
                                                            tmp_path: Path) -> None:
    from medseg.io.manifest import load_manifest

    val = [c.id for c in load_manifest(tiny_phantom).split("val")]
    assert len(val) == 2
    report = run_prediction(str(package_dir), tiny_phantom, tmp_path / "out", split="val", device="cpu", shard=(1, 2))
    assert len(report.done) == 1 and set(report.done) <= set(val)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [f"{report.done[0]}.nii.gz"]


def test_an_option_the_batch_cannot_honour_is_refused_before_any_case(package_dir: Path, tiny_phantom: Path,
                                                                      tmp_path: Path) -> None:
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 1)
    with pytest.raises(PredictionOptionError, match="memory_bounded") as err:
        run_prediction(str(package_dir), scans, tmp_path / "out", device="cpu", save_probabilities=True,
                       overrides=["inference.memory_bounded=true"])
    assert err.value.option == "save_probabilities"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_rank_from_env() -> None:
    assert local_rank_from_env({"LOCAL_RANK": "3"}) == 3
    assert local_rank_from_env({"LOCAL_RANK": ""}) is None and local_rank_from_env({}) is None
