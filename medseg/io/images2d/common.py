"""Shared pieces of the 2D image importers: reading and checking images and index labels, writing index
PNGs atomically, and turning (image, label, split) triples into a medseg manifest.

Label images are *index* maps: each pixel value is a class index (``P`` palette, ``L`` or 16-bit grey
PNGs); ``VOID`` (255) marks void/boundary pixels, which training ignores (``data.ignore_index``).
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.manifest import IMAGE_SUFFIXES, Case, Manifest, Split, assign_splits, duplicates

VOID = 255
INDEX_MODES = ("P", "L", "I", "I;16")
RGB_CHANNELS = {"0": "R", "1": "G", "2": "B"}
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def voc_palette() -> list[int]:
    """The 256-colour PASCAL VOC palette (bit-interleaved), so written label PNGs look like VOC's."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image; unreadable or truncated files are an ``InputError``."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        im = Image.open(path)
        im.load()
    except Image.DecompressionBombError as e:  # Pillow refuses it from the header, before decoding a pixel
        raise InputError(
            path, f"absurd image size, refused before decoding ({str(e).split(', could be')[0]})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error) as e:
        raise InputError(path, f"not a readable image ({e.__class__.__name__}: {str(e)[:80]})") from None
    return im


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of a readable image."""
    w, h = open_image(path).size
    return h, w


def read_index_label(path: Path) -> np.ndarray:
    """A label image as an integer (H, W) array; colour (RGB) labels are an ``InputError``."""
    im = open_image(path)
    if im.mode not in INDEX_MODES:
        raise InputError(path, f"label image has mode {im.mode}; expected a class-index PNG (palette or greyscale)")
    return np.asarray(im).astype(np.int64)


def check_pair(image: Path, label: Path, allowed: set[int]) -> None:
    """Both files readable, same size, label values within ``allowed``; else ``InputError`` naming the file."""
    h, w = image_size(image)
    arr = read_index_label(label)
    if arr.shape != (h, w):
        raise InputError(label, f"label size {arr.shape[1]}x{arr.shape[0]} != image size {w}x{h} ({image.name})")
    bad = sorted(set(np.unique(arr).tolist()) - allowed)
    if bad:
        raise InputError(label, f"label values {bad[:10]} not in the label map {sorted(allowed)}")


def write_index_png(path: Path, labels: np.ndarray) -> Path:
    """Atomically write an (H, W) class-index array (values 0..255) as a VOC-palette PNG."""
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError("index PNGs hold values 0..255")
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    failure = None
    try:  # the temp file goes on failure (atomic_path): a full disk leaves no partial output
        with atomic_path(path, suffix=".png") as tmp:
            im.save(tmp, format="PNG")
    except OSError as e:
        failure = e.strerror or e.__class__.__name__
    if failure is not None:  # raised outside the handler: the OSError's frames (an open temp file) are freed first
        raise InputError(path, f"cannot write this output ({failure})")
    return path


def list_images(folder: Path) -> list[Path]:
    """Image files (png/jpg/jpeg, any case) directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def safe_id(name: str) -> str:
    """A case id from a file stem: characters other than letters, digits, '.', '_', '-' become '_'."""
    cid = _BAD_ID_CHARS.sub("_", name)
    return cid if cid[:1].isalnum() else f"i{cid}"


def inside(path: Path, root: Path, source: Path) -> Path:
    """``path`` resolved; an ``InputError`` (naming ``source``) if it escapes ``root``."""
    p = path.resolve()
    if not p.is_relative_to(root.resolve()):
        raise InputError(source, f"path {str(path)!r} escapes the dataset folder {root}")
    return p


def derived_dir(out: Path, src_dirs: list[Path]) -> Path:
    """Folder for converted labels next to the manifest (``<stem>_labels``); never one of the source folders."""
    d = out.resolve().parent / f"{out.stem}_labels"
    for s in src_dirs:
        s = s.resolve()
        if d == s or s.is_relative_to(d):
            raise InputError(d, "derived label folder would overwrite the source data; choose another --out")
    return d


def label_map(names: list[str], source: Path) -> dict[str, int]:
    """Class names in index order -> ``{name: index}``; duplicates or more than 255 classes are an ``InputError``."""
    dup = duplicates(names)
    if dup:
        raise InputError(source, f"class names listed twice: {', '.join(dup[:5])}")
    if not 0 < len(names) <= VOID:
        raise InputError(source, f"{len(names)} classes; index PNGs hold 1 to {VOID} classes (255 is void)")
    return {n: i for i, n in enumerate(names)}


@dataclass(frozen=True)
class Pair:
    """One imported case: absolute image and label paths; ``split`` None means 'assign at random'."""

    id: str
    image: Path
    label: Path
    split: Split | None = None


def build_manifest(
    name: str,
    labels: dict[str, int],
    pairs: list[Pair],
    out: Path,
    val_fraction: float,
    seed: int,
    description: str,
    check: bool = True,
) -> Manifest:
    """Check every pair, assign missing splits deterministically and save the manifest at ``out``.

    The manifest's root is the deepest folder holding every image and label (the source folder, or its
    common ancestor with the derived label folder), so all case paths are relative and inside the root.
    """
    if not pairs:
        raise InputError(out, "no images with labels found")
    dup = duplicates(p.id for p in pairs)
    if dup:
        raise InputError(out, f"duplicate case ids (image names) across the source: {', '.join(dup[:5])}")
    allowed = {*labels.values(), VOID}
    if check:
        for p in pairs:
            check_pair(p.image, p.label, allowed)
    random_ids = [p.id for p in pairs if p.split is None]
    drawn = assign_splits(random_ids, val_fraction, 0.0, seed) if random_ids else {}
    out = out.resolve()
    root = Path(os.path.commonpath([str(q.parent) for p in pairs for q in (p.image, p.label)]))
    cases = [
        Case(
            p.id, (p.image.relative_to(root).as_posix(),), p.label.relative_to(root).as_posix(), p.split or drawn[p.id]
        )
        for p in pairs
    ]
    m = Manifest(
        name=name,
        labels=labels,
        cases=cases,
        root=os.path.relpath(root, out.parent),
        channel_names=dict(RGB_CHANNELS),
        description=description,
    )
    m.save(out)
    return m
