"""Tests for medseg.losses: every value is computed by hand from softmax probabilities written out."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.losses import LOSSES, CombinedLoss, build_loss, wrap_deep_supervision

# A 1 x 2 x 2 x 2 case: background logit 0 everywhere, foreground logit Z, target T (row-major pixels).
Z = [-1.0, 2.0, 0.5, 1.0]
T = [0, 1, 1, 0]
SMOOTH = 1e-5


def fg_prob(z: float) -> float:
    """Softmax probability of the foreground for logits (0, z)."""
    return math.exp(z) / (math.exp(0.0) + math.exp(z))


P1 = [fg_prob(z) for z in Z]  # foreground probabilities
P0 = [1.0 - p for p in P1]  # background probabilities
PT = [P1[i] if T[i] == 1 else P0[i] for i in range(4)]  # probability of the true class
CE_PIX = [-math.log(p) for p in PT]  # per-pixel cross-entropy


def logits_2x2() -> torch.Tensor:
    """Logits (1, 2, 2, 2) for Z, requiring grad."""
    fg = torch.tensor(Z).reshape(1, 1, 2, 2)
    return torch.cat([torch.zeros_like(fg), fg], dim=1).requires_grad_(True)


def target_2x2(dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Target (1, 1, 2, 2) for T."""
    return torch.tensor(T, dtype=dtype).reshape(1, 1, 2, 2)


def hand_dice_fg() -> float:
    tp = P1[1] + P1[2]
    return 1.0 - (2 * tp + SMOOTH) / (sum(P1) + 2 + SMOOTH)


def hand_dice_bg() -> float:
    tp = P0[0] + P0[3]
    return 1.0 - (2 * tp + SMOOTH) / (sum(P0) + 2 + SMOOTH)


def hand_focal(gamma: float, factors: list[float] | None = None, num_classes: int = 2) -> float:
    """Mean over B * C * pixels (MONAI convention) of -f_t (1 - p_t)^gamma log p_t."""
    factors = factors or [1.0, 1.0, 1.0, 1.0]
    terms = [factors[i] * (1 - PT[i]) ** gamma * CE_PIX[i] for i in range(4)]
    return sum(terms) / (num_classes * 4)


# --- cross-entropy -------------------------------------------------------------------------------


def test_ce_matches_hand_computed() -> None:
    loss = build_loss("ce", 2)(logits_2x2(), target_2x2())
    assert loss.item() == pytest.approx(sum(CE_PIX) / 4, rel=1e-6)


def test_ce_class_weights_give_weighted_mean() -> None:
    loss = build_loss("ce", 2, {"class_weights": [1.0, 3.0]})(logits_2x2(), target_2x2())
    # Pixels 1 and 2 are foreground (weight 3): torch divides by the sum of the weights used, 1+3+3+1.
    expected = (CE_PIX[0] + 3 * CE_PIX[1] + 3 * CE_PIX[2] + CE_PIX[3]) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(sum(CE_PIX) / 4, rel=1e-3)


def test_ce_label_smoothing() -> None:
    eps = 0.2
    loss = build_loss("ce", 2, {"label_smoothing": eps})(logits_2x2(), target_2x2())
    per_pixel = [
        (1 - eps) * CE_PIX[i] + eps / 2 * (-math.log(P0[i]) - math.log(P1[i])) for i in range(4)
    ]
    assert loss.item() == pytest.approx(sum(per_pixel) / 4, rel=1e-6)


def test_ce_three_classes() -> None:
    # Two pixels, logits (1, 0, -1) with target 2 and (0, 2, 0) with target 1.
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]).reshape(1, 3, 1, 2)
    target = torch.tensor([2, 1]).reshape(1, 1, 1, 2)
    p_a = math.exp(-1) / (math.exp(1) + math.exp(0) + math.exp(-1))
    p_b = math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(0))
    expected = (-math.log(p_a) - math.log(p_b)) / 2
    assert build_loss("ce", 3)(logits, target).item() == pytest.approx(expected, rel=1e-6)


# --- focal ---------------------------------------------------------------------------------------


def test_focal_gamma2_hand_computed() -> None:
    loss = build_loss("focal", 2)(logits_2x2(), target_2x2())
    assert loss.item() == pytest.approx(hand_focal(2.0), rel=1e-5)


