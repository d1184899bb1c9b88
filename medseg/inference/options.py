"""Run-time options of a prediction batch: which shard to take, and inference overrides of the package config."""

from __future__ import annotations

from dataclasses import replace

from pydantic import ValidationError

from medseg.config import Config, apply_overrides
from medseg.errors import ConfigError
from medseg.inference.model_package import ModelPackage
from medseg.inference.shard import parse_shard, shard_from_env


def resolve_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` if given, else torchrun's RANK/WORLD_SIZE, else None (``ValueError`` on a bad value)."""
    return parse_shard(text) if text else shard_from_env()


def apply_inference_overrides(package: ModelPackage, overrides: list[str]) -> ModelPackage:
    """A copy of ``package`` whose config has ``inference.KEY=VALUE`` overrides applied (validated).

    Only the ``inference`` section may change: the rest (preprocessing, architecture) is what the weights
    were trained with.
    """
    if not overrides:
        return package
    bad = [o for o in overrides if not o.strip().startswith("inference.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only inference.* settings can be changed at prediction time")
    raw = apply_overrides(package.config.model_dump(mode="json"), overrides)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"--set: invalid inference setting: {msgs}") from None
    return replace(package, config=cfg)
