"""COCO instance annotations (``instances_*.json``) rasterised into semantic class-index PNGs.

Categories, sorted by id, become classes 1..K (0 is ``background``). Each image's annotations are
decoded to binary masks with pycocotools (polygons, uncompressed and compressed RLE: COCO's own
rasteriser, so masks match what COCO tools compute) and painted in this order:

1. crowd regions (``iscrowd: 1``) as void (255): their pixels are ambiguous and excluded from training;
2. the other instances by decreasing mask area, so a smaller object lying on a larger one stays visible
   (ties keep annotation order; a later one wins).

The index PNGs go to a derived folder next to the manifest. Images without annotations are all background.
A file named ``instances_<name>.json`` whose name contains train / val / test sets that split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from medseg.errors import InputError
from medseg.io.images2d.common import (
    VOID,
    Pair,
    build_manifest,
    derived_dir,
    image_size,
    inside,
    label_map,
    safe_id,
    write_index_png,
)
from medseg.io.manifest import Manifest, Split


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "categories")):
        raise InputError(path, "not a COCO instances file (needs 'images' and 'categories' lists)")
    return doc


def decode(segmentation: Any, h: int, w: int, path: Path, ann_id: Any) -> np.ndarray:
    """Binary (H, W) mask of a COCO segmentation: polygon list, uncompressed or compressed RLE."""
    try:
        if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
            if not segmentation or any(len(p) < 6 or len(p) % 2 for p in segmentation):
                raise ValueError("polygons need at least 3 (x, y) points")
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            if list(segmentation["size"]) != [h, w]:
                raise ValueError(f"RLE size {segmentation['size']} != image size [{h}, {w}]")
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                if sum(counts) != h * w:
                    raise ValueError(f"RLE counts cover {sum(counts)} pixels, the image has {h * w}")
                rle = mask_utils.frPyObjects(segmentation, h, w)
            else:
                rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise ValueError("segmentation must be a polygon list or an RLE {counts, size}")
        return mask_utils.decode(rle).astype(bool)
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(path, f"annotation {ann_id}: {e}") from None


def semantic_map(anns: list[dict[str, Any]], h: int, w: int, cat_index: dict[int, int], path: Path) -> np.ndarray:
    """Paint one image's annotations into an (H, W) index map (crowds void first, then largest to smallest)."""
    out = np.zeros((h, w), dtype=np.int64)
    decoded = []
    for order, a in enumerate(anns):
        cid = a.get("category_id")
        if cid not in cat_index:
            raise InputError(path, f"annotation {a.get('id')}: category_id {cid} is not in 'categories'")
        m = decode(a.get("segmentation"), h, w, path, a.get("id"))
        decoded.append((bool(a.get("iscrowd", 0)), -int(m.sum()), order, cat_index[cid], m))
    for crowd, _neg_area, _order, value, m in sorted(decoded, key=lambda t: (not t[0], t[1], t[2])):
        out[m] = VOID if crowd else value
    return out


def _split_of(json_path: Path) -> Split | None:
    name = json_path.stem.removeprefix("instances_").lower()
    splits: tuple[Split, ...] = ("train", "val", "test")
    for split in splits:
        if split in name:
            return split
    return None


def _images_dir(src: Path, json_path: Path, images: Path | None) -> Path:
    if images is not None:
        return src / images if not images.is_absolute() else images
    name = json_path.stem.removeprefix("instances_")
    base = src if src.is_dir() else src.parent
    for cand in (base / name, base / "images" / name, base / "images", base.parent / name, base.parent / "images"):
        if cand.is_dir():
            return cand
    raise InputError(json_path, f"no image folder found for it (tried {name}/ and images/ beside it); give --images")


def import_coco(src: Path, out: Path, val_fraction: float = 0.1, seed: int = 0, images: Path | None = None) -> Manifest:
    """Manifest for COCO ``instances_*.json`` (SRC: one such file, or a folder with them or ``annotations/``)."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if src.is_file():
        jsons = [src]
    else:
        jsons = sorted({*src.glob("instances_*.json"), *src.glob("annotations/instances_*.json")})
    if not jsons:
        raise InputError(src, "no instances_*.json found (here or in annotations/)")
    root = src if src.is_dir() else src.parent
    derived = derived_dir(out, [root])
    categories: list[dict[str, Any]] | None = None
    pairs = []
    for jp in jsons:
        doc = _load(jp)
        cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
        if categories is None:
            categories = cats
        elif [(c["id"], c["name"]) for c in cats] != [(c["id"], c["name"]) for c in categories]:
            raise InputError(jp, f"categories differ from those of {jsons[0].name}")
        cat_index = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for a in doc.get("annotations", []):
            by_image.setdefault(a.get("image_id"), []).append(a)
        img_dir = _images_dir(root, jp, images)
        split = _split_of(jp)
        for info in doc["images"]:
            image = inside(img_dir / str(info["file_name"]), img_dir, jp)
            h, w = image_size(image)
            if (int(info.get("height", h)), int(info.get("width", w))) != (h, w):
                raise InputError(
                    jp,
                    f"image {info['file_name']}: height/width {info.get('height')}x{info.get('width')} != file size {h}x{w}",
                )
            index = semantic_map(by_image.get(info["id"], []), h, w, cat_index, jp)
            stem = Path(str(info["file_name"])).with_suffix("").as_posix().replace("/", "_")
            label = write_index_png(derived / (split or jp.stem) / f"{stem}.png", index)
            pairs.append(Pair(safe_id(stem), image, label, split))
    names = ["background", *[str(c["name"]) for c in categories or []]]
    return build_manifest(
        root.name,
        label_map(names, jsons[0]),
        pairs,
        out,
        val_fraction,
        seed,
        f"imported from COCO {', '.join(j.name for j in jsons)} (seed {seed})",
    )
