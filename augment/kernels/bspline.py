"""The uniform cubic B-spline that spreads a coarse control grid over the output grid.

An elastic displacement is a ``(3, gz, gy, gx)`` grid of control vectors laid over the
output patch; every backend evaluates it at each output voxel inside the resampling pass
and adds it to the affine-mapped source coordinate. This module is the definition they all
follow (the numba kernel, the torch fallback and the Triton kernel), in numpy:

- Along an output axis of ``n`` voxels with ``g >= 4`` control points, output index ``i``
  sits at control coordinate ``u = 1 + i * (g - 3) / (n - 1)`` (``u = 1`` when ``n == 1``):
  control point ``j`` lies at output index ``(j - 1) * (n - 1) / (g - 3)``, so points 1 and
  ``g - 2`` fall on the first and last voxel and points 0 and ``g - 1`` lie one spacing
  outside, where the spline still needs them.
- ``u`` is clipped to ``g - 2`` (rounding), ``j = min(floor(u), g - 3)``, ``t = u - j``
  in [0, 1]; the value is
  ``sum_k B_k(t) * c[j - 1 + k]`` for k = 0..3 with the cubic B-spline weights of
  :func:`weights` (non-negative, summing to 1: the field never exceeds its largest control
  vector, which bounds how far a tile's samples can move).
- In 3D the weights are the products of the three axes' weights (64 taps), which the
  kernels evaluate separably.

``scipy.ndimage.map_coordinates(c, u, order=3, prefilter=False)`` evaluates the same sum
(its cubic B-spline at integer knots), which is what the tests compare against.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

MIN_POINTS = 4
"""Control points per axis at least: one interval of a cubic B-spline needs four."""


def step(n: int, g: int) -> float:
    """Control intervals per output voxel along an axis of ``n`` voxels and ``g`` points."""
    return (g - 3) / (n - 1) if n > 1 else 0.0


def weights(t: ArrayLike) -> NDArray[np.float64]:
    """Cubic B-spline weights ``(..., 4)`` of the points ``j - 1 .. j + 2`` at fraction ``t``."""
    t = np.asarray(t, dtype=np.float64)
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    return np.stack(
        [
            s * s * s / 6.0,
            (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
            (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
            t3 / 6.0,
        ],
        axis=-1,
    )


def basis(n: int, g: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Per output index along one axis: the interval ``j`` and the four weights.

    Args:
        n: output voxels along the axis.
        g: control points along the axis (>= 4).

    Returns:
        ``(j (n,) int64, w (n, 4) float64)``: voxel ``i`` reads control points
        ``j[i] - 1 .. j[i] + 2`` with weights ``w[i]``.
    """
    if g < MIN_POINTS:
        raise ValueError(f"a cubic B-spline needs at least {MIN_POINTS} control points, got {g}")
    u = np.minimum(1.0 + np.arange(n, dtype=np.float64) * step(n, g), g - 2.0)
    j = np.minimum(np.floor(u), g - 3).astype(np.int64)
    return j, weights(u - j)


def bound(field: ArrayLike) -> NDArray[np.float64]:
    """``(..., 3)`` largest absolute control value per component: no output voxel moves
    further along that axis (the weights are a partition of unity, all non-negative).

    Shape:
        field: ``(..., 3, gz, gy, gx)``.
    """
    f = np.asarray(field, dtype=np.float64)
    return np.abs(f).max(axis=(-3, -2, -1), initial=0.0)
