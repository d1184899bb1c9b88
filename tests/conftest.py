"""Shared fixtures: a real MLflow tracking server on 127.0.0.1, tiny phantoms, the shared real data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from tests.helpers import MEDSEG, REPO, SHARED_DATA, MlflowServer, run_cli  # noqa: F401  (re-exported: older imports)

# Property tests are reproducible in CI (the same examples every run, no example database in a fresh clone);
# HYPOTHESIS_PROFILE=explore searches anew with more examples.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("explore", max_examples=500)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _mlflow_environment_restored() -> object:
    """``mlflow.set_tracking_uri`` / ``set_registry_uri`` (called by some tests) also set ``MLFLOW_*`` variables in
    ``os.environ``, which every later subprocess would inherit: each test ends with the environment it began with."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_") and k not in before]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Start ``mlflow server`` (SQLite backend, served artifacts) on 127.0.0.1; yield its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-case phantom (small volumes) written once per session; returns its manifest path."""
    from medseg.data.phantom import write_phantom

    out = tmp_path_factory.mktemp("phantom")
    m = write_phantom(out, cases=6, seed=0, val_fraction=0.34, shape=(48, 48, 24), spacing=(3.0, 3.0, 4.0))
    return m.path


@pytest.fixture
def phantom_copy(tiny_phantom: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny phantom (for tests that damage files)."""
    dst = tmp_path / "phantom"
    shutil.copytree(tiny_phantom.parent, dst)
    return dst / "dataset.json"


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """The real MSD Task04 hippocampus training data in ../shared/data (skip if absent)."""
    d = SHARED_DATA / "hippocampus"
    if not (d / "dataset.json").is_file():
        pytest.skip(f"real data not found at {d}")
    return d


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """The real MR DICOM series in ../shared/data (skip if absent)."""
    d = SHARED_DATA / "dicom_mr_series"
    if not d.is_dir():
        pytest.skip(f"real data not found at {d}")
    return d

