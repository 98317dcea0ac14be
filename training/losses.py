"""Segmentation and adversarial losses.

The segmentation loss is nnU-Net's Dice + cross-entropy: soft Dice on softmax probabilities,
pooled over the whole batch ("batch Dice") and averaged over the foreground classes, plus
cross-entropy on the logits. The adversarial losses are the non-saturating GAN pair (BCE with
logits): the adversary labels ground-truth pairs 1 and segnet pairs 0; the segnet is trained
to make its pairs score 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DeepSupervisionLoss",
    "DiceCELoss",
    "adversary_accuracy",
    "deep_supervision_weights",
    "discriminator_loss",
    "downsample_labels",
    "generator_loss",
    "one_hot",
    "soft_dice",
]


def _labels(target: Tensor, logits: Tensor) -> Tensor:
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "expected (B, D, H, W) or (B, 1, D, H, W) integer labels"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer labels, got {target.dtype}")
    return target.long()


def one_hot(labels: Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot encode integer labels, channels first.

    Args:
        labels: integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        dtype: output dtype.

    Returns:
        The one-hot tensor.

    Shape:
        ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` -> ``(B, num_classes, D, H, W)``.
    """
    if labels.ndim == 5 and labels.shape[1] == 1:
        labels = labels[:, 0]
    out = torch.zeros(
        (labels.shape[0], num_classes, *labels.shape[1:]), dtype=dtype, device=labels.device
    )
    return out.scatter_(1, labels.long().unsqueeze(1), 1)


def soft_dice(
    logits: Tensor,
    target: Tensor,
    *,
    batch_dice: bool = True,
    include_background: bool = False,
    smooth: float = 1e-5,
    valid: Tensor | None = None,
) -> Tensor:
    """Soft Dice coefficient per class (nnU-Net's memory-efficient soft Dice).

    Args:
        logits: raw network outputs.
        target: integer labels.
        batch_dice: pool intersections and sums over the batch before the ratio (nnU-Net's
            default for 3D), instead of one Dice per sample.
        include_background: keep class 0.
        smooth: added to numerator and denominator.
        valid: optional mask of voxels that count (for an ignore label).

    Returns:
        Dice per class, ``(K,)`` with batch Dice or ``(B, K)`` without (K excludes the
        background unless ``include_background``).

    Shape:
        logits ``(B, C, D, H, W)``; target ``(B, D, H, W)`` or ``(B, 1, D, H, W)``; valid like
        target.
    """
    labels = _labels(target, logits)
    probs = logits.float().softmax(1)
    onehot = one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1])
    if valid is not None:
        w = valid.reshape(labels.shape).unsqueeze(1).float()
        probs, onehot = probs * w, onehot * w
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, logits.ndim))
    intersect = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    if batch_dice:
        intersect, denom = intersect.sum(0), denom.sum(0)
    return (2 * intersect + smooth) / (denom + smooth).clamp_min(1e-8)


