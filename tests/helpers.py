"""Helpers shared by several test modules (test modules import these, never each other's private helpers).

- paths and the real CLI: ``REPO``, ``SHARED_DATA``, ``MEDSEG``, ``run_cli``;
- the "oracle" volume network and the mask it must produce: ``oracle_model``, ``expected_mask``
  (``LOWER``/``UPPER``: the CT window of the phantom preset the oracle's thresholds assume);
- a tiny model package from the phantom preset: ``phantom_package``;
- phantom scans copied into a folder of plain NIfTI files: ``copy_phantom_scans``;
- real servers on 127.0.0.1: ``free_port``, ``MlflowServer`` (an ``mlflow server`` that can be stopped and
  started again on the same port and store).

Fixtures stay in ``conftest.py``; 2D image datasets are drawn by ``tests.images2d_data``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
MEDSEG = [sys.executable, "-m", "medseg.cli"]

LOWER, UPPER = -200.0, 300.0  # the phantom preset's CT window (HU)
THRESHOLDS_HU = (40.5, 85.5, 145.5)  # half-integers: integer HU never sits on a boundary


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``medseg`` in a subprocess (the real CLI), returning the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([*MEDSEG, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"medseg {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def oracle_model() -> torch.nn.Module:
    """A fixed 1x1x1 convolution, logits linear in the windowed intensity x; argmax = number of
    ``THRESHOLDS_HU`` below x (in HU, after the ``LOWER``..``UPPER`` window)."""
    import torch

    t = [(h - LOWER) / (UPPER - LOWER) for h in THRESHOLDS_HU]
    conv = torch.nn.Conv3d(1, 4, kernel_size=1)
    s = 100.0
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, s, 2 * s, 3 * s]).view(4, 1, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -s * t[0], -s * (t[0] + t[1]), -s * (t[0] + t[1] + t[2])]))
    return conv


def expected_mask(raw: np.ndarray) -> np.ndarray:
    """What ``oracle_model`` must predict for a raw HU array: the thresholds applied voxel by voxel."""
    return sum((raw > h).astype(np.uint8) for h in THRESHOLDS_HU)


def phantom_package(tmp_path: Path, manifest_path: Path, overrides: list[str]):
    """A tiny 3D U-Net package (untrained weights) of the ``phantom_unet3d`` preset, saved to ``tmp_path / "pkg"``
    and loaded back; returns ``(ModelPackage, Manifest)``."""
    from medseg.config import load_config
    from medseg.inference.model_package import load_package, save_package
    from medseg.io.manifest import load_manifest
    from medseg.models import build_model

    cfg = load_config("phantom_unet3d", [f"data.manifest={manifest_path}", "data.patch_size=[32, 32, 16]",
                                         "model.params.channels=[4, 8, 16, 32]",
                                         "inference.precision=fp32", *overrides])  # exact masks, on bf16 CPUs too
    m = load_manifest(manifest_path)
    net = build_model(cfg.model.name, 3, m.num_channels, m.num_classes, cfg.model.params)
    save_package(tmp_path / "pkg", net, cfg, m)
    return load_package(tmp_path / "pkg"), m


def copy_phantom_scans(manifest_path: Path, folder: Path, names: Mapping[int, str] | int | None = None) -> Path:
    """Copy a phantom's training scans (``imagesTr``, sorted) into a new ``folder`` of plain NIfTI files.

    ``names``: index -> new file name (only those scans), an int n (the first n, own names) or None (all).
    """
    folder.mkdir(parents=True)
    images = sorted((Path(manifest_path).parent / "imagesTr").glob("*.nii.gz"))
    if names is None or isinstance(names, int):
        names = {i: p.name for i, p in enumerate(images[:names])}
    for i, name in names.items():
        shutil.copy(images[i], folder / name)
    return folder


def free_port() -> int:
    """A TCP port nothing listens on now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend store, served artifacts) under ``root`` on a fixed free port;
    ``start`` waits for ``/health``, ``stop`` ends it; it can be started again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class _Records(logging.Handler):
    """Collects log records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def oracle_batch(package, folder: Path, out: Path):
    """``run_batch`` of every scan in ``folder`` into ``out`` on the CPU with ``oracle_model`` as the network;
    returns ``(BatchReport, the records the batch logged to medseg.predict)``."""
    from medseg.inference.batch import run_batch
    from medseg.inference.inputs import discover_inputs
    from medseg.inference.predictor import Predictor

    handler, logger = _Records(), logging.getLogger("medseg.predict")
    logger.addHandler(handler)
    try:
        inputs = discover_inputs(folder)
        predictor = Predictor(package, device="cpu", model=oracle_model())
        report = run_batch(package, inputs, out, device="cpu", progress=False, predictor=predictor)
    finally:
        logger.removeHandler(handler)
    return report, handler.records
