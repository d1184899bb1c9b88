"""Decode one DICOM slice's pixel data: pydicom's decoders, plus GDCM for the two retired progressive JPEG syntaxes.

What decodes what was measured on ``shared/data/dicom_ct_transfer_syntaxes`` (one real GE CT slice re-encoded by
dcmtk/gdcm in 15 transfer syntaxes, and the NEMA WG04 CT1/CT2 images, each against its uncompressed original;
pydicom 3.0.2, pylibjpeg 2.1 with libjpeg 2.5 and openjpeg 2.6, pyjpegls 1.5.1, python-gdcm 3.2.6):

* Syntaxes pydicom has a decoder for (``pydicom.pixels.decoders``: uncompressed, deflated, big endian, JPEG
  baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE) go through ``Dataset.pixel_array``. pydicom tries
  its installed plugins in its own order (for JPEG: gdcm, pylibjpeg, pillow). Every plugin that accepts a file
  gave the same values: lossless syntaxes exactly the original, lossy ones the same error statistics
  (pydicom's gdcm plugin refuses 12-bit JPEG Extended; pylibjpeg then decodes it).
* JPEG Spectral Selection (Process 6 & 8, ``1.2.840.10008.1.2.4.53``) and JPEG Full Progression (Process 10 & 12,
  ``1.2.840.10008.1.2.4.55``), both retired: pydicom has no decoder for them at all (``NotImplementedError``;
  its ``gdcm`` plugin is registered only for the syntaxes above, so there is no plugin to select). GDCM's
  ``gdcm.ImageReader`` (python-gdcm, public API) decodes them, and decodes them right: on the 12-bit CT (IJG
  quality 90) both are bit-identical to GDCM's decode of the same slice stored as JPEG Extended (``.4.51``), as
  they must be (progressive JPEG only sends the same quantised DCT coefficients in several scans), and within 1
  stored value (1 in 4096, on 4.2 % of the pixels) of pylibjpeg's independent decode of that ``.4.51`` file;
  against the uncompressed original: max 35.6 HU, RMS 5.19 HU, the same as ``.4.51``. So they are decoded, not
  refused: such files turn up in old archives and GDCM gets their values right. GDCM prints "Unsupported JPEG
  data precision 12" on native stderr before its 12-bit codec succeeds (python-gdcm issue #35): harmless.
* Every other syntax (other retired JPEG processes, JPEG 2000 Part 2, JPIP, MPEG/H.264/HEVC video, private
  ones) is refused with an ``InputError`` naming it: nothing here was measured on them, and a decoder that runs
  is not yet one that gives the right values.

``decoder_table`` lists, per transfer syntax, which route and installed plugins decode it (for the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gdcm
import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes

from medseg.errors import InputError

# Decoded through GDCM (see the module docstring for the measurements behind this list).
GDCM_SYNTAXES: tuple[UID, ...] = (UID("1.2.840.10008.1.2.4.53"), UID("1.2.840.10008.1.2.4.55"))

_GDCM_DTYPES = {
    gdcm.PixelFormat.UINT8: np.uint8,
    gdcm.PixelFormat.INT8: np.int8,
    gdcm.PixelFormat.UINT16: np.uint16,
    gdcm.PixelFormat.INT16: np.int16,
    gdcm.PixelFormat.UINT32: np.uint32,
    gdcm.PixelFormat.INT32: np.int32,
}


@dataclass(frozen=True)
class DecoderRow:
    """How one transfer syntax is decoded: ``route`` is ``"pydicom"``, ``"gdcm"`` or ``"refused"``."""

    uid: str
    name: str
    route: str
    plugins: tuple[str, ...]  # installed pydicom plugins (pydicom route), ("python-gdcm",) for the GDCM route
    missing: tuple[str, ...] = ()  # pydicom plugins that would decode it but are not installed


def describe_syntax(uid: str) -> str:
    """``"<name> (<uid>)"`` of a transfer syntax, e.g. ``"RLE Lossless (1.2.840.10008.1.2.5)"``."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else f"unknown transfer syntax {uid}"


def decoder_row(uid: str) -> DecoderRow:
    """The ``DecoderRow`` of one transfer syntax UID (any UID; unknown ones are refused)."""
    uid = UID(uid)
    if uid in GDCM_SYNTAXES:
        return DecoderRow(str(uid), uid.name, "gdcm", ("python-gdcm",))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:  # pydicom has no decoder for this syntax
        return DecoderRow(str(uid), uid.name, "refused", ())
    missing = tuple(decoder.missing_dependencies)
    if not decoder.is_available:
        return DecoderRow(str(uid), uid.name, "refused", (), missing)
    plugins = decoder.available_plugins or ("pydicom",)  # uncompressed syntaxes: pydicom's own code
    return DecoderRow(str(uid), uid.name, "pydicom", tuple(plugins), missing)


def decoder_table() -> list[DecoderRow]:
    """One ``DecoderRow`` per transfer syntax pydicom knows, plus the GDCM ones, sorted by UID."""
    uids = {str(u) for u in AllTransferSyntaxes} | {str(u) for u in GDCM_SYNTAXES}
    return [decoder_row(u) for u in sorted(uids, key=lambda u: tuple(int(x) for x in u.split(".")))]


def decoder_table_markdown(rows: list[DecoderRow] | None = None) -> str:
    """The decoder table as a Markdown table (transfer syntax, UID, route, plugins)."""
    lines = ["| transfer syntax | UID | decoded by | installed plugins |", "|---|---|---|---|"]
    for r in rows if rows is not None else decoder_table():
        lines.append(f"| {r.name} | `{r.uid}` | {r.route} | {', '.join(r.plugins) or '-'} |")
    return "\n".join(lines)


def read_slice_pixels(path: Path, rows: int | None, columns: int | None) -> np.ndarray:
    """Stored pixel values (no rescale, native byte order) of a single-frame slice, checked to be ``rows x columns``.

    Raises ``InputError`` naming the file: unreadable DICOM, no PixelData, a transfer syntax nothing here
    decodes (naming the syntax, its UID and the decoders tried), a decoder failure, or a shape mismatch.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise InputError(path, f"unreadable DICOM file ({type(e).__name__})") from e
    if "PixelData" not in ds:
        raise InputError(path, "non-image object (no PixelData)")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if not syntax:
        raise InputError(path, "no TransferSyntaxUID in the file meta information; cannot decode pixel data")
    row = decoder_row(syntax)
    if row.route == "gdcm":
        pixels = _gdcm_pixels(path, syntax)
    elif row.route == "pydicom":
        pixels = _pydicom_pixels(path, ds, row)
    else:
        needs = f"; it needs {'; '.join(row.missing)}" if row.missing else ""
        raise InputError(
            path,
            f"cannot decode pixel data: transfer syntax {describe_syntax(syntax)} is not supported; tried "
            f"pydicom {pydicom.__version__} (no installed decoder{needs}) and GDCM (used only for "
            f"{', '.join(GDCM_SYNTAXES)})",
        )
    if pixels.shape != (rows, columns):
        raise InputError(path, f"pixel data shape {pixels.shape} != Rows x Columns ({rows}, {columns})")
    # Explicit VR Big Endian decodes to a big-endian array; SimpleITK (GetImageFromArray) refuses those.
    return pixels.astype(pixels.dtype.newbyteorder("="), copy=False)


def _one_line(e: Exception, limit: int = 300) -> str:
    """``"Type: message"`` on one line (pydicom lists each plugin's failure on its own line)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _pydicom_pixels(path: Path, ds: pydicom.Dataset, row: DecoderRow) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:
        raise InputError(
            path,
            f"cannot decode pixel data ({describe_syntax(row.uid)}); tried pydicom plugins "
            f"{', '.join(row.plugins)}: {_one_line(e)}",
        ) from e


def _gdcm_pixels(path: Path, syntax: str) -> np.ndarray:
    """Decode with ``gdcm.ImageReader``: the decoded frame comes back as a str of raw bytes (SWIG maps char*)."""
    tried = f"cannot decode pixel data ({describe_syntax(syntax)}); tried GDCM {gdcm.Version.GetVersion()}"
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise InputError(path, f"{tried}: gdcm.ImageReader could not read the file")
    image = reader.GetImage()
    fmt = image.GetPixelFormat()
    dtype = _GDCM_DTYPES.get(fmt.GetScalarType())
    if dtype is None or fmt.GetSamplesPerPixel() != 1:
        raise InputError(
            path,
            f"{tried}: unsupported pixel format {fmt.GetScalarTypeAsString()} with "
            f"{fmt.GetSamplesPerPixel()} samples per pixel (greyscale integers only)",
        )
    buffer = image.GetBuffer()  # None when the codestream does not decode (GDCM prints why on stderr)
    if buffer is None:
        raise InputError(path, f"{tried}: the codestream did not decode (corrupt or truncated?)")
    # The same conversion pydicom's gdcm plugin uses: SWIG decodes the C bytes with surrogateescape.
    data = buffer.encode("utf-8", "surrogateescape")
    columns, rows = image.GetDimension(0), image.GetDimension(1)
    frames = image.GetDimension(2) if image.GetNumberOfDimensions() == 3 else 1
    expected = frames * rows * columns * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise InputError(path, f"{tried}: decoded {len(data)} bytes, expected {expected}")
    shape = (rows, columns) if frames == 1 else (frames, rows, columns)
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
