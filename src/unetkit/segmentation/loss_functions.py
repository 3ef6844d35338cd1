"""Segmentation loss functions: (B)CE, the U-Net paper's pixel-weighted CE, soft Dice, Dice+CE.

Configured losses by name, and deep supervision over several heads, are
:mod:`unetkit.segmentation.losses` (which also re-exports these functions).

All losses take ``logits`` of shape N×C×*spatial (1, 2 or 3 spatial dims) and a target of
shape N×*spatial (an N×1×*spatial target is accepted and squeezed):

* C ≥ 2: softmax over the channels; the target holds integer class indices in [0, C).
* C == 1: sigmoid (binary cross-entropy); the target is 0/1 (integer) or a float in [0, 1].

Pixels whose target equals ``ignore_index`` contribute nothing (no loss, no gradient).

Empty-mask rule of the soft Dice loss: a class absent from the target of the whole batch has
Dice = smooth / (Σp + smooth), which is 1 (loss 0) when the prediction is empty too and
falls towards 0 as predicted mass appears. This is the soft form of the rule used by
:mod:`unetkit.segmentation.metrics` ("empty agrees with empty = perfect").

Example:
    >>> import torch
    >>> logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    >>> target = torch.randint(0, 3, (2, 16, 16))
    >>> loss = dice_ce_loss(logits, target)
    >>> loss.backward()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unetkit.errors import ConfigError, DataError, InputSizeError

__all__ = ["cross_entropy", "dice_ce_loss", "soft_dice_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _prepare_target(logits: torch.Tensor, target: torch.Tensor, where: str) -> torch.Tensor:
    """Check shapes; squeeze an N×1×*spatial target to N×*spatial."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise DataError(f"{where}: logits and target must be torch tensors")
    if logits.ndim not in (3, 4, 5):
        raise InputSizeError(
            f"{where}: logits must be N×C×*spatial with 1-3 spatial dims, got shape "
            f"{tuple(logits.shape)}; add the batch/channel axes (e.g. logits[None])"
        )
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise InputSizeError(
            f"{where}: target shape {tuple(target.shape)} does not match logits "
            f"{tuple(logits.shape)}; expected {expected}. For valid-padding models crop the "
            f"mask to the output size (unetkit.nn.sampling.center_crop)"
        )
    return target


def _prepare_weight(weight: torch.Tensor | None, target: torch.Tensor, where: str):
    if weight is None:
        return None
    if weight.ndim == target.ndim + 1 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if tuple(weight.shape) != tuple(target.shape):
        raise InputSizeError(
            f"{where}: pixel weight map has shape {tuple(weight.shape)}, expected the target "
            f"shape {tuple(target.shape)} (N×*spatial)"
        )
    return weight.to(torch.float32)


def _check_labels(target: torch.Tensor, num: int, valid: torch.Tensor, where: str) -> None:
    """Integer targets must lie in [0, num) wherever they are not ignored."""
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise DataError(
            f"{where}: a {num}-class target must hold integer class indices, got dtype "
            f"{target.dtype}; convert it with target.long()"
        )
    if target.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(torch.where(valid, target, 0)))  # one sync
    if lo < 0 or hi >= num:
        raise DataError(
            f"{where}: target values must be in [0, {num - 1}] (or ignore_index), found range "
            f"[{lo}, {hi}]; check the mask encoding or the number of output channels"
        )


def _class_weight_tensor(class_weights, n: int, like: torch.Tensor, where: str):
    cw = torch.as_tensor(class_weights, dtype=torch.float32, device=like.device).flatten()
    if cw.numel() != n:
        raise ConfigError(
            f"{where}: class_weights has {cw.numel()} entries, expected {n} "
            f"(one per class; [background, foreground] for a 1-channel model)"
        )
    return cw


