"""Model packages: a folder that predicts on its own.

    model.pt        state dict (loaded with weights_only=True)
    config.yaml     the resolved training config (preprocessing, architecture, inference settings)
    metadata.json   model card: label map, channels, spacing, intensity, versions, run id, metrics
    MLmodel         MLflow model descriptor (a ``medseg`` flavour), so the registry lists it as a model

A package can be referenced as the folder itself, a training run folder (``RUN/model``), or an MLflow
URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/model``), which is downloaded first.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import torch
import torch.nn as nn

import medseg
from medseg.config import Config, config_from_yaml_text
from medseg.errors import InputError
from medseg.io.atomic import write_json_atomic, write_text_atomic
from medseg.io.manifest import Manifest
from medseg.models import build_model

WEIGHTS, CONFIG, METADATA, MLMODEL = "model.pt", "config.yaml", "metadata.json", "MLmodel"
PLANS = "plans.json"


@dataclass
class ModelPackage:
    """A loaded package: where it is, its config and its model card."""

    path: Path
    config: Config
    metadata: dict[str, Any]

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> value."""
        return {str(k): int(v) for k, v in self.metadata["labels"].items()}

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return int(self.metadata["num_classes"])

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with its trained weights, in eval mode on ``device``."""
        cfg = self.config.model
        # The trained weights replace any pretrained encoder, so the training-time file is not needed here.
        params = {k: v for k, v in cfg.params.items() if k != "pretrained_path"}
        model = build_model(cfg.name, cfg.spatial_dims, int(self.metadata["in_channels"]), self.num_classes, params)
        weights = self.path / WEIGHTS
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(weights, f"cannot load weights ({e.__class__.__name__})") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(
                weights, f"weights do not fit the architecture in config.yaml ({str(e).splitlines()[0]})"
            ) from None
        return model.to(device).eval()


def save_package(
    out_dir: str | Path,
    model: nn.Module,
    cfg: Config,
    manifest: Manifest,
    extra: dict[str, Any] | None = None,
    plans: dict[str, Any] | None = None,
) -> Path:
    """Write a package folder (each file atomically; weights last so a complete ``model.pt`` means done).

    ``plans`` (the dataset fingerprint and planned preprocessing of ``medseg data plan``) travel with the
    model as ``plans.json``, so the package documents how its preprocessing was chosen. The label map and
    ``num_classes`` leave void out (``Manifest.class_labels(cfg.data.ignore_index)``), as the network does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "medseg-model-package/1",
        # void (data.ignore_index) is no class of the model, even where the label map lists it: never predicted
        "labels": manifest.class_labels(cfg.data.ignore_index),
        "num_classes": manifest.num_classes_without(cfg.data.ignore_index),
        "in_channels": manifest.num_channels,
        "channel_names": manifest.channel_names,
        "dataset": manifest.name,
        "spacing": list(cfg.data.spacing) if cfg.data.spacing else None,
        "orientation": cfg.data.orientation,
        "intensity": cfg.data.intensity.model_dump(),
        "roi_size": list(cfg.roi_size),
        "versions": {
            "medseg": medseg.__version__,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "python": platform.python_version(),
        },
        **(extra or {}),
    }
    if plans is not None:
        write_json_atomic(out / PLANS, plans)
        meta["plans"] = PLANS
    write_text_atomic(out / CONFIG, cfg.to_yaml())
    write_json_atomic(out / METADATA, meta)
    write_text_atomic(out / MLMODEL, _mlmodel_yaml(meta))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from medseg.runtime.checkpoint import save_checkpoint

    save_checkpoint(out / WEIGHTS, state)
    return out


def _mlmodel_yaml(meta: dict[str, Any]) -> str:
    """An ``MLmodel`` file declaring a ``medseg`` flavour, so MLflow lists and registers the package as a model.

    No pyfunc flavour on purpose: pyfunc would pickle Python code into the artifact, while a medseg package
    holds only weights-only tensors and text; ``medseg predict --model models:/NAME/VERSION`` loads it.
    """
    import datetime

    import yaml

    doc = {
        "artifact_path": "model",
        "flavors": {
            "medseg": {
                "format": meta["format"],
                "weights": WEIGHTS,
                "config": CONFIG,
                "metadata": METADATA,
                "loader": "medseg.inference.model_package:load_package",
                "medseg_version": meta["versions"]["medseg"],
            }
        },
        "model_uuid": None,
        "run_id": meta.get("run_id"),
        "utc_time_created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"),
    }
    return yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False)


def _download_mlflow(uri: str, tracking_uri: str | None) -> Path:
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:
        raise InputError(
            uri, f"cannot download model from MLflow ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def find_package_dir(path: Path) -> Path:
    """The package folder at or under ``path`` (package itself, run folder, or MLflow model folder)."""
    for cand in (path, path / "model", path / "artifacts" / "model", path / "model" / "artifacts" / "model"):
        if (cand / WEIGHTS).is_file() and (cand / CONFIG).is_file():
            return cand
    hits = sorted(p.parent for p in path.rglob(WEIGHTS) if (p.parent / CONFIG).is_file())
    if len(hits) == 1:
        return hits[0]
    raise InputError(path, "no model package here (expected model.pt + config.yaml + metadata.json, or RUN_DIR/model/)")


def load_package(ref: str | Path, tracking_uri: str | None = None) -> ModelPackage:
    """Load a package from a folder, a run folder or an MLflow URI."""
    ref_s = str(ref)
    path = (
        _download_mlflow(ref_s, tracking_uri)
        if ref_s.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))
        else Path(ref_s)
    )
    if not path.exists():
        raise InputError(path, "model not found")
    pkg = find_package_dir(path)
    cfg = config_from_yaml_text((pkg / CONFIG).read_text(), str(pkg / CONFIG))
    try:
        meta = json.loads((pkg / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(pkg / METADATA, f"unreadable model card ({e.__class__.__name__})") from None
    return ModelPackage(pkg, cfg, meta)
