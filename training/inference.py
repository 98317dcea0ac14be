"""Sliding-window inference over whole volumes with Gaussian importance blending (nnU-Net)."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.modes import evaluating

__all__ = ["gaussian_importance_map", "sliding_window_inference", "window_starts"]

Output = Literal["probabilities", "logits", "argmax"]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows along one axis, nnU-Net's ``compute_steps_for_sliding_window``.

    The windows are spread evenly: the first starts at 0, the last ends at ``size``, and
    neighbours overlap by at least ``overlap * patch``.

    Args:
        size: axis length (at least ``patch``).
        patch: window length.
        overlap: overlap fraction in [0, 1).

    Returns:
        Sorted start indices.
    """
    if size < patch:
        raise ValueError(f"axis of {size} is shorter than the window {patch}")
    if size == patch:
        return [0]
    step = patch * (1.0 - overlap)
    n = math.ceil((size - patch) / step) + 1
    actual = (size - patch) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


def gaussian_importance_map(
    patch_size: Sequence[int],
    *,
    sigma_scale: float = 1.0 / 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Gaussian weight of each voxel of a window, highest (1) at the centre.

    Sigma is ``sigma_scale * patch`` per axis (nnU-Net: 1/8). Weights are floored at the
    smallest non-zero value so no voxel of a window is ignored (nnU-Net does the same).

    Args:
        patch_size: window size ``(d, h, w)``.
        sigma_scale: sigma as a fraction of the window size.
        dtype: output dtype.
        device: output device.

    Returns:
        The map, shape ``patch_size``.
    """
    axes = []
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    g = axes[0]
    for a in axes[1:]:
        g = g[..., None] * a
    g = g / g.max()
    g = g.clamp_min(g[g > 0].min())
    return g.to(dtype=dtype, device=device)


def _first(out: Tensor | Sequence[Tensor]) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def sliding_window_inference(
    volume: Tensor,
    predictor: nn.Module | Callable[[Tensor], Tensor],
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    blend: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 1.0 / 8,
    output: Output = "probabilities",
    pad_value: float = 0.0,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str | None = None,
    autocast: bool | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Predict a whole volume window by window and blend the windows' logits.

    Windows of ``patch_size`` are placed with :func:`window_starts` (the last flush with the
    volume's end), run through ``predictor`` ``batch_size`` at a time, weighted by the
    Gaussian importance map (or uniformly) and averaged where they overlap, as nnU-Net does
    with logits. A volume smaller than the window along an axis is padded with ``pad_value``
    on both sides and the result cropped back. An ``nn.Module`` predictor runs inside
    :func:`training.modes.evaluating`, so its own and its submodules' train/eval flags are
    restored afterwards.

    Args:
        volume: the image(s), on any device.
        predictor: a network or callable mapping ``(n, C, *patch_size)`` windows to
            ``(n, K, *patch_size)`` logits; a list (deep supervision) contributes its first
            entry.
        patch_size: window size ``(d, h, w)``.
        overlap: overlap fraction of neighbouring windows, in [0, 1).
        batch_size: windows per forward pass.
        blend: ``"gaussian"`` (sigma = ``sigma_scale`` x window) or ``"constant"``.
        sigma_scale: see :func:`gaussian_importance_map`.
        output: ``"probabilities"`` (softmax of the blended logits; sigmoid for one output
            channel), ``"logits"`` or ``"argmax"`` (int64 labels; ``logit > 0`` for one
            channel).
        pad_value: fill for volumes smaller than the window.
        mirror_axes: spatial axes (0, 1, 2 for z, y, x) for mirroring test-time augmentation;
            logits are averaged over all 2**len combinations of flips.
        device: where the predictor runs and logits accumulate; default: the module's
            parameters' device, else the volume's. The result goes back to the volume's
            device.
        autocast: bf16 autocast; None means on when running on CUDA. Accumulation is float32.
        channels_last: feed windows in ``torch.channels_last_3d`` memory format.

    Returns:
        Per-class probabilities or logits (float32), or labels.

    Shape:
        volume ``(C, D, H, W)`` -> ``(K, D, H, W)`` (``(D, H, W)`` for argmax); a batch
        ``(B, C, D, H, W)`` -> ``(B, K, D, H, W)`` (``(B, D, H, W)``).
    """
    if volume.ndim == 5:
        return torch.stack(
            [
                sliding_window_inference(
                    v,
                    predictor,
                    patch_size=patch_size,
                    overlap=overlap,
                    batch_size=batch_size,
                    blend=blend,
                    sigma_scale=sigma_scale,
                    output=output,
                    pad_value=pad_value,
                    mirror_axes=mirror_axes,
                    device=device,
                    autocast=autocast,
                    channels_last=channels_last,
                )
                for v in volume
            ]
        )
    if volume.ndim != 4:
        raise ValueError(
            f"volume must be (C, D, H, W) or (B, C, D, H, W), got {tuple(volume.shape)}"
        )
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive ints, got {patch_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if output not in ("probabilities", "logits", "argmax"):
        raise ValueError(f"output must be probabilities, logits or argmax, got {output!r}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    if any(a not in (0, 1, 2) for a in mirror_axes):
        raise ValueError(f"mirror_axes must be among 0, 1, 2, got {mirror_axes!r}")

    if device is None:
        param = next(predictor.parameters(), None) if isinstance(predictor, nn.Module) else None
        device = param.device if param is not None else volume.device
    device = torch.device(device)
    use_autocast = device.type == "cuda" if autocast is None else autocast

    spatial = tuple(volume.shape[1:])
    before = [max(p - s, 0) // 2 for s, p in zip(spatial, patch, strict=True)]
    after = [max(p - s, 0) - b for s, p, b in zip(spatial, patch, before, strict=True)]
    x = volume.to(device=device, dtype=torch.float32)
    if any(before) or any(after):
        pad = [n for b, a in zip(reversed(before), reversed(after), strict=True) for n in (b, a)]
        x = F.pad(x, pad, value=pad_value)
    padded = tuple(x.shape[1:])
    starts = [window_starts(s, p, overlap) for s, p in zip(padded, patch, strict=True)]
    corners = list(itertools.product(*starts))
    weight = (
        gaussian_importance_map(patch, sigma_scale=sigma_scale, device=device)
        if blend == "gaussian"
        else torch.ones(patch, device=device)
    )
    flips = [
        [a + 2 for a in combo]
        for r in range(len(mirror_axes) + 1)
        for combo in itertools.combinations(mirror_axes, r)
    ]

    def predict(batch: Tensor) -> Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        cast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if use_autocast
            else contextlib.nullcontext()
        )
        total = None
        for dims in flips:
            with cast:
                inp = batch.flip(dims) if dims else batch
                out = _first(predictor(inp)).float()
            out = out.flip(dims) if dims else out
            total = out if total is None else total + out
        assert total is not None
        return total / len(flips)

    context = evaluating(predictor) if isinstance(predictor, nn.Module) else torch.no_grad()
    logits: Tensor | None = None
    norm = torch.zeros(padded, device=device)
    with context:
        for i in range(0, len(corners), batch_size):
            chunk = corners[i : i + batch_size]
            regions = [
                tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
                for corner in chunk
            ]
            batch = torch.stack([x[(slice(None),) + r] for r in regions])
            out = predict(batch)
            if out.shape[2:] != patch or out.shape[0] != len(chunk):
                raise ValueError(
                    f"predictor returned {tuple(out.shape)} for windows {tuple(batch.shape)}"
                )
            if logits is None:
                logits = torch.zeros((out.shape[1], *padded), device=device)
            for r, o in zip(regions, out, strict=True):
                logits[(slice(None),) + r] += o * weight
                norm[r] += weight
    assert logits is not None
    logits /= norm
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))
    logits = logits[(slice(None),) + crop]
    binary = logits.shape[0] == 1
    if output == "logits":
        result = logits
    elif output == "probabilities":
        result = logits.sigmoid() if binary else logits.softmax(0)
    else:
        result = (logits[0] > 0).long() if binary else logits.argmax(0)
    return result.to(volume.device)
