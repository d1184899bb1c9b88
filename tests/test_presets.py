"""Every preset in configs/ builds, trains one epoch of two steps on the tiny phantom on CPU, and its model
package predicts a scan into the scan's own geometry. Sizes are shrunk by overrides; the architecture,
loss, optimizer and sampling settings are the preset's own."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import CONFIG_DIR, load_config
from medseg.engine.trainer import Trainer
from medseg.inference.model_package import load_package
from medseg.inference.predictor import Predictor
from medseg.io.manifest import load_manifest

# Per preset: overrides that make the network tiny (same architecture and options).
SMALL: dict[str, list[str]] = {
    "phantom_unet3d": ["data.patch_size=[32, 32, 16]", "model.params.channels=[4, 8, 16, 32]"],
    "hippocampus_unet3d": ["data.patch_size=[32, 32, 16]", "model.params.channels=[4, 8, 16, 32]"],
    "vnet_dice_focal": ["data.patch_size=[16, 16, 16]"],  # smallest V-Net size (4 halvings)
    "unet3d_dice_ce": ["data.patch_size=[32, 32, 16]", "model.params.channels=[4, 8, 16, 32]", "model.params.strides=[2, 2, 2]"],
    "unet2d_slicewise": ["data.patch_size=[32, 32]", "model.params.channels=[4, 8, 16, 32]", "data.batch_size=4",
                         "data.samples_per_volume=2", "inference.sw_batch_size=8"],
    "dynunet": ["data.patch_size=[32, 32, 16]", "model.params.filters=[4, 8, 16, 16, 16]"],
    "sarcoma_ct_unet3d": ["data.patch_size=[32, 32, 16]", "model.params.channels=[4, 8, 16, 32]"],
    "deeplabv3plus3d": ["data.patch_size=[32, 32, 16]", "model.params.encoder_channels=[4, 8, 8, 16]",
                        "model.params.aspp_channels=8", "model.params.decoder_channels=8", "model.params.low_level_channels=4"],
}
COMMON = ["data.spacing=[3.0, 3.0, 4.0]", "train.epochs=1", "train.val_every=1", "train.hd95_every=1", "train.overlay_cases=0", "data.samples_per_volume=1",
          "data.batch_size=2", "tracking.backend=none", "train.device=cpu", "inference.overlap=0.0"]
# Volume presets only: 2D natural-image presets (data.kind image2d) are smoke-run on synthetic images in
# tests/engine/test_train_images2d.py.
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if load_config(p).data.kind == "volume")


def test_every_preset_has_a_smoke_setting() -> None:
    assert set(PRESETS) == set(SMALL), "add the new preset to SMALL"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_a_step_and_predicts(preset: str, tiny_phantom: Path, tmp_path: Path) -> None:
    # COMMON first so a preset's own smoke overrides (e.g. 2D batch size) win.
    cfg = load_config(preset, [*COMMON, *SMALL[preset], f"data.manifest={tiny_phantom}", f"train.output_dir={tmp_path}",
                               "train.run_name=smoke"])
    manifest = load_manifest(tiny_phantom)
    result = Trainer(cfg, manifest).fit()
    assert result.epochs_run == 1 and result.run_dir == tmp_path / "smoke"
    hist = (result.run_dir / "history.csv").read_text().splitlines()
    assert len(hist) == 2 and "val_dice_mean" in hist[0] and "val_hd95_liver" in hist[0]
    assert set(result.best_per_class) == set(manifest.foreground)

    package = load_package(result.run_dir)
    assert package.config.model.name == cfg.model.name and package.config.model.spatial_dims == cfg.model.spatial_dims
    case = manifest.split("val")[0]
    image_path = manifest.image_paths(case)[0]
    pred = Predictor(package, device="cpu").predict([image_path])
    scan = nib.load(image_path)
    assert pred.labels.shape == scan.shape[:3]
    assert np.array_equal(pred.reference.affine, scan.affine)
    assert set(np.unique(pred.labels)) <= set(range(manifest.num_classes))
