"""``medseg ensemble``: several trained packages (seeds, folds) as one package that predicts their mean probability.

    DIR/ensemble.json     format, how members combine (mean softmax), each member's folder and weights checksum
    DIR/config.yaml       the first member's config (preprocessing, window, inference settings of the ensemble)
    DIR/metadata.json     the first member's model card, plus ``ensemble`` (member count); no ``weights_sha256``
    DIR/members/K/        member K's package files as trained (model.pt, config.yaml, metadata.json, plans.json)

Members must agree on everything the shared preprocessing and outputs depend on (label map, channels, spacing,
orientation, intensity, cropping, window size, 2D/3D); otherwise ``create_ensemble`` names the first member that
differs and how, before anything is written. The folder is assembled beside ``DIR`` and renamed into place, so a
killed command leaves no half ensemble. ``load_package`` reads it; ``ModelPackage.build`` gives the
``EnsembleNetwork`` of the members' own weights (each checked against its model card).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from medseg.config import Config
from medseg.errors import InputError
from medseg.inference.model_package import (
    CONFIG,
    ENSEMBLE_FORMAT,
    ENSEMBLE_JSON,
    METADATA,
    PLANS,
    WEIGHTS,
    ModelPackage,
    load_package,
    recorded_preprocessing,
)
from medseg.io.atomic import atomic_folder, write_json_atomic, write_text_atomic

MEMBERS = "members"


def inference_contract(pkg: ModelPackage) -> dict[str, Any]:
    """What a shared preprocessing and output need members to agree on, as plain JSON-like values."""
    cfg: Config = pkg.config
    data = cfg.data
    return {
        "labels": pkg.labels,
        "in_channels": pkg.metadata.get("in_channels"),
        "spatial_dims": cfg.model.spatial_dims,
        "kind": data.kind,
        "ignore_index": data.ignore_index,
        "resize": list(data.resize) if data.resize else None,
        **recorded_preprocessing(cfg),  # what the model card records too (spacing, orientation, intensity, window)
        "crop_foreground": data.crop_foreground,
        "foreground_threshold": data.foreground_threshold,
    }


def check_members(members: list[ModelPackage]) -> None:
    """``InputError`` naming the first member whose inference contract differs from the first member's."""
    if len(members) < 2:
        raise InputError(members[0].path if members else "ensemble", "an ensemble needs at least two models")
    for pkg in members:
        if pkg.export is not None or pkg.members is not None:
            raise InputError(pkg.path, "an ensemble member must be a trained model package (not an export or ensemble)")
    first = inference_contract(members[0])
    for pkg in members[1:]:
        contract = inference_contract(pkg)
        diff = [k for k in first if contract[k] != first[k]]
        if diff:
            key = diff[0]
            raise InputError(
                pkg.path,
                f"cannot join an ensemble with {members[0].path}: {key} {contract[key]} differs from {first[key]}"
                + (f" (also differs: {', '.join(diff[1:])})" if diff[1:] else ""),
            )


def create_ensemble(refs: list[str], output: str | Path, tracking_uri: str | None = None) -> Path:
    """Write the ensemble package of the packages ``refs`` (folders, run folders or MLflow URIs) to ``output``.

    ``output`` must not exist yet (an existing folder is never overwritten). Returns the package folder.
    """
    out = Path(output)
    if out.exists():
        raise InputError(out, "already exists: give a new folder for the ensemble")
    members = [load_package(ref, tracking_uri) for ref in refs]
    check_members(members)
    with atomic_folder(out) as staging:  # one rename: the ensemble exists whole or not at all
        records = []
        for k, pkg in enumerate(members):
            dest = staging / MEMBERS / str(k)
            dest.mkdir(parents=True)
            for name in (WEIGHTS, CONFIG, METADATA, PLANS):
                if (pkg.path / name).is_file():
                    shutil.copyfile(pkg.path / name, dest / name)
            records.append({"path": f"{MEMBERS}/{k}", "weights_sha256": pkg.metadata.get("weights_sha256")})
        card = {k: v for k, v in members[0].metadata.items() if k not in ("weights_sha256", "plans")}
        card["ensemble"] = {"members": len(members), "combine": "mean_probability"}
        write_text_atomic(staging / CONFIG, members[0].config.to_yaml())
        write_json_atomic(staging / METADATA, card)
        write_json_atomic(
            staging / ENSEMBLE_JSON, {"format": ENSEMBLE_FORMAT, "combine": "mean_probability", "members": records}
        )
    return out
