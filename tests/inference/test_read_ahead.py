"""Reading the next case ahead (checksums, page cache) while a batch runs: same outputs and records as without,
checksums of the real files, and a case whose file vanished fails with the loader's own message."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.inference.batch import run_batch
from medseg.inference.inputs import case_sha256, discover_inputs
from medseg.inference.predictor import Predictor
from medseg.inference.read_ahead import ReadAhead
from tests.helpers import copy_phantom_scans, oracle_model, phantom_package


def test_read_ahead_yields_each_cases_checksum_in_order(tiny_phantom: Path, tmp_path: Path) -> None:
    cases = discover_inputs(copy_phantom_scans(tiny_phantom, tmp_path / "scans", 3))
    ahead = ReadAhead(cases)
    try:
        got = [ahead.take(i).result() for i in range(len(cases))]  # type: ignore[union-attr]
        assert ahead.take(len(cases)) is None
    finally:
        ahead.close()
    assert got == [hashlib.sha256(c.images[0].read_bytes()).hexdigest() for c in cases] == [case_sha256(c) for c in cases]
    off = ReadAhead(cases, enabled=False)
    assert off.take(0) is None
    off.close()


def test_batch_with_and_without_read_ahead_agree(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 3)
    cases = discover_inputs(scans)
    predictor = Predictor(pkg, device="cpu", model=oracle_model())
    records = {}
    for ahead in (True, False):
        out = tmp_path / f"out-{ahead}"
        report = run_batch(pkg, cases, out, device="cpu", progress=False, predictor=predictor, read_ahead=ahead)
        assert sorted(report.done) == sorted(c.id for c in cases) and not report.failed
        records[ahead] = {c.id: json.loads((out / f"{c.id}.json").read_text()) for c in cases}
    for c in cases:
        a, b = records[True][c.id], records[False][c.id]
        assert a["input_sha256"] == b["input_sha256"] == hashlib.sha256(c.images[0].read_bytes()).hexdigest()
        assert a["organs"] == b["organs"]
        masks = [np.asanyarray(nib.load(tmp_path / f"out-{x}" / f"{c.id}.nii.gz").dataobj) for x in (True, False)]
        assert np.array_equal(*masks)


def test_vanished_input_fails_with_the_loaders_message_and_the_batch_goes_on(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null"])
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 3)
    cases = discover_inputs(scans)
    cases[1].images[0].unlink()  # gone between discovery and its turn (a PACS export cleaned up, say)
    report = run_batch(pkg, cases, tmp_path / "out", device="cpu", progress=False,
                       predictor=Predictor(pkg, device="cpu", model=oracle_model()))
    assert list(report.failed) == [cases[1].id] and len(report.done) == len(cases) - 1
    record = json.loads((tmp_path / "out" / f"{cases[1].id}.json").read_text())
    assert record["status"] == "failed" and "file not found" in record["error"] and cases[1].images[0].name in record["error"]