def test_focal_gamma0_is_ce_over_num_classes() -> None:
    """MONAI averages over the C one-hot channels too, so gamma=0 gives CE / C, not CE."""
    loss = build_loss("focal", 2, {"gamma": 0.0})(logits_2x2(), target_2x2())
    assert loss.item() == pytest.approx(sum(CE_PIX) / 4 / 2, rel=1e-6)


def test_focal_scalar_alpha_weighs_background_by_one_minus_alpha() -> None:
    loss = build_loss("focal", 2, {"alpha": 0.75})(logits_2x2(), target_2x2())
    factors = [0.25 if t == 0 else 0.75 for t in T]
    assert loss.item() == pytest.approx(hand_focal(2.0, factors), rel=1e-5)


def test_focal_class_weights_multiply_without_normalising() -> None:
    loss = build_loss("focal", 2, {"class_weights": [1.0, 3.0]})(logits_2x2(), target_2x2())
    factors = [1.0 if t == 0 else 3.0 for t in T]
    assert loss.item() == pytest.approx(hand_focal(2.0, factors), rel=1e-5)


# --- dice ----------------------------------------------------------------------------------------


def test_dice_excludes_background_by_default() -> None:
    loss = build_loss("dice", 2)(logits_2x2(), target_2x2())
    assert loss.item() == pytest.approx(hand_dice_fg(), rel=1e-5)


def test_dice_include_background_averages_both_classes() -> None:
    loss = build_loss("dice", 2, {"include_background": True})(logits_2x2(), target_2x2())
    expected = (hand_dice_bg() + hand_dice_fg()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(hand_dice_fg(), rel=1e-3)


def test_dice_batch_pools_over_items() -> None:
    # Item a: foreground logits (1, -1), target (1, 0); item b: logits (0.5, -2), no foreground.
    fg = torch.tensor([[1.0, -1.0], [0.5, -2.0]]).reshape(2, 1, 1, 2)
    logits = torch.cat([torch.zeros_like(fg), fg], dim=1)
    target = torch.tensor([[1, 0], [0, 0]]).reshape(2, 1, 1, 2)
    pa, pa2, pb, pb2 = fg_prob(1.0), fg_prob(-1.0), fg_prob(0.5), fg_prob(-2.0)

    pooled = 1 - (2 * pa + SMOOTH) / (pa + pa2 + pb + pb2 + 1 + SMOOTH)
    per_item = ((1 - (2 * pa + SMOOTH) / (pa + pa2 + 1 + SMOOTH)) + (1 - SMOOTH / (pb + pb2 + SMOOTH))) / 2

    assert build_loss("dice", 2)(logits, target).item() == pytest.approx(pooled, rel=1e-5)
    assert build_loss("dice", 2, {"batch": False})(logits, target).item() == pytest.approx(per_item, rel=1e-5)


# --- combined ------------------------------------------------------------------------------------


def test_dice_ce_is_weighted_sum_and_class_weights_touch_ce_only() -> None:
    params = {"lambda_dice": 0.3, "lambda_ce": 2.0, "class_weights": [1.0, 3.0]}
    loss = build_loss("dice_ce", 2, params)
    weighted_ce = (CE_PIX[0] + 3 * CE_PIX[1] + 3 * CE_PIX[2] + CE_PIX[3]) / 8
    expected = 0.3 * hand_dice_fg() + 2.0 * weighted_ce
    assert loss(logits_2x2(), target_2x2()).item() == pytest.approx(expected, rel=1e-5)

    assert isinstance(loss, CombinedLoss)
    parts = loss.components(logits_2x2(), target_2x2())
    assert parts["dice"].item() == pytest.approx(hand_dice_fg(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(weighted_ce, rel=1e-5)


def test_dice_ce_include_background() -> None:
    loss = build_loss("dice_ce", 2, {"include_background": True})(logits_2x2(), target_2x2())
    expected = (hand_dice_bg() + hand_dice_fg()) / 2 + sum(CE_PIX) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dice_focal_is_weighted_sum_with_softmax_focal() -> None:
    params = {"lambda_dice": 0.5, "lambda_focal": 4.0, "gamma": 2.0, "alpha": 0.75}
    loss = build_loss("dice_focal", 2, params)(logits_2x2(), target_2x2())
    factors = [0.25 if t == 0 else 0.75 for t in T]
    expected = 0.5 * hand_dice_fg() + 4.0 * hand_focal(2.0, factors)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- properties of every registered loss ---------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES.names())
def test_perfect_prediction_gives_near_zero_loss(name: str) -> None:
    target = target_2x2()
    logits = torch.where(torch.cat([target == 0, target == 1], dim=1), 20.0, -20.0)
    assert build_loss(name, 2)(logits, target).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradients_flow_3d_three_classes(name: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    target = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1] * 2).reshape(2, 1, 2, 2, 2)
    loss = build_loss(name, 3)(logits, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_float_labels_equal_integer_labels(name: str) -> None:
    loss = build_loss(name, 2)
    as_long = loss(logits_2x2(), target_2x2(torch.long))
    as_float = loss(logits_2x2(), target_2x2(torch.float32))
    assert as_float.item() == pytest.approx(as_long.item(), rel=1e-6)


# --- errors --------------------------------------------------------------------------------------


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="dice_ce") as info:
        build_loss("dicece", 2, {})
    for name in ("ce", "dice", "dice_ce", "dice_focal", "focal"):
        assert name in str(info.value)


def test_unknown_param_is_named() -> None:
    with pytest.raises(ValueError, match="gama"):
        build_loss("focal", 2, {"gama": 2.0})


def test_num_classes_in_params_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("dice", 2, {"num_classes": 3})


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="class_weights has 3 values"):
        build_loss("ce", 2, {"class_weights": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="alpha"):
        build_loss("focal", 2, {"alpha": 1.5})
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("dice", 1)
    with pytest.raises(ValueError, match="lambda_ce"):
        build_loss("dice_ce", 2, {"lambda_ce": -1.0})


def test_ce_rejects_target_without_channel_axis() -> None:
    with pytest.raises(ValueError, match="target must have shape"):
        build_loss("ce", 2)(logits_2x2(), target_2x2()[:, 0])


# --- deep supervision ----------------------------------------------------------------------------

# 4x4 target made of 2x2 blocks, so nearest downsampling to 2x2 is unambiguous: [[0, 1], [1, 0]].
BLOCKS = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]).reshape(1, 1, 4, 4)


