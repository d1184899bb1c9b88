"""Configuration: pydantic models, YAML presets and dotted command-line overrides.

One place for defaults. Every model forbids unknown keys, so a typo in a preset or an override is an
error that names the exact key path (``train.epochz``), never a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The ``inference`` section lives in ``config_inference`` (kept apart for size); its names are re-exported here.
from medseg.config_inference import DicomOutputConfig as DicomOutputConfig
from medseg.config_inference import InferenceConfig as InferenceConfig
from medseg.config_inference import SegmentCodeConfig as SegmentCodeConfig
from medseg.config_inference import parse_code as parse_code
from medseg.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IntensityConfig(_Strict):
    """Intensity normalisation: CT window (HU clip to [lower, upper] then to [0, 1]), per-volume z-score, or
    ``range``: the same linear clip-and-scale of [lower, upper] to [0, 1] for non-CT data (8-bit RGB: 0, 255)."""

    mode: Literal["ct_window", "zscore", "range"] = "zscore"
    lower: float = -1000.0
    upper: float = 1000.0
    nonzero: bool = False

    @model_validator(mode="after")
    def _window_ordered(self) -> IntensityConfig:
        if self.mode in ("ct_window", "range") and not self.lower < self.upper:
            raise ValueError(f"{self.mode} needs lower < upper")
        return self


class DataConfig(_Strict):
    """Where the data is and how it is preprocessed and sampled."""

    manifest: Path = Path("data_manifests/phantom.json")
    kind: Literal["volume", "image2d"] = Field(
        default="volume", description="volume: 3D NIfTI scans; image2d: 2D natural images (PNG/JPG, index-PNG labels)"
    )
    ignore_index: int | None = Field(
        default=None, ge=0, le=255, description="label value of void pixels (VOC: 255): excluded from loss and metrics"
    )
    resize: tuple[int, int] | None = Field(
        default=None, description="image2d only: resize every image to (height, width) (labels nearest) before cropping"
    )
    spacing: tuple[float, ...] | None = Field(default=None, description="target voxel spacing (mm); None keeps native")
    orientation: str = "RAS"
    intensity: IntensityConfig = IntensityConfig()
    crop_foreground: bool = True
    foreground_threshold: float | None = Field(
        default=None, description="raw intensity above which a voxel is body; None: above the minimum"
    )
    patch_size: tuple[int, ...] = (64, 64, 32)
    samples_per_volume: int = Field(default=2, ge=1)
    pos_fraction: float = Field(default=0.67, ge=0.0, le=1.0, description="share of patches centred on foreground")
    class_ratios: list[float] | None = Field(
        default=None, description="per-class patch-centre ratios (class-balanced sampling)"
    )
    batch_size: int = Field(default=2, ge=1)
    num_workers: int = Field(default=0, ge=0)
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dir: Path | None = None
    augment: bool = True
    augmentations: list[str] = Field(
        default_factory=lambda: ["intensity", "noise"],
        description="augmentations by registry name (intensity, noise, spatial, flip_lr, flip_all, flip_horizontal), applied when augment is true",
    )

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("spacing values must be > 0")
        return v

    @field_validator("resize")
    @classmethod
    def _positive_resize(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("resize values must be > 0")
        return v

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s <= 0 for s in v):
            raise ValueError("patch_size values must be > 0")
        return v


class ModelConfig(_Strict):
    """Architecture by registry name; ``params`` are passed to its builder (checked against its signature)."""

    name: str = "unet"
    spatial_dims: Literal[2, 3] = 3
    params: dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Strict):
    """Loss by registry name with its parameters."""

    name: str = "dice_focal"
    params: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    momentum: float = 0.99
    nesterov: bool = True
    scheduler: Literal["none", "poly", "cosine"] = "poly"
    warmup_epochs: int = Field(default=0, ge=0)
    schedule_span: Literal["epochs", "time_budget"] = Field(
        default="epochs",
        description="what the schedule's progress counts: epochs done of train.epochs, or (time_budget) the larger "
        "of that and the share of train.max_minutes spent, so the LR anneals by the end of a time-limited run",
    )
    grad_clip: float | None = 12.0


class TrainConfig(_Strict):
    """Training loop settings."""

    epochs: int = Field(default=50, ge=1)
    val_every: int = Field(default=5, ge=1)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: Literal["auto", "off", "fp16", "bf16"] = Field(
        default="auto",
        description="training autocast: auto = bf16 / fp16 AMP on CUDA, fp32 on the CPU; bf16 also on the CPU "
        "(~1.2x faster per 3D U-Net step where the CPU has avx512_bf16 / amx_bf16); fp16 on the CPU falls back to fp32",
    )
    output_dir: Path = Path("runs")
    run_name: str | None = None
    max_minutes: float | None = Field(default=None, gt=0)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    grad_accumulation: int = Field(default=1, ge=1)
    hd95_every: int = Field(default=5, ge=0, description="per-organ HD95 (mm) every k epochs at validation; 0: never")
    overlay_cases: int = Field(
        default=3,
        ge=0,
        description="validation cases drawn as PNG overlays of the best epoch: the first N of the split and the N with the lowest mean Dice",
    )
    num_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op CPU threads; None keeps torch's default"
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off_is_not_false(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` (in a preset or a `train.amp=off` override) as the boolean false.
        return "off" if v is False else v


class TrackingConfig(_Strict):
    """Experiment tracking. ``uri`` None means a local SQLite store ``mlflow.db`` in the working folder."""

    backend: Literal["mlflow", "none"] = "mlflow"
    uri: str | None = None
    experiment: str = "medseg"
    registered_model_name: str | None = None
    system_metrics: bool = Field(
        default=False, description="log MLflow system metrics (CPU, memory, disk, network, GPU) during training"
    )
    system_metrics_interval_s: float = Field(default=10.0, ge=0.5, description="seconds between system samples")


class Config(_Strict):
    """The whole resolved configuration of a run."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _dims_agree(self) -> Config:
        nd = self.model.spatial_dims
        if len(self.data.patch_size) != nd:
            raise ValueError(f"data.patch_size has {len(self.data.patch_size)} values but model.spatial_dims is {nd}")
        if self.data.kind == "image2d" and nd != 2:
            raise ValueError("data.kind image2d needs model.spatial_dims 2")
        if self.data.kind == "image2d" and self.data.spacing is not None:
            raise ValueError("data.spacing applies to volumes; 2D images use data.resize")
        if self.data.kind == "volume" and self.data.resize is not None:
            raise ValueError("data.resize applies to data.kind image2d only (volumes use data.spacing)")
        if self.data.spacing is not None and len(self.data.spacing) != 3:
            raise ValueError("data.spacing must have 3 values (volumes are resampled in 3D)")
        roi = self.inference.roi_size
        if roi is not None and len(roi) != nd:
            raise ValueError(f"inference.roi_size has {len(roi)} values but model.spatial_dims is {nd}")
        if self.optimizer.schedule_span == "time_budget" and self.train.max_minutes is None:
            raise ValueError("optimizer.schedule_span time_budget needs train.max_minutes")
        axes = self.inference.tta_axes
        if axes is not None and (not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes)):
            raise ValueError(f"inference.tta_axes must be distinct spatial axes among 0, 1, 2, got {axes}")
        return self

    @property
    def roi_size(self) -> tuple[int, ...]:
        """Sliding-window ROI: ``inference.roi_size`` or the training patch size."""
        return tuple(self.inference.roi_size or self.data.patch_size)

    def to_yaml(self) -> str:
        """The resolved config as YAML (paths as strings)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, str]:
        """Flattened ``{"train.epochs": "50", ...}`` (for MLflow params)."""
        return flatten(self.model_dump(mode="json"))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts into dotted keys with string values (``prefix`` ends with its own dot).

    ``{"inference": {"overlap": 0.5}}`` -> ``{"inference.overlap": "0.5"}``; lists stay one value, an empty
    dict is the value ``"{}"``. The one flattening of MLflow params (``Config.flat``, batch prediction runs).
    """
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: invalid config: " + "; ".join(parts)


def resolve_preset(preset: str | Path) -> Path:
    """A preset is a YAML path or a name in ``configs/`` (``phantom_unet3d``)."""
    p = Path(preset)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        return p
    candidate = CONFIG_DIR / f"{preset}.yaml"
    if not candidate.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"{preset}: no such preset; available: {', '.join(names)}")
    return candidate


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` -> (["train", "epochs"], 5); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (unknown keys are caught later by validation)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset (or defaults), apply overrides, validate the schema; errors name the file and key path.

    Names of models, losses and augmentations are checked against their registries by
    ``medseg.components.load_checked_config`` (config sits below the modules that register them).
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if preset is not None:
        path = resolve_preset(preset)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    return cfg


def config_from_yaml_text(text: str, source: str = "config") -> Config:
    """Validate a resolved config stored as YAML (e.g. inside a model package)."""
    try:
        return Config.model_validate(yaml.safe_load(text) or {})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
