"""Dice + cross-entropy, deep supervision and the adversarial losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    adversary_accuracy,
    deep_supervision_weights,
    discriminator_loss,
    downsample_labels,
    generator_loss,
    one_hot,
    soft_dice,
)
from training.models import UNet3D


def random_case(seed=0, b=2, c=3, size=(6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *size, generator=g)
    labels = torch.randint(0, c, (b, *size), generator=g)
    return logits, labels


def reference_dice(logits, labels, batch_dice, smooth=1e-5):
    # Straight from the definition, one class and (optionally) one sample at a time.
    probs = logits.softmax(1)
    c = logits.shape[1]
    samples = [slice(None)] if batch_dice else [slice(i, i + 1) for i in range(logits.shape[0])]
    out = torch.zeros(len(samples), c - 1)
    for i, s in enumerate(samples):
        for k in range(1, c):
            p, g = probs[s, k], (labels[s] == k).float()
            out[i, k - 1] = (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)
    return out[0] if batch_dice else out


def test_one_hot():
    labels = torch.tensor([[[[0, 2], [1, 1]]]])
    oh = one_hot(labels, 3)
    assert oh.shape == (1, 3, 1, 2, 2)
    assert torch.equal(oh.argmax(1), labels) and torch.all(oh.sum(1) == 1)
    assert torch.equal(one_hot(labels[:, None], 3), oh)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_soft_dice_matches_definition(batch_dice):
    logits, labels = random_case()
    got = soft_dice(logits, labels, batch_dice=batch_dice)
    torch.testing.assert_close(got, reference_dice(logits, labels, batch_dice))
    with_bg = soft_dice(logits, labels, batch_dice=batch_dice, include_background=True)
    assert with_bg.shape[-1] == 3


def test_dice_ce_value_and_perfect_prediction():
    logits, labels = random_case(1)
    loss = DiceCELoss()(logits, labels)
    want = F.cross_entropy(logits, labels) + 1 - reference_dice(logits, labels, True).mean()
    torch.testing.assert_close(loss, want)
    confident = one_hot(labels, 3) * 40 - 20
    assert DiceCELoss()(confident, labels).item() == pytest.approx(0.0, abs=1e-5)
    assert DiceCELoss()(confident, labels[:, None]).item() == pytest.approx(0.0, abs=1e-5)


def test_dice_ce_ignore_index():
    logits, labels = random_case(2)
    labels_ignored = labels.clone()
    labels_ignored[:, 0] = 255
    loss = DiceCELoss(ignore_index=255)
    base = loss(logits, labels_ignored)
    changed = logits.clone()
    changed[:, :, 0] = torch.randn_like(changed[:, :, 0]) * 10
    torch.testing.assert_close(loss(changed, labels_ignored), base)


def test_dice_ce_rejects_bad_targets():
    logits, labels = random_case()
    with pytest.raises(ValueError, match="does not match"):
        DiceCELoss()(logits, labels[:, :3])
    with pytest.raises(TypeError, match="integer"):
        DiceCELoss()(logits, labels.float())


def test_deep_supervision_weights():
    torch.testing.assert_close(deep_supervision_weights(3), torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(deep_supervision_weights(1), torch.tensor([1.0]))
    w = deep_supervision_weights(4, include_lowest=True)
    torch.testing.assert_close(w, torch.tensor([8, 4, 2, 1]) / 15)


def test_downsample_labels():
    labels = torch.randint(0, 3, (2, 8, 8, 8))
    small = downsample_labels(labels, (4, 4, 4))
    assert small.shape == (2, 4, 4, 4) and small.dtype == labels.dtype
    assert torch.equal(small, labels[:, 1::2, 1::2, 1::2])
    assert downsample_labels(labels[:, None], (2, 2, 2)).shape == (2, 1, 2, 2, 2)
    assert downsample_labels(labels, (8, 8, 8)) is labels


def test_deep_supervision_loss_with_unet():
    net = UNet3D(in_channels=1, num_classes=2, base_width=4, depth=3, deep_supervision=True)
    x = torch.randn(2, 1, 8, 8, 8)
    labels = (x[:, 0] > 0).long()
    outs = net(x)
    base = DiceCELoss()
    loss = DeepSupervisionLoss(base)(outs, labels)
    w = deep_supervision_weights(2)
    want = w[0] * base(outs[0], labels) + w[1] * base(outs[1], downsample_labels(labels, (4,) * 3))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert DeepSupervisionLoss(base)(outs[0], labels) == base(outs[0], labels)
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionLoss(base, weights=[1.0])(outs, labels)


def test_adversarial_losses():
    real = torch.tensor([[2.0], [-1.0]])
    fake = torch.tensor([[0.5], [-3.0]])

    def softplus(x):
        return math.log1p(math.exp(x))

    want_d = (softplus(-2) + softplus(1)) / 2 + (softplus(0.5) + softplus(-3)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(want_d, rel=1e-6)
    want_g = (softplus(-0.5) + softplus(3)) / 2
    assert generator_loss(fake).item() == pytest.approx(want_g, rel=1e-6)


def test_generator_loss_does_not_saturate():
    # When the adversary confidently rejects the segnet's masks the gradient stays ~ -1 per
    # logit (non-saturating), where log(1 - sigmoid) would give ~ 0.
    fake = torch.full((4,), -12.0, requires_grad=True)
    generator_loss(fake).backward()
    assert fake.grad is not None
    torch.testing.assert_close(fake.grad, torch.full((4,), -0.25), atol=1e-4, rtol=0)
    saturating = torch.full((4,), -12.0, requires_grad=True)
    torch.log1p(-torch.sigmoid(saturating)).mean().backward()
    assert saturating.grad is not None and saturating.grad.abs().max() < 1e-4


def test_adversary_accuracy_counts_pairs():
    real = torch.tensor([[[1.0, -0.5]], [[-2.0, 0.5]]])  # per-sample means 0.25, -0.75
    fake = torch.tensor([[-1.0], [3.0], [-0.1]])
    assert adversary_accuracy(real, fake).item() == pytest.approx(3 / 5)
