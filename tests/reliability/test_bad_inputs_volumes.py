"""Broken NIfTI scans among good ones in one prediction batch: each fails alone, as one line naming its file and
the cause, and the good scans beside it are segmented.

Every bad file is written into a temp folder by the test, derived from a good phantom scan (or from its header
alone). One batch per prediction path (standard, memory-bounded, resampled) runs the real predictor with the oracle
network of ``tests.helpers`` over the good and bad files together; each kind is then checked in its own record
(``<id>.json``: status ``failed``, the one-line error) and in the batch log (one line, no traceback). The table of
kinds and what happens to each is ``docs/reliability.md``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.inference.model_package import ModelPackage
from medseg.inference.options import apply_inference_overrides
from medseg.inference.records import BatchReport
from tests.helpers import copy_phantom_scans, oracle_batch, phantom_package

GOOD = {0: "a_good.nii.gz", 1: "m_good.nii.gz", 3: "z_good.nii.gz"}  # sorted among the bad ones: the batch goes on


@dataclass(frozen=True)
class Good:
    """The good scan bad files are made from: its file, image, voxels and bytes."""

    path: Path
    img: nib.Nifti1Image
    array: np.ndarray
    raw: bytes


def _save(folder: Path, name: str, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(folder / name))


def _raw_nifti(folder: Path, name: str, header: nib.Nifti1Header, data: bytes) -> None:
    """A file from a header written as is (nibabel would fix or refuse these headers when saving)."""
    header["vox_offset"] = 352
    block = header.binaryblock + b"\0" * 4 + data
    (folder / name).write_bytes(gzip.compress(block) if name.endswith(".gz") else block)


def _with_pixdim(folder: Path, name: str, good: Good, value: float) -> None:
    header = good.img.header.copy()
    header["pixdim"][1] = value
    _raw_nifti(folder, name, header, good.array.tobytes(order="F"))


def _absurd(folder: Path, name: str, good: Good) -> None:
    header = good.img.header.copy()
    header.set_data_shape((30000, 30000, 30000))
    _raw_nifti(folder, name, header, good.array.tobytes(order="F"))


def _corrupt_gzip(folder: Path, name: str, good: Good) -> None:
    """One flipped bit in the deflate stream that nibabel alone reads without an error, into wrong voxels."""
    for pos in range(len(good.raw) // 2, len(good.raw) - 8):
        bad = bytearray(good.raw)
        bad[pos] ^= 0x10
        (folder / name).write_bytes(bytes(bad))
        try:
            silent = np.asanyarray(nib.load(str(folder / name)).dataobj)
        except Exception:
            continue
        if not np.array_equal(silent, good.array):
            return
    raise AssertionError("no silently decoding bit flip found")


def _singular(folder: Path, name: str, good: Good) -> None:
    affine = good.img.affine.copy()
    affine[:3, 0] = 0.0
    img = nib.Nifti1Image(good.array, None)
    img.header.set_sform(affine, 1)
    img.header.set_qform(None, 0)
    nib.save(img, str(folder / name))


def _forms_disagree(folder: Path, name: str, good: Good) -> None:
    img = nib.Nifti1Image(good.array, good.img.affine)
    shifted = good.img.affine.copy()
    shifted[0, 3] += 12.0  # 4 voxels of 3 mm
    img.set_sform(good.img.affine, 1)
    img.set_qform(shifted, 1)
    nib.save(img, str(folder / name))


def _with_voxel(value: float) -> Callable[[Path, str, Good], None]:
    def write(folder: Path, name: str, good: Good) -> None:
        a = good.array.astype(np.float32)
        a[5, 6, 7] = value
        _save(folder, name, a, good.img.affine)

    return write


# kind -> (file name, writer, cause the one-line error must give)
KINDS: dict[str, tuple[str, Callable[[Path, str, Good], None], str]] = {
    "truncated_gzip": (
        "b_trunc.nii.gz",
        lambda d, n, g: (d / n).write_bytes(g.raw[: len(g.raw) // 2]),
        r"corrupt gzip data \(EOFError: Compressed file ended",
    ),
    "corrupt_gzip": ("b_flip.nii.gz", _corrupt_gzip, r"corrupt gzip data \((BadGzipFile|error|EOFError)"),
    "zero_bytes": ("c_empty.nii.gz", lambda d, n, g: (d / n).write_bytes(b""), r"empty file \(0 bytes\)"),
    "not_nifti_gz": (
        "d_text.nii.gz",
        lambda d, n, g: (d / n).write_text("a report, not a scan\n" * 40),
        r"not a readable NIfTI file \(ImageFileError: .*not a gzip file",
    ),
    "not_nifti_plain": (
        "d_text2.nii",
        lambda d, n, g: (d / n).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 400),
        r"not a readable NIfTI file",
    ),
    "image_2d": (
        "e_2d.nii.gz",
        lambda d, n, g: _save(d, n, g.array[:, :, 0], g.img.affine),
        r"expected a 3D volume, got shape \(48, 48\)",
    ),
    "image_4d": (
        "e_4d.nii.gz",
        lambda d, n, g: _save(d, n, np.stack([g.array, g.array], -1), g.img.affine),
        r"model expects 1 input channel\(s\), got 2",
    ),
    "nan_voxels": ("f_nan.nii.gz", _with_voxel(np.nan), r"image contains NaN/inf voxels"),
    "inf_voxels": ("f_inf.nii.gz", _with_voxel(-np.inf), r"image contains NaN/inf voxels"),
    "constant_image": (
        "g_const.nii.gz",
        lambda d, n, g: _save(d, n, np.full_like(g.array, 40), g.img.affine),
        r"image is constant \(every voxel 40\): no contrast to segment",
    ),
    "zero_spacing": (
        "h_sp0.nii.gz",
        lambda d, n, g: _with_pixdim(d, n, g, 0.0),
        r"invalid voxel spacing \[0\.0, 3\.0, 4\.0\] in the header \(pixdim\)",
    ),
    "negative_spacing": (
        "h_spneg.nii.gz",
        lambda d, n, g: _with_pixdim(d, n, g, -3.0),
        r"invalid voxel spacing \[-3\.0, 3\.0, 4\.0\]",
    ),
    "nan_spacing": (
        "h_spnan.nii.gz",
        lambda d, n, g: _with_pixdim(d, n, g, np.nan),
        r"invalid voxel spacing \[nan, 3\.0, 4\.0\]",
    ),
    "singular_affine": ("i_singular.nii.gz", _singular, r"invalid affine \(singular: not invertible"),
    "sform_qform_disagree": (
        "j_forms.nii.gz",
        _forms_disagree,
        r"sform and qform disagree: .* up to 12 mm apart \(tolerance 1\.5 mm\)",
    ),
    "absurd_size_gz": (
        "k_huge.nii.gz",
        _absurd,
        r"declares 30000x30000x30000 int16 voxels \(54\.0 TB\), more than a .* gzip file can hold",
    ),
    "absurd_size_nii": (
        "k_huge2.nii",
        _absurd,
        r"truncated: the header declares 30000x30000x30000 int16 voxels \(54\.0 TB\) from byte 352",
    ),
    "complex_voxels": (
        "l_complex.nii.gz",
        lambda d, n, g: _save(d, n, g.array.astype(np.complex64), g.img.affine),
        r"voxel type complex64 is not a scalar intensity",
    ),
}
# the kinds that reach the voxels: checked on every prediction path (the header kinds fail before any path)
VOXEL_KINDS = ("truncated_gzip", "corrupt_gzip", "nan_voxels", "constant_image", "absurd_size_gz")


@dataclass
class Batch:
    """One batch over the folder: its report, the per-case records and the log."""

    report: BatchReport
    out: Path
    log: list[logging.LogRecord]


@pytest.fixture(scope="module")
def scans(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = copy_phantom_scans(tiny_phantom, tmp_path_factory.mktemp("bad_volumes") / "scans", GOOD)
    path = folder / GOOD[0]
    img = nib.load(str(path))
    good = Good(path, img, np.asanyarray(img.dataobj), path.read_bytes())
    assert good.array.dtype == np.int16 and good.array.shape == (48, 48, 24)
    for name, write, _ in KINDS.values():
        write(folder, name, good)
    return folder


@pytest.fixture(scope="module")
def package(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    pkg, _ = phantom_package(tmp_path_factory.mktemp("pkg"), tiny_phantom, ["data.spacing=null"])
    return pkg


def _variant(pkg: ModelPackage, path: str) -> ModelPackage:
    if path == "memory_bounded":
        return apply_inference_overrides(pkg, ["inference.memory_bounded=true"])
    if path == "resampled":  # the same network at another spacing: the slab-wise resampling path
        data = pkg.config.data.model_copy(update={"spacing": (4.0, 4.0, 4.0)})
        return replace(pkg, config=pkg.config.model_copy(update={"data": data}))
    return pkg


@pytest.fixture(scope="module")
def batches(package: ModelPackage, scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Batch]:
    done: dict[str, Batch] = {}

    def run(path: str) -> Batch:
        if path not in done:
            pkg = _variant(package, path)
            out = tmp_path_factory.mktemp(f"out_{path}")
            report, records = oracle_batch(pkg, scans, out)
            done[path] = Batch(report, out, records)
        return done[path]

    return run


def _record(batch: Batch, name: str) -> dict:
    return json.loads((batch.out / f"{name.split('.')[0]}.json").read_text())


def assert_fails_alone(batch: Batch, scans: Path, name: str, cause: str) -> None:
    """The case of ``name`` failed with one line ``<its path>: <cause>``, logged without a traceback; no output."""
    cid = name.split(".")[0]
    record = _record(batch, name)
    error = record["error"]
    assert record["status"] == "failed" and record["case"] == cid
    assert error.startswith(f"{scans / name}: "), error
    assert re.search(cause, error), error
    assert "\n" not in error and "Traceback" not in error and not re.search(r"object at 0x[0-9a-f]+", error), error
    logged = [r for r in batch.log if r.getMessage().startswith(f"{cid}: ")]
    assert len(logged) == 1 and logged[0].exc_info is None and "\n" not in logged[0].getMessage()
    assert logged[0].getMessage() == f"{cid}: {error}"
    assert not (batch.out / f"{cid}.nii.gz").exists()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_volume_fails_alone(kind: str, batches: Callable[[str], Batch], scans: Path) -> None:
    name, _, cause = KINDS[kind]
    assert_fails_alone(batches("standard"), scans, name, cause)


@pytest.mark.parametrize("path", ["memory_bounded", "resampled"])
@pytest.mark.parametrize("kind", VOXEL_KINDS)
def test_bad_volume_fails_alone_on_every_path(
    kind: str, path: str, batches: Callable[[str], Batch], scans: Path
) -> None:
    name, _, cause = KINDS[kind]
    assert_fails_alone(batches(path), scans, name, cause)


@pytest.mark.parametrize("path", ["standard", "memory_bounded", "resampled"])
def test_the_batch_goes_on(path: str, batches: Callable[[str], Batch], scans: Path) -> None:
    """Only the bad files failed: every good scan beside them has its mask and an ok record."""
    batch = batches(path)
    good = sorted(n.split(".")[0] for n in GOOD.values())
    assert sorted(batch.report.done) == good
    assert sorted(batch.report.failed) == sorted(n.split(".")[0] for n, _, _ in KINDS.values())
    for cid in good:
        record = _record(batch, cid)
        assert record["status"] == "ok" and record["organs"]["liver"]["voxels"] > 0
        assert nib.load(str(batch.out / f"{cid}.nii.gz")).shape == (48, 48, 24)
    assert not [r for r in batch.log if r.exc_info]  # no traceback anywhere in the batch log


def test_unusual_but_valid_scans_pass(scans: Path, tmp_path: Path, package: ModelPackage) -> None:
    """Not every unusual file is bad: a float32 copy of a good scan, stored uncompressed, is segmented alike."""
    folder = tmp_path / "fine"
    folder.mkdir()
    good = nib.load(str(scans / GOOD[0]))
    _save(folder, "float.nii", np.asanyarray(good.dataobj).astype(np.float32), good.affine)
    shutil.copy(scans / GOOD[0], folder / "int.nii.gz")
    report, _ = oracle_batch(package, folder, tmp_path / "out")
    assert sorted(report.done) == ["float", "int"] and not report.failed
    masks = [np.asanyarray(nib.load(str(tmp_path / "out" / f"{c}.nii.gz")).dataobj) for c in ("float", "int")]
    assert np.array_equal(*masks)
