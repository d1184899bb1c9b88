"""Broken model packages: refused when loaded (or when the batch builds the network), before any case is segmented,
with one line naming the package file and the cause.

The model card (``metadata.json``) records the sha256 of ``model.pt`` when the package is saved, and loading checks
it: weights changed after packaging are refused even when they still load. The card's label map must fit its
``num_classes`` and agree with ``config.yaml``; the weights must fit both.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from medseg.errors import InputError
from medseg.inference.batch import run_batch
from medseg.inference.inputs import discover_inputs
from medseg.inference.model_package import load_package
from tests.helpers import copy_phantom_scans, phantom_package


@pytest.fixture(scope="module")
def saved(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg.path


@pytest.fixture
def package_dir(saved: Path, tmp_path: Path) -> Path:
    """A copy of the package that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "pkg"))


def _card(pkg: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((pkg / "metadata.json").read_text())
    change(meta)
    (pkg / "metadata.json").write_text(json.dumps(meta))


def _config(pkg: Path, change: Callable[[dict], None]) -> None:
    cfg = yaml.safe_load((pkg / "config.yaml").read_text())
    change(cfg)
    (pkg / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_saved_card_records_the_weights_checksum(saved: Path) -> None:
    meta = json.loads((saved / "metadata.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((saved / "model.pt").read_bytes()).hexdigest()
    assert load_package(saved).build("cpu") is not None


def _retouch(pkg: Path) -> None:
    """Weights that still load and fit the architecture, one value changed: only the checksum tells."""
    state = torch.load(pkg / "model.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 0.5
    torch.save(state, pkg / "model.pt")


# kind -> (damage the package, the file named, the cause, loading or building refuses it)
KINDS: dict[str, tuple[Callable[[Path], None], str, str, str]] = {
    "tampered_weights": (
        _retouch,
        "model.pt",
        r"weights checksum mismatch: its sha256 [0-9a-f]{16}\.\.\. is not the "
        r"[0-9a-f]{16}\.\.\. the model card \(metadata\.json\) records",
        "build",
    ),
    "garbage_weights": (
        lambda p: (p / "model.pt").write_bytes(b"\x80\x04 not a torch file"),
        "model.pt",
        r"cannot load weights \(\w+\): its sha256 .* changed or damaged after",
        "build",
    ),
    "label_map_larger_than_num_classes": (
        lambda p: _card(p, lambda m: m["labels"].update(tumour=4)),
        "metadata.json",
        r"label map .*'tumour': 4.* does not fit num_classes 4",
        "load",
    ),
    "label_map_duplicate_values": (
        lambda p: _card(p, lambda m: m["labels"].update(kidney=2)),
        "metadata.json",
        r"does not fit num_classes 4 \(distinct values",
        "load",
    ),
    "class_ratios_disagree": (
        lambda p: _config(p, lambda c: c["data"].update(class_ratios=[0.2, 0.4, 0.4])),
        "config.yaml",
        r"data\.class_ratios has 3 entries, the model card's label map 4 classes",
        "load",
    ),
    "card_spacing_disagrees": (
        lambda p: _card(p, lambda m: m.update(spacing=[1.0, 1.0, 1.0])),
        "metadata.json",
        r"spacing \[1\.0, 1\.0, 1\.0\] disagrees with config\.yaml \(None\)",
        "load",
    ),
    "num_classes_disagree_with_weights": (
        lambda p: _card(p, lambda m: m.update(num_classes=5, labels={**m["labels"], "tumour": 4})),
        "model.pt",
        r"weights do not fit the architecture in config\.yaml \(Error\(s\) in loading state_dict for \w+: "
        r"size mismatch for ",
        "build",
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_package_is_refused_naming_the_file(kind: str, package_dir: Path) -> None:
    damage, name, cause, when = KINDS[kind]
    damage(package_dir)
    with pytest.raises(InputError) as e:
        load_package(package_dir).build("cpu")
    assert e.value.path == str(package_dir / name), str(e.value)
    assert re.search(cause, str(e.value)) and "\n" not in str(e.value), str(e.value)
    if when == "build":  # the card itself is fine: loading passes, building the network refuses
        load_package(package_dir)


def test_tampered_weights_stop_the_batch_before_any_case(package_dir: Path, tiny_phantom: Path, tmp_path: Path) -> None:
    _retouch(package_dir)
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 2)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="weights checksum mismatch"):
        run_batch(load_package(package_dir), discover_inputs(scans), out, device="cpu", progress=False)
    assert not list(out.glob("*.nii.gz")) and not list(out.glob("*.json"))


def test_package_saved_before_the_checksum_still_loads(package_dir: Path) -> None:
    _card(package_dir, lambda m: m.pop("weights_sha256"))
    assert load_package(package_dir).build("cpu") is not None
