"""Pixel decoding of real CT in every transfer syntax of ``shared/data/dicom_ct_transfer_syntaxes``.

Each file goes through ``medseg.io.dicom_pixels.read_slice_pixels`` (what ``read_series`` uses) and is compared,
in HU (each file's own RescaleSlope/Intercept applied: dcmtk's lossy JPEG re-encodings rescale the 16-bit CT into
8 or 12 bits), with its uncompressed original: ``cornerstone_CTImage/CTImage.dcm`` for the cornerstone
re-encodings, ``nema_wg04_CT/REF/CT?_UNC.zst`` (decompressed here with the ``zstd`` tool) for NEMA WG04.

Tolerances (``CASES``): lossless syntaxes must give exactly the reference's stored values. Lossy ones:

* JPEG-LS near-lossless: the standard bounds every error by the NEAR parameter of the scan header (1 for the
  cornerstone file, 4 for WG04, read from the codestreams by ``test_jpegls_bound_is_near_of_the_codestream``);
  the measured maxima reach it exactly.
* JPEG (DCT, dcmtk/IJG): measured max + one stored value x RescaleSlope, the largest difference measured between
  two decoders (GDCM and pylibjpeg on the 12-bit file); RMS: measured + 10 %.
* JPEG 2000 irreversible: no bound exists; measured + 25 % (every installed decoder gave the same values).

Measured (pydicom 3.0.2, pylibjpeg 2.1, pyjpegls 1.5.1, python-gdcm 3.2.6), max |error| / RMS in HU:
baseline 8-bit (q100, 8.9:1) 64.2 / 22.7; extended, spectral and progressive 12-bit (q90, 7.2-7.7:1) 35.6 / 5.19
(spectral and progressive bit-identical to extended, decoded by GDCM); J2K cornerstone (3.8:1) 5 / 0.89; WG04
CT1_J2KI (69:1) 352 / 38.0, CT2_J2KI (106:1) 402 / 30.3; JPEG-LS near-lossless 1 / 0.83 and 4 / 2.57, 4 / 2.52.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import generate_uid

from medseg.errors import InputError
from medseg.io.dicom_pixels import (
    GDCM_SYNTAXES,
    decoder_row,
    decoder_table,
    decoder_table_markdown,
    read_slice_pixels,
)
from medseg.io.dicom_series import discover_series, read_series
from tests.helpers import SHARED_DATA

DATA = SHARED_DATA / "dicom_ct_transfer_syntaxes"
CS = "cornerstone_CTImage/CTImage.dcm"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared transfer-syntax data not available")


@dataclass(frozen=True)
class Case:
    file: str  # below DATA
    reference: str  # "CTImage", "CT1" or "CT2"
    max_hu: float  # 0: lossless, stored values must equal the reference's
    rms_hu: float = 0.0

    @property
    def path(self) -> Path:
        return DATA / self.file


def _cs(syntax: str, uid: str, max_hu: float = 0.0, rms_hu: float = 0.0) -> Case:
    return Case(f"{CS}_{syntax}TransferSyntax_{uid}.dcm", "CTImage", max_hu, rms_hu)


def _wg(folder: str, ct: str, max_hu: float = 0.0, rms_hu: float = 0.0) -> Case:
    return Case(f"nema_wg04_CT/{folder}/{ct}_{folder}", ct, max_hu, rms_hu)


CASES = [
    _cs("LittleEndianImplicit", "1.2.840.10008.1.2"),
    _cs("LittleEndianExplicit", "1.2.840.10008.1.2.1"),
    _cs("DeflatedExplicitVRLittleEndian", "1.2.840.10008.1.2.1.99"),
    _cs("BigEndianExplicit", "1.2.840.10008.1.2.2"),
    _cs("JPEGProcess1", "1.2.840.10008.1.2.4.50", 64.22 + 32.12, 25.0),  # slope 32.12 HU per stored value
    _cs("JPEGProcess2_4", "1.2.840.10008.1.2.4.51", 35.63 + 2.0, 5.7),  # slope 2.0
    _cs("JPEGProcess6_8", "1.2.840.10008.1.2.4.53", 35.63 + 2.0, 5.7),  # GDCM
    _cs("JPEGProcess10_12", "1.2.840.10008.1.2.4.55", 35.63 + 2.0, 5.7),  # GDCM
    _cs("JPEGProcess14", "1.2.840.10008.1.2.4.57"),
    _cs("JPEGProcess14SV1", "1.2.840.10008.1.2.4.70"),
    _cs("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
    _cs("JPEGLSLossy", "1.2.840.10008.1.2.4.81", 1, 1.0),  # NEAR = 1
    _cs("JPEG2000LosslessOnly", "1.2.840.10008.1.2.4.90"),
    _cs("JPEG2000", "1.2.840.10008.1.2.4.91", 5 * 1.25, 0.89 * 1.25),
    _cs("RLELossless", "1.2.840.10008.1.2.5"),
    *[_wg(f, ct) for ct in ("CT1", "CT2") for f in ("J2KR", "JLSL", "JPLL", "RLE")],
    _wg("J2KI", "CT1", 352 * 1.25, 38.0 * 1.25),
    _wg("J2KI", "CT2", 402 * 1.25, 30.3 * 1.25),
    _wg("JLSN", "CT1", 4, 2.6),  # NEAR = 4
    _wg("JLSN", "CT2", 4, 2.6),
]


def _case(suffix: str) -> Case:
    return next(c for c in CASES if c.file.endswith(suffix))


def _hu(path: Path, stored: np.ndarray) -> np.ndarray:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return stored.astype(np.float64) * float(header.get("RescaleSlope", 1)) + float(header.get("RescaleIntercept", 0))


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (stored values, HU) of the uncompressed originals."""
    paths = {"CTImage": DATA / CS}
    zstd = shutil.which("zstd")
    if zstd is not None:
        folder = tmp_path_factory.mktemp("wg04_ref")
        for ct in ("CT1", "CT2"):
            paths[ct] = folder / f"{ct}_UNC"
            subprocess.run(
                [zstd, "-q", "-d", str(DATA / f"nema_wg04_CT/REF/{ct}_UNC.zst"), "-o", str(paths[ct])],
                check=True,
                timeout=60,
            )
    out = {}
    for name, path in paths.items():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # truly uncompressed
        out[name] = (ds.pixel_array, _hu(path, ds.pixel_array))
    return out


