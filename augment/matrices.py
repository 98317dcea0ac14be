"""Homogeneous 4x4 matrices in voxel index space, (z, y, x) order.

Every spatial transform is a *pull* map: it takes an OUTPUT voxel index ``(z, y, x, 1)`` to
the INPUT index it samples from. Voxel centres sit at integer indices. Composing a pipeline
``t1 -> t2 -> t3`` (t1 applied to the data first) gives ``M = M1 @ M2 @ M3``: the output of
t3 pulls from the output of t2, which pulls from the output of t1, which pulls from the
source.

All constructors accept a single set of parameters or a batch (leading axis B) and return
``(4, 4)`` or ``(B, 4, 4)`` float64 arrays. Angles are in radians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]

_EXACT_TOL = 1e-9


def _batch(values: ArrayLike, width: int) -> tuple[F64, bool]:
    a = np.asarray(values, dtype=np.float64)
    single = a.ndim == 1
    a = np.atleast_2d(a)
    if a.shape[-1] != width:
        raise ValueError(f"expected {width} values per sample, got shape {a.shape}")
    return a, single


def _finish(m: F64, single: bool) -> F64:
    return m[0] if single else m


_EYE = np.eye(4)


def identity(batch: int | None = None) -> F64:
    """The identity, ``(4, 4)`` or ``(batch, 4, 4)``."""
    if batch is None:
        return np.eye(4)
    return _EYE[None].repeat(batch, axis=0)  # 10x faster than broadcast_to(...).copy()


def translation(offset: ArrayLike) -> F64:
    """Pull map ``in = out + offset``; ``offset`` is ``(3,)`` or ``(B, 3)`` in (z, y, x)."""
    t, single = _batch(offset, 3)
    m = identity(len(t))
    m[:, :3, 3] = t
    return _finish(m, single)


def scaling(factors: ArrayLike) -> F64:
    """Pull map ``in = diag(factors) @ out`` (factors > 1 sample a larger input region)."""
    s, single = _batch(factors, 3)
    m = identity(len(s))
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = s[:, 0], s[:, 1], s[:, 2]
    return _finish(m, single)


def rotation(angles: ArrayLike) -> F64:
    """Rotation by ``angles = (a0, a1, a2)`` radians about axes 0 (z), 1 (y), 2 (x).

    The rotation about axis k turns the plane of the two other axes; the result is
    ``R0 @ R1 @ R2``. A rotation about z (axis 0) is an in-plane rotation of each slice.
    """
    a, single = _batch(angles, 3)
    m = identity(len(a))
    for axis in (0, 1, 2):
        c, s = np.cos(a[:, axis]), np.sin(a[:, axis])
        p, q = [k for k in (0, 1, 2) if k != axis]
        r = identity(len(a))
        r[:, p, p], r[:, p, q], r[:, q, p], r[:, q, q] = c, -s, s, c
        m = m @ r
    return _finish(m, single)


def shear(coefficients: ArrayLike) -> F64:
    """Shear with the six off-diagonal coefficients ``(zy, zx, yz, yx, xz, xy)``.

    ``in_z = out_z + zy * out_y + zx * out_x`` and so on.
    """
    s, single = _batch(coefficients, 6)
    m = identity(len(s))
    m[:, 0, 1], m[:, 0, 2] = s[:, 0], s[:, 1]
    m[:, 1, 0], m[:, 1, 2] = s[:, 2], s[:, 3]
    m[:, 2, 0], m[:, 2, 1] = s[:, 4], s[:, 5]
    return _finish(m, single)


def flip(mask: ArrayLike, shape: ArrayLike) -> F64:
    """Mirror the axes where ``mask`` is true within a grid of ``shape``: ``in = n - 1 - out``."""
    f, single = _batch(np.asarray(mask, dtype=np.float64), 3)
    n, _ = _batch(shape, 3)
    m = identity(len(f))
    sign = np.where(f > 0.5, -1.0, 1.0)
    for k in range(3):
        m[:, k, k] = sign[:, k]
        m[:, k, 3] = np.where(f[:, k] > 0.5, n[:, k] - 1.0, 0.0)
    return _finish(m, single)


def permutation(order: ArrayLike) -> F64:
    """Axis permutation like ``np.transpose(x, order)``: output axis j reads input axis order[j]."""
    o = np.atleast_2d(np.asarray(order, dtype=np.int64))
    single = np.asarray(order).ndim == 1
    m = identity(len(o))
    m[:, :3, :3] = 0.0
    for b, row in enumerate(o):
        if sorted(row.tolist()) != [0, 1, 2]:
            raise ValueError(f"order must be a permutation of (0, 1, 2), got {row.tolist()}")
        for j, k in enumerate(row):
            m[b, k, j] = 1.0
    return _finish(m, single)


def centre(shape: ArrayLike) -> F64:
    """Centre of a grid of ``shape`` in index coordinates, ``(n - 1) / 2``."""
    return (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0


def about(linear: F64, out_centre: ArrayLike, in_centre: ArrayLike) -> F64:
    """Pull map that applies ``linear`` about ``out_centre`` and lands on ``in_centre``.

    ``in = in_centre + A @ (out - out_centre)``: the output centre samples the input centre.
    """
    return translation(in_centre) @ linear @ translation(-np.asarray(out_centre, np.float64))


def to_3x4(m: ArrayLike) -> F64:
    """Drop the homogeneous row: ``(..., 4, 4)`` or ``(..., 3, 4)`` -> ``(..., 3, 4)``."""
    a = np.asarray(m, dtype=np.float64)
    if a.shape[-2:] == (4, 4):
        return np.ascontiguousarray(a[..., :3, :])
    if a.shape[-2:] == (3, 4):
        return np.ascontiguousarray(a)
    raise ValueError(f"matrix must have shape (3, 4) or (4, 4) (optionally batched), got {a.shape}")


def to_4x4(m: ArrayLike) -> F64:
    """Add the homogeneous row to ``(..., 3, 4)`` matrices."""
    a = to_3x4(m)
    bottom = np.zeros(a.shape[:-2] + (1, 4))
    bottom[..., 0, 3] = 1.0
    return np.concatenate([a, bottom], axis=-2)


def apply_points(m: ArrayLike, points: ArrayLike) -> F64:
    """Map points ``(..., 3)`` in output index space to input index space."""
    a = to_3x4(m)
    p = np.asarray(points, dtype=np.float64)
    return p @ a[:, :3].T + a[:, 3]


@dataclass(frozen=True)
class ExactMap:
    """A signed axis permutation with an integer offset.

    ``in[k] = sign[k] * out[axis[k]] + offset[k]``.
    """

    axis: tuple[int, int, int]
    sign: tuple[int, int, int]
    offset: tuple[int, int, int]


def as_exact(m: ArrayLike, tol: float = _EXACT_TOL) -> ExactMap | None:
    """Return the :class:`ExactMap` if ``m`` (3x4 or 4x4) is a signed permutation with an
    integer offset (flips, 90-degree rotations, axis swaps, integer crops), else ``None``."""
    a = to_3x4(m)
    lin, off = a[:, :3], a[:, 3]
    rounded = np.rint(lin)
    if np.abs(lin - rounded).max() > tol or np.abs(off - np.rint(off)).max() > tol:
        return None
    if not (np.abs(rounded).sum(axis=1) == 1).all() or not (np.abs(rounded).sum(axis=0) == 1).all():
        return None
    axis = tuple(int(np.flatnonzero(rounded[k])[0]) for k in range(3))
    sign = tuple(int(rounded[k, axis[k]]) for k in range(3))
    return ExactMap(axis=axis, sign=sign, offset=tuple(int(v) for v in np.rint(off)))  # type: ignore[arg-type]
