"""Model packages: a folder that predicts on its own.

    model.pt        state dict (loaded with weights_only=True)
    config.yaml     the resolved training config (preprocessing, architecture, inference settings)
    metadata.json   model card: label map, channels, spacing, intensity, versions, run id, metrics, and the
                    sha256 of model.pt (checked when the network is built: changed weights are refused)
    MLmodel         MLflow model descriptor (a ``medseg`` flavour; trained volume models also a ``python_function``
                    one, see ``pyfunc_model``), so the registry lists it as a model

A package can be referenced as the folder itself, a training run folder (``RUN/model``), or an MLflow
URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``), which is downloaded first; an
alias is resolved to the version it points at once, and that version is downloaded and recorded.

A local ``medseg export`` folder (``medseg.json`` + ``model.onnx`` or ``model.torchscript.pt`` + the package's
``config.yaml`` and ``metadata.json``) loads too: its ``ModelPackage.export`` is medseg.json, and ``build`` gives
the exported network behind a torch module (``onnx_network``), so the predictor runs it like any package.

An ensemble folder (``medseg ensemble``: ``ensemble.json`` + config + model card + ``members/K/`` packages) loads
with ``ModelPackage.members`` set; ``build`` gives the members' mean-probability ``EnsembleNetwork``.
"""

from __future__ import annotations

import hashlib
import io
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
from medseg.inference.ensemble_network import EnsembleNetwork
from medseg.inference.onnx_network import MEDSEG_JSON, check_export_folder, exported_network
from medseg.io.atomic import write_atomic, write_json_atomic, write_text_atomic
from medseg.io.manifest import Manifest
from medseg.models import build_model

WEIGHTS, CONFIG, METADATA, MLMODEL = "model.pt", "config.yaml", "metadata.json", "MLmodel"
PLANS = "plans.json"
ENSEMBLE_JSON, ENSEMBLE_FORMAT = "ensemble.json", "medseg-ensemble/1"  # written by ``inference.ensemble``


@dataclass
class ModelPackage:
    """A loaded package: where it is, its config and its model card."""

    path: Path
    config: Config
    metadata: dict[str, Any]
    resolved_ref: str | None = None  # ``models:/NAME/VERSION`` that a ``models:/NAME@ALIAS`` reference resolved to
    export: dict[str, Any] | None = None  # medseg.json of a ``medseg export`` folder: ``build`` runs its file
    members: list[ModelPackage] | None = None  # an ensemble's member packages: ``build`` averages their softmax

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> value."""
        return {str(k): int(v) for k, v in self.metadata["labels"].items()}

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return int(self.metadata["num_classes"])

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with its trained weights, in eval mode on ``device`` (an export folder: its exported network,
        fp32 only, behind a torch module)."""
        if self.export is not None:
            return exported_network(self.path, self.export, self.config.roi_size, device)
        if self.members is not None:
            return EnsembleNetwork([m.build(device) for m in self.members]).to(device).eval()
        cfg = self.config.model
        # The trained weights replace any pretrained encoder, so the training-time file is not needed here.
        params = {k: v for k, v in cfg.params.items() if k != "pretrained_path"}
        model = build_model(cfg.name, cfg.spatial_dims, int(self.metadata["in_channels"]), self.num_classes, params)
        weights = self.path / WEIGHTS
        try:
            blob = weights.read_bytes()
        except OSError as e:
            raise InputError(weights, f"cannot read weights ({e.strerror or e.__class__.__name__})") from None
        changed = weights_changed(blob, self.metadata.get("weights_sha256"))
        try:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(weights, f"cannot load weights ({e.__class__.__name__}){changed or ''}") from None
        if changed:  # loadable, yet not the weights that were packaged
            raise InputError(weights, f"weights checksum mismatch{changed}")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # the first line only says "Error(s) in loading state_dict": the next one says what
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise InputError(
                weights, f"weights do not fit the architecture in config.yaml ({' '.join(lines[:2])[:300]})"
            ) from None
        return model.to(device).eval()


def weights_changed(blob: bytes, sha256: str | None) -> str | None:
    """None if ``blob`` (``model.pt``) has the model card's ``weights_sha256`` (or the card has none: packages
    saved before the checksum existed are read unchecked), else the cause, as a clause for the error."""
    actual = hashlib.sha256(blob).hexdigest()
    if sha256 is None or actual == sha256:
        return None
    return (
        f": its sha256 {actual[:16]}... is not the {str(sha256)[:16]}... the model card (metadata.json) records; "
        "the file was changed or damaged after the package was saved"
    )


