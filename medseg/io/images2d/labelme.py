"""LabelMe annotations: one JSON per image with ``shapes`` (label, points, shape_type) and ``imagePath``.

Shapes are rasterised into class-index PNGs (in a derived folder next to the manifest) the way LabelMe's
own ``labelme_json_to_dataset``/``labelme2voc`` do with Pillow: polygon, rectangle (two corners), circle
(centre and a point on the circle), line/linestrip (10 px wide), point (radius 5), drawn in file order
so a later shape covers an earlier one. Class 0 is ``background`` (also the label ``_background_``);
shapes labelled ``__ignore__`` are void (255). Other class names are collected over all files, sorted,
and numbered from 1 unless ``classes`` gives the order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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
from medseg.io.manifest import Manifest

BACKGROUND_NAMES = ("_background_", "background")
IGNORE_NAME = "__ignore__"
LINE_WIDTH, POINT_RADIUS = 10, 5  # LabelMe's shape_to_mask defaults


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list) or not doc.get("imagePath"):
        raise InputError(path, "not a LabelMe file (needs 'shapes' and 'imagePath')")
    return doc


def _draw(draw: ImageDraw.ImageDraw, shape: dict[str, Any], value: int, path: Path) -> None:
    kind = shape.get("shape_type") or "polygon"
    try:
        xy = [(float(x), float(y)) for x, y in shape["points"]]
    except (KeyError, TypeError, ValueError):
        raise InputError(path, f"shape {shape.get('label')!r}: 'points' must be a list of [x, y]") from None
    need = {"polygon": 3, "rectangle": 2, "circle": 2, "line": 2, "linestrip": 2, "point": 1}
    if kind not in need:
        raise InputError(
            path, f"shape {shape.get('label')!r}: shape_type {kind!r} is not supported ({', '.join(need)})"
        )
    if len(xy) < need[kind]:
        raise InputError(path, f"shape {shape.get('label')!r}: a {kind} needs at least {need[kind]} points")
    if kind == "polygon":
        draw.polygon(xy, fill=value, outline=value)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy[:2]
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value, outline=value)
    elif kind == "circle":
        (cx, cy), (px, py) = xy[:2]
        r = math.hypot(px - cx, py - cy)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value, outline=value)
    elif kind in ("line", "linestrip"):
        draw.line(xy, fill=value, width=LINE_WIDTH)
    else:
        (cx, cy) = xy[0]
        draw.ellipse(
            [cx - POINT_RADIUS, cy - POINT_RADIUS, cx + POINT_RADIUS, cy + POINT_RADIUS], fill=value, outline=value
        )


def rasterise(doc: dict[str, Any], size: tuple[int, int], labels: dict[str, int], path: Path) -> np.ndarray:
    """Index map (H, W) of one LabelMe document; ``labels`` maps names to indices (IGNORE_NAME -> 255)."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for shape in doc["shapes"]:
        name = str(shape.get("label", ""))
        value = VOID if name == IGNORE_NAME else 0 if name in BACKGROUND_NAMES else labels.get(name)
        if value is None:
            raise InputError(path, f"shape label {name!r} is not in the class list")
        _draw(draw, shape, value, path)
    return np.asarray(canvas).astype(np.int64)


def import_labelme(
    src: Path, out: Path, val_fraction: float = 0.1, seed: int = 0, classes: list[str] | None = None
) -> Manifest:
    """Manifest for a folder of LabelMe JSON files (searched recursively) and the images they name."""
    src, out = Path(src).resolve(), Path(out).resolve()
    files = sorted(p for p in src.rglob("*.json") if not p.name.startswith("."))
    if not files:
        raise InputError(src, "no LabelMe .json files found")
    derived = derived_dir(out, [src])
    if derived.is_relative_to(src):
        files = [f for f in files if not f.is_relative_to(derived)]
    docs = [(f, _read(f)) for f in files]
    if classes:
        names = ["background", *[c for c in classes if c not in BACKGROUND_NAMES]]
    else:
        found = {str(s.get("label", "")) for _, d in docs for s in d["shapes"]}
        names = ["background", *sorted(found - {*BACKGROUND_NAMES, IGNORE_NAME})]
    labels = label_map(names, src)
    pairs = []
    for f, doc in docs:
        image = inside(f.parent / str(doc["imagePath"]).replace("\\", "/"), src, f)
        h, w = image_size(image)
        jh, jw = doc.get("imageHeight"), doc.get("imageWidth")
        if (jh is not None and int(jh) != h) or (jw is not None and int(jw) != w):
            raise InputError(f, f"imageHeight/imageWidth {jw}x{jh} != size {w}x{h} of {image.name}")
        index = rasterise(doc, (h, w), labels, f)
        rel = f.relative_to(src).with_suffix(".png")
        label = write_index_png(derived / rel, index)
        pairs.append(Pair(safe_id(f.relative_to(src).with_suffix("").as_posix().replace("/", "_")), image, label))
    return build_manifest(
        src.name, labels, pairs, out, val_fraction, seed, f"imported from LabelMe folder {src.name} (seed {seed})"
    )
