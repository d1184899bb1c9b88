"""MONAI dictionary-transform pipelines for volumes (``data.kind: volume``), built from config (data, not code).

The deterministic preprocessing (load, channel-first, orientation, spacing, intensity, foreground crop)
is shared by training, validation and inference, and every step is invertible with MONAI's
``Invertd``: that is how predictions return to the input scan's voxel grid.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np
from monai import transforms as mt

from medseg.config import Config, DataConfig
from medseg.data.augmentations import augmentations
from medseg.data.intensity import intensity_steps
from medseg.data.keys import IMAGE, LABEL

if TYPE_CHECKING:
    import torch


# LoadImage probes MONAI's optional GPU DICOM decoder (nvImageCodec) even for NIfTI input and warns twice
# when it is absent; DICOM decoding here goes through pydicom's own plugins, so the notice is only noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


class ForegroundAbove:
    """Foreground selector for ``CropForegroundd``: voxels above ``threshold`` (or above the minimum).

    A class, not a lambda, so transforms pickle into DataLoader workers and persistent caches.
    """

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:  # CropForegroundd passes tensors
        return x > (x.min() if self.threshold is None else self.threshold)


def preprocessing(data: DataConfig, with_label: bool) -> list[mt.Transform]:
    """Deterministic, invertible preprocessing shared by train, validation and inference."""
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    interp = ["bilinear", "nearest"] if with_label else ["bilinear"]
    out: list[mt.Transform] = [
        mt.LoadImaged(keys=keys, reader="NibabelReader", image_only=True, ensure_channel_first=True),
        mt.EnsureTyped(keys=IMAGE, dtype=np.float32),
        mt.Orientationd(keys=keys, axcodes=data.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if data.spacing is not None:
        out.append(mt.Spacingd(keys=keys, pixdim=data.spacing, mode=interp))
    if data.crop_foreground:
        out.append(
            mt.CropForegroundd(
                keys=keys,
                source_key=IMAGE,
                select_fn=ForegroundAbove(data.foreground_threshold),
                margin=2,
                allow_smaller=True,
            )
        )
    return [*out, *intensity_steps(data, with_label)]


def _sampling(cfg: Config, num_classes: int) -> list[mt.Transform]:
    d = cfg.data
    patch = tuple(d.patch_size) if cfg.model.spatial_dims == 3 else (*d.patch_size, 1)
    keys = [IMAGE, LABEL]
    out: list[mt.Transform] = [mt.SpatialPadd(keys=keys, spatial_size=patch)]
    # Candidate patch centres are computed once per case (deterministic, so CacheDataset caches them) instead
    # of on every draw: the random crops below then only index into them. Costs 8 bytes per candidate voxel
    # in the cache. Centres come from the label alone (no image threshold: z-scored images are negative
    # over half their voxels, which an image_key threshold of 0 would silently exclude).
    if d.class_ratios is not None:
        if len(d.class_ratios) != num_classes:
            raise ValueError(f"data.class_ratios has {len(d.class_ratios)} values for {num_classes} classes")
        index_keys = [f"{LABEL}_cls_indices"]
        out.append(mt.ClassesToIndicesd(keys=LABEL, num_classes=num_classes, indices_postfix="_cls_indices"))
        out.append(
            mt.RandCropByLabelClassesd(
                keys=keys,
                label_key=LABEL,
                spatial_size=patch,
                ratios=list(d.class_ratios),
                num_classes=num_classes,
                num_samples=d.samples_per_volume,
                indices_key=index_keys[0],
                allow_smaller=False,
                warn=False,
            )
        )
    else:
        index_keys = [f"{LABEL}_fg_indices", f"{LABEL}_bg_indices"]
        out.append(mt.FgBgToIndicesd(keys=LABEL))
        out.append(
            mt.RandCropByPosNegLabeld(
                keys=keys,
                label_key=LABEL,
                spatial_size=patch,
                pos=d.pos_fraction,
                neg=1.0 - d.pos_fraction,
                num_samples=d.samples_per_volume,
                fg_indices_key=index_keys[0],
                bg_indices_key=index_keys[1],
                allow_smaller=False,
            )
        )
    out.append(mt.DeleteItemsd(keys=index_keys))  # index arrays differ in length per case: never collate them
    if cfg.model.spatial_dims == 2:  # slice-wise 2D training on volumes: drop the singleton z axis
        out.append(mt.SqueezeDimd(keys=keys, dim=-1))
    return out


def volume_train_transforms(cfg: Config, num_classes: int) -> mt.Compose:
    """Preprocessing + patch sampling + light augmentation."""
    aug = augmentations(cfg.data, cfg.model.spatial_dims)
    return mt.Compose([*preprocessing(cfg.data, True), *_sampling(cfg, num_classes), *aug])


def volume_eval_transforms(cfg: Config, with_label: bool = True) -> mt.Compose:
    """Deterministic preprocessing for validation (with label) and inference (without)."""
    return mt.Compose(preprocessing(cfg.data, with_label))
