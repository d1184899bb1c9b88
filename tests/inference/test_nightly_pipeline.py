"""pipelines/nightly_predict.py: config file in, log file out, one run at a time per output folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.nightly_predict import exclusive_lock, lock_path
from tests.conftest import REPO
from tests.helpers import phantom_package


def _run(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.nightly_predict", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_second_run_on_the_same_output_is_refused_then_a_free_run_works(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    scan = m.image_paths(m.cases[0])[0]
    out = tmp_path / "out"
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"model": str(pkg.path), "input": str(scan), "output": str(out),
                                      "device": "cpu", "log_file": str(tmp_path / "logs" / "nightly.log")}))
    with exclusive_lock(lock_path(out, None)):  # a run in progress holds the folder's lock
        busy = _run(config)
    assert busy.returncode == 2, busy.stderr
    assert "another nightly run" in busy.stderr and str(out) in busy.stderr
    assert not list(out.glob("*.nii.gz"))

    done = _run(config)
    assert done.returncode == 0, done.stderr
    case = scan.name.removesuffix(".nii.gz")
    assert json.loads((out / f"{case}.json").read_text())["status"] == "ok"
    log = (tmp_path / "logs" / "nightly.log").read_text()
    assert "nightly run: model" in log and "1 predicted" in log


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    from pipelines.nightly_predict import LockedError

    path = lock_path(tmp_path, (1, 4))
    assert path.name == ".nightly-1of4.lock"
    code = "import sys; from pathlib import Path; from pipelines.nightly_predict import exclusive_lock\n" \
           "with exclusive_lock(Path(sys.argv[1])): print('got it')"
    with exclusive_lock(path):
        p = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True)
        assert p.returncode != 0 and "LockedError" in p.stderr
    p = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and "got it" in p.stdout
    with pytest.raises(LockedError), exclusive_lock(path), exclusive_lock(path):
        pass


def test_bad_config_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\ninput: y\noutput: z\nshards: 1/2\n")
    from pipelines.nightly_predict import main

    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "shards" in err and str(config) in err


def test_an_option_the_batch_cannot_honour_is_a_usage_error_naming_the_key(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, m = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"model": str(pkg.path), "input": str(m.image_paths(m.cases[0])[0]),
                                      "output": str(tmp_path / "out"), "device": "cpu", "save_probabilities": True,
                                      "inference": ["inference.memory_bounded=true"]}))
    p = _run(config)
    assert p.returncode == 2, p.stderr
    assert f"nightly_predict: error: {config}: save_probabilities: saving probabilities is not supported" in p.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz"))