def _reference(references: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in references:
        pytest.skip("the zstd tool is needed to decompress the WG04 references")
    return references[name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: Path(c.file).name.removeprefix("CTImage.dcm_"))
def test_each_file_decodes_to_its_reference(case: Case, references: dict) -> None:
    header = pydicom.dcmread(case.path, stop_before_pixels=True)
    syntax = header.file_meta.TransferSyntaxUID
    assert decoder_row(syntax).route == ("gdcm" if syntax in GDCM_SYNTAXES else "pydicom")
    pixels = read_slice_pixels(case.path, header.Rows, header.Columns)
    ref_stored, ref_hu = _reference(references, case.reference)
    err = _hu(case.path, pixels) - ref_hu
    lossy = str(header.get("LossyImageCompression", "00")) == "01"
    assert lossy == (case.max_hu > 0)  # the file's own header agrees with the table
    if case.max_hu == 0:
        assert pixels.dtype == ref_stored.dtype and np.array_equal(pixels, ref_stored)
    else:
        max_err, rms = float(np.abs(err).max()), float(np.sqrt(np.mean(err**2)))
        assert 0 < max_err <= case.max_hu + 1e-6, max_err
        assert rms <= case.rms_hu, rms


@pytest.mark.parametrize(
    "case", [c for c in CASES if "JLSN" in c.file or "JPEGLSLossy" in c.file], ids=lambda c: Path(c.file).name
)
def test_jpegls_bound_is_near_of_the_codestream(case: Case) -> None:
    """The JPEG-LS tolerance is the NEAR byte of the start-of-scan segment (FFDA Ls Ns {Ci Tmi} NEAR ILV ...)."""
    ds = pydicom.dcmread(case.path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    n_components = frame[sos + 4]
    assert frame[sos + 5 + 2 * n_components] == case.max_hu


def test_retired_progressive_jpeg_goes_through_gdcm_and_matches_jpeg_extended() -> None:
    """Why GDCM is trusted for Process 6/8 and 10/12: pydicom has no decoder for them; GDCM's decode equals the
    same slice coded as JPEG Extended (same quantised coefficients) within one stored value of pylibjpeg's."""
    for uid in GDCM_SYNTAXES:
        with pytest.raises(NotImplementedError):
            get_decoder(uid)
    spectral, progressive, extended = (
        read_slice_pixels(_case(s).path, 512, 512).astype(np.int64) for s in (".4.53.dcm", ".4.55.dcm", ".4.51.dcm")
    )
    assert np.array_equal(spectral, progressive)
    assert np.abs(spectral - extended).max() <= 1
    assert 0 < np.count_nonzero(spectral != extended) < 0.1 * spectral.size  # two decoders, nearly identical


def test_multi_frame_file_is_not_a_slice() -> None:
    path = DATA / "cornerstone_CTImage/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"
    with pytest.raises(InputError, match=r"pixel data shape \(2, 512, 512\) != Rows x Columns \(512, 512\)") as exc:
        read_slice_pixels(path, 512, 512)
    assert exc.value.path == str(path)


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2.4.52", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.100"])
def test_unsupported_syntax_is_refused_naming_it(uid: str, tmp_path: Path) -> None:
    """A real JPEG codestream relabelled with a syntax nothing here decodes (retired JPEG, J2K Part 2, MPEG-2)."""
    ds = pydicom.dcmread(_case(".4.55.dcm").path)
    ds.file_meta.TransferSyntaxUID = uid
    ds.save_as(tmp_path / "x.dcm")
    assert decoder_row(uid).route == "refused"
    with pytest.raises(InputError) as exc:
        read_slice_pixels(tmp_path / "x.dcm", 512, 512)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'x.dcm'}: cannot decode pixel data") and "\n" not in msg
    assert uid in msg and pydicom.uid.UID(uid).name in msg and "pydicom" in msg and "GDCM" in msg