class DiceCELoss(nn.Module):
    """``weight_ce * CE + weight_dice * (1 - mean soft Dice)``, as nnU-Net's DC_and_CE_loss.

    nnU-Net adds ``-dice``; ``1 - dice`` differs by a constant, so the gradients are the same
    and the loss stays non-negative (0 for a perfect, confident prediction).

    Args:
        weight_ce: weight of the cross-entropy term.
        weight_dice: weight of the Dice term.
        batch_dice: see :func:`soft_dice`.
        include_background: count class 0 in the Dice term (cross-entropy always does).
        smooth: Dice smoothing.
        ignore_index: a label value that contributes to neither term.

    Shape:
        logits ``(B, C, D, H, W)``; target ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` integer
        labels; returns a scalar.
    """

    def __init__(
        self,
        *,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
        batch_dice: bool = True,
        include_background: bool = False,
        smooth: float = 1e-5,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        labels = _labels(target, logits)
        valid = None if self.ignore_index is None else labels != self.ignore_index
        ce = F.cross_entropy(
            logits.float(),
            labels,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
        )
        dc = soft_dice(
            logits,
            labels,
            batch_dice=self.batch_dice,
            include_background=self.include_background,
            smooth=self.smooth,
            valid=valid,
        )
        return self.weight_ce * ce + self.weight_dice * (1 - dc.mean())


def deep_supervision_weights(n: int, *, include_lowest: bool = False) -> Tensor:
    """nnU-Net's deep-supervision weights: ``1 / 2**i``, lowest resolution 0, sum 1.

    Args:
        n: number of outputs, full resolution first.
        include_lowest: keep the lowest-resolution output (nnU-Net gives it weight 0).

    Returns:
        ``(n,)`` float weights summing to 1.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n!r}")
    w = torch.tensor([0.5**i for i in range(n)], dtype=torch.float64)
    if n > 1 and not include_lowest:
        w[-1] = 0
    return (w / w.sum()).float()


def downsample_labels(target: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour downsampling of integer labels to ``size`` (deep-supervision targets).

    Args:
        target: integer labels.
        size: output spatial size ``(d, h, w)``.

    Returns:
        Labels, same dtype.

    Shape:
        ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` -> ``(B, d, h, w)`` or ``(B, 1, d, h, w)``.
    """
    squeeze = target.ndim == 4
    t = target.unsqueeze(1) if squeeze else target
    if tuple(t.shape[2:]) == tuple(size):
        return target
    out = F.interpolate(t.float(), size=tuple(size), mode="nearest-exact").to(target.dtype)
    return out[:, 0] if squeeze else out


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over multi-scale outputs, targets downsampled to each scale.

    Args:
        loss: the per-scale loss, ``loss(logits, target) -> scalar``.
        weights: one weight per output, full resolution first; None uses
            :func:`deep_supervision_weights`.

    Shape:
        outputs: a list of ``(B, C, D_i, H_i, W_i)`` (or a single tensor, passed straight to
        ``loss``); target ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` at full resolution.
    """

    def __init__(self, loss: nn.Module, *, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.loss(outputs, target)
        weights = (
            deep_supervision_weights(len(outputs)).tolist()
            if self.weights is None
            else self.weights
        )
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(weights)} weights")
        # Every term is computed, also at weight 0, so every head stays in the graph (DDP).
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs, strict=True):
            total = total + w * self.loss(out, downsample_labels(target, out.shape[2:]))
        return total


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The adversary's loss: BCE(real, 1) + BCE(fake, 0), each a mean over its logits.

    Args:
        real_logits: adversary outputs on (image, ground-truth one-hot) pairs.
        fake_logits: adversary outputs on (image, segnet softmax) pairs; detach the softmax
            when only the adversary is updated.

    Returns:
        A scalar.

    Shape:
        any shape (per patch or per sample); the two need not match.
    """
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The segnet's non-saturating adversarial loss, ``BCE(fake, 1) = -log sigmoid(fake)``.

    Its gradient stays large while the adversary confidently rejects the segnet's masks,
    unlike the saturating ``log(1 - sigmoid(fake))`` of the minimax form.

    Args:
        fake_logits: adversary outputs on (image, segnet softmax) pairs, with the softmax
            attached to the segnet's graph.

    Returns:
        A scalar.
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def adversary_accuracy(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Fraction of pairs the adversary classifies correctly.

    Patch outputs are averaged per sample first, so each (image, mask) pair is one decision:
    real when its mean logit is > 0.

    Args:
        real_logits: outputs on ground-truth pairs.
        fake_logits: outputs on segnet pairs.

    Returns:
        A scalar tensor in [0, 1].

    Shape:
        ``(B, ...)`` each; the batch sizes may differ.
    """
    real = real_logits.detach().flatten(1).mean(1) > 0
    fake = fake_logits.detach().flatten(1).mean(1) <= 0
    return torch.cat([real, fake]).float().mean()
