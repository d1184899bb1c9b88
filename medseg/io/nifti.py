"""NIfTI reading with validation, and atomic writing of label maps in a reference geometry.

``load_nifti`` checks the header before any voxel is read, so a broken file is one ``InputError`` naming it and the
cause instead of a library traceback (or an allocation of terabytes): the file exists, is readable and not empty,
is a NIfTI-1/2 image of scalar voxels, its voxel spacings (``pixdim``) are finite and positive, its affine is finite
and invertible, its sform and qform (when both are set) place the volume in the same spot, and the file is large
enough for the voxel data the header declares (exactly for ``.nii``; for ``.nii.gz`` within deflate's best
compression ratio). Reading the voxels (``read_array``, ``read_unscaled``) first verifies a ``.nii.gz`` to its
gzip trailer (``verify_gzip``): a truncated or corrupt payload is an ``InputError`` too, never silently wrong voxels.
Writing an output that fails (disk full, read-only folder) is an ``InputError`` naming the output file.
"""

from __future__ import annotations

import gzip
import itertools
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from medseg.errors import InputError
from medseg.io.atomic import atomic_path

DEFLATE_MAX_RATIO = 1032  # zlib's documented best case: deflate never expands data by more than 1032:1 on inflating
GZIP_CHUNK = 1 << 20  # bytes inflated per step when a .nii.gz is verified
FORM_TOLERANCE_VOXELS = 0.5  # sform and qform may place the volume's corners this many (smallest) voxels apart


def _bytes(n: float) -> str:
    """``n`` bytes as a short human figure (``54.0 TB``)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _first_line(e: BaseException, limit: int = 160) -> str:
    """``Class: first line of the message`` of an exception, for a one-line cause."""
    text = str(e).splitlines()[0][:limit] if str(e).strip() else ""
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load a NIfTI header (data stays lazy) and check it (see the module doc); a bad file is an ``InputError``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:  # nibabel reports an unreadable file as "Could not read file"; the OS error says why
        with path.open("rb") as fh:
            empty = not fh.read(1)
    except OSError as e:
        raise InputError(path, f"cannot read the file ({e.strerror or e.__class__.__name__})") from None
    if empty:
        raise InputError(path, "empty file (0 bytes)")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(path, f"not a readable NIfTI file ({_first_line(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    check_header(img, path)
    return img


def check_header(img: nib.Nifti1Image, path: str | Path) -> None:
    """``InputError`` naming ``path`` for a header no voxel of which should be trusted (see the module doc)."""
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise InputError(path, f"voxel type {dtype} is not a scalar intensity (complex, RGB or structured voxels)")
    shape = tuple(int(n) for n in img.shape)
    n_spatial = min(len(shape), 3)
    pixdim = [float(v) for v in _raw_header(img, path)["pixdim"][1 : 1 + n_spatial]]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        raise InputError(
            path, f"invalid voxel spacing {pixdim} in the header (pixdim); spacings must be finite and > 0"
        )
    affine = img.affine
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "invalid affine (not finite)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "invalid affine (singular: not invertible, determinant 0)")
    _check_forms(img, path, shape[:3])
    _check_payload_size(img, path, shape, dtype)


def _raw_header(img: nib.Nifti1Image, path: str | Path) -> nib.Nifti1Header:
    """The header as stored: nibabel's loader silently fixes some fields (zero or negative ``pixdim``)."""
    try:
        with ImageOpener(str(path)) as fh:
            return type(img.header).from_fileobj(fh, check=False)
    except Exception as e:
        raise InputError(path, f"not a readable NIfTI header ({_first_line(e)})") from None


def _check_forms(img: nib.Nifti1Image, path: str | Path, shape3: tuple[int, ...]) -> None:
    """Where both sform and qform are set they must agree: ITK/SimpleITK-based tools read the qform, nibabel and
    MONAI the sform, so a disagreement places the volume (and its mask) differently depending on the reader."""
    sform, scode = img.header.get_sform(coded=True)
    qform, qcode = img.header.get_qform(coded=True)
    if not scode or not qcode or sform is None or qform is None:
        return
    extent = [max(n - 1, 0) for n in [*shape3, 1, 1][:3]]  # a 2D image: its third axis is one voxel deep
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, e) for e in extent])]).T
    gap = float(np.max(np.linalg.norm((sform @ corners - qform @ corners)[:3], axis=0)))
    tolerance = FORM_TOLERANCE_VOXELS * float(min(np.linalg.norm(sform[:3, :3], axis=0)))
    if not gap <= tolerance:
        raise InputError(
            path,
            f"sform and qform disagree: they place the volume's corners up to {gap:.3g} mm apart (tolerance "
            f"{tolerance:.3g} mm); qform readers (ITK, SimpleITK) and sform readers (nibabel, MONAI) would put it in "
            "different places; rewrite the header with one geometry",
        )


