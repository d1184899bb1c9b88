"""The intensity step every data kind ends its deterministic preprocessing with (after the spatial steps)."""

from __future__ import annotations

import numpy as np
from monai import transforms as mt

from medseg.config import DataConfig
from medseg.data.keys import IMAGE, LABEL


def intensity_steps(data: DataConfig, with_label: bool) -> list[mt.Transform]:
    """``data.intensity``: a clip-and-scale of [lower, upper] to [0, 1] (``ct_window``, ``range``) or a per-channel
    z-score (``zscore``); then the label as int64 when there is one."""
    out: list[mt.Transform] = []
    if data.intensity.mode in ("ct_window", "range"):
        out.append(
            mt.ScaleIntensityRanged(
                keys=IMAGE, a_min=data.intensity.lower, a_max=data.intensity.upper, b_min=0.0, b_max=1.0, clip=True
            )
        )
    else:
        out.append(mt.NormalizeIntensityd(keys=IMAGE, nonzero=data.intensity.nonzero, channel_wise=True))
    if with_label:
        out.append(mt.EnsureTyped(keys=LABEL, dtype=np.int64))
    return out
