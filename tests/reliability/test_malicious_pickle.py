"""A pickle that runs code when unpickled is refused everywhere medseg loads torch files (``weights_only=True``).

The payload's ``__reduce__`` would create a marker file; the test asserts the load fails with one line naming the
file, and the marker never appears (the code did not run). A plain ``torch.load(weights_only=False)`` of the same
file does run it: the proof that the payload is real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medseg.errors import InputError
from medseg.inference.model_package import load_package
from medseg.runtime.checkpoint import load_checkpoint
from tests.helpers import phantom_package


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_payload(path: Path, marker: Path) -> Path:
    torch.save({"state": _Payload(marker)}, path)
    return path


def test_the_payload_is_real(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _write_payload(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)  # the unsafe load this project never does
    assert marker.exists()


def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _write_payload(tmp_path / "last.pt", marker)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.path == str(path) and not marker.exists()


def test_model_package_with_malicious_weights_is_refused(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, [])
    marker = tmp_path / "ran"
    _write_payload(pkg.path / "model.pt", marker)
    with pytest.raises(InputError) as e:
        load_package(pkg.path).build()
    assert e.value.path == str(pkg.path / "model.pt") and "\n" not in str(e.value)
    assert not marker.exists()