def _check_payload_size(img: nib.Nifti1Image, path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The file must be able to hold the voxel data its header declares: refused before anything is allocated."""
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    offset = int(img.dataobj.offset) if hasattr(img.dataobj, "offset") else 0
    size = Path(path).stat().st_size
    declared = f"{'x'.join(map(str, shape))} {dtype} voxels ({_bytes(nbytes)})"
    name = str(path).lower()
    if name.endswith(".nii") and size < offset + nbytes:
        raise InputError(
            path, f"truncated: the header declares {declared} from byte {offset}, the file has {size} bytes"
        )
    if name.endswith(".nii.gz") and nbytes > DEFLATE_MAX_RATIO * size:
        raise InputError(
            path,
            f"the header declares {declared}, more than a {_bytes(size)} gzip file can hold "
            f"(deflate expands at most {DEFLATE_MAX_RATIO}:1); refused before reading",
        )


def verify_gzip(file: str | Path, path: str | Path | None = None) -> None:
    """Inflate a ``.nii.gz`` to its end, discarding the output, so its CRC-32 and length are checked; a truncated
    or corrupt file is an ``InputError`` naming ``path`` (default ``file``). Other files pass unread.

    nibabel (and MONAI through it) reads only the bytes of the voxel data and never reaches the gzip trailer: a
    flipped bit in the deflate stream then decodes, silently, into wrong voxels (50 of 60 random single-bit flips
    of a real hippocampus scan did). Costs one inflate pass (~150 MB/s of voxels on a loaded 2-core machine).
    """
    if not str(file).lower().endswith(".gz"):
        return
    try:
        with gzip.open(file, "rb") as fh:
            while fh.read(GZIP_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(
            path or file, f"corrupt gzip data ({_first_line(e)}); the file is truncated or damaged"
        ) from None


def _verify_source(img: nib.Nifti1Image, path: str | Path) -> None:
    """``verify_gzip`` on the file an image was loaded from (in-memory images have none)."""
    file = img.get_filename()
    if file is not None:
        verify_gzip(file, path)


def read_array(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """Read voxel data (a ``.nii.gz``'s checksum verified first), turning truncated/corrupt payloads into an
    ``InputError``."""
    _verify_source(img, path)
    return _read(img, path)


def _read(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except MemoryError:
        raise InputError(path, f"voxel data {img.shape} {img.get_data_dtype()} does not fit in memory") from None
    except Exception as e:
        raise InputError(path, f"cannot read voxel data ({_first_line(e)}); the file is truncated or corrupt") from None


def read_unscaled(img: nib.Nifti1Image, path: str | Path) -> tuple[np.ndarray, float, float]:
    """Stored voxel values and their scaling: ``value = stored * slope + inter``.

    CT exported by dcm2niix and others keeps int16/uint16 voxels with ``scl_inter`` (e.g. -1024); nibabel
    applies that scaling in float64, four times an int16 scan. Memory-bounded inference reads the stored
    integers instead and applies the scaling window by window. Unscaled images give ``(array, 1.0, 0.0)``;
    a non-positive slope (order-reversing) is returned already scaled.
    """
    _verify_source(img, path)
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if (slope, inter) == (1.0, 0.0) or slope <= 0 or not hasattr(proxy, "get_unscaled"):
        return _read(img, path), 1.0, 0.0
    try:
        return np.asanyarray(proxy.get_unscaled()), slope, inter
    except MemoryError:
        raise InputError(path, f"voxel data {img.shape} {img.get_data_dtype()} does not fit in memory") from None
    except Exception as e:
        raise InputError(path, f"cannot read voxel data ({_first_line(e)}); the file is truncated or corrupt") from None


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel spacing (mm) from an affine's column norms."""
    return tuple(float(x) for x in np.linalg.norm(affine[:3, :3], axis=0))


def save_like(
    array: np.ndarray,
    reference: nib.Nifti1Image,
    out_path: str | Path,
    *,
    slope: float = 1.0,
    intent: tuple[str, tuple, str] | None = None,
) -> Path:
    """Write ``array`` with exactly the reference image's affine and (q/s)form codes, atomically.

    The reference is the *input scan*: copying its header geometry is what makes an output overlay it.
    ``array`` has the reference's spatial shape, optionally with a trailing axis (e.g. classes).
    """
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    out = nib.Nifti1Image(array, reference.affine, header)
    out.header.set_slope_inter(slope, 0.0)
    if intent is not None:
        out.header.set_intent(intent[0], intent[1], name=intent[2])
    qform, qcode = reference.get_qform(coded=True)
    sform, scode = reference.get_sform(coded=True)
    out.set_qform(qform if qform is not None else reference.affine, int(qcode) if qcode else 1)
    out.set_sform(sform if sform is not None else reference.affine, int(scode) if scode else 1)
    failure = None
    try:  # the temp file goes on failure (atomic_path): a full disk leaves no partial output
        with atomic_path(out_path, suffix=".nii.gz") as tmp:
            nib.save(out, str(tmp))
    except OSError as e:
        failure = e.strerror or _first_line(e)
    if failure is not None:  # raised outside the handler: the OSError's frames (and nibabel's open temp file,
        # whose blocks a full disk needs back) are freed now, not when the InputError is (a log record may keep it)
        raise InputError(out_path, f"cannot write this output ({failure})")
    return Path(out_path)


def save_label_like(labels: np.ndarray, reference: nib.Nifti1Image, out_path: str | Path) -> Path:
    """Write a label map in the reference (input scan) geometry as uint8 (uint16 above 255 labels), atomically."""
    if labels.shape[:3] != reference.shape[:3]:
        raise ValueError(f"label shape {labels.shape} != reference shape {reference.shape[:3]}")
    max_label = int(labels.max()) if labels.size else 0
    return save_like(labels.astype(np.uint8 if max_label < 256 else np.uint16), reference, out_path)
