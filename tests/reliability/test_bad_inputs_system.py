"""The machine, not the scan, in the way: an unreadable input file, an output folder that cannot be written, a disk
that fills up while a mask is written.

The suite runs as root in CI, and root ignores permission bits. So the unreadable file is read by the real CLI
under ``setpriv`` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (still uid 0, which then meets the file's
``000`` bits like anyone else); the read-only output folder is a read-only tmpfs mounted there, and the full disk a
1 MiB tmpfs filled up to a few pages. Not as root, the plain permission bits are used, and the full disk (mounting
needs root) is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import InputError
from medseg.inference.model_package import ModelPackage
from tests.helpers import MEDSEG, copy_phantom_scans, oracle_batch, phantom_package

ROOT = os.geteuid() == 0
DROP_CAPS = [
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
    "--inh-caps",
    "-dac_override,-dac_read_search",
]


@pytest.fixture(scope="module")
def package(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg


def _unprivileged(probe: Path) -> list[str]:
    """The command prefix under which permission bits apply to this process's children (skip if there is none)."""
    if not ROOT:
        return []
    probe.write_text("x")
    probe.chmod(0)
    if (
        shutil.which("setpriv") is None
        or subprocess.run([*DROP_CAPS, "cat", str(probe)], capture_output=True).returncode == 0
    ):
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: root would read a 000 file")
    return DROP_CAPS


def test_unreadable_input_file_fails_alone_at_the_cli(
    package: ModelPackage, tiny_phantom: Path, tmp_path: Path
) -> None:
    prefix = _unprivileged(tmp_path / "probe")
    scans = copy_phantom_scans(
        tiny_phantom, tmp_path / "scans", {0: "a_good.nii.gz", 1: "b_locked.nii.gz", 2: "z_good.nii.gz"}
    )
    (scans / "b_locked.nii.gz").chmod(0)
    good = (scans / "a_good.nii.gz").read_bytes()
    (scans / "c_cut.nii.gz").write_bytes(good[: len(good) // 2])  # the user's report: a traceback through LoadImaged
    out = tmp_path / "out"
    p = subprocess.run(
        [
            *prefix,
            *MEDSEG,
            "predict",
            "--model",
            str(package.path),
            "--input",
            str(scans),
            "--output",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 3, p.stderr  # some cases failed
    error = f"{scans / 'b_locked.nii.gz'}: cannot read the file (Permission denied)"
    assert f"  failed b_locked: {error}" in p.stderr.splitlines() and "Traceback" not in p.stderr, p.stderr
    assert json.loads((out / "b_locked.json").read_text())["error"] == error
    cut = [line for line in p.stderr.splitlines() if line.startswith("  failed c_cut: ")]
    assert len(cut) == 1 and f"{scans / 'c_cut.nii.gz'}: corrupt gzip data (EOFError: " in cut[0], p.stderr
    assert "LoadImaged" not in p.stderr and "object at 0x" not in p.stderr
    for cid in ("a_good", "z_good"):
        assert json.loads((out / f"{cid}.json").read_text())["status"] == "ok"
    assert not (out / "b_locked.nii.gz").exists()


def _mount_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()[:120]})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a failed test may hold a file


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write into: a read-only tmpfs as root, else mode 555."""
    if ROOT:
        yield from _mount_tmpfs(tmp_path / "ro", "ro,size=1m")
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_output_folder_not_writable_is_one_error_before_any_case(
    package: ModelPackage, tiny_phantom: Path, tmp_path: Path, read_only_folder: Path
) -> None:
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 2)
    with pytest.raises(InputError) as e:
        oracle_batch(package, scans, read_only_folder)
    assert e.value.path == str(read_only_folder) and "not writable" in str(e.value)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs filled up to 64 KiB (root only: mounting needs it)."""
    if not ROOT:
        pytest.skip("a full disk is a tmpfs mounted by the test, which needs root")
    for folder in _mount_tmpfs(tmp_path / "small_disk", "size=1m"):
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        (folder / "filler").write_bytes(b"\0" * (free - 64 * 1024))
        yield folder


def test_full_disk_while_writing_fails_that_case_and_leaves_no_partial_file(
    package: ModelPackage, tiny_phantom: Path, tmp_path: Path, full_disk: Path
) -> None:
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", {0: "a_small.nii.gz", 1: "z_small.nii.gz"})
    rng = np.random.default_rng(0)  # noise across the oracle's thresholds: a mask that compresses to ~100 KB
    big = rng.integers(-200, 300, size=(96, 96, 48)).astype(np.int16)
    nib.save(nib.Nifti1Image(big, np.diag([1.0, 1.0, 1.0, 1.0])), str(scans / "m_big.nii.gz"))
    report, _ = oracle_batch(package, scans, full_disk)
    assert sorted(report.done) == ["a_small", "z_small"] and list(report.failed) == ["m_big"]
    error = json.loads((full_disk / "m_big.json").read_text())["error"]
    assert error == f"{full_disk / 'm_big.nii.gz'}: cannot write this output (No space left on device)"
    assert sorted(p.name for p in full_disk.iterdir() if "m_big" in p.name) == ["m_big.json"]  # no partial mask
    assert not [p.name for p in full_disk.iterdir() if p.name.startswith(".")]  # no temp file left either
    for cid in report.done:
        assert nib.load(str(full_disk / f"{cid}.nii.gz")).shape == (48, 48, 24)
