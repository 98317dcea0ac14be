"""Numba kernel for in-plane warps: every output z-slice is a 2D warp of one source slice.

Pure functions writing into explicit outputs; validation lives in :mod:`augment.slices`.
Conventions are those of :mod:`augment.kernels.cpu` restricted to a plane: ``m`` is a
``(2, 3)`` pull map from output ``(y, x)`` to source ``(y, x)``, voxel centres at integers,
taps outside the slice read ``cval`` (scipy's ``grid-constant``), nearest rounds with
``floor(c + 0.5)``. The bilinear lerp chain and the coordinate arithmetic are the 3D
kernel's with a zero z weight, so interior voxels are bit-identical to the 3D pass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

_JIT: dict[str, Any] = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}


@njit(inline="always", **_JIT)
def _span(b, d, n, x1):
    """Integer x range [lo, hi] within [0, x1) where 0 <= b + d * x < n - 1."""
    lim = n - 1.0
    lo = 0
    hi = x1 - 1
    if abs(d) < 1e-12:
        if not (b >= 0.0 and b < lim):
            return x1, x1 - 1
        return lo, hi
    t0 = (0.0 - b) / d
    t1 = (lim - b) / d
    if t0 > t1:
        t0, t1 = t1, t0
    lo = max(lo, int(math.ceil(t0)) - 1)
    hi = min(hi, int(math.floor(t1)) + 1)
    # tighten with the exact expression the loop evaluates
    while lo <= hi:
        c = b + d * lo
        if c >= 0.0 and c < lim:
            break
        lo += 1
    while hi >= lo:
        c = b + d * hi
        if c >= 0.0 and c < lim:
            break
        hi -= 1
    return lo, hi


@njit(inline="always", **_JIT)
def _tap(src, z, y, x, ny, nx, fill):
    if y < 0 or x < 0 or y >= ny or x >= nx:
        return fill
    return float(src[z, y, x])


@njit(**_JIT)
def warp_slices(src, m, zmap, out, z0, z1, cval, linear):
    """Resample output slices ``z0 <= z < z1``: ``out[z]`` warps ``src[zmap[z]]``.

    Args:
        src: ``(D, H, W)`` source, any real dtype.
        m: ``(2, 3)`` float64 in-plane pull map (output (y, x) -> source (y, x)).
        zmap: ``(d,)`` int64 source slice of each output slice; < 0 means all ``cval``.
        out: ``(d, h, w)`` output: float32 for ``linear``, else any dtype (nearest).
        z0, z1: the output slices to compute.
        cval: value outside the source.
        linear: bilinear if True, else nearest.
    """
    ny, nx = src.shape[1], src.shape[2]
    oh, ow = out.shape[1], out.shape[2]
    fy, fx = float(ny), float(nx)
    dy, dx = m[0, 1], m[1, 1]
    for z in range(z0, z1):
        zs = zmap[z]
        if zs < 0:
            for y in range(oh):
                for x in range(ow):
                    out[z, y, x] = cval
            continue
        for y in range(oh):
            by = m[0, 0] * y + m[0, 2]
            bx = m[1, 0] * y + m[1, 2]
            lo0, hi0 = _span(by, dy, fy, ow)
            lo1, hi1 = _span(bx, dx, fx, ow)
            lo = max(lo0, lo1)
            hi = min(hi0, hi1)
            if hi < lo:
                lo = ow
                hi = ow - 1
            for x in range(lo, hi + 1):
                cy = by + dy * x
                cx = bx + dx * x
                iy = int(cy)
                ix = int(cx)
                if linear:
                    wy = np.float32(cy - iy)
                    wx = np.float32(cx - ix)
                    a0 = np.float32(src[zs, iy, ix])
                    a1 = np.float32(src[zs, iy, ix + 1])
                    a2 = np.float32(src[zs, iy + 1, ix])
                    a3 = np.float32(src[zs, iy + 1, ix + 1])
                    b0 = a0 + (a1 - a0) * wx
                    b1 = a2 + (a3 - a2) * wx
                    out[z, y, x] = b0 + (b1 - b0) * wy
                else:
                    out[z, y, x] = src[zs, int(cy + 0.5), int(cx + 0.5)]
            for x in range(ow):
                if x >= lo and x <= hi:
                    continue
                cy = by + dy * x
                cx = bx + dx * x
                if linear:
                    gy = math.floor(cy)
                    gx = math.floor(cx)
                    ty = cy - gy
                    tx = cx - gx
                    iy = int(gy)
                    ix = int(gx)
                    a0 = _tap(src, zs, iy, ix, ny, nx, cval)
                    a1 = _tap(src, zs, iy, ix + 1, ny, nx, cval)
                    a2 = _tap(src, zs, iy + 1, ix, ny, nx, cval)
                    a3 = _tap(src, zs, iy + 1, ix + 1, ny, nx, cval)
                    b0 = a0 + (a1 - a0) * tx
                    b1 = a2 + (a3 - a2) * tx
                    out[z, y, x] = b0 + (b1 - b0) * ty
                else:
                    ry = int(math.floor(cy + 0.5))
                    rx = int(math.floor(cx + 0.5))
                    if ry < 0 or rx < 0 or ry >= ny or rx >= nx:
                        out[z, y, x] = cval
                    else:
                        out[z, y, x] = src[zs, ry, rx]
