"""The batch runner through the real CLI: corrupt input among good ones, SIGKILL then --resume, shards.

A small model package (a tiny U-Net with untrained weights, built from the phantom preset) keeps these fast;
what is tested is the batch behaviour, not the segmentation quality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from medseg.inference.shard import parse_shard, select_shard, shard_from_env
from tests.conftest import MEDSEG, run_cli
from tests.helpers import copy_phantom_scans, phantom_package


@pytest.fixture(scope="module")
def package_dir(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg.path


@pytest.fixture
def scans(tiny_phantom: Path, tmp_path: Path) -> Path:
    """A folder with the phantom's 6 scans as plain NIfTI files."""
    return copy_phantom_scans(tiny_phantom, tmp_path / "scans")


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_shard_parsing_and_selection() -> None:
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="0..N-1"):
            parse_shard(bad)
    items = list(range(11))
    parts = [select_shard(items, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None and shard_from_env({}) is None


def test_bad_shard_is_a_usage_error(package_dir: Path, scans: Path, tmp_path: Path) -> None:
    p = run_cli("predict", "--model", str(package_dir), "--input", str(scans), "--output", str(tmp_path / "o"),
                "--shard", "2/2", check=False)
    assert p.returncode == 2, p.stderr
    assert "--shard" in p.stderr and "0..N-1" in p.stderr
    assert not (tmp_path / "o").exists()


def test_corrupt_scan_is_recorded_and_the_rest_are_written(package_dir: Path, scans: Path, tmp_path: Path) -> None:
    bad = scans / "broken.nii.gz"
    bad.write_bytes((scans / "phantom_000.nii.gz").read_bytes()[:500])  # truncated gzip stream
    out = tmp_path / "out"
    p = run_cli("predict", "--model", str(package_dir), "--input", str(scans), "--output", str(out),
                "--device", "cpu", "--shard", "0/1", check=False)
    assert p.returncode == 3, p.stderr
    good = [f.name.removesuffix(".nii.gz") for f in scans.glob("phantom_*.nii.gz")]
    for cid in good:
        assert json.loads((out / f"{cid}.json").read_text())["status"] == "ok"
        assert (out / f"{cid}.nii.gz").stat().st_size > 0
    record = json.loads((out / "broken.json").read_text())
    assert record["status"] == "failed" and "broken.nii.gz" in record["error"]
    assert not (out / "broken.nii.gz").exists()
    assert "failed broken" in p.stderr and f"{len(good)} predicted" in p.stdout
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == len(good) + 2 and any(r.startswith("broken,failed,") for r in summary)


def test_sigkill_mid_batch_then_resume(package_dir: Path, scans: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ids = sorted(f.name.removesuffix(".nii.gz") for f in scans.glob("*.nii.gz"))
    # a dense window overlap makes each case take long enough to be killed mid-batch
    args = ["predict", "--model", str(package_dir), "--input", str(scans), "--output", str(out), "--device", "cpu",
            "--set", "inference.overlap=0.5"]
    proc = subprocess.Popen([*MEDSEG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and any(p.suffix == ".json" and not p.name.startswith(".") for p in out.iterdir()):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    finished = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.json") if not p.name.startswith(".")}
    assert 1 <= len(finished) < len(ids)

    p = run_cli(*args, "--resume")
    assert f"{len(finished)} already done" in p.stdout
    assert f"{len(ids) - len(finished)} predicted" in p.stdout
    names = _outputs(out)
    assert not [n for n in names if n.startswith(".")], names  # no temp files left
    assert names == sorted([f"{i}.json" for i in ids] + [f"{i}.nii.gz" for i in ids] + ["summary.csv"])
    for cid, mtime in finished.items():  # not redone
        assert (out / f"{cid}.json").stat().st_mtime_ns == mtime
    rows = (out / "summary.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == ids and all(r.split(",")[1] == "ok" for r in rows)


def test_two_shards_cover_the_batch_once(package_dir: Path, scans: Path, tmp_path: Path) -> None:
    from medseg.inference.batch import run_batch
    from medseg.inference.inputs import discover_inputs
    from medseg.inference.model_package import load_package

    out = tmp_path / "out"
    # shard 1 of 2 in this process, shard 0 by the CLI under torchrun's environment (no --shard given)
    cases = discover_inputs(scans)
    mine = run_batch(load_package(package_dir), select_shard(cases, *parse_shard("1/2")), out, device="cpu", progress=False)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    common = ["predict", "--model", str(package_dir), "--input", str(scans), "--output", str(out), "--device", "cpu"]
    other = subprocess.run([*MEDSEG, *common], capture_output=True, text=True, env=env, timeout=600)
    assert other.returncode == 0, other.stderr
    assert len(mine.done) == 3 and "3 predicted, 0 already done" in other.stdout and "(shard 0/2)" in other.stdout
    ids = sorted(c.id for c in cases)
    assert sorted(p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz")) == ids
    rows = (out / "summary.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == ids  # the last shard's summary covers both