@pytest.mark.parametrize(("suffix", "tried"), [(".4.90.dcm", "gdcm, pillow, pylibjpeg"), (".4.55.dcm", "GDCM 3.")])
def test_corrupt_codestream_names_syntax_and_decoders(suffix: str, tried: str, tmp_path: Path) -> None:
    source = _case(suffix).path
    ds = pydicom.dcmread(source)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds.save_as(tmp_path / "cut.dcm")
    with pytest.raises(InputError) as exc:
        read_slice_pixels(tmp_path / "cut.dcm", 512, 512)
    syntax = ds.file_meta.TransferSyntaxUID
    msg = str(exc.value)
    assert (
        f"({syntax.name} ({syntax}))" in msg and f"tried {'pydicom plugins ' if 'gdcm,' in tried else ''}{tried}" in msg
    )
    assert "\n" not in msg


def test_other_bad_inputs(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_case(".4.90.dcm").path)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(InputError, match="no PixelData"):
        read_slice_pixels(tmp_path / "nopix.dcm", 512, 512)
    (tmp_path / "text.dcm").write_text("not DICOM")
    with pytest.raises(InputError, match="unreadable DICOM file"):
        read_slice_pixels(tmp_path / "text.dcm", 512, 512)
    with pytest.raises(InputError, match=r"shape \(512, 512\) != Rows x Columns \(256, 512\)"):
        read_slice_pixels(_case(".4.55.dcm").path, 256, 512)


def test_decoder_table() -> None:
    rows = {r.uid: r for r in decoder_table()}
    assert len(rows) == len(decoder_table())
    for case in CASES:  # every syntax in the data has a decoding route
        assert rows[pydicom.dcmread(case.path, stop_before_pixels=True).file_meta.TransferSyntaxUID].route != "refused"
    assert [rows[u].route for u in GDCM_SYNTAXES] == ["gdcm", "gdcm"]
    assert "pylibjpeg" in rows["1.2.840.10008.1.2.4.90"].plugins and rows["1.2.840.10008.1.2.5"].route == "pydicom"
    assert rows["1.2.840.10008.1.2.4.100"].route == "refused"  # MPEG-2 video
    text = decoder_table_markdown()
    assert "| JPEG Full Progression, Non-Hierarchical (Process 10 and 12) | `1.2.840.10008.1.2.4.55` | gdcm |" in text
    assert len(text.splitlines()) == len(rows) + 2


