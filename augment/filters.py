"""Separable filters after the warp: Gaussian blur and simulated low resolution.

Both need the neighbourhood of a voxel in the output patch, so they run after the fused
resampling pass, one axis at a time over the finished patch (per sample, every channel):
a tap table per axis (:mod:`augment.kernels.taps`) run by numba on numpy patches
(:mod:`augment.kernels.cpu_taps`) or by torch ops on tensors, on the tensor's device.
Gated-out samples have an empty program and stay in the fused pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from augment.base import IntensityTransform, Params, as_range, check_probability
from augment.kernels import program as pg
from augment.kernels import taps

F64 = NDArray[np.float64]
Range = tuple[float, float]


def run_tables(x: Any, tables: Sequence[tuple[int, taps.Table]]) -> Any:
    """Apply ``(axis, table)`` passes in turn to a float32 numpy array or a tensor."""
    if type(x).__module__.startswith("torch"):
        for axis, table in tables:
            x = taps.apply_torch(x, axis, table)
        return x
    # numba compiles (or loads from its cache) on first use, not at ``import augment``
    from augment.kernels import cpu_taps

    y = np.asarray(x, dtype=np.float32)
    for axis, (idx, w) in tables:
        y = cpu_taps.apply(y, axis, idx, w)
    return y


def _axes(axes: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(a) for a in axes)
    if not out or any(a not in (0, 1, 2) for a in out) or len(set(out)) != len(out):
        raise ValueError(f"axes must be distinct spatial axes among (0, 1, 2), got {axes!r}")
    return out


@dataclass(frozen=True)
class BlurParams(Params):
    active: NDArray[np.bool_]  # (B,)
    sigma: F64  # (B, 3) output voxels per axis (z, y, x); 0: that axis is not blurred


class RandomGaussianBlur(IntensityTransform):
    """Gaussian blur with probability ``p``, sigma ~ U(sigma) output voxels per axis.

    Each channel equals ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect",
    truncate=truncate)`` (float32 accumulation). nnU-Net's defaults: sigma (0.5, 1), a
    draw per axis, p 0.2.

    Cost: after the warp, one pass per axis over the patch, ``2 * int(truncate * sigma
    + 0.5) + 1`` multiply-adds per voxel each (sigma 1: 9, so 27 a voxel for the three
    axes, against about 20 for the fused trilinear pass) plus a read and a write of the
    float32 patch per axis; on a 128^3 patch with sigma U(0.5, 1) one thread takes
    roughly half the time of the W1 pass.

    Args:
        sigma: range of the standard deviation in output voxels.
        p: probability that a sample is blurred.
        isotropic: one draw for all three axes (else one per axis).
        axes: the axes blurred (e.g. ``(1, 2)`` for in-plane only).
        truncate: kernel radius in standard deviations.
    """

    def __init__(
        self,
        sigma: float | Range = (0.5, 1.0),
        p: float = 0.2,
        *,
        isotropic: bool = False,
        axes: Sequence[int] = (0, 1, 2),
        truncate: float = 4.0,
    ) -> None:
        self.sigma = (0.0, float(sigma)) if np.isscalar(sigma) else as_range(sigma, "sigma")  # type: ignore[arg-type]
        if self.sigma[0] < 0:
            raise ValueError(f"sigma must be >= 0 voxels, got {sigma!r}")
        self.p = check_probability(p)
        self.isotropic = isotropic
        self.axes = _axes(axes)
        if not truncate > 0:
            raise ValueError(f"truncate must be positive, got {truncate!r}")
        self.truncate = float(truncate)

    def sample(self, rng: np.random.Generator) -> BlurParams:
        active = rng.random() < self.p
        draws = rng.uniform(*self.sigma, 1 if self.isotropic else 3)
        sigma = np.broadcast_to(draws, (3,)).copy()
        keep = np.isin(np.arange(3), self.axes)
        sigma = np.where(keep & active, sigma, 0.0)
        return BlurParams(active=np.array([active]), sigma=sigma[None])

    def program(self, params: Params, value_range: Range | None) -> F64 | None:
        assert isinstance(params, BlurParams)
        return pg.empty() if not np.any(params.sigma[0] > 0) else None

    def tables(self, params: Params, shape: Sequence[int]) -> list[tuple[int, taps.Table]]:
        """The ``(axis, table)`` passes for a ``(C, D, H, W)`` patch of ``shape``."""
        assert isinstance(params, BlurParams)
        return [
            (1 + k, taps.gaussian(int(shape[1 + k]), float(s), self.truncate))
            for k, s in enumerate(params.sigma[0])
            if s > 0
        ]

    def apply(self, x: Any, params: Params) -> Any:
        tables = self.tables(params, x.shape)
        return run_tables(x, tables) if tables else x

    def out_range(self, value_range: Range | None) -> Range | None:
        return value_range  # non-negative weights summing to one


@dataclass(frozen=True)
class LowResParams(Params):
    active: NDArray[np.bool_]  # (B,)
    zoom: F64  # (B, 3) size factor of the low-resolution grid per axis; 1: untouched


class RandomLowResolution(IntensityTransform):
    """nnU-Net's SimulateLowResolution: down to ``zoom ~ U(zoom)`` times the patch size,
    then back up, with probability ``p``.

    Each channel equals ``scipy.ndimage.zoom(scipy.ndimage.zoom(x, f, order=order_down,
    grid_mode=True, mode="nearest"), n / round(n * f), order=order_up, grid_mode=True,
    mode="nearest")``: voxels as cells, as nnU-Net v2's torch ``interpolate``
    (``nearest-exact`` down, ``trilinear`` with ``align_corners=False`` up, the defaults
    here).

    Cost: after the warp, the down pass reads the patch once per axis and writes the
    smaller grid (``order_down + 1`` taps a voxel), the up pass ``order_up + 1``
    multiply-adds per voxel per axis (two with the default linear) plus a read and a
    write of the float32 patch per axis: a few times cheaper than the W1 pass.

    Args:
        zoom: range of the size factor (0, 1]; nnU-Net uses (0.5, 1).
        p: probability that a sample is degraded (nnU-Net: 0.25).
        isotropic: one factor for all ``axes`` (nnU-Net's default) or one per axis.
        axes: the axes made coarse (nnU-Net leaves the through-plane axis of 2D-like
            data alone: ``axes=(1, 2)``).
        order_down, order_up: 0 nearest or 1 linear.
    """

    def __init__(
        self,
        zoom: float | Range = (0.5, 1.0),
        p: float = 0.25,
        *,
        isotropic: bool = True,
        axes: Sequence[int] = (0, 1, 2),
        order_down: int = 0,
        order_up: int = 1,
    ) -> None:
        self.zoom = (float(zoom), float(zoom)) if np.isscalar(zoom) else as_range(zoom, "zoom")  # type: ignore[arg-type]
        if not (0.0 < self.zoom[0] <= self.zoom[1] <= 1.0):
            raise ValueError(f"zoom must lie in (0, 1], got {zoom!r}")
        self.p = check_probability(p)
        self.isotropic = isotropic
        self.axes = _axes(axes)
        for name, order in (("order_down", order_down), ("order_up", order_up)):
            if order not in (0, 1):
                raise ValueError(f"{name} must be 0 (nearest) or 1 (linear), got {order!r}")
        self.order_down, self.order_up = int(order_down), int(order_up)

    def sample(self, rng: np.random.Generator) -> LowResParams:
        active = rng.random() < self.p
        draws = rng.uniform(*self.zoom, 1 if self.isotropic else 3)
        zoom = np.broadcast_to(draws, (3,)).copy()
        keep = np.isin(np.arange(3), self.axes)
        zoom = np.where(keep & active, zoom, 1.0)
        return LowResParams(active=np.array([active]), zoom=zoom[None])

    def low_shape(self, params: Params, shape: Sequence[int]) -> tuple[int, int, int]:
        """The low-resolution grid of a ``(d, h, w)`` patch."""
        assert isinstance(params, LowResParams)
        z = params.zoom[0]
        return (
            taps.out_size(int(shape[0]), z[0]),
            taps.out_size(int(shape[1]), z[1]),
            taps.out_size(int(shape[2]), z[2]),
        )

    def program(self, params: Params, value_range: Range | None) -> F64 | None:
        assert isinstance(params, LowResParams)
        return pg.empty() if np.all(params.zoom[0] == 1.0) else None

    def tables(self, params: Params, shape: Sequence[int]) -> list[tuple[int, taps.Table]]:
        """The ``(axis, table)`` passes, down then up, for a ``(C, D, H, W)`` patch."""
        full = [int(n) for n in shape[1:]]
        low = self.low_shape(params, full)
        changed = [k for k in range(3) if low[k] != full[k]]
        down = [(1 + k, taps.zoom(full[k], low[k], self.order_down)) for k in changed]
        up = [(1 + k, taps.zoom(low[k], full[k], self.order_up)) for k in changed]
        return down + up

    def apply(self, x: Any, params: Params) -> Any:
        tables = self.tables(params, x.shape)
        return run_tables(x, tables) if tables else x

    def out_range(self, value_range: Range | None) -> Range | None:
        return value_range  # copies and convex combinations of the values
