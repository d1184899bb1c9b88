"""A batch's files on disk: outputs of a case, completion (resume) against the files really there, stale
temps of a killed run, and ``summary.csv`` columns per data kind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medseg.inference.inputs import InputCase
from medseg.inference.records import (
    BatchReport,
    case_records,
    is_complete,
    outputs_of,
    probabilities_name,
    remove_stale_temps,
    write_summary,
)
from medseg.io.atomic import atomic_path, write_json_atomic

LABELS = {"background": 0, "spleen": 2, "liver": 1}


def _case(cid: str, suffix: str = ".nii.gz") -> InputCase:
    return InputCase(cid, (Path(f"/scans/{cid}{suffix}"),))


def _finish(out: Path, cid: str, outputs: list[str], status: str = "ok", **extra) -> None:
    """A case as the batch leaves it: its outputs, then the JSON record."""
    for name in outputs:
        (out / name).write_bytes(b"data")
    write_json_atomic(out / f"{cid}.json", {"case": cid, "status": status, "outputs": outputs, **extra})


@pytest.fixture
def stale_temp():
    """Make the temp file ``atomic_path`` makes for a target and leave it, as a killed process does (the write
    never finishes: the context stays open until teardown, so nothing renames or removes it)."""
    open_writes = []

    def make(target: Path, suffix: str = "") -> Path:
        cm = atomic_path(target, suffix)
        open_writes.append(cm)
        return cm.__enter__()

    yield make
    open_writes.clear()  # the abandoned writes are collected: their finally removes any temp still there


def test_outputs_and_probabilities_names() -> None:
    assert outputs_of(_case("a")) == ["a.nii.gz"]
    assert outputs_of(_case("a"), probabilities=True) == ["a.nii.gz", "a_probs.nii.gz"]
    assert outputs_of(_case("b", ".png"), probabilities=True) == ["b.png", "b_probs.npy"]
    assert probabilities_name(_case("b", ".jpg")) == "b_probs.npy"


def test_is_complete_agrees_with_the_files(tmp_path: Path) -> None:
    out = tmp_path
    assert not is_complete(out, "none")  # no record
    _finish(out, "ok", ["ok.nii.gz"])
    assert is_complete(out, "ok")

    _finish(out, "missing", ["missing.nii.gz"])
    (out / "missing.nii.gz").unlink()
    assert not is_complete(out, "missing")

    _finish(out, "empty", ["empty.nii.gz"])
    (out / "empty.nii.gz").write_bytes(b"")  # zero bytes: not a finished output
    assert not is_complete(out, "empty")

    _finish(out, "failed", ["failed.nii.gz"], status="failed", error="boom")
    assert not is_complete(out, "failed")

    _finish(out, "corrupt", ["corrupt.nii.gz"])
    (out / "corrupt.json").write_text('{"case": "corrupt", "status": "o')  # truncated
    assert not is_complete(out, "corrupt")

    # the outputs the caller needs now (e.g. probabilities on a resume) override the record's list
    assert not is_complete(out, "ok", ["ok.nii.gz", "ok_probs.nii.gz"])
    (out / "ok_probs.nii.gz").write_bytes(b"p")
    assert is_complete(out, "ok", ["ok.nii.gz", "ok_probs.nii.gz"])

    # an old record without an outputs list: the mask is what must exist
    (out / "old.json").write_text(json.dumps({"case": "old", "status": "ok"}))
    assert not is_complete(out, "old")
    (out / "old.nii.gz").write_bytes(b"m")
    assert is_complete(out, "old")


def test_is_complete_with_a_record_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"m")
    (tmp_path / "a.json").write_text("[1, 2]")
    assert not is_complete(tmp_path, "a")


def test_remove_stale_temps_only_of_these_cases(tmp_path: Path, stale_temp) -> None:
    out = tmp_path
    mine, other = _case("case1"), _case("case10")  # case10 (another shard) starts with case1's name
    temps = [stale_temp(out / "case1.nii.gz", ".nii.gz"), stale_temp(out / "case1_probs.nii.gz", ".nii.gz"),
             stale_temp(out / "case1.json")]
    others = [stale_temp(out / "case10.nii.gz", ".nii.gz"), stale_temp(out / "case10.json")]
    _finish(out, "case1", ["case1.nii.gz"])
    (out / ".hidden_note").write_text("x")
    assert all(t.exists() and t.name.startswith(".case1") for t in temps)

    assert remove_stale_temps(out, [mine]) == 3
    assert not any(t.exists() for t in temps)
    assert all(t.exists() for t in others)
    assert (out / "case1.nii.gz").read_bytes() == b"data" and (out / ".hidden_note").exists()
    assert is_complete(out, "case1")
    assert remove_stale_temps(out, [mine]) == 0
    assert remove_stale_temps(out, [other]) == 2 and not any(t.exists() for t in others)


def test_remove_stale_temps_of_a_case_id_with_brackets(tmp_path: Path, stale_temp) -> None:
    temp = stale_temp(tmp_path / "scan[1].nii.gz", ".nii.gz")  # NIfTI case ids keep brackets ("scan[1].nii.gz")
    assert remove_stale_temps(tmp_path, [_case("scan[1]")]) == 1 and not temp.exists()


def test_case_records_ignore_other_json(tmp_path: Path, stale_temp) -> None:
    _finish(tmp_path, "b", ["b.nii.gz"])
    _finish(tmp_path, "a", ["a.nii.gz"], status="failed")
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1}))  # not a record
    (tmp_path / "c.json").write_text(json.dumps({"case": "other", "status": "ok"}))  # names another case
    (tmp_path / "broken.json").write_text("{")
    stale_temp(tmp_path / "d.json").write_text(json.dumps({"case": "d", "status": "ok"}))  # in-flight temp
    assert [r["case"] for r in case_records(tmp_path)] == ["a", "b"]


def _read_summary(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_summary_columns_for_volumes(tmp_path: Path) -> None:
    organs = {"liver": {"volume_ml": 12.5, "voxels": 100}, "spleen": {"volume_ml": 3.0, "voxels": 24}}
    _finish(tmp_path, "v2", ["v2.nii.gz"], seconds=1.5, runtime_s=1.2, peak_rss_mb=300.0, organs=organs)
    _finish(tmp_path, "v1", ["v1.nii.gz"], status="failed", error="unreadable", seconds=0.1)
    path = write_summary(tmp_path, LABELS)
    fields, rows = _read_summary(path)
    assert fields == ["case", "status", "seconds", "runtime_s", "peak_rss_mb", "liver_ml", "liver_voxels",
                      "spleen_ml", "spleen_voxels", "error"]
    assert [r["case"] for r in rows] == ["v1", "v2"]
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "unreadable" and rows[0]["liver_ml"] == ""
    assert (rows[1]["liver_ml"], rows[1]["spleen_voxels"], rows[1]["peak_rss_mb"]) == ("12.5", "24", "300.0")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_summary_columns_for_images(tmp_path: Path) -> None:
    classes = {"background": {"pixels": 90, "fraction": 0.9}, "liver": {"pixels": 10, "fraction": 0.1}}
    _finish(tmp_path, "img", ["img.png"], classes=classes)
    fields, rows = _read_summary(write_summary(tmp_path, LABELS, kind="image2d"))
    assert fields[5:-1] == ["background_pixels", "background_fraction", "liver_pixels", "liver_fraction",
                            "spleen_pixels", "spleen_fraction"]
    assert (rows[0]["background_pixels"], rows[0]["liver_fraction"], rows[0]["spleen_pixels"]) == ("90", "0.1", "")


def test_exit_code() -> None:
    assert BatchReport(done=["a"]).exit_code == 0
    assert BatchReport(done=["a"], failed={"b": "boom"}).exit_code == 3
