"""Training checkpoints (``medseg.runtime.checkpoint``): RNG state round trip, atomic save, safe load."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import InputError
from medseg.runtime.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


class _NotATensor:  # pickled by torch.save, refused by a weights-only load
    pass


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_survives_a_checkpoint_and_replays_the_same_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leaves a cached Gaussian in numpy's state: it must come back too
    save_checkpoint(tmp_path / "ck" / "last.pt", {"epoch": 3, "rng": rng_state()})
    first = (*_draws(), float(np.random.randn()))
    _draws()  # move every generator on
    back = load_checkpoint(tmp_path / "ck" / "last.pt")
    assert back["epoch"] == 3
    set_rng_state(back["rng"])
    assert (*_draws(), float(np.random.randn())) == first
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["last.pt"]  # no temp file left beside it


def test_missing_or_unsafe_checkpoint_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"obj": _NotATensor()}, tmp_path / "code.pt")  # would run code on a plain torch.load
    with pytest.raises(InputError, match=r"code.pt: cannot load checkpoint \(UnpicklingError"):
        load_checkpoint(tmp_path / "code.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputError, match="cut.pt: cannot load checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
