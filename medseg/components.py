"""Configs checked against the registries: model, loss and augmentation names and their parameters.

``medseg.config`` validates the schema only: it sits below the modules that register models, losses and
augmentations, so it cannot list them. This module sits above them and is what entry points load configs with,
so a misspelt name fails at start-up with the valid names listed.
"""

from __future__ import annotations

from pathlib import Path

from medseg.config import Config, load_config, resolve_preset
from medseg.data.augmentations import AUGMENTATIONS
from medseg.data.kinds import DATA_KINDS
from medseg.errors import ConfigError
from medseg.losses import LOSSES
from medseg.models import MODELS, RESERVED_PARAMS


def check_components(cfg: Config, source: str = "config") -> Config:
    """``ConfigError`` (naming ``source`` and the key) unless every registry name and its params are valid."""
    if cfg.data.kind not in DATA_KINDS:
        raise ConfigError(
            f"{source}: data.kind: unknown data kind {cfg.data.kind!r}; valid names: {', '.join(DATA_KINDS.names())}"
        )
    for aug in cfg.data.augmentations:
        if aug not in AUGMENTATIONS:
            raise ConfigError(
                f"{source}: data.augmentations: unknown augmentation {aug!r}; "
                f"valid names: {', '.join(AUGMENTATIONS.names())}"
            )
    for section, registry, name, params, reserved in (
        ("model", MODELS, cfg.model.name, cfg.model.params, RESERVED_PARAMS),
        ("loss", LOSSES, cfg.loss.name, cfg.loss.params, ("num_classes",)),
    ):
        try:
            registry.check_params(name, params, reserved)
        except KeyError as e:
            raise ConfigError(f"{source}: {section}.name: {e.args[0]}") from None
        except ValueError as e:
            raise ConfigError(f"{source}: {section}.params: {e}") from None
    return cfg


def load_checked_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """``load_config`` (schema) and then ``check_components`` (registry names and params)."""
    cfg = load_config(preset, overrides)
    source = "defaults" if preset is None else str(resolve_preset(preset))
    return check_components(cfg, source)
