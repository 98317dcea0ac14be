"""Mode safety: the stage-2 regression from the seed notes, and the contexts in training.modes.

Stage 2 trains the adversary against a segnet that must stay frozen in eval mode. The original
bug: an evaluation in the middle called ``segnet.eval()`` then ``segnet.train()``, so dropout
(and batch-norm statistics) came back on for the rest of stage 2 and "Test VoE" fluctuated
although no weight changed. The test runs a small stage 2 with an evaluation in the middle
and checks what the notes checked: parameters and buffers are bit-identical before and after,
repeated evaluations agree exactly, and every segnet submodule runs in eval mode throughout
(recorded by forward pre-hooks). The same run with the naive evaluation must fail those checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from training.losses import discriminator_loss, one_hot
from training.metrics import voe
from training.models import Discriminator3D, UNet3D
from training.modes import ModeError, evaluating, expect_mode, frozen

SIZE = 16


def make_segnet() -> nn.Module:
    # A leading BatchNorm3d gives the segnet running statistics (buffers) that a wrong mode
    # would update; the U-Net itself brings dropout.
    return nn.Sequential(
        nn.BatchNorm3d(1),
        UNet3D(in_channels=1, num_classes=2, base_width=4, depth=2, dropout=0.3),
    )


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(4, SIZE, SIZE, SIZE, generator=g) > 0.6).long()
    images = labels[:, None].float() + 0.3 * torch.randn(4, 1, SIZE, SIZE, SIZE, generator=g)
    return images, labels


def safe_evaluate(segnet: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    with evaluating(segnet):
        probs = segnet(images).softmax(1)
    pred = probs.argmax(1)
    return probs, voe(pred.numpy(), labels.numpy())


def naive_evaluate(segnet: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    segnet.eval()
    with torch.no_grad():
        probs = segnet(images).softmax(1)
    segnet.train()
    return probs, voe(probs.argmax(1).numpy(), labels.numpy())


@dataclass
class Stage2Record:
    modes: list[tuple[str, bool]] = field(default_factory=list)
    evaluations: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    fake_masks: list[torch.Tensor] = field(default_factory=list)
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    after: dict[str, torch.Tensor] = field(default_factory=dict)


def run_stage2(evaluate: Callable, *, steps: int = 6) -> Stage2Record:
    torch.manual_seed(0)  # the global RNG drives dropout
    segnet = make_segnet()
    segnet.train()  # as stage 1 leaves it
    adversary = Discriminator3D(image_channels=1, mask_channels=2, base_width=4, depth=2)
    opt = torch.optim.Adam(adversary.parameters(), lr=1e-3)
    images, labels = make_data()
    rec = Stage2Record()
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: rec.modes.append((name, mod.training))
        )
        for name, m in segnet.named_modules()
    ]
    rec.before = {k: v.clone() for k, v in segnet.state_dict().items()}
    with frozen(segnet):
        rec.evaluations.append(evaluate(segnet, images, labels))
        for step in range(steps):
            # The adversary's update: the segnet's masks are fixed inputs.
            with torch.no_grad():
                fake = segnet(images).softmax(1)
            rec.fake_masks.append(fake)
            real_logits = adversary(images, one_hot(labels, 2))
            fake_logits = adversary(images, fake)
            loss = discriminator_loss(real_logits, fake_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == steps // 2:
                rec.evaluations.append(evaluate(segnet, images, labels))
                rec.evaluations.append(evaluate(segnet, images, labels))
        rec.evaluations.append(evaluate(segnet, images, labels))
    rec.after = {k: v.clone() for k, v in segnet.state_dict().items()}
    for h in hooks:
        h.remove()
    assert segnet.training  # frozen() gave back the flag stage 1 left
    return rec


def check_stage2(rec: Stage2Record) -> None:
    assert rec.before.keys() == rec.after.keys()
    assert any("running_mean" in k for k in rec.before)
    for k in rec.before:
        assert torch.equal(rec.before[k], rec.after[k]), f"segnet {k} changed in stage 2"
    first_probs, first_voe = rec.evaluations[0]
    for probs, value in rec.evaluations[1:]:
        assert torch.equal(probs, first_probs), "repeated evaluations differ"
        assert value == first_voe, "repeated evaluations give different VoE"
    for fake in rec.fake_masks[1:]:
        assert torch.equal(fake, rec.fake_masks[0]), "the frozen segnet's masks changed"
    in_training = sorted({name for name, training in rec.modes if training})
    assert not in_training, f"segnet submodules ran in training mode: {in_training}"


def test_stage2_with_evaluating_keeps_the_segnet_frozen():
    rec = run_stage2(safe_evaluate)
    assert len(rec.evaluations) == 4 and len(rec.modes) > 0
    check_stage2(rec)


def test_stage2_with_naive_eval_train_is_caught():
    rec = run_stage2(naive_evaluate)
    with pytest.raises(AssertionError, match="changed in stage 2|differ|masks changed"):
        check_stage2(rec)
    assert any(training for _, training in rec.modes)
    assert not torch.equal(rec.fake_masks[0], rec.fake_masks[-1])


def test_evaluating_restores_each_submodules_own_flag():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2)))
    net.train()
    net[2].eval()  # a submodule deliberately kept in eval mode
    flags = [m.training for m in net.modules()]
    with evaluating(net):
        assert not any(m.training for m in net.modules())
        assert not torch.is_grad_enabled()
        assert net(torch.randn(3, 2)).requires_grad is False
    assert [m.training for m in net.modules()] == flags
    assert torch.is_grad_enabled()
    net.eval()
    with evaluating(net):
        pass
    assert not any(m.training for m in net.modules())


def test_evaluating_restores_after_an_exception_and_nests():
    a, b = nn.Dropout(0.1), nn.Dropout(0.1)
    a.train()
    b.eval()
    with pytest.raises(RuntimeError, match="boom"), evaluating(a, b):
        raise RuntimeError("boom")
    assert a.training and not b.training
    with evaluating(a):
        with evaluating(a, b):
            pass
        assert not a.training
    assert a.training


def test_evaluating_inference_mode():
    lin = nn.Linear(2, 2)
    with evaluating(lin, inference=True):
        out = lin(torch.randn(1, 2))
    assert out.is_inference()
    with evaluating(lin):
        out = lin(torch.randn(1, 2))
    assert not out.is_inference()


def test_frozen_restores_flags_and_requires_grad_and_passes_gradients():
    d = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2), nn.Linear(3, 1))
    d.train()
    d[2].bias.requires_grad_(False)  # a parameter the user froze on purpose
    grads = [p.requires_grad for p in d.parameters()]
    x = torch.randn(4, 3, requires_grad=True)
    with frozen(d):
        assert not d.training and not d[1].training
        assert not any(p.requires_grad for p in d.parameters())
        d(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients flow to the input
    assert all(p.grad is None for p in d.parameters())
    assert [p.requires_grad for p in d.parameters()] == grads
    assert d.training and d[1].training


def test_frozen_restores_after_an_exception():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError), frozen(lin):
        raise ValueError
    assert lin.training and all(p.requires_grad for p in lin.parameters())


def test_expect_mode_catches_a_stray_train():
    net = make_segnet().eval()
    x = make_data()[0]
    with expect_mode(net, training=False), torch.no_grad():
        net(x)
        net.train()
        with pytest.raises(ModeError, match="training=True"):
            net(x)
    net(x)  # hooks removed


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="Module"), evaluating(object()):  # type: ignore[arg-type]
        pass
