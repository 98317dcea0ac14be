"""The segnet (UNet3D) and the adversary (Discriminator3D): shapes, init, modes, layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models import Discriminator3D, UNet3D


def tiny_unet(**kw) -> UNet3D:
    opts = {"in_channels": 1, "num_classes": 3, "base_width": 4, "depth": 3}
    opts.update(kw)
    return UNet3D(**opts)


def test_unet_output_shapes_and_deep_supervision():
    x = torch.randn(2, 1, 16, 16, 16)
    net = tiny_unet(deep_supervision=True)
    outs = net(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    net.eval()
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16, 16)
    assert torch.allclose(out, outs[0], atol=1e-6)
    plain = tiny_unet()
    assert plain(x).shape == (2, 3, 16, 16, 16)
    assert len(plain.heads) == 1 and len(net.heads) == 2


def test_unet_widths_depth_and_validation():
    net = UNet3D(base_width=8, depth=5, max_width=32)
    assert net.widths == (8, 16, 32, 32, 32)
    assert net.divisor == 16
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_unet()(torch.randn(1, 1, 16, 16, 18))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        tiny_unet()(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="depth"):
        UNet3D(depth=1)
    with pytest.raises(ValueError, match="dropout"):
        UNet3D(dropout=1.0)


def test_unet_layers():
    net = tiny_unet(dropout=0.2)
    kinds = {type(m) for m in net.modules()}
    assert {nn.InstanceNorm3d, nn.LeakyReLU, nn.Dropout3d, nn.ConvTranspose3d} <= kinds
    assert nn.BatchNorm3d not in kinds and nn.MaxPool3d not in kinds
    assert all(m.affine for m in net.modules() if isinstance(m, nn.InstanceNorm3d))
    assert not any(m.track_running_stats for m in net.modules() if isinstance(m, nn.InstanceNorm3d))
    assert nn.Dropout3d not in {type(m) for m in tiny_unet().modules()}
    assert sum(p.numel() for p in tiny_unet().parameters()) < 25_000


def test_init_uses_only_the_given_generator():
    before = torch.random.get_rng_state()
    a = tiny_unet(generator=torch.Generator().manual_seed(5))
    d = Discriminator3D(mask_channels=3, base_width=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(before, torch.random.get_rng_state())
    b = tiny_unet(generator=torch.Generator().manual_seed(5))
    c = tiny_unet(generator=torch.Generator().manual_seed(6))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )
    assert all(torch.isfinite(p).all() for p in d.parameters())


def test_every_parameter_gets_a_gradient_in_training():
    # DDP requires it: a parameter without a gradient is an error there.
    for ds in (False, True):
        net = tiny_unet(deep_supervision=ds)
        out = net(torch.randn(1, 1, 8, 8, 8))
        loss = sum(o.square().mean() for o in out) if ds else out.square().mean()
        loss.backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert not missing


def test_channels_last_3d_gives_the_same_result():
    x = torch.randn(2, 1, 16, 16, 16)
    net = tiny_unet().eval()
    want = net(x)
    net_cl = tiny_unet().to(memory_format=torch.channels_last_3d).eval()
    got = net_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_dropout_acts_only_in_training_mode():
    x = torch.randn(1, 1, 8, 8, 8)
    net = tiny_unet(dropout=0.5)
    torch.manual_seed(0)
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("output", ["patch", "global"])
def test_discriminator_shapes(output):
    d = Discriminator3D(image_channels=1, mask_channels=3, base_width=4, depth=3, output=output)
    img = torch.randn(2, 1, 16, 16, 16)
    mask = torch.randn(2, 3, 16, 16, 16).softmax(1)
    out = d(img, mask)
    assert out.shape == ((2, 1, 2, 2, 2) if output == "patch" else (2, 1))
    out.mean().backward()
    assert all(p.grad is not None for p in d.parameters())


def test_discriminator_validates_inputs():
    d = Discriminator3D(image_channels=1, mask_channels=2, base_width=4)
    img = torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="mask"):
        d(img, torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="image"):
        d(torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="pair up"):
        d(img, torch.zeros(1, 2, 8, 8, 16))
    with pytest.raises(ValueError, match="output"):
        Discriminator3D(output="pixel")  # type: ignore[arg-type]


def test_discriminator_channels_last_3d():
    d = Discriminator3D(mask_channels=2, base_width=4).eval()
    img, mask = torch.randn(2, 1, 16, 16, 16), torch.rand(2, 2, 16, 16, 16)
    want = d(img, mask)
    d_cl = Discriminator3D(mask_channels=2, base_width=4).to(memory_format=torch.channels_last_3d)
    cl = torch.channels_last_3d
    got = d_cl.eval()(img.contiguous(memory_format=cl), mask.contiguous(memory_format=cl))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_training_step():
    cl = torch.channels_last_3d
    net = UNet3D(in_channels=1, num_classes=2, base_width=8, depth=4, deep_supervision=True)
    net = net.cuda().to(memory_format=cl)
    d = Discriminator3D(mask_channels=2, base_width=8).cuda().to(memory_format=cl)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda").contiguous(memory_format=cl)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = net(x)
        score = d(x, outs[0].softmax(1))
        loss = sum(o.float().square().mean() for o in outs) + score.float().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