def confident_logits(target: torch.Tensor, margin: float) -> torch.Tensor:
    """Logits where the true class scores ``margin`` and the other 0: every pixel's CE is log(1 + e^-margin)."""
    return torch.cat([(target == 0).float(), (target == 1).float()], dim=1) * margin


def test_deep_supervision_list_downsamples_target() -> None:
    loss = wrap_deep_supervision(build_loss("ce", 2))
    low_target = torch.tensor([[0, 1], [1, 0]]).reshape(1, 1, 2, 2)
    outputs = [confident_logits(BLOCKS, 1.0), confident_logits(low_target, 2.0)]
    expected = 1.0 * math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.exp(-2))
    assert loss(outputs, BLOCKS).item() == pytest.approx(expected, rel=1e-6)


def test_deep_supervision_stacked_tensor_and_weights() -> None:
    stacked = torch.stack([confident_logits(BLOCKS, 1.0), confident_logits(BLOCKS, 3.0)], dim=1)
    expected = 1.0 * math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.exp(-3))
    assert wrap_deep_supervision(build_loss("ce", 2))(stacked, BLOCKS).item() == pytest.approx(expected, rel=1e-6)

    custom = wrap_deep_supervision(build_loss("ce", 2), weights=[0.2, 0.8])
    expected = 0.2 * math.log(1 + math.exp(-1)) + 0.8 * math.log(1 + math.exp(-3))
    assert custom(stacked, BLOCKS).item() == pytest.approx(expected, rel=1e-6)

    single = wrap_deep_supervision(build_loss("ce", 2))(confident_logits(BLOCKS, 1.0), BLOCKS)
    assert single.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_deep_supervision_too_few_weights_is_an_error() -> None:
    stacked = torch.stack([confident_logits(BLOCKS, 1.0)] * 3, dim=1)
    with pytest.raises(ValueError, match="3 deep-supervision outputs but only 2 weights"):
        wrap_deep_supervision(build_loss("ce", 2), weights=[1.0, 0.5])(stacked, BLOCKS)
