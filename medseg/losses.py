"""Segmentation losses, looked up by name.

Every builder is ``build(num_classes, **params) -> nn.Module``; the module is called as
``loss(logits, target)`` with ``logits`` of shape ``(B, C, *spatial)`` (raw scores, before softmax) and
``target`` of shape ``(B, 1, *spatial)`` holding class indices, as integers or as floats holding integers
(what MONAI's loaders give). All losses here are multi-class softmax losses, so ``num_classes >= 2``
(a binary task has two channels: background and foreground).

Conventions (numbers the tests check by hand):

- ``ce``: mean over voxels of ``-log p_target``; with ``class_weights`` the mean is weighted, i.e.
  ``sum(w_t * ce) / sum(w_t)`` over voxels (``torch.nn.CrossEntropyLoss``).
- ``focal``: MONAI ``FocalLoss(use_softmax=True)``: ``-alpha_t * w_t * (1 - p_t)**gamma * log p_t`` per
  voxel, averaged over **all B * C * voxels elements** (the one-hot target leaves C - 1 zeros per voxel),
  so with ``gamma=0`` and no alpha it equals ``ce / C``. A scalar ``alpha`` weighs the background class
  (index 0) by ``1 - alpha`` and every foreground class by ``alpha``: ``alpha=0.25`` (RetinaNet's value,
  meant for sigmoid positives) *down*-weights foreground here; use ``alpha > 0.5`` to up-weight it.
  ``class_weights`` multiply per class and are not normalised (unlike ``ce``).
- ``dice``: soft Dice on softmax probabilities, ``1 - (2 tp + smooth_nr) / (sum p + sum y + smooth_dr)``
  per class, averaged over classes (background excluded by default). ``batch=True`` (default, as in
  nnU-Net) pools tp and sums over the whole batch before dividing, so a patch without foreground does
  not score a Dice of 0 on its own.
- ``dice_ce`` / ``dice_focal``: exactly ``lambda_dice * dice + lambda_ce * ce`` (resp. ``focal``) with the
  parts built by the builders above; ``include_background`` applies to the Dice term only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.losses import DeepSupervisionLoss, DiceLoss, FocalLoss
from torch import nn

from medseg.registry import Registry

LOSSES: Registry = Registry("loss")


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(
            f"num_classes must be >= 2 for softmax losses (binary = background + foreground), got {num_classes}"
        )


def _class_weight_tensor(class_weights: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    """Validate ``class_weights`` (one non-negative value per class) and return them as a tensor."""
    if class_weights is None:
        return None
    weights = [float(w) for w in class_weights]
    if len(weights) != num_classes:
        raise ValueError(f"class_weights has {len(weights)} values but there are {num_classes} classes")
    if any(w < 0 for w in weights):
        raise ValueError(f"class_weights must be non-negative, got {weights}")
    return torch.tensor(weights, dtype=torch.float32)


def _check_lambda(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


class CrossEntropy(nn.Module):
    """Softmax cross-entropy for ``(B, 1, *spatial)`` index targets.

    Written here because ``torch.nn.CrossEntropyLoss`` wants ``(B, *spatial)`` long targets and MONAI has
    no stand-alone CE loss (only the ``ce`` step inside ``DiceCELoss``); this only drops the channel axis
    and casts float labels to ``long`` before calling torch.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean (class-weighted) cross-entropy of ``logits`` ``(B, C, ...)`` against ``target`` ``(B, 1, ...)``."""
        if target.ndim != logits.ndim or target.shape[1] != 1:
            raise ValueError(
                f"target must have shape (B, 1, *spatial) for logits {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        return self.ce(logits, target[:, 0].long())


class CombinedLoss(nn.Module):
    """Weighted sum of named losses: ``sum(weight * loss(logits, target))``.

    Written here instead of using MONAI's ``DiceCELoss`` / ``DiceFocalLoss`` because (MONAI 1.6)
    ``DiceCELoss`` also applies the CE class weights to the Dice term (unnormalised), and
    ``DiceFocalLoss`` computes a *sigmoid* focal loss (it has no ``use_softmax``) and drops a scalar
    ``alpha`` when background is excluded. Summing the registered parts keeps ``dice_ce`` equal to
    ``dice`` + ``ce`` as configured, and lets the trainer log each part via :meth:`components`.
    """

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        for name, (weight, _) in terms.items():
            _check_lambda(f"weight of {name!r}", weight)
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: loss for name, (_, loss) in terms.items()})

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted value of each part, by name."""
        return {name: loss(logits, target) for name, loss in self.terms.items()}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the parts."""
        parts = self.components(logits, target)
        total: torch.Tensor = sum(self.weights[name] * value for name, value in parts.items())  # type: ignore[assignment]  # sum() starts at int 0; a sum of tensors is a tensor
        return total


@LOSSES.register("ce")
def build_ce(num_classes: int, class_weights: list[float] | None = None, label_smoothing: float = 0.0) -> nn.Module:
    """Pixel-wise softmax cross-entropy; ``class_weights`` give a weighted mean (torch semantics)."""
    _check_num_classes(num_classes)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return CrossEntropy(weight=_class_weight_tensor(class_weights, num_classes), label_smoothing=label_smoothing)


@LOSSES.register("focal")
def build_focal(
    num_classes: int,
    gamma: float = 2.0,
    alpha: float | None = None,
    class_weights: list[float] | None = None,
) -> nn.Module:
    """Softmax focal loss over all classes (MONAI ``FocalLoss``; see the module docstring for ``alpha``)."""
    _check_num_classes(num_classes)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
    return FocalLoss(
        include_background=True,
        to_onehot_y=True,
        gamma=gamma,
        alpha=alpha,
        weight=_class_weight_tensor(class_weights, num_classes),
        use_softmax=True,
        reduction="mean",
    )


@LOSSES.register("dice")
def build_dice(
    num_classes: int,
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = True,
) -> nn.Module:
    """Soft Dice loss on softmax probabilities (MONAI ``DiceLoss``), mean over classes."""
    _check_num_classes(num_classes)
    return DiceLoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        reduction="mean",
    )


@LOSSES.register("dice_ce")
def build_dice_ce(
    num_classes: int,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    class_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = True,
) -> nn.Module:
    """``lambda_dice * dice + lambda_ce * ce``; ``class_weights`` weight the CE term only."""
    _check_lambda("lambda_dice", lambda_dice)
    _check_lambda("lambda_ce", lambda_ce)
    dice = build_dice(num_classes, include_background, smooth_nr, smooth_dr, batch)
    ce = build_ce(num_classes, class_weights, label_smoothing)
    return CombinedLoss({"dice": (lambda_dice, dice), "ce": (lambda_ce, ce)})


@LOSSES.register("dice_focal")
def build_dice_focal(
    num_classes: int,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
    gamma: float = 2.0,
    alpha: float | None = None,
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = True,
) -> nn.Module:
    """``lambda_dice * dice + lambda_focal * focal`` (softmax focal over all classes)."""
    _check_lambda("lambda_dice", lambda_dice)
    _check_lambda("lambda_focal", lambda_focal)
    dice = build_dice(num_classes, include_background, smooth_nr, smooth_dr, batch)
    focal = build_focal(num_classes, gamma, alpha)
    return CombinedLoss({"dice": (lambda_dice, dice), "focal": (lambda_focal, focal)})


class IgnoreIndex(nn.Module):
    """Any loss above, computed over the pixels whose target is not ``ignore_index`` (void) only.

    The kept pixels of the whole batch are gathered into one sample ``(1, C, M)`` and passed to the wrapped
    loss, so void pixels add nothing to any term: CE and focal average over kept pixels only, and Dice's
    sums (tp, sum p, sum y) run over kept pixels. Because the batch is pooled, Dice behaves as with
    ``batch=True`` (the default); a per-sample Dice (``batch=False``) is not kept. Written here because
    MONAI's ``MaskedDiceLoss`` zeroes logits *before* the softmax, which still leaves 1/C probabilities
    in void pixels, and torch's ``ignore_index`` exists for CE alone. A batch without kept pixels gives 0.
    """

    def __init__(self, loss: nn.Module, ignore_index: int) -> None:
        super().__init__()
        self.loss = loss
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(B, C, ...)`` against ``target`` ``(B, 1, ...)`` over non-void pixels."""
        if target.ndim != logits.ndim or target.shape[1] != 1:
            raise ValueError(
                f"target must have shape (B, 1, *spatial) for logits {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        keep = target[:, 0] != self.ignore_index
        if not bool(keep.any()):
            return logits.sum() * 0.0
        kept_logits = logits.movedim(1, -1)[keep]  # (M, C)
        kept_target = target[:, 0][keep]
        return self.loss(kept_logits.T.unsqueeze(0), kept_target.reshape(1, 1, -1))


def build_loss(
    name: str, num_classes: int, params: dict[str, Any] | None = None, ignore_index: int | None = None
) -> nn.Module:
    """Build the loss registered as ``name`` (wrapped in ``IgnoreIndex`` when ``ignore_index`` is given).

    Raises ``KeyError`` listing the valid names for an unknown ``name``, and ``ValueError`` naming the key
    for a parameter the builder does not take (``num_classes`` comes from the dataset, not the config).
    """
    params = dict(params or {})
    LOSSES.check_params(name, params, reserved=("num_classes",))
    loss = LOSSES.get(name)(num_classes, **params)
    return loss if ignore_index is None else IgnoreIndex(loss, ignore_index)


class _DeepSupervision(DeepSupervisionLoss):
    """MONAI ``DeepSupervisionLoss`` that also takes a stacked tensor and integer targets.

    Two gaps filled here: MONAI's ``DynUNet`` returns its deep-supervision heads stacked as one tensor
    ``(B, levels, C, *spatial)`` (all upsampled to full size), which ``DeepSupervisionLoss`` would treat
    as a single output, so it is unbound into a list; and the target is cast to float because torch's
    nearest-neighbour downsampling of the target for smaller heads is not implemented for integer dtypes.
    """

    def forward(self, input: torch.Tensor | list[torch.Tensor] | None, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """Weighted sum of the loss over each output level (level 0 = full resolution, weight 1)."""
        if isinstance(input, torch.Tensor) and input.ndim == target.ndim + 1:
            input = list(torch.unbind(input, dim=1))
        if isinstance(input, (list, tuple)) and self.weights is not None and len(self.weights) < len(input):
            # MONAI would silently fall back to weight_mode; a short weight list is a config mistake.
            raise ValueError(f"{len(input)} deep-supervision outputs but only {len(self.weights)} weights")
        return super().forward(input, target.float())


def wrap_deep_supervision(loss: nn.Module, weight_mode: str = "exp", weights: list[float] | None = None) -> nn.Module:
    """Wrap ``loss`` for a model that returns outputs at several scales.

    The wrapped loss accepts a single tensor (plain loss), a list/tuple of outputs (finest first;
    smaller ones get a nearest-neighbour downsampled target), or a stacked tensor
    ``(B, levels, C, *spatial)``. Level weights follow MONAI: ``"exp"`` = 1, 0.5, 0.25, ... (floored at
    0.0625), ``"same"`` = all 1, ``"two"`` = 1, 0.5, 0.5, ...; explicit ``weights`` take precedence. The
    weights are not normalised to sum to 1.
    """
    if weight_mode not in ("exp", "same", "two"):
        raise ValueError(f"unknown weight_mode {weight_mode!r}; valid: exp, same, two")
    return _DeepSupervision(loss, weight_mode=weight_mode, weights=weights)  # type: ignore[arg-type]  # MONAI annotates _Loss; any nn.Module loss works