def recorded_preprocessing(cfg: Config) -> dict[str, Any]:
    """The preprocessing a model card records from its config (spacing, orientation, intensity, window size): what
    ``check_card`` compares with ``config.yaml`` and ensemble members must share."""
    return {
        "spacing": list(cfg.data.spacing) if cfg.data.spacing else None,
        "orientation": cfg.data.orientation,
        "intensity": cfg.data.intensity.model_dump(),
        "roi_size": list(cfg.roi_size),
    }


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
        **recorded_preprocessing(cfg),
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
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()  # serialised first: the model card records the weights' checksum, checked on loading
    torch.save(state, buffer)
    blob = buffer.getvalue()
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    write_text_atomic(out / CONFIG, cfg.to_yaml())
    write_json_atomic(out / METADATA, meta)
    write_text_atomic(out / MLMODEL, _mlmodel_yaml(meta))
    write_atomic(out / WEIGHTS, lambda p: p.write_bytes(blob))
    return out


def _mlmodel_yaml(meta: dict[str, Any]) -> str:
    """An ``MLmodel`` file declaring a ``medseg`` flavour, so MLflow lists and registers the package as a model.

    The ``python_function`` flavour is added by ``pyfunc_model.add_pyfunc_flavour`` when a trained run logs the
    package (it names a loader module, nothing is pickled); ``medseg predict --model models:/NAME/VERSION`` loads
    the ``medseg`` flavour.
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
    from mlflow.tracking import MlflowClient

    # The URIs go to these calls only: mlflow.set_tracking_uri / set_registry_uri would also set MLFLOW_TRACKING_URI /
    # MLFLOW_REGISTRY_URI in os.environ, and every later MLflow client and subprocess of this process (a training
    # that registers its model elsewhere) would follow them. mlflow.artifacts.download_artifacts does not pass its
    # registry_uri on for models:/ URIs (MLflow 3.17), so a version is resolved to its source with a client first.
    try:
        source, (name, _, version) = uri, uri.removeprefix("models:/").rstrip("/").rpartition("/")
        if uri.startswith("models:/") and name and version.isdigit():
            source = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(
                name, version
            )
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri))
    except Exception as e:
        raise InputError(
            uri, f"cannot download model from MLflow ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def resolve_model_alias(ref: str, tracking_uri: str | None = None) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION``, the version the registry alias points at now (one
    ``MlflowClient.get_model_version_by_alias`` call); any other reference is returned as it is.

    Downloading the resolved version (not the alias) means the weights loaded are the version recorded, even if
    the alias moves meanwhile (e.g. a training pipeline promoting a new champion).
    """
    if not ref.startswith("models:/") or "@" not in ref:
        return ref
    name, _, alias = ref.removeprefix("models:/").rstrip("/").rpartition("@")
    if not name or not alias or "/" in alias:
        raise InputError(ref, "not a registry alias reference (expected models:/NAME@ALIAS)")
    from mlflow.tracking import MlflowClient

    from medseg.tracking import bounded_http

    try:
        with bounded_http():  # an unreachable server fails in seconds, not after MLflow's minutes of retries
            version = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version
    except Exception as e:
        raise InputError(
            ref,
            f"cannot resolve alias {alias!r} of model {name!r} in MLflow ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})",
        ) from None
    return f"models:/{name}/{version}"


def find_package_dir(path: Path) -> Path:
    """The package folder at or under ``path`` (package itself, run folder, or MLflow model folder)."""
    for cand in (path, path / "model", path / "artifacts" / "model", path / "model" / "artifacts" / "model"):
        if ((cand / WEIGHTS).is_file() or (cand / ENSEMBLE_JSON).is_file()) and (cand / CONFIG).is_file():
            return cand
    ensembles = sorted(p.parent for p in path.rglob(ENSEMBLE_JSON) if (p.parent / CONFIG).is_file())
    if len(ensembles) == 1:  # a folder holding one ensemble (its members are packages too)
        return ensembles[0]
    hits = sorted(p.parent for p in path.rglob(WEIGHTS) if (p.parent / CONFIG).is_file())
    if len(hits) == 1:
        return hits[0]
    raise InputError(path, "no model package here (expected model.pt + config.yaml + metadata.json, or RUN_DIR/model/)")


