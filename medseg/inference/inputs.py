"""What a batch predicts on: cases found in a file, a folder, a manifest or a DICOM tree, and their checksums.

NIfTI files (a file, a folder, a manifest), DICOM series found recursively in a folder, or 2D PNG/JPG images
(a file, a folder, a 2D-image manifest). Case ids are output file stems; duplicates are refused.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import InputError
from medseg.inference.dicom_input import series_sha256
from medseg.inference.model_package import ModelPackage
from medseg.io.atomic import is_output_file
from medseg.io.dicom_case_ids import uid_hash
from medseg.io.dicom_series import NonImageObject, SeriesInfo, scan_dicom_folder
from medseg.io.images2d.common import IMAGE_SUFFIXES, list_images, safe_id
from medseg.io.manifest import case_id_from_path, duplicates, load_manifest

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class InputCase:
    """A scan or 2D image to segment: an id (output file stem) and its image file(s), or a DICOM series."""

    id: str
    images: tuple[Path, ...]
    series: SeriesInfo | None = field(default=None, compare=False, repr=False)

    @property
    def data_kind(self) -> str:
        """The ``data.kind`` that segments this case: ``image2d`` for a PNG/JPG file, else ``volume``."""
        return "image2d" if self.kind == "image2d" else "volume"

    @property
    def kind(self) -> str:
        """``dicom``, ``image2d`` (a PNG/JPG file) or ``nifti``."""
        if self.series is not None:
            return "dicom"
        return "image2d" if is_image_file(self.images[0]) else "nifti"


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES) and is_output_file(p)


@dataclass(frozen=True)
class Discovery:
    """The cases found in an input, and the DICOM objects there that are not image series (skipped, listed)."""

    cases: list[InputCase]
    not_scans: tuple[NonImageObject, ...] = ()


def discover_inputs(source: str | Path, split: str | None = None) -> list[InputCase]:
    """The cases of ``source`` (see ``discover``)."""
    return discover(source, split).cases


def discover(source: str | Path, split: str | None = None) -> Discovery:
    """A NIfTI file, a folder of NIfTI files, a manifest (``.json``; optionally one split), a DICOM folder,
    or 2D images (a PNG/JPG file, a folder of them, a 2D-image manifest; ids as ``discover_images``).

    A folder with NIfTI files directly inside is a NIfTI folder; otherwise it is searched recursively for
    DICOM series (one case per SeriesInstanceUID, id ``SeriesInfo.case_id``); the DICOM objects that are not
    image slices (RTSTRUCT, SEG, SR, KO, PR, RT plan/dose, DICOMDIR) are returned apart as ``not_scans``.
    """
    src = Path(source)
    if src.is_dir() and not is_image_input(src) and not any(_is_nifti(p) for p in src.iterdir() if p.is_file()):
        return _discover_dicom(src)
    return Discovery(_discover_files(src, split))


def _discover_dicom(src: Path) -> Discovery:
    scan = scan_dicom_folder(src)
    if not scan.series:
        found = f" (only {len(scan.others)} non-image DICOM objects)" if scan.others else ""
        raise InputError(src, f"no NIfTI files (.nii/.nii.gz) in this folder and no DICOM image series below it{found}")
    counts = Counter(s.case_id for s in scan.series)  # same folder name in two studies: add the UID hash
    cases = [
        InputCase(s.case_id if counts[s.case_id] == 1 else f"{s.case_id}-{uid_hash(s.uid)}", s.files, s)
        for s in scan.series
    ]
    return Discovery(cases, scan.others)


def _discover_files(src: Path, split: str | None) -> list[InputCase]:
    if not src.exists():
        raise InputError(src, "input not found")
    if is_image_input(src):  # a manifest of images is read below like any other
        return [InputCase(cid, (path,)) for cid, path in discover_images(src)]
    if src.is_file() and src.suffix == ".json":
        m = load_manifest(src)
        selected = [c for c in m.cases if split is None or c.split == split]
        return [InputCase(c.id, tuple(m.image_paths(c))) for c in selected]
    if src.is_file():
        if not _is_nifti(src):
            raise InputError(src, "expected a NIfTI file (.nii/.nii.gz), a folder (NIfTI or DICOM) or a manifest .json")
        return [InputCase(case_id_from_path(src.name), (src,))]
    files = sorted(p for p in src.iterdir() if p.is_file() and _is_nifti(p))
    cases = [InputCase(case_id_from_path(p.name), (p,)) for p in files]
    dup = duplicates(c.id for c in cases)
    if dup:
        raise InputError(src, f"several files map to case id {dup[0]!r}")
    return cases


def is_image_input(path: Path) -> bool:
    """A PNG/JPG file or a folder of them (and no NIfTI/DICOM files). Manifests say it themselves (``holds_images``)."""
    if path.is_file():
        return is_image_file(path)
    if not path.is_dir():
        return False
    names = [p.name.lower() for p in path.iterdir() if p.is_file()]
    if any(n.endswith((".nii", ".nii.gz", ".dcm")) for n in names):  # scans (with stray pictures): the volume path
        return False
    return any(n.endswith(IMAGE_SUFFIXES) for n in names)


def is_image_file(path: Path) -> bool:
    """True for a PNG/JPG file name (any case)."""
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def discover_images(path: Path) -> list[tuple[str, Path]]:
    """(id, image path) of a PNG/JPG file or a folder of them (a 2D-image manifest goes through
    ``batch.discover_inputs`` like any manifest)."""
    items = [(safe_id(path.stem), path)] if path.is_file() else [(safe_id(p.stem), p) for p in list_images(path)]
    dup = duplicates(i for i, _ in items)
    if dup:
        raise InputError(path, f"several images map to the same output name: {', '.join(dup[:5])}")
    if not items:
        raise InputError(path, "no PNG/JPG images to predict")
    return items


def check_model_kind(package: ModelPackage, images: bool, example: Path | str | None = None) -> None:
    """``InputError`` (naming the model) unless it was trained on the kind of input given (2D images or volumes)."""
    trained = package.config.data.kind
    if (trained == "image2d") == images:
        return
    what = "2D images" if trained == "image2d" else "volumes"
    given = "2D images" if images else "volumes (NIfTI/DICOM)"
    such = f" such as {Path(example).name}" if example is not None else ""
    raise InputError(
        package.path, f"this model was trained on {what} (data.kind {trained}) and cannot segment {given}{such}"
    )


def sha256_file(path: Path) -> str:
    """sha256 of a file (recorded so a result can be matched to the exact input)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def case_sha256(case: InputCase) -> str:
    """sha256 of a case's input: the file (first channel file) or the series' files in slice order."""
    return series_sha256(case.series) if case.series is not None else sha256_file(case.images[0])
