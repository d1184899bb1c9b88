"""Configs checked against the registries (``medseg.components``): ``check_components`` on configs that pass the
schema (``medseg.config.load_config``) but name an unknown augmentation or model, or a parameter the builder does
not take. (The same errors through ``load_checked_config`` and a preset are in ``tests/test_config.py``.)"""

from __future__ import annotations

import pytest

from medseg.components import check_components, load_checked_config
from medseg.config import CONFIG_DIR, load_config
from medseg.errors import ConfigError
from medseg.models import MODELS


def _cfg(*overrides: str):
    return load_config("phantom_unet3d", list(overrides))  # the schema accepts every one of these


def test_unknown_augmentation_lists_the_valid_names() -> None:
    cfg = _cfg("data.augmentations=[intensity, rotate]")
    with pytest.raises(ConfigError) as err:
        check_components(cfg, "my.yaml")
    assert str(err.value) == ("my.yaml: data.augmentations: unknown augmentation 'rotate'; "
                              "valid names: flip_all, flip_horizontal, flip_lr, intensity, noise, spatial")


def test_unknown_model_names_the_key_and_lists_the_models() -> None:
    with pytest.raises(ConfigError) as err:
        check_components(_cfg("model.name=transformer9000"))
    assert str(err.value) == ("config: model.name: unknown model 'transformer9000'; "
                              f"valid names: {', '.join(MODELS.names())}")
    assert {"unet", "vnet", "dynunet"} <= set(MODELS.names())


@pytest.mark.parametrize(("override", "message"), [
    ("model.params.bogus=1", "cfg.yaml: model.params: model 'unet' has no parameter 'bogus'; valid: "),
    ("model.params.in_channels=2", "cfg.yaml: model.params: 'in_channels' is set by medseg, not in config (model 'unet')"),
    ("loss.params.num_classes=3", "cfg.yaml: loss.params: 'num_classes' is set by medseg, not in config (loss 'dice_focal')"),
    ("loss.params.bogus=1", "cfg.yaml: loss.params: loss 'dice_focal' has no parameter 'bogus'"),
])
def test_a_bad_parameter_names_the_section_and_the_parameter(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_components(_cfg(override), "cfg.yaml")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_valid_unet_params_are_listed_without_the_reserved_ones() -> None:
    with pytest.raises(ConfigError) as err:
        check_components(_cfg("model.params.bogus=1"))
    valid = str(err.value).split("valid: ")[1].split(", ")
    assert "channels" in valid and "strides" in valid
    assert not {"spatial_dims", "in_channels", "out_channels"} & set(valid)


def test_a_valid_config_passes_unchanged() -> None:
    cfg = _cfg("data.augmentations=[spatial, flip_lr]", "model.params.num_res_units=2")
    before = cfg.model_dump()
    assert check_components(cfg, "cfg.yaml") is cfg
    assert cfg.model_dump() == before


def test_load_checked_config_names_the_preset_file_or_defaults() -> None:
    with pytest.raises(ConfigError, match=f"^{CONFIG_DIR / 'phantom_unet3d.yaml'}: model.name: unknown model"):
        load_checked_config("phantom_unet3d", ["model.name=nope"])
    with pytest.raises(ConfigError, match="^defaults: model.name: unknown model 'nope'"):
        load_checked_config(None, ["model.name=nope"])
    assert load_checked_config("phantom_unet3d").model_dump() == load_config("phantom_unet3d").model_dump()


def test_flip_all_mirrors_each_axis_independently_with_the_label() -> None:
    """Over many draws every one of the 8 axis combinations occurs, and the label always follows the image."""
    import numpy as np
    import torch
    from monai.transforms import Compose

    from medseg.data.augmentations import AUGMENTATIONS

    image = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6)
    tf = Compose(AUGMENTATIONS.get("flip_all")(["image", "label"], 3))
    tf.set_random_state(seed=0)
    seen = set()
    for _ in range(80):
        out = tf({"image": image.clone(), "label": image.clone().long()})
        img, src = out["image"].numpy()[0], image.numpy()[0]
        combos = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))
        seen.add(next(c for c in combos if np.array_equal(np.flip(src, c) if c else src, img)))  # a pure mirror
        assert np.array_equal(out["label"].numpy()[0], img.astype(np.int64))
    assert len(seen) == 8
