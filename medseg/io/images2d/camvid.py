"""CamVid-like folders: an images folder and a labels folder with the same file stems.

Layouts found automatically under SRC (or give ``images``/``labels`` folders explicitly):

* ``train/`` + ``train_labels/`` (or ``trainannot/``), likewise ``val`` and ``test`` -> those splits;
* ``images/`` + ``labels/`` -> one pool, split at random.

A label file is ``<stem>.png`` or ``<stem>_L.png`` (the Kaggle CamVid naming). Labels are either
class-index PNGs (used in place) or RGB colour-coded; colour labels need ``class_dict.csv`` (``name,r,g,b``,
one row per class in index order; a class named ``void`` maps to the void value 255) and are converted to
index PNGs in a derived folder next to the manifest, never over the source.

Class names come from ``class_dict.csv``, else from ``classes`` (one name per index), else ``class_<i>``.
Index labels whose void pixels carry another value than medseg's 255 (SegNet's CamVid: 11 = Unlabelled) take
``void``: those pixels are rewritten to 255 in the derived folder (the manifest has no void field; 255 is the
void every 2D preset ignores, ``data.ignore_index: 255``) and the void class is left out of the label map, so
the classes are the values ``0 .. void-1``. A ``classes`` list may name the void class too, at index ``void``
(SegNet's 12 names): that name is dropped.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.images2d.common import (
    VOID,
    Pair,
    build_manifest,
    derived_dir,
    label_map,
    list_images,
    open_image,
    safe_id,
    write_index_png,
)
from medseg.io.manifest import Manifest, Split

_LABEL_DIR_SUFFIXES = ("_labels", "annot", "_annot")


def read_class_dict(path: Path) -> tuple[list[str], dict[tuple[int, int, int], int]]:
    """Class names (index order, void excluded) and colour -> index (void colour -> 255) from ``class_dict.csv``."""
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
        entries = [(r["name"].strip(), (int(r["r"]), int(r["g"]), int(r["b"]))) for r in rows]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise InputError(
            path, f"expected CSV columns name,r,g,b with integer colours ({e.__class__.__name__})"
        ) from None
    if not entries:
        raise InputError(path, "no classes listed")
    names: list[str] = []
    colours: dict[tuple[int, int, int], int] = {}
    for name, rgb in entries:
        if rgb in colours:
            raise InputError(path, f"colour {rgb} is listed twice")
        if name.lower() == "void":
            colours[rgb] = VOID
        else:
            colours[rgb] = len(names)
            names.append(name)
    return names, colours


def rgb_to_index(rgb: np.ndarray, colours: dict[tuple[int, int, int], int], path: Path) -> np.ndarray:
    """(H, W, 3) colour label -> (H, W) index map; a colour not in ``colours`` is an ``InputError``."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in colours), dtype=np.int64)
    values = np.array([colours[((k >> 16) & 255, (k >> 8) & 255, k & 255)] for k in keys], dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    unknown = keys[pos] != code
    if unknown.any():
        y, x = np.argwhere(unknown)[0]
        raise InputError(
            path, f"colour {tuple(int(c) for c in rgb[y, x, :3])} at pixel (x={x}, y={y}) is not in class_dict.csv"
        )
    return values[pos]


def _layouts(src: Path, images: Path | None, labels: Path | None) -> list[tuple[Path, Path, Split | None]]:
    if images is not None or labels is not None:
        if images is None or labels is None:
            raise InputError(src, "give both the images and the labels folder")
        return [(src / images, src / labels, None)]
    found: list[tuple[Path, Path, Split | None]] = []
    splits: tuple[Split, ...] = ("train", "val", "test")
    for split in splits:
        for suf in _LABEL_DIR_SUFFIXES:
            if (src / split).is_dir() and (src / f"{split}{suf}").is_dir():
                found.append((src / split, src / f"{split}{suf}", split))
                break
    if not found and (src / "images").is_dir() and (src / "labels").is_dir():
        found.append((src / "images", src / "labels", None))
    if not found:
        raise InputError(
            src, "no images/labels folders found (expected train/ + train_labels/ ... or images/ + labels/)"
        )
    return found


def _label_for(labels: Path, stem: str) -> Path | None:
    for name in (f"{stem}.png", f"{stem}_L.png"):
        if (labels / name).is_file():
            return labels / name
    return None


def _without_void(names: list[str], void: int, source: Path) -> list[str]:
    """Class names of the values ``0 .. void-1``: ``names`` as given, or without its entry at index ``void``."""
    if len(names) == void + 1:
        return names[:void]
    if len(names) != void:
        raise InputError(
            source,
            f"{len(names)} class names but void value {void}: name the {void} classes "
            f"0..{void - 1} (optionally followed by the void class's name)",
        )
    return names


def import_camvid(
    src: Path,
    out: Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    images: Path | None = None,
    labels: Path | None = None,
    classes: list[str] | None = None,
    void: int | None = None,
) -> Manifest:
    """Manifest for a CamVid-like dataset; colour labels are converted to index PNGs next to the manifest.

    ``classes``: class names in index order (overrides ``class_dict.csv``'s). ``void``: the label value of
    void pixels in index labels, rewritten to 255 next to the manifest and left out of the label map.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    void = None if void == VOID else void
    if void is not None and not 0 < void < VOID:
        raise InputError(src, f"void value {void}: expected 1..254 (the classes are the values below it) or 255")
    layouts = _layouts(src, images, labels)
    class_dict = src / "class_dict.csv"
    names, colours = read_class_dict(class_dict) if class_dict.is_file() else (list(classes or []), None)
    if classes:
        names = list(classes)
    if void is not None and names:
        names = _without_void(names, void, class_dict if class_dict.is_file() and not classes else src)
    derived = derived_dir(out, [d for lay in layouts for d in lay[:2]])
    pairs, seen_max = [], 0
    for img_dir, lbl_dir, split in layouts:
        for image in list_images(img_dir):
            label = _label_for(lbl_dir, image.stem)
            if label is None:
                raise InputError(image, f"no label {lbl_dir / (image.stem + '.png')} (or {image.stem}_L.png)")
            im = open_image(label)
            if im.mode in ("RGB", "RGBA"):
                if colours is None:
                    raise InputError(label, f"colour label but no {class_dict.name} (name,r,g,b) in {src}")
                if void is not None:
                    raise InputError(
                        label,
                        f"colour label: a void value applies to index labels only "
                        f"(colour labels mark void with a class named 'void' in {class_dict.name})",
                    )
                index = rgb_to_index(np.asarray(im.convert("RGB")), colours, label)
                label = write_index_png(derived / (split or "all") / f"{image.stem}.png", index)
            else:
                arr = np.asarray(im)
                if void is not None:
                    arr = np.where(arr == void, VOID, arr)
                    label = write_index_png(derived / (split or "all") / f"{image.stem}.png", arr)
                seen_max = max(seen_max, int(arr[arr != VOID].max(initial=0)))
            pairs.append(Pair(safe_id(image.stem), image, label, split))
    if not names:  # index labels without names: generic names for the values found (below void)
        names = [f"class_{i}" for i in range(seen_max + 1 if void is None else void)]
    note = "" if void is None else f"; void value {void} stored as {VOID}"
    return build_manifest(
        src.name,
        label_map(names, class_dict),
        pairs,
        out,
        val_fraction,
        seed,
        f"imported from CamVid-like folder {src.name} (seed {seed}){note}",
    )
