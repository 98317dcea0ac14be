"""Separable filters as tap tables: output index ``i`` along an axis is
``sum_k w[i, k] * x[idx[i, k]]``.

One table per axis describes a Gaussian blur or a resampling step; the numba kernels
(:mod:`augment.kernels.cpu_taps`) and torch (:func:`apply_torch`) run the same tables, so
the backends agree to float rounding. The boundary rules are scipy.ndimage's:

- :func:`gaussian`: ``scipy.ndimage.gaussian_filter1d`` (kernel ``exp(-x^2 / 2 sigma^2)``
  normalised, radius ``int(truncate * sigma + 0.5)``, mode ``"reflect"``: the edge voxel
  repeated, ``d c b a | a b c d | d c b a``).
- :func:`zoom`: ``scipy.ndimage.zoom(..., grid_mode=True, mode="nearest")``, i.e. voxels
  as cells (output ``i`` samples input ``(i + 0.5) * n_in / n_out - 0.5``, torch's
  ``align_corners=False``), order 0 (``floor(c + 0.5)``) or 1, indices clamped to the edge.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

Table = tuple[NDArray[np.int64], NDArray[np.float64]]


def reflect(i: NDArray[np.int64], n: int) -> NDArray[np.int64]:
    """Indices ``i`` (any integers) folded into ``[0, n)`` by half-sample symmetric
    reflection, repeated as often as needed (scipy's ``"reflect"``)."""
    m = np.mod(i, 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


def gaussian(n: int, sigma: float, truncate: float = 4.0) -> Table:
    """The Gaussian blur of an axis of ``n`` voxels: ``(idx (n, K), w (n, K))``,
    ``K = 2 * int(truncate * sigma + 0.5) + 1``.

    Raises:
        ValueError: ``sigma`` not positive.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / float(sigma)) ** 2)
    k /= k.sum()
    idx = reflect(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], n)
    return idx.astype(np.int64), np.broadcast_to(k, idx.shape).copy()


def zoom(n_in: int, n_out: int, order: int) -> Table:
    """Resampling of an axis from ``n_in`` to ``n_out`` voxels, cells aligned.

    Args:
        n_in, n_out: voxels before and after.
        order: 0 nearest (one tap) or 1 linear (two taps).

    Returns:
        ``(idx (n_out, 1 + order), w (n_out, 1 + order))``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order!r}")
    c = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = np.clip(np.floor(c + 0.5), 0, n_in - 1).astype(np.int64)[:, None]
        return idx, np.ones((n_out, 1))
    f = np.floor(c)
    t = c - f
    lo = np.clip(f, 0, n_in - 1).astype(np.int64)
    hi = np.clip(f + 1, 0, n_in - 1).astype(np.int64)
    return np.stack([lo, hi], axis=1), np.stack([1.0 - t, t], axis=1)


def out_size(n: int, factor: float) -> int:
    """``round(n * factor)``, at least 1: ``scipy.ndimage.zoom``'s output size (Python's
    round, ties to even)."""
    return max(1, int(round(n * float(factor))))


def apply_torch(x: Any, axis: int, table: Table) -> Any:
    """Run ``table`` along ``axis`` of the tensor ``x`` (float32 accumulation).

    Shape:
        x ``(..., n_in, ...)`` -> ``(..., n_out, ...)`` along ``axis``.
    """
    # torch is optional: a tensor here means it is loaded already
    import torch

    idx, w = table
    shape = [1] * x.dim()
    shape[axis] = len(idx)
    index = torch.from_numpy(np.ascontiguousarray(idx)).to(x.device)
    weight = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(x.device)
    out = None
    for k in range(idx.shape[1]):
        term = x.index_select(axis, index[:, k]) * weight[:, k].view(shape)
        out = term if out is None else out + term
    return out
