"""Config: presets validate, overrides apply, bad keys and values are rejected with their key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.components import load_checked_config
from medseg.config import CONFIG_DIR, Config, flatten, load_config
from medseg.errors import ConfigError
from tests.conftest import run_cli

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_presets_exist() -> None:
    assert "phantom_unet3d" in PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates(preset: str) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert len(cfg.roi_size) == cfg.model.spatial_dims


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config("phantom_unet3d", ["train.epochs=7", "optimizer.lr=0.01", "data.patch_size=[32, 32, 16]",
                                          "model.params.channels=[8, 16, 32, 64]", "tracking.backend=none"])
    assert cfg.train.epochs == 7 and cfg.optimizer.lr == 0.01
    assert cfg.data.patch_size == (32, 32, 16)
    assert cfg.model.params["channels"] == [8, 16, 32, 64]
    assert cfg.tracking.backend == "none"


def test_amp_off_survives_yaml_reading_it_as_false(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare ``off`` as false; ``train.amp: off`` must still mean fp32 (it was a schema error)."""
    assert load_config("phantom_unet3d", ["train.amp=off"]).train.amp == "off"
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  amp: off\n")
    assert load_config(preset).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config("phantom_unet3d", ["train.amp=true"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochz=3", "train.epochz: unknown key"),
        ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
        ("train.epochs=many", "train.epochs"),
        ("data.intensity.mode=hu", "data.intensity.mode"),
        ("optimizer.name=adam", "optimizer.name"),
        ("model.params.bogus=1", "model.params: model 'unet' has no parameter 'bogus'"),
        ("model.name=transformer9000", "model.name: unknown model 'transformer9000'; valid names:"),
        ("loss.name=hinge", "loss.name: unknown loss 'hinge'"),
        ("data.patch_size=[64, 64]", "data.patch_size has 2 values but model.spatial_dims is 3"),
        ("data.spacing=[1, 0, 1]", "data.spacing"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
        ("train", "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_checked_config("phantom_unet3d", [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError, match="available: .*phantom_unet3d"):
        load_config("no_such_preset")


def test_yaml_file_with_unknown_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and "train.lr: unknown key" in str(err.value)


def test_flatten_round_trip_keys() -> None:
    flat = load_config("phantom_unet3d").flat()
    assert flat["train.epochs"] == "30"
    assert flat["model.params.channels"] == "[16, 32, 64, 128]"
    assert flatten({"a": {"b": {}}}) == {"a.b": "{}"}


def test_config_show_cli() -> None:
    p = run_cli("config", "show", "phantom_unet3d", "train.epochs=3")
    assert "epochs: 3" in p.stdout
    bad = run_cli("config", "show", "phantom_unet3d", "train.epochz=3", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "train.epochz: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr
