"""Prediction on 2D natural images (``data.kind: image2d`` models): PNG/JPG in, class-index PNGs out.

Each input gives ``<id>.png`` (VOC palette, pixel value = class index) of exactly the input's width and
height: the image goes through the model's own preprocessing (RGB, ``data.resize``, intensity scaling),
a sliding window of ``inference.roi_size`` covers it, and when the model works on resized images the
class scores are resized back (bilinear) before the argmax. ``inference.tta_mirror`` mirrors each window
(``inference.tta_axes``, default the width axis) through the same window function as volumes (``sliding``).
The network runs in ``inference.precision`` resolved as for volumes (``runtime.precision.network_precision``),
self-checked against fp32 on the first image's first windows (``sliding.CheckedAutocast``); each image's record
says the backend and the precision that ran (``network``).

Optional probabilities are ``<id>_probs.npy``: a plain numpy array (``np.save`` with ``allow_pickle=False``,
so it loads without pickle) of dtype uint8 and shape ``(C, H, W)``, value/255 = probability, quantised
with ``quantize_probabilities`` so every pixel sums to exactly 255 and the argmax is the mask.

Batches (resume, shards, per-image JSON records, ``summary.csv``, MLflow) go through the same runner as
volumes, ``medseg.inference.batch.run_batch``; this module holds what is particular to images.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.kinds import data_kind, eval_transforms
from medseg.inference.inputs import check_model_kind
from medseg.inference.label_maps import quantize_probabilities
from medseg.inference.model_package import ModelPackage
from medseg.inference.onnx_network import network_record
from medseg.inference.sliding import CheckedAutocast, WindowRunner, network_fn, window_logits
from medseg.io.atomic import write_atomic
from medseg.io.images2d.common import image_size, write_index_png
from medseg.runtime.device import resolve_device
from medseg.runtime.precision import PrecisionWarning, network_precision


@dataclass
class ImagePrediction:
    """A class-index map of one image, the size of that image, and optionally its quantised probabilities."""

    labels: np.ndarray  # uint8 (H, W)
    seconds: float
    probabilities: np.ndarray | None = None  # uint8 (C, H, W), value/255 = probability


class ImagePredictor:
    """A loaded 2D image model that turns one image file into an (H, W) class-index array."""

    def __init__(self, package: ModelPackage, device: str = "auto", local_rank: int | None = None) -> None:
        check_model_kind(package, images=True)
        cfg = package.config
        self.cfg = cfg
        self.device = resolve_device(device, local_rank)
        self.model = package.build(self.device)
        # ``inference.precision`` as for volumes (not train.amp), self-checked against fp32 on the batch's first
        # network call: the first image's first windows. Exported networks run in fp32 (a note per image).
        self.precision, self.precision_note = network_precision(cfg.inference.precision, self.device, self.model)
        self.autocast = CheckedAutocast(self.precision, cfg.inference.precision_min_agreement)
        self.run = network_fn(self.model, 2, input_dims=2)
        self.num_classes = int(package.num_classes)
        self.mirror_axes = data_kind(cfg).mirror_axes(cfg.inference)
        self.transform = eval_transforms(cfg, with_label=False)

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax ``(1, C, h, w)`` of a preprocessed ``(3, h, w)`` image (mirrored per window with
        ``inference.tta_mirror``: the width axis unless ``inference.tta_axes`` says otherwise)."""
        runner = WindowRunner(self.run, self.num_classes, mirror_axes=self.mirror_axes, precision=self.autocast)
        logits = window_logits(
            image.unsqueeze(0), self.cfg.roi_size, self.cfg.inference, runner, self.device, self.precision
        )
        return torch.softmax(logits.float(), 1)

    def segment(self, path: Path, with_probabilities: bool = False) -> ImagePrediction:
        """Class-index map (and optionally quantised probabilities) of the image at ``path``, at its own size."""
        t0 = time.perf_counter()
        if self.precision_note:  # inside a batch: in each image's record
            warnings.warn(self.precision_note, PrecisionWarning, stacklevel=2)
        h, w = image_size(path)  # fully decodes: a truncated or unreadable file is an InputError naming it
        probs = self.probabilities(self.transform({"image": str(path)})["image"])
        if tuple(probs.shape[-2:]) != (h, w):  # model works on resized images: scores back to the input size
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        labels = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
        quantized = np.moveaxis(quantize_probabilities(probs[0].cpu()), -1, 0) if with_probabilities else None
        return ImagePrediction(labels, time.perf_counter() - t0, quantized)

    def network(self) -> dict[str, Any]:
        """The backend and the precision the network ran in so far (``onnx_network.network_record``)."""
        inf = self.cfg.inference
        return network_record(self.model, inf.precision, self.autocast.dtype, self.autocast.agreement)

    def predict(self, path: Path) -> np.ndarray:
        """Class-index map (uint8) of the image at ``path``, the size of that image."""
        return self.segment(path).labels


def save_image_probabilities(probs: np.ndarray, path: Path) -> Path:
    """Atomically write uint8 ``(C, H, W)`` probabilities as a ``.npy`` file that loads without pickle."""
    if probs.dtype != np.uint8 or probs.ndim != 3:
        raise ValueError(f"expected uint8 (C, H, W) probabilities, got {probs.dtype} {probs.shape}")
    return write_atomic(path, lambda tmp: np.save(tmp, probs, allow_pickle=False), suffix=".npy")


def class_pixels(labels: np.ndarray, label_map: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Pixel count and fraction of the image per class name (background included: in natural images class 0
    is often a real class, e.g. CamVid's sky)."""
    counts = np.bincount(labels.ravel(), minlength=max(label_map.values()) + 1)
    total = max(int(labels.size), 1)
    return {
        name: {"pixels": int(counts[v]), "fraction": round(float(counts[v]) / total, 6)}
        for name, v in sorted(label_map.items(), key=lambda kv: kv[1])
    }


def predict_image_case(
    predictor: ImagePredictor, image: Path, mask_path: Path, probs_path: Path | None, label_map: dict[str, int]
) -> dict[str, Any]:
    """Segment one image, write its mask (and probabilities when ``probs_path``); returns its record fields."""
    pred = predictor.segment(image, with_probabilities=probs_path is not None)
    if pred.probabilities is not None and probs_path is not None:
        save_image_probabilities(pred.probabilities, probs_path)
    write_index_png(mask_path, pred.labels)
    return {
        "seconds": round(pred.seconds, 3),
        "shape": list(pred.labels.shape),
        "classes": class_pixels(pred.labels, label_map),
        "network": predictor.network(),
    }
