"""W1 on a GPU: sources on the device, parameters drawn on the host, and the peers' way.

Shared by ``benchmarks/device_check.py`` and ``python -m benchmarks.run``. W1 (see
BENCHMARKS.md): 200x256x256 float32 image + uint8 label per sample, 128^3 patches,
rotation U(-15, 15) degrees about each axis, isotropic scale U(0.85, 1.25), crop centre
uniform over the valid range, flip p=0.5 per axis; batches of 8.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

import augment
from augment.rng import batch_rngs

SOURCE = (200, 256, 256)
PATCH = (128, 128, 128)
BATCH = 8


def w1_compose(patch: tuple[int, int, int] = PATCH, intensity: bool = False) -> augment.Compose:
    """The W1 pipeline (W2's intensity transforms with ``intensity``)."""
    ts: list[Any] = [
        augment.RandomCrop(patch),
        augment.RandomAffine(degrees=15, scale=(0.85, 1.25)),
        augment.RandomFlip(axes=(0, 1, 2), p=0.5),
    ]
    if intensity:
        ts += [
            augment.Window(-200, 250),
            augment.RandomGamma((0.7, 1.5), p=0.3),
            augment.RandomNoise((0.0, 0.1), p=0.1),
            augment.RandomContrast((0.75, 1.25), p=0.15),
        ]
    return augment.Compose(ts)


def make_sources(
    batch: int, shape: tuple[int, int, int], device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` ellipsoid 'organs' in noise, made on the device.

    Returns:
        image ``(B, 1, D, H, W)`` float32 (HU-like), label ``(B, 1, D, H, W)`` uint8.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    img = torch.randn((batch, 1, *shape), generator=gen, device=device) * 20.0
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    c = [n / 2.0 for n in shape]
    r = [n / 3.5 for n in shape]
    dist = (
        (((axes[0] - c[0]) / r[0]) ** 2).view(-1, 1, 1)
        + (((axes[1] - c[1]) / r[1]) ** 2).view(1, -1, 1)
        + (((axes[2] - c[2]) / r[2]) ** 2).view(1, 1, -1)
    )
    inside = (dist < 1.0).to(torch.uint8)
    lab = inside.expand(batch, 1, *shape).contiguous()
    img += 60.0 * lab
    return img, lab


def draw_matrices(
    compose: augment.Compose,
    n_batches: int,
    batch: int,
    src_shape: tuple[int, int, int],
    seed: int = 0,
) -> list[NDArray[np.float64]]:
    """Host-drawn pull maps, ``n_batches`` arrays ``(batch, 4, 4)``, as Compose draws them."""
    out = []
    for k in range(n_batches):
        params = augment.stack_params(
            [compose.sample(g, src_shape) for g in batch_rngs(seed, k, range(batch))]
        )
        out.append(compose.matrix(params))
    return out


def to_theta(
    m: NDArray[np.float64], in_shape: tuple[int, int, int], out_shape: tuple[int, int, int]
) -> NDArray[np.float64]:
    """Index-space pull maps ``(B, 3|4, 4)`` in (z, y, x) -> ``affine_grid`` thetas
    ``(B, 3, 4)`` in normalised (x, y, z) with ``align_corners=True``."""
    a = np.asarray(m, dtype=np.float64)[:, :3, :]
    n_out = np.asarray(out_shape, dtype=np.float64)
    n_in = np.asarray(in_shape, dtype=np.float64)
    s_out = np.maximum(n_out - 1.0, 1.0) / 2.0
    s_in = np.maximum(n_in - 1.0, 1.0) / 2.0
    lin = a[:, :, :3] * s_out[None, None, :] / s_in[None, :, None]
    off = ((a[:, :, :3] @ s_out) + a[:, :, 3] - s_in) / s_in[None, :]
    theta = np.empty_like(a)
    theta[:, :, :3] = lin[:, ::-1, ::-1]
    theta[:, :, 3] = off[:, ::-1]
    return theta


def grid_sample_warp(
    img: torch.Tensor,
    lab_float: torch.Tensor | None,
    m: NDArray[np.float64],
    out_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hand-written peer: ``affine_grid`` + ``grid_sample`` (bilinear image, nearest
    label, zero padding, ``align_corners=True``) with the same pull maps.

    Shape:
        img ``(B, C, D, H, W)`` float32; lab_float ``(B, 1, D, H, W)`` float32 (converted
        once by the caller) -> ``(B, C, d, h, w)`` float32 and ``(B, 1, d, h, w)`` uint8.
    """
    d, h, w = (int(n) for n in img.shape[2:])
    theta = torch.from_numpy(to_theta(m, (d, h, w), out_shape)).to(img.device, torch.float32)
    grid = F.affine_grid(theta, [img.shape[0], 1, *out_shape], align_corners=True)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    lab = None
    if lab_float is not None:
        lab = F.grid_sample(
            lab_float, grid, mode="nearest", padding_mode="zeros", align_corners=True
        ).to(torch.uint8)
    return out, lab


def time_batches(
    run: Callable[[int], Any], n_batches: int, repeats: int, device: torch.device, warmup: int = 1
) -> tuple[list[float], float]:
    """Seconds per pass over ``run(0..n_batches-1)`` for each repeat, and the host time
    per ``run`` call (queueing only, no sync) measured in the timed passes.

    CUDA: events around the whole pass, one synchronisation per pass.
    """
    for _ in range(warmup):
        for k in range(n_batches):
            run(k)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times, host = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for k in range(n_batches):
                run(k)
            host.append((time.perf_counter() - t0) / n_batches)
            stop.record()
            stop.synchronize()  # one sync per timed pass
            times.append(start.elapsed_time(stop) / 1000.0)
        else:
            t0 = time.perf_counter()
            for k in range(n_batches):
                run(k)
            times.append(time.perf_counter() - t0)
            host.append(times[-1] / n_batches)
    return times, statistics.median(host)
