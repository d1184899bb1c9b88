"""Inference settings of the configuration (``inference.*``): sliding windows, precision, post-processing, DICOM output.

Split out of ``medseg.config``, which re-exports every name here, so ``from medseg.config import InferenceConfig``
keeps working. Like every config model, each forbids unknown keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):  # medseg.config's base, restated: a private name is not imported across modules
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_code(text: str) -> tuple[str, str, str]:
    """``"SCT^10200004^Liver"`` -> ``("SCT", "10200004", "Liver")`` (scheme, code value, meaning); ``ValueError``
    unless it has three non-empty ``^``-separated parts (a SNOMED CT code value is digits)."""
    parts = [p.strip() for p in str(text).split("^")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{text!r}: expected SCHEME^CODE^MEANING, e.g. SCT^10200004^Liver")
    scheme, value, meaning = parts
    if len(scheme) > 16 or not scheme.replace("-", "").isalnum() or not scheme.isupper():
        raise ValueError(f"{text!r}: coding scheme {scheme!r} must be an upper-case designator such as SCT")
    if scheme == "SCT" and not value.isdigit():
        raise ValueError(f"{text!r}: a SNOMED CT code value is a number")
    if len(meaning) > 64:
        raise ValueError(f"{text!r}: code meaning longer than 64 characters")
    return scheme, value, meaning


class SegmentCodeConfig(_Strict):
    """What a label is, as two codes ``SCHEME^CODE^MEANING`` (SNOMED CT: ``SCT^10200004^Liver``)."""

    category: str = Field(description="segmented property category (CID 7150), e.g. SCT^123037004^Anatomical Structure")
    type: str = Field(description="segmented property type, e.g. SCT^10200004^Liver")

    @field_validator("category", "type")
    @classmethod
    def _coded(cls, v: str) -> str:
        parse_code(v)
        return v


class DicomOutputConfig(_Strict):
    """Header fields and codes of the DICOM-SEG / RTSTRUCT written for a DICOM series."""

    series_description: str = Field(
        default="medseg segmentation", min_length=1, max_length=64, description="SeriesDescription of SEG and RTSTRUCT"
    )
    manufacturer: str = Field(default="medseg", min_length=1, max_length=64, description="their Manufacturer")
    algorithm_name: str | None = Field(default=None, max_length=64, description="None: the model's name")
    algorithm_version: str | None = Field(default=None, max_length=64, description="None: the model's version")
    codes: dict[str, SegmentCodeConfig] = Field(
        default_factory=dict,
        description="label name -> {category, type} codes; SEG segments of unlisted labels are SCT Tissue/Tissue, "
        "RTSTRUCT ROIs of unlisted labels carry no code",
    )


class InferenceConfig(_Strict):
    """Sliding-window inference and post-processing."""

    roi_size: tuple[int, ...] | None = None
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(default=4, ge=1)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    tta_mirror: bool = False
    tta_axes: list[int] | None = Field(
        default=None,
        description="spatial axes mirrored by tta_mirror (0 = L-R after RAS); None: all. Mirror only "
        "axes the model was trained to be invariant to (e.g. [0] with the flip_lr augmentation)",
    )
    keep_largest_component: bool = Field(
        default=False, description="keep only the largest connected component of each organ"
    )
    min_component_voxels: int = Field(default=0, ge=0, description="remove components with fewer voxels (0: off)")
    min_component_ml: float = Field(
        default=0.0, ge=0.0, description="remove components smaller than this volume in ml (0: off)"
    )
    fill_holes: bool = Field(default=False, description="fill enclosed holes in each organ")
    memory_bounded: bool = Field(
        default=False,
        description="large scans: crop to the body on the raw array, keep it in its "
        "own dtype, normalise window by window, stream the blending slab by slab on the CPU and "
        "invert the label map instead of probabilities",
    )
    channels_last: bool = Field(
        default=False,
        description="run the network on channels-last tensors (outputs equal to "
        "~1e-5; no gain measured on CPU; meant for cuDNN under AMP, not measured here)",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="network precision at prediction: auto: bf16 autocast on CPUs with native bf16 (avx512_bf16 / "
        "amx_bf16), AMP on CUDA (bf16 where the card has it, else fp16), else fp32; bf16 on a CPU without it works "
        "(slowly); fp16 is CUDA-only. Reduced precision is self-checked against fp32 on the first windows of a batch",
    )
    precision_min_agreement: float = Field(
        default=0.99,
        ge=0.0,
        le=1.0,
        description="the self-check: below this share of voxels with the same argmax label in fp32 and reduced "
        "precision, the rest of the batch runs in fp32 (with a warning in the case record)",
    )
    window_grid: Literal["body", "whole"] = Field(
        default="body",
        description="body: windows tile the body's box (the foreground crop training validated on: "
        "predictions reproduce the validation metrics; fewer windows); whole: windows on the whole scan's grid, so body "
        "voxels get exactly what a plain whole-volume sliding window gives. Body-free windows are skipped in both",
    )
    dicom_output: Literal["seg", "rtstruct", "both", "none"] = Field(
        default="seg",
        description="DICOM series only: DICOM objects written beside the NIfTI mask: seg (<id>.seg.dcm), "
        "rtstruct (<id>.rtstruct.dcm), both, or none",
    )
    dicom: DicomOutputConfig = DicomOutputConfig()
