"""Prediction on 2D natural images (``data.kind: image2d`` models): PNG/JPG in, class-index PNGs out.

Each input gives ``<id>.png`` (VOC palette, pixel value = class index) of exactly the input's width and
height: the image goes through the model's own preprocessing (RGB, ``data.resize``, intensity scaling),
a sliding window of ``inference.roi_size`` covers it, and when the model works on resized images the
class scores are resized back (bilinear) before the argmax. ``inference.tta_mirror`` averages the
softmax with that of the horizontally mirrored image. Outputs are written atomically; ``resume`` skips
inputs whose mask exists. A failing input is reported and the others still run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medseg.data.transforms import eval_transforms
from medseg.engine.device import resolve_device
from medseg.errors import InputError, MedsegError
from medseg.inference.model_package import ModelPackage
from medseg.inference.sliding import predictor_for
from medseg.io.images2d.common import IMAGE_SUFFIXES, image_size, list_images, safe_id, write_index_png
from medseg.io.manifest import load_manifest

log = logging.getLogger("medseg.predict")


def is_image_input(path: Path) -> bool:
    """A PNG/JPG file, a folder of them (and no NIfTI/DICOM files), or a manifest of 2D images."""
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return True
        if path.suffix.lower() == ".json":
            try:
                m = load_manifest(path)
            except MedsegError:
                return False
            return bool(m.cases) and m.cases[0].image[0].lower().endswith(IMAGE_SUFFIXES)
        return False
    if not path.is_dir():
        return False
    names = [p.name.lower() for p in path.iterdir() if p.is_file()]
    if any(n.endswith((".nii", ".nii.gz", ".dcm")) for n in names):  # scans (with stray pictures): the volume path
        return False
    return any(n.endswith(IMAGE_SUFFIXES) for n in names)


def discover_images(path: Path, split: str | None = None) -> list[tuple[str, Path]]:
    """(id, image path) of a PNG/JPG file, a folder of them, or a 2D-image manifest (optionally one split)."""
    if path.is_file() and path.suffix.lower() == ".json":
        m = load_manifest(path)
        items = [(c.id, m.image_paths(c)[0]) for c in m.cases if split is None or c.split == split]
    elif path.is_file():
        items = [(safe_id(path.stem), path)]
    else:
        items = [(safe_id(p.stem), p) for p in list_images(path)]
    ids = [i for i, _ in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(path, f"several images map to the same output name: {', '.join(dup[:5])}")
    if not items:
        raise InputError(path, "no PNG/JPG images to predict")
    return items


class ImagePredictor:
    """A loaded 2D image model that turns one image file into an (H, W) class-index array."""

    def __init__(self, package: ModelPackage, device: str = "auto") -> None:
        cfg = package.config
        if cfg.data.kind != "image2d":
            raise InputError(package.path, "this model was trained on volumes (data.kind volume), not on 2D images")
        self.cfg = cfg
        self.device = resolve_device(device)
        self.model = package.build(self.device)
        self.run = predictor_for(self.model, 2, volume_dims=2)
        self.transform = eval_transforms(cfg, with_label=False)

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax ``(1, C, h, w)`` of a preprocessed ``(3, h, w)`` image (mirror TTA if configured)."""
        inf = self.cfg.inference
        x = image.unsqueeze(0).to(self.device)
        views = [False, True] if inf.tta_mirror else [False]
        total = None
        for mirror in views:
            xin = torch.flip(x, dims=(-1,)) if mirror else x
            logits = sliding_window_inference(xin, tuple(self.cfg.roi_size), inf.sw_batch_size, self.run,
                                              overlap=inf.overlap, mode=inf.blend_mode).float()
            probs = torch.softmax(logits, 1)
            probs = torch.flip(probs, dims=(-1,)) if mirror else probs
            total = probs if total is None else total + probs
        return total / len(views)  # type: ignore[operator]

    def predict(self, path: Path) -> np.ndarray:
        """Class-index map (uint8) of the image at ``path``, the size of that image."""
        h, w = image_size(path)
        probs = self.probabilities(self.transform({"image": str(path)})["image"])
        if tuple(probs.shape[-2:]) != (h, w):  # model works on resized images: scores back to the input size
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        return probs.argmax(1)[0].cpu().numpy().astype(np.uint8)


@dataclass
class ImageBatchReport:
    """Ids predicted, skipped (already done) and failed (id -> error)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """3 if any input failed (as ``medseg predict`` for volumes), else 0."""
        return 3 if self.failed else 0


def predict_images(package: ModelPackage, items: list[tuple[str, Path]], output: Path, device: str = "auto",
                   resume: bool = False) -> ImageBatchReport:
    """Write ``output/<id>.png`` for every (id, image); bad inputs are reported, not fatal."""
    report = ImageBatchReport()
    predictor = ImagePredictor(package, device)
    for cid, path in items:
        target = output / f"{cid}.png"
        if resume and target.is_file():
            report.skipped.append(cid)
            continue
        try:
            write_index_png(target, predictor.predict(path).astype(np.int64))
        except MedsegError as e:
            report.failed[cid] = str(e)
            log.warning("failed %s: %s", cid, e)
            continue
        report.done.append(cid)
    return report
