"""Importers that turn 2D natural-image datasets (VOC, CamVid-like, LabelMe, COCO) into medseg manifests.

Each importer checks every image/label pair (readable, same size, label values in the label map or void
255) and writes class-index label PNGs where the source has none (colour labels, polygons, RLE), in a
folder ``<manifest stem>_labels/`` next to the manifest, atomically and never over the source.
"""

from __future__ import annotations

from collections.abc import Callable

from medseg.io.images2d.camvid import import_camvid
from medseg.io.images2d.coco import import_coco
from medseg.io.images2d.labelme import import_labelme
from medseg.io.images2d.voc import import_voc
from medseg.io.manifest import Manifest
from medseg.registry import Registry

IMPORTERS: Registry[Callable[..., Manifest]] = Registry("image dataset format")
IMPORTERS.register("voc")(import_voc)
IMPORTERS.register("camvid")(import_camvid)
IMPORTERS.register("labelme")(import_labelme)
IMPORTERS.register("coco")(import_coco)

__all__ = ["IMPORTERS", "import_camvid", "import_coco", "import_labelme", "import_voc"]