def load_package(ref: str | Path, tracking_uri: str | None = None) -> ModelPackage:
    """Load a package from a folder, a run folder or an MLflow URI."""
    ref_s = str(ref)
    resolved = resolve_model_alias(ref_s, tracking_uri)  # models:/NAME@ALIAS -> models:/NAME/VERSION
    path = (
        _download_mlflow(resolved, tracking_uri)
        if resolved.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))
        else Path(ref_s)
    )
    if not path.exists():
        raise InputError(path, "model not found")
    # A local export folder (never a downloaded one: TorchScript loads code); a package folder that an export was
    # written into stays the torch package.
    if path == Path(ref_s) and (path / MEDSEG_JSON).is_file() and not (path / WEIGHTS).is_file():
        return load_export(path)
    pkg = find_package_dir(path)
    cfg, meta = read_config_and_card(pkg)
    members = load_members(pkg) if (pkg / ENSEMBLE_JSON).is_file() else None
    return ModelPackage(pkg, cfg, meta, resolved_ref=resolved if resolved != ref_s else None, members=members)


def load_members(pkg: Path) -> list[ModelPackage]:
    """The member packages an ensemble folder's ``ensemble.json`` lists (each inside the folder, each checked)."""
    record = _read_json_object(pkg / ENSEMBLE_JSON, "ensemble record")
    entries = record.get("members")
    if record.get("format") != ENSEMBLE_FORMAT or not isinstance(entries, list) or not entries:
        raise InputError(pkg / ENSEMBLE_JSON, f"not a {ENSEMBLE_FORMAT} record with a list of members")
    members = []
    root = pkg.resolve()
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else None
        folder = (pkg / str(rel)).resolve() if isinstance(rel, str) else None
        if folder is None or not folder.is_relative_to(root) or folder == root:
            raise InputError(pkg / ENSEMBLE_JSON, f"member path {rel!r} is not a folder inside the ensemble")
        if not (folder / WEIGHTS).is_file():
            raise InputError(folder, "ensemble member has no model.pt")
        members.append(ModelPackage(folder, *read_config_and_card(folder)))
    return members


def read_config_and_card(pkg: Path) -> tuple[Config, dict[str, Any]]:
    """``config.yaml`` and ``metadata.json`` of the folder ``pkg``, checked against each other (``check_card``)."""
    cfg = config_from_yaml_text((pkg / CONFIG).read_text(), str(pkg / CONFIG))
    meta = _read_json_object(pkg / METADATA, "model card")
    check_card(meta, cfg, pkg)
    return cfg, meta


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; an ``InputError`` saying ``unreadable <what>`` otherwise."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(path, f"unreadable {what} ({e.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise InputError(path, f"unreadable {what} (not a JSON object)")
    return value


def load_export(folder: Path) -> ModelPackage:
    """A ``medseg export`` folder as a package: the config and model card copied with the export, and medseg.json,
    whose network file is checked now (a missing file or runtime fails here, not at the first case)."""
    record = _read_json_object(folder / MEDSEG_JSON, "export record")
    check_export_folder(folder, record)
    for name in (CONFIG, METADATA):
        if not (folder / name).is_file():
            raise InputError(
                folder / name, "missing: an export made before exports carried the package's config; export again"
            )
    cfg, meta = read_config_and_card(folder)
    return ModelPackage(folder, cfg, meta, export=record)


def check_card(meta: dict[str, Any], cfg: Config, pkg: Path) -> None:
    """The model card's label map fits its ``num_classes`` (distinct values, 0 the lowest and ``num_classes - 1`` the
    highest, as ``Manifest.num_classes`` counts them), and the card agrees with ``config.yaml``:
    the preprocessing it records (spacing, orientation, intensity, window) and ``data.class_ratios`` (one per
    class). A package assembled from two trainings, or edited by hand, is an ``InputError`` naming the file."""
    card = pkg / METADATA
    try:
        labels = {str(k): int(v) for k, v in meta["labels"].items()}
        n = int(meta["num_classes"])
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise InputError(card, f"no valid label map and num_classes ({e.__class__.__name__})") from None
    values = sorted(labels.values())
    if not values or len(set(values)) != len(values) or values[0] != 0 or values[-1] != n - 1:
        raise InputError(
            card, f"label map {labels} does not fit num_classes {n} (distinct values from background 0 to {n - 1})"
        )
    ratios = cfg.data.class_ratios
    if ratios is not None and len(ratios) != n:
        raise InputError(
            pkg / CONFIG, f"data.class_ratios has {len(ratios)} entries, the model card's label map {n} classes"
        )
    # json round trip: tuples and lists, ints and floats compare as written
    for key, value in recorded_preprocessing(cfg).items():
        if key in meta and json.loads(json.dumps(meta[key])) != json.loads(json.dumps(value)):
            raise InputError(
                card, f"{key} {meta[key]} disagrees with config.yaml ({value}); the package mixes two models"
            )