# --- the series path: read_series on folders of the real slices ---------------------------------------------


def _write_series(folder: Path, sources: list[Path], step: float = 2.5) -> None:
    """Copies of real slices (pixel data untouched) stacked ``step`` mm apart, one new series, fake patient."""
    folder.mkdir()
    series_uid = generate_uid()
    for k, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        ds.PatientName, ds.PatientID = "Synthetic^Case", "SYNTH-0001"
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-161.4, -148.8, 4.7 + k * step]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"slice{k}.dcm")


SERIES = {
    "progressive_gdcm": [".4.55.dcm"] * 3,
    "spectral_gdcm": [".4.53.dcm"] * 3,
    "jpeg2000_lossless": [".4.90.dcm"] * 3,
    "jpeg2000_lossy": [".4.91.dcm"] * 3,
    "jpegls_near": [".4.81.dcm"] * 3,
    "rle": [".1.2.5.dcm"] * 3,
    "big_endian": [".1.2.2.dcm"] * 3,
    "mixed_syntaxes_and_rescales": [".4.90.dcm", ".4.55.dcm", ".4.50.dcm", ".4.70.dcm"],
    "wg04_ct1_lossless": ["CT1_J2KR", "CT1_JLSL", "CT1_RLE"],
}


@pytest.mark.parametrize("name", SERIES)
def test_series_of_real_slices_reads_through_read_series(name: str, references: dict, tmp_path: Path) -> None:
    cases = [_case(s) for s in SERIES[name]]
    _write_series(tmp_path / name, [c.path for c in cases])
    (info,) = discover_series(tmp_path / name)
    image = read_series(info)
    volume = sitk.GetArrayFromImage(image).astype(np.float64)
    assert volume.shape == (len(cases), 512, 512)
    assert image.GetSpacing()[2] == pytest.approx(2.5) and image.GetOrigin() == pytest.approx((-161.4, -148.8, 4.7))
    for plane, case in zip(volume, cases):
        err = np.abs(plane - _reference(references, case.reference)[1])
        # lossy planes may come back as float32 HU (non-integer slopes): allow float32 rounding
        assert err.max() <= case.max_hu + 1e-3 * (case.max_hu > 0), (case.file, err.max())


def test_big_endian_series_without_rescale(references: dict, tmp_path: Path) -> None:
    """Slope 1 / intercept 0: the big-endian stored values come through unchanged, as native int16."""
    _write_series(tmp_path / "be", [_case(".1.2.2.dcm").path] * 2)
    for f in (tmp_path / "be").iterdir():
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = 0
        ds.save_as(f)
    volume = sitk.GetArrayFromImage(read_series(discover_series(tmp_path / "be")[0]))
    assert volume.dtype == np.int16 and np.array_equal(volume[1], references["CTImage"][0])


def test_real_three_slice_series() -> None:
    """The one real multi-slice series of this data set (dcmqi, uncompressed): HU as pydicom gives them."""
    (info,) = discover_series(DATA / "dcmqi_ct3slice_SEG" / "ct-3slice")
    volume = sitk.GetArrayFromImage(read_series(info))
    for plane, f in zip(volume, info.files):
        ds = pydicom.dcmread(f)
        assert np.array_equal(plane, pydicom.pixels.apply_modality_lut(ds.pixel_array, ds))


def test_refused_slice_in_a_series_names_that_file(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", [_case(".4.90.dcm").path] * 3)
    bad = tmp_path / "s" / "slice1.dcm"
    ds = pydicom.dcmread(bad)
    ds.file_meta = copy.deepcopy(ds.file_meta)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.92"
    ds.save_as(bad)
    with pytest.raises(InputError, match="1.2.840.10008.1.2.4.92") as exc:
        read_series(discover_series(tmp_path / "s")[0])
    assert exc.value.path == str(bad)
