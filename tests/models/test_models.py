"""Every registered model through the same checks, plus the upsample helper and unet_resnet's weights.

A new architecture gets coverage by adding one ``TINY`` entry: the spatial dims it supports, the
divisor its input sizes need (``None``: any size, logits are cropped/interpolated back), and the
smallest params that still exercise it. Run with ``-s`` to see parameter counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn as nn

from medseg.errors import InputError
from medseg.models import MODELS, build_model
from medseg.models.unet_resnet import build_unet_resnet
from medseg.models.upsample import UPSAMPLE_MODES, make_upsample


class Spec(NamedTuple):
    dims: tuple[int, ...]
    divisor: int | None  # input sizes must be multiples of this (total stride); None: any size
    params: dict[str, Any]


TINY: dict[str, Spec] = {
    "unet": Spec((2, 3), 4, {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}),
    "vnet": Spec((2, 3), 16, {}),  # fixed widths in MONAI (16..256 channels)
    "dynunet": Spec((2, 3), 4, {"depth": 3, "filters": (4, 8, 16)}),
    "unet_resnet": Spec((2, 3), 32, {"backbone": "resnet18", "decoder_channels": (4, 4, 4, 4, 4)}),
    "deeplabv3plus": Spec(
        (2, 3),
        None,
        {
            "encoder_channels": (4, 8, 8, 16),
            "blocks_per_stage": (1, 1, 1, 1),
            "aspp_rates": (1, 2, 3),
            "aspp_channels": 8,
            "low_level_channels": 4,
            "decoder_channels": 8,
        },
    ),
    "fcn": Spec((2, 3), None, {"channels": (4, 4, 8, 8, 8), "convs_per_stage": (1, 1, 1, 1, 1), "fc_channels": 8}),
    "fc_densenet": Spec(
        (2, 3), None, {"growth_rate": 2, "layers_per_block": (1, 2), "bottleneck_layers": 1, "first_channels": 4}
    ),
}
ODD_SIZE = {2: (37, 45), 3: (13, 17, 11)}
IN_CHANNELS, OUT_CHANNELS, BATCH = 2, 3, 2


def _spec(name: str) -> Spec:
    assert name in TINY, f"model {name!r} is registered but has no TINY entry in {__file__}; add one"
    return TINY[name]


def _input_size(spec: Spec, dims: int) -> tuple[int, ...]:
    """Odd sizes for models that map back to any size; else multiples of the divisor, not all equal."""
    if spec.divisor is None:
        return ODD_SIZE[dims]
    d = spec.divisor
    return (d, 3 * d) if dims == 2 else (d, 2 * d, d)


CASES = [
    pytest.param(name, dims, id=f"{name}-{dims}d")
    for name in MODELS.names()
    for dims in (2, 3)
    if name not in TINY or dims in TINY[name].dims
]


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_model_forward_backward(name: str, dims: int) -> None:
    spec = _spec(name)
    torch.manual_seed(0)
    model = build_model(name, dims, IN_CHANNELS, OUT_CHANNELS, spec.params)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{name} {dims}D (tiny config): {n_params:,} parameters")
    assert n_params > 0

    size = _input_size(spec, dims)
    x = torch.randn(BATCH, IN_CHANNELS, *size)
    model.train()
    out = model(x)
    assert out.shape == (BATCH, OUT_CHANNELS, *size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

    (out * torch.randn_like(out)).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters unused in the forward pass: {no_grad[:5]}"
    first = next(p for p in model.parameters() if p.ndim == dims + 2)
    assert first.shape[1] == IN_CHANNELS, "expected the first conv kernel to be the input layer"
    assert first.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        assert model(x).shape == (BATCH, OUT_CHANNELS, *size)


@pytest.mark.parametrize("name", MODELS.names())
def test_unknown_param_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="bogus"):
        build_model(name, 2, 1, 2, params={"bogus": 1})


# -- upsample helper -------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_upsample_modes_build_and_differ(dims: int) -> None:
    torch.manual_seed(0)
    x = torch.ones(1, 4, *[6] * dims)  # constant input: any spatial pattern in the output is an artefact
    interior = (slice(None), slice(None), *[slice(2, -2)] * dims)
    outputs = {}
    for mode in UPSAMPLE_MODES:
        up = make_upsample(dims, 4, 3, scale=2, mode=mode)
        outputs[mode] = y = up(x)
        assert y.shape == (1, 3, *[12] * dims)
    kinds = {mode: {type(m).__name__ for m in make_upsample(dims, 4, 3, 2, mode).modules()} for mode in UPSAMPLE_MODES}
    assert f"ConvTranspose{dims}d" in kinds["deconv"] and "Upsample" not in kinds["deconv"]
    assert "Upsample" in kinds["resize_conv"] and f"Conv{dims}d" in kinds["resize_conv"]
    # Resize + conv keeps a constant image constant away from the borders; a stride-2 transposed conv
    # stamps its kernel in a period-2 (checkerboard) pattern.
    flat = lambda y: y[interior].flatten(2)  # noqa: E731
    assert flat(outputs["resize_conv"]).std(dim=2).max() < 1e-5
    assert flat(outputs["deconv"]).std(dim=2).min() > 1e-3


def test_upsample_kernel_and_unknown_mode() -> None:
    up = make_upsample(2, 2, 2, scale=2, mode="deconv", kernel_size=3)
    assert up(torch.randn(1, 2, 5, 7)).shape == (1, 2, 10, 14)
    with pytest.raises(ValueError, match="deconv, resize_conv"):
        make_upsample(2, 2, 2, mode="bilinear")


# -- dynunet deep supervision ------------------------------------------------------------------------


def test_dynunet_deep_supervision_shapes() -> None:
    params = {"depth": 4, "filters": (4, 4, 8, 8), "deep_supervision": True, "deep_supr_num": 2}
    model = build_model("dynunet", 2, 1, 3, params)
    x = torch.randn(2, 1, 16, 24)
    assert model.train()(x).shape == (2, 3, 3, 16, 24)  # (B, 1 + deep_supr_num, C, ...)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, 16, 24)


# -- unet_resnet local encoder weights --------------------------------------------------------------


def _tiny_unet_resnet(**kw: Any) -> nn.Module:
    return build_unet_resnet(2, 1, 2, backbone="resnet18", decoder_channels=(4, 4, 4, 4, 4), **kw)


def _randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}


def test_unet_resnet_loads_plain_encoder_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = _randomised(_tiny_unet_resnet().encoder.state_dict())
    path = tmp_path / "encoder.pt"
    torch.save(weights, path)
    loaded = _tiny_unet_resnet(pretrained_path=str(path)).encoder.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_unet_resnet_loads_torchvision_layout(tmp_path: Path) -> None:
    """ImageNet ResNet-18 layout: 3-channel stem, projection shortcuts, fc head, module. prefix."""
    torch.manual_seed(0)
    weights = _randomised(build_unet_resnet(2, 3, 2, backbone="resnet18").encoder.state_dict())
    for k in ("conv1.weight", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias"):
        assert k in weights  # torchvision's parameter names
    assert weights["conv1.weight"].shape == (64, 3, 7, 7)
    weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}  # old checkpoints
    weights |= {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)

    encoder = _tiny_unet_resnet(pretrained_path=str(path)).encoder  # 1 input channel
    assert torch.equal(encoder.layer2[0].downsample[0].weight, weights["layer2.0.downsample.0.weight"])
    assert torch.equal(encoder.layer4[1].bn2.bias, weights["layer4.1.bn2.bias"])
    assert torch.allclose(encoder.conv1.weight, weights["conv1.weight"].sum(dim=1, keepdim=True))


def test_unet_resnet_bad_weights_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="garbage.pt"):
        _tiny_unet_resnet(pretrained_path=str(garbage))
    with pytest.raises(InputError, match="not found"):
        _tiny_unet_resnet(pretrained_path=str(tmp_path / "missing.pt"))

    shortcut_a = tmp_path / "shortcut_a.pt"
    torch.save(_tiny_unet_resnet(shortcut_type="A").encoder.state_dict(), shortcut_a)
    with pytest.raises(InputError, match=r"shortcut_a\.pt.*missing keys: layer2\.0\.downsample.*hint"):
        _tiny_unet_resnet(pretrained_path=str(shortcut_a))
    _tiny_unet_resnet(shortcut_type="A", pretrained_path=str(shortcut_a))  # the matching layout loads

    two_d = tmp_path / "encoder2d.pt"
    torch.save(_tiny_unet_resnet().encoder.state_dict(), two_d)
    with pytest.raises(InputError, match=r"encoder2d\.pt.*shape mismatch.*conv1\.weight"):
        build_unet_resnet(3, 1, 2, backbone="resnet18", decoder_channels=(4, 4, 4, 4, 4), pretrained_path=str(two_d))