def _reduce(per_pixel: torch.Tensor, norm: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_pixel
    total = per_pixel.sum()
    if reduction == "sum":
        return total
    # All pixels ignored: total is 0 too, so this returns a graph-connected 0 where torch
    # gives NaN; clamp instead of branching keeps it free of a device sync.
    return total / norm.clamp_min(1e-12)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy (C ≥ 2, softmax) or binary cross-entropy (C == 1, sigmoid).

    With ``weight`` this is the energy of Ronneberger et al. 2015 (U-Net, eq. 1):
    E = Σ_x w(x) · (−log p_ℓ(x)(x)), w being the border-aware weight map computed in
    :mod:`unetkit.data.weightmaps`.

    Let a(x) = class_weights[target(x)] (1 without class weights), w(x) the pixel weight
    (1 without a map) and ℓ(x) the per-pixel (B)CE. Then, over non-ignored pixels,
    ``"sum"`` gives Σ w·a·ℓ and ``"mean"`` gives Σ w·a·ℓ / Σ a — so without a weight map it
    equals ``torch.nn.functional.cross_entropy``, and with one border pixels count w(x) times
    as much as an ordinary pixel. ``"none"`` returns w·a·ℓ (N×*spatial, 0 where ignored).
    If every pixel is ignored, ``"mean"`` returns 0.

    Args:
        logits: N×C×*spatial raw scores.
        target: N×*spatial class indices (C ≥ 2) or 0/1 / [0, 1] floats (C == 1).
        weight: optional N×*spatial pixel weight map w(x).
        ignore_index: target value whose pixels are skipped.
        class_weights: C weights (C ≥ 2) or [background, foreground] weights (C == 1);
            for a soft binary target a(x) = cw0·(1 − t) + cw1·t.
        reduction: "mean", "sum" or "none".

    Example:
        >>> logits, target = torch.randn(1, 2, 8, 8), torch.randint(0, 2, (1, 8, 8))
        >>> w = torch.ones(1, 8, 8)
        >>> torch.allclose(cross_entropy(logits, target, weight=w),
        ...                F.cross_entropy(logits, target))
        True
    """
    where = "cross_entropy"
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"{where}: reduction={reduction!r}; choose one of {_REDUCTIONS}")
    target = _prepare_target(logits, target, where)
    weight = _prepare_weight(weight, target, where)
    logits = logits.float()  # losses in float32 even under bf16 autocast
    num_channels = logits.shape[1]
    valid = target != ignore_index
    if num_channels == 1:
        t = torch.where(valid, target, torch.zeros_like(target)).float()
        lo, hi = (float(v) for v in torch.aminmax(t)) if t.numel() else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise DataError(
                f"{where}: a 1-channel (sigmoid) model needs targets in [0, 1], found range "
                f"[{lo}, {hi}]; use C ≥ 2 output channels for multi-class masks"
            )
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
        if class_weights is None:
            a = torch.ones_like(t)
        else:
            cw = _class_weight_tensor(class_weights, 2, logits, where)
            a = cw[0] * (1 - t) + cw[1] * t
    else:
        _check_labels(target, num_channels, valid, where)
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        per_pixel = F.cross_entropy(logits, safe, reduction="none")
        if class_weights is None:
            a = torch.ones_like(per_pixel)
        else:
            a = _class_weight_tensor(class_weights, num_channels, logits, where)[safe]
    a = a * valid
    per_pixel = per_pixel * a if weight is None else per_pixel * a * weight
    return _reduce(per_pixel, a.sum(), reduction)


def _probs_and_onehot(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """Class probabilities and one-hot target, both N×K×*spatial, zeroed where ignored."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        t = torch.where(valid, target, torch.zeros_like(target)).float()[:, None]
        probs, onehot = torch.cat([1 - p, p], 1), torch.cat([1 - t, t], 1)
    else:
        probs = torch.softmax(logits, dim=1)
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        onehot = F.one_hot(safe, logits.shape[1]).movedim(-1, 1).float()
    mask = valid[:, None].float()
    return probs * mask, onehot * mask


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1e-5,
    include_background: bool = False,
    ignore_index: int = -100,
    squared: bool = False,
) -> torch.Tensor:
    """Soft Dice loss, 1 − mean over classes of the batch-level soft Dice.

    For each scored class c, sums run over the batch and all spatial positions
    (the "batch Dice" of nnU-Net, Isensee et al. 2021; soft Dice after Milletari et al. 2016,
    V-Net): Dice_c = (2 Σ p_c g_c + smooth) / (Σ p_c + Σ g_c + smooth). With ``squared`` the
    denominator is Σ p_c² + Σ g_c² + smooth, the form of Milletari et al. 2016 (eq. 1).
    Class 0 (background) is left out unless ``include_background``; a 1-channel sigmoid
    model scores [1 − p, p] as classes 0 and 1.

    Empty-mask rule: a class with no target pixel in the batch scores
    smooth / (Σ p_c + smooth) — 1 if the prediction is empty too, ≈ 0 otherwise. Its gradient
    is tiny, so pair this loss with CE (:func:`dice_ce_loss`) when crops may be empty.

    Args:
        logits: N×C×*spatial raw scores.
        target: N×*spatial class indices (or 0/1, [0, 1] floats for C == 1).
        smooth: added to numerator and denominator.
        include_background: also score class 0.
        ignore_index: target value whose pixels are skipped.
        squared: square p and g in the denominator (the V-Net paper's Dice loss).

    Example:
        >>> target = torch.zeros(1, 4, 4, dtype=torch.long); target[:, :2] = 1
        >>> logits = 40.0 * F.one_hot(target, 2).movedim(-1, 1).float() - 20.0
        >>> float(soft_dice_loss(logits, target)) < 1e-6
        True
    """
    where = "soft_dice_loss"
    target = _prepare_target(logits, target, where)
    logits = logits.float()
    valid = target != ignore_index
    if logits.shape[1] > 1:
        _check_labels(target, logits.shape[1], valid, where)
    probs, onehot = _probs_and_onehot(logits, target, valid)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    if squared:
        denominator = probs.square().sum(dims) + onehot.square().sum(dims)
    else:
        denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice.mean()


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    smooth: float = 1e-5,
    include_background: bool = False,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """``ce_weight`` · :func:`cross_entropy` + ``dice_weight`` · :func:`soft_dice_loss`.

    The nnU-Net default objective (Isensee et al. 2021). ``weight`` and ``class_weights``
    apply to the CE term only.

    Example:
        >>> logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
        >>> loss = dice_ce_loss(logits, target, dice_weight=0.5)
    """
    ce = cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, class_weights=class_weights
    )
    dice = soft_dice_loss(
        logits,
        target,
        smooth=smooth,
        include_background=include_background,
        ignore_index=ignore_index,
    )
    return ce_weight * ce + dice_weight * dice
