"""U-Net with a ResNet-18/34 encoder (2D or 3D) from MONAI ``FlexibleUNet``, with optional local weights.

Nothing here downloads: MONAI's ``pretrained=True`` (MedicalNet weights from the internet) is never
used. Encoder weights come only from ``pretrained_path``, a local file read with
``torch.load(path, weights_only=True)``.

Encoder layout. MONAI's own resnet18/34 encoders use parameter-free "A" shortcuts (zero-padded identity),
while torchvision's ImageNet ResNets use "B" shortcuts (1x1 conv + norm, no bias) whose weights are
stored as ``layerN.0.downsample.*``. So the builder replaces FlexibleUNet's encoder with a MONAI
``ResNet`` of the requested ``shortcut_type``; its parameter names (``conv1``, ``bn1``, ``layer1`` ...
``layer4``) are torchvision's, so a torchvision state dict loads key for key.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from monai.networks.nets import FlexibleUNet, ResNet
from monai.networks.nets.resnet import get_inplanes

from medseg.errors import InputError
from medseg.models.registry import MODELS

BACKBONE_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
SHORTCUT_TYPES = ("A", "B")
# medseg's upsample names (see upsample.py) -> FlexibleUNet's; "nontrainable" is nearest resize + convs.
UPSAMPLE_MODES = {"resize_conv": "nontrainable", "deconv": "deconv"}
MAX_LISTED_KEYS = 8


class ResNetFeatureEncoder(ResNet):
    """MONAI ``ResNet`` (basic blocks, stride-2 7x7 stem, no classifier) returning the 5 feature maps
    FlexibleUNet expects, at strides 2, 4, 8, 16, 32."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]  # encoder: all stages' maps
        """Return [stem, layer1, layer2, layer3, layer4] features."""
        x = self.act(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def _make_encoder(backbone: str, spatial_dims: int, in_channels: int, shortcut_type: str) -> ResNetFeatureEncoder:
    return ResNetFeatureEncoder(
        block="basic",
        layers=BACKBONE_LAYERS[backbone],
        block_inplanes=get_inplanes(),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_stride=2,
        shortcut_type=shortcut_type,
        feed_forward=False,
        bias_downsample=False,
    )


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map a stem kernel trained on C_src input channels (3 for RGB) to ``in_channels``.

    1 channel: sum over the source channels (a grey image is R = G = B). Otherwise cycle the source
    channels and rescale by C_src / in_channels so the response to a constant image is unchanged
    (the rule segmentation_models.pytorch uses).
    """
    src = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    idx = torch.arange(in_channels) % src
    return weight[:, idx] * (src / in_channels)


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load local encoder weights from ``path`` into ``encoder`` (in place).

    Accepted layouts: a plain encoder state dict (``conv1.weight``, ``layer1.0.conv1.weight`` ...); a
    torchvision ResNet state dict (its classifier ``fc.*`` is dropped, and a stem with another number of
    input channels is adapted, see ``_adapt_first_conv``); either wrapped in ``{"state_dict": ...}``
    and/or prefixed ``module.`` (DataParallel); or a full ``unet_resnet`` state dict, of which only
    the ``encoder.*`` entries are used.

    Raises:
        InputError: naming ``path`` if the file is missing or unreadable, or if keys are missing,
            unexpected or of the wrong shape (all are listed at once).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "pretrained encoder weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise InputError(path, f"cannot read encoder weights with torch.load(weights_only=True): {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "expected a state dict (parameter name -> tensor)")

    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if k not in ("fc.weight", "fc.bias")}

    own = encoder.state_dict()
    stem = state.get("conv1.weight")
    if stem is not None and stem.ndim == own["conv1.weight"].ndim and stem.shape[1] != own["conv1.weight"].shape[1]:
        state["conv1.weight"] = _adapt_first_conv(stem, own["conv1.weight"].shape[1])

    counters = [k for k in own if k.endswith("num_batches_tracked")]  # BN step counters, not weights
    missing = [k for k in own if k not in state and k not in counters]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listed(unexpected)}")
        if wrong_shape:
            problems.append(f"shape mismatch (file vs model): {_listed(wrong_shape)}")
        if any("downsample" in k for k in missing + unexpected):
            problems.append(
                "hint: shortcut_type 'B' has downsample.* weights (torchvision), 'A' has none (MONAI/MedicalNet)"
            )
        raise InputError(path, "encoder weights do not fit the model; " + "; ".join(problems))
    for k in counters:
        state.setdefault(k, own[k])
    encoder.load_state_dict(state, strict=True)


@MODELS.register("unet_resnet")
def build_unet_resnet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    backbone: str = "resnet34",
    pretrained_path: str | None = None,
    shortcut_type: str = "B",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
    dropout: float = 0.0,
    upsample: str = "resize_conv",
) -> nn.Module:
    """FlexibleUNet with a ResNet encoder (2D or 3D). Inputs must be divisible by 32 per axis.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        backbone: ``"resnet18"`` or ``"resnet34"``.
        pretrained_path: local file with encoder weights (see ``load_encoder_weights``); ``None``: random
            init. Never downloads. 2D (e.g. torchvision ImageNet) weights fit only ``spatial_dims=2``.
        shortcut_type: ``"B"`` (1x1 conv projection, torchvision layout) or ``"A"`` (parameter-free,
            MONAI/MedicalNet resnet18/34 layout); must match the weights file.
        decoder_channels: channels of the 5 decoder stages.
        norm: decoder normalisation, name or (name, kwargs). The encoder uses batch norm, as the weights do.
        dropout: decoder dropout.
        upsample: decoder upsampling, ``"resize_conv"`` (nearest resize + convs, MONAI's "nontrainable")
            or ``"deconv"`` (transposed conv).
    """
    if backbone not in BACKBONE_LAYERS:
        raise ValueError(f"unknown unet_resnet backbone {backbone!r}; valid: {', '.join(BACKBONE_LAYERS)}")
    if shortcut_type not in SHORTCUT_TYPES:
        raise ValueError(f"unknown shortcut_type {shortcut_type!r}; valid: {', '.join(SHORTCUT_TYPES)}")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {upsample!r}; valid: {', '.join(UPSAMPLE_MODES)}")
    net = FlexibleUNet(
        in_channels=in_channels,
        out_channels=out_channels,
        backbone=backbone,
        pretrained=False,  # never MONAI's download path
        decoder_channels=tuple(decoder_channels),
        spatial_dims=spatial_dims,
        norm=norm,
        dropout=dropout,
        upsample=UPSAMPLE_MODES[upsample],
    )
    # Same channels (64, 64, 128, 256, 512) and strides as MONAI's encoder; see the module docstring.
    net.encoder = _make_encoder(backbone, spatial_dims, in_channels, shortcut_type)
    if pretrained_path is not None:
        load_encoder_weights(net.encoder, pretrained_path)
    return net
