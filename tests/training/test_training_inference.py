"""Sliding-window inference: exact for a pointwise model, padding, shapes, modes, mirroring."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.inference import gaussian_importance_map, sliding_window_inference, window_starts
from training.models import UNet3D


def pointwise(c_in=2, c_out=3, seed=0) -> nn.Module:
    # A 1x1x1 convolution is translation-equivariant with no context, so every window gives
    # the same value at a voxel and any blending must reproduce the direct result.
    torch.manual_seed(seed)
    return nn.Conv3d(c_in, c_out, 1)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize(("overlap", "batch_size"), [(0.5, 3), (0.0, 1), (0.25, 8)])
def test_pointwise_model_is_reproduced_exactly(blend, overlap, batch_size):
    model = pointwise()
    volume = torch.randn(2, 37, 29, 41)
    with torch.no_grad():
        direct = model(volume[None])[0]
    kw = {"patch_size": (16, 12, 20), "overlap": overlap, "batch_size": batch_size}
    logits = sliding_window_inference(volume, model, output="logits", blend=blend, **kw)
    torch.testing.assert_close(logits, direct, atol=1e-5, rtol=1e-5)
    probs = sliding_window_inference(volume, model, blend=blend, **kw)
    torch.testing.assert_close(probs, direct.softmax(0), atol=1e-5, rtol=1e-5)
    labels = sliding_window_inference(volume, model, output="argmax", blend=blend, **kw)
    assert labels.dtype == torch.int64 and torch.equal(labels, direct.argmax(0))


def test_volume_smaller_than_patch_is_padded_and_cropped():
    model = pointwise()
    volume = torch.randn(2, 5, 20, 7)
    out = sliding_window_inference(volume, model, patch_size=(8, 16, 16), output="logits")
    assert out.shape == (3, 5, 20, 7)
    with torch.no_grad():
        torch.testing.assert_close(out, model(volume[None])[0], atol=1e-5, rtol=1e-5)


def test_batched_volumes():
    model = pointwise()
    volumes = torch.randn(3, 2, 10, 12, 14)
    out = sliding_window_inference(volumes, model, patch_size=(8, 8, 8))
    assert out.shape == (3, 3, 10, 12, 14)
    torch.testing.assert_close(out.sum(1), torch.ones(3, 10, 12, 14))
    labels = sliding_window_inference(volumes, model, patch_size=(8, 8, 8), output="argmax")
    assert labels.shape == (3, 10, 12, 14)


def test_single_window_equals_direct_unet():
    net = UNet3D(in_channels=1, num_classes=2, base_width=4, depth=3).eval()
    volume = torch.randn(1, 16, 16, 16)
    out = sliding_window_inference(volume, net, patch_size=(16, 16, 16), output="logits")
    with torch.no_grad():
        torch.testing.assert_close(out, net(volume[None])[0], atol=1e-5, rtol=1e-5)


def test_module_modes_restored_and_results_deterministic():
    net = UNet3D(in_channels=1, num_classes=2, base_width=4, depth=2, dropout=0.5)
    net.train()
    flags = [m.training for m in net.modules()]
    volume = torch.randn(1, 12, 12, 10)
    a = sliding_window_inference(volume, net, patch_size=(8, 8, 8), batch_size=4)
    b = sliding_window_inference(volume, net, patch_size=(8, 8, 8), batch_size=4)
    assert torch.equal(a, b)  # dropout off inside
    assert [m.training for m in net.modules()] == flags
    assert not a.requires_grad


def test_deep_supervision_list_output_uses_full_resolution():
    model = pointwise()
    out = sliding_window_inference(
        torch.randn(2, 9, 9, 9),
        lambda x: [model(x), model(x)[:, :, ::2, ::2, ::2]],
        patch_size=(8, 8, 8),
        output="logits",
    )
    assert out.shape == (3, 9, 9, 9)


def test_mirroring_of_a_pointwise_model_changes_nothing():
    model = pointwise()
    volume = torch.randn(2, 11, 13, 9)
    plain = sliding_window_inference(volume, model, patch_size=(8, 8, 8), output="logits")
    tta = sliding_window_inference(
        volume, model, patch_size=(8, 8, 8), output="logits", mirror_axes=(0, 1, 2)
    )
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-5)


def test_single_output_channel_uses_sigmoid():
    model = pointwise(c_out=1)
    volume = torch.randn(2, 9, 9, 9)
    with torch.no_grad():
        direct = model(volume[None])[0]
    probs = sliding_window_inference(volume, model, patch_size=(8, 8, 8))
    torch.testing.assert_close(probs, direct.sigmoid(), atol=1e-5, rtol=1e-5)
    labels = sliding_window_inference(volume, model, patch_size=(8, 8, 8), output="argmax")
    assert torch.equal(labels, (direct[0] > 0).long())


def test_channels_last_windows():
    net = UNet3D(in_channels=1, num_classes=2, base_width=4, depth=2)
    net = net.to(memory_format=torch.channels_last_3d)
    volume = torch.randn(1, 12, 12, 12)
    a = sliding_window_inference(volume, net, patch_size=(8, 8, 8), channels_last=True)
    b = sliding_window_inference(volume, net, patch_size=(8, 8, 8))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("size", "patch", "overlap"), [(37, 16, 0.5), (16, 16, 0.5), (100, 7, 0.3), (9, 8, 0.0)]
)
def test_window_starts_cover_evenly(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert starts == sorted(set(starts))
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(g <= patch * (1 - overlap) + 0.5 for g in gaps)  # overlap at least requested
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()
    with pytest.raises(ValueError, match="shorter"):
        window_starts(5, 8, 0.5)


def test_gaussian_importance_map():
    g = gaussian_importance_map((9, 16, 7))
    assert g.shape == (9, 16, 7) and g.dtype == torch.float32
    assert g.max().item() == pytest.approx(1.0) and g.min() > 0
    assert g[4, 7, 3] == g.max() or g[4, 8, 3] == g.max()
    torch.testing.assert_close(g, g.flip(0).flip(1).flip(2))
    # sigma = patch / 8: one sigma from the centre of a 16-long axis (2 voxels) is exp(-1/2).
    line = gaussian_importance_map((1, 1, 17))[0, 0]
    assert line[8].item() == pytest.approx(1.0)
    assert line[8 + 2].item() == pytest.approx(
        torch.exp(torch.tensor(-0.5 * (2 / 2.125) ** 2)).item()
    )


def test_argument_validation():
    model = pointwise()
    v = torch.randn(2, 8, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(v, model, patch_size=(8, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_inference(v, model, patch_size=(8, 8))
    with pytest.raises(ValueError, match="volume"):
        sliding_window_inference(v[0, 0], model, patch_size=(8, 8, 8))
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_inference(v, model, patch_size=(8, 8, 8), mirror_axes=(3,))
    with pytest.raises(ValueError, match="predictor returned"):
        sliding_window_inference(v, lambda x: x[:, :, :4], patch_size=(8, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu():
    net = UNet3D(in_channels=1, num_classes=2, base_width=8, depth=3)
    volume = torch.randn(1, 40, 36, 44)
    cpu = sliding_window_inference(volume, net, patch_size=(16, 16, 16))
    net_cuda = net.cuda().to(memory_format=torch.channels_last_3d)
    gpu = sliding_window_inference(volume, net_cuda, patch_size=(16, 16, 16), channels_last=True)
    assert gpu.device == volume.device  # comes back to the input's device
    torch.testing.assert_close(gpu, cpu, atol=5e-2, rtol=0)
    fp32 = sliding_window_inference(
        volume.cuda(), net_cuda, patch_size=(16, 16, 16), autocast=False
    )
    assert fp32.is_cuda
    # cuDNN convolutions run in TF32 by default on Ampere and later: about 1e-3 off.
    torch.testing.assert_close(fp32.cpu(), cpu, atol=1e-2, rtol=0)
