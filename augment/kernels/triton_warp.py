"""The CUDA Triton kernel: a whole batch resampled in one launch.

Imported lazily (never by ``import augment``); needs ``triton``. Semantics are those of the
numba kernel (:mod:`augment.kernels.cpu`): pull maps from output to input index, voxel
centres at integers, trilinear image with every outside tap reading ``cval``, nearest
label with ``floor(c + 0.5)`` (or one-hot linear), then the fused intensity program of
:mod:`augment.kernels.program` on every image voxel, padding included.

Design (each choice is about the W1 workload, 8 x 128^3 patches of 200x256x256 sources):

- One program instance per tile of ``TY x TX`` output voxels of one z-plane of one sample;
  tiles enumerate x fastest, then y, z and the sample, so instances resident together
  read neighbouring source regions (L2 reuse), and the stores are contiguous along x.
- Coordinates in 32.32 fixed point (int64): the host rounds ``M * 2**32`` once and the
  kernel's affine steps are exact integer arithmetic, so integer parts and weights agree
  with the float64 CPU path to about 1e-9 (float32 coordinates lose up to 1e-5 at index
  255). The integer part is the high word; the weight is the low word times ``2**-32``.
- Per tile, the four corners bound the coordinates exactly (they are affine), so a scalar
  test picks an unmasked path for tiles whose 8 taps are all inside; only border tiles
  pay for masks.
- Offsets inside a sample are int32; each sample's base is an int64 pointer offset, so a
  batch may exceed 2**31 elements. Differently sized sources are read in place: their
  element offsets relative to the first tensor go in the per-sample table.
- All per-sample numbers (offsets, shapes, fixed-point matrix, padded program with its
  float64 words bitcast to int64) travel in ONE int64 table per launch, one async copy.
- The intensity program is unrolled over ``N_OPS`` (constexpr), each op a scalar branch on
  its opcode; padding ops are the identity ``AFFINE(1, 0)``.
- A displacement (``ELASTIC``, a separate specialisation: without it the kernel is the
  affine one) is added to the fixed-point coordinates before the taps. The host contracts
  the control grid's z taps for every output plane (``od * 3 * gy * gx`` floats a sample,
  not one per voxel); each voxel then takes 16 (y, x) taps per component from that small
  plane table (cache-resident), with its B-spline position in 32.32 fixed point. A tile
  is unmasked when its affine corners clear the borders by the largest control vector.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from numpy.typing import NDArray

from augment import matrices as mx
from augment.kernels import bspline
from augment.kernels.program import AFFINE, CLIP, GAMMA, NOISE, pad
from augment.kernels.torch_fallback import spline_matrix

FIX_ONE = float(1 << 32)
META_FIXED = 5  # img_off, lab_off, D, H, W, then 12 fixed-point matrix words, then program
META_PROG = META_FIXED + 12
ELASTIC_WORDS = 8  # after the program: plane offset, gy, gx, y/x steps, dmax z/y/x

# (TY, TX, num_warps, VEC) tried by the tuner; the first is the default. TX = 32 with
# rows spread over warps gives every lane its own x and each thread several rows, which
# spreads the per-tile setup (about 330 SASS instructions, mostly int64 arithmetic) over
# more voxels: for sm_90, 16x32/4 warps is about 143 instructions per voxel (92
# registers), 32x32/4 about 107 (146 registers, fewer resident warps).
Config = tuple[int, int, int, int]
CONFIGS: tuple[Config, ...] = (
    (16, 32, 4, 0),
    (32, 32, 4, 0),
    (8, 32, 4, 0),
    (32, 32, 8, 0),
    (8, 64, 4, 1),
)
TUNE_MIN_VOXELS = 1 << 21
# Programs are padded (identity ops) to a multiple of this, so the few lengths random
# intensity pipelines produce share compiled kernels.
OPS_BUCKET = 4

if (AFFINE, CLIP, GAMMA, NOISE) != (0, 1, 2, 3):  # the kernel compares opcodes to literals
    raise ImportError("augment.kernels.program opcodes changed; update the Triton kernel")


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _normal(key, index):
    """Standard normal of the counter-based generator (``program.noise_reference``): the
    cosine (even ``index``) or sine (odd) of its pair's Box-Muller transform."""
    even = (index >> 1) << 1
    b1 = _mix32(_mix32(even) ^ key)
    b2 = _mix32(_mix32(even + 1) ^ key)
    u1 = ((b1 >> 8).to(tl.float32) + 1.0) * (1.0 / 16777216.0)
    u2 = (b2 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    angle = 6.283185307179586 * u2
    trig = tl.where(index != even, tl.sin(angle), tl.cos(angle))
    return tl.sqrt(-2.0 * tl.log(u1)) * trig


@triton.jit
def _program(v, meta_b, flat, N_OPS: tl.constexpr):
    for k in tl.static_range(N_OPS):
        row = meta_b + 17 + 4 * k
        code = tl.load(row).to(tl.float64, bitcast=True).to(tl.int32)
        a = tl.load(row + 1).to(tl.float64, bitcast=True)
        b = tl.load(row + 2).to(tl.float64, bitcast=True)
        c = tl.load(row + 3).to(tl.float64, bitcast=True)
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        c32 = c.to(tl.float32)
        if code == 0:
            v = v * a32 + b32
        elif code == 1:
            v = tl.minimum(tl.maximum(v, a32), b32)
        elif code == 2:
            t = (v - b32) / (c32 - b32)
            t = tl.minimum(tl.maximum(t, 0.0), 1.0)
            v = b32 + (c32 - b32) * tl.exp2(a32 * tl.log2(t))
        elif code == 3:
            key = b.to(tl.int64).to(tl.uint32)
            v = v + a32 * _normal(key, flat.to(tl.uint32))
    return v


@triton.jit
def _lerp8(a0, a1, a2, a3, a4, a5, a6, a7, wz, wy, wx):
    b0 = a0 + (a1 - a0) * wx
    b1 = a2 + (a3 - a2) * wx
    b2 = a4 + (a5 - a4) * wx
    b3 = a6 + (a7 - a6) * wx
    c0 = b0 + (b1 - b0) * wy
    c1 = b2 + (b3 - b2) * wy
    return c0 + (c1 - c0) * wz


@triton.jit
def _tap(p, m, fill, MASKED: tl.constexpr):
    if MASKED:
        v = tl.where(m, tl.load(p, mask=m, other=0).to(tl.float32), fill)
    else:
        v = tl.load(p).to(tl.float32)
    return v


@triton.jit
def _ltap(p, m, fill, MASKED: tl.constexpr):
    if MASKED:
        v = tl.where(m, tl.load(p, mask=m, other=0).to(tl.int32), fill)
    else:
        v = tl.load(p).to(tl.int32)
    return v


@triton.jit
def _label(
    lab_c,
    inside,
    lcval,
    r,
    q,
    m0,
    m1,
    m2,
    m3,
    m4,
    m5,
    m6,
    m7,
    nx,
    sz,
    wz,
    wy,
    wx,
    cls_ptr,
    LAB_ONEHOT: tl.constexpr,
    N_CLS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One label channel: nearest, or the first class of highest trilinear indicator."""
    if LAB_ONEHOT:
        pq = lab_c + q
        l0 = _ltap(pq, m0, lcval, MASKED)
        l1 = _ltap(pq + 1, m1, lcval, MASKED)
        l2 = _ltap(pq + nx, m2, lcval, MASKED)
        l3 = _ltap(pq + nx + 1, m3, lcval, MASKED)
        l4 = _ltap(pq + sz, m4, lcval, MASKED)
        l5 = _ltap(pq + sz + 1, m5, lcval, MASKED)
        l6 = _ltap(pq + sz + nx, m6, lcval, MASKED)
        l7 = _ltap(pq + sz + nx + 1, m7, lcval, MASKED)
        best = tl.full(wx.shape, -1.0, tl.float32)
        lv = tl.full(wx.shape, 0, tl.int64)
        for k in tl.static_range(N_CLS):
            ck = tl.load(cls_ptr + k)
            w = _lerp8(
                (l0 == ck).to(tl.float32),
                (l1 == ck).to(tl.float32),
                (l2 == ck).to(tl.float32),
                (l3 == ck).to(tl.float32),
                (l4 == ck).to(tl.float32),
                (l5 == ck).to(tl.float32),
                (l6 == ck).to(tl.float32),
                (l7 == ck).to(tl.float32),
                wz,
                wy,
                wx,
            )
            better = w > best
            best = tl.where(better, w, best)
            lv = tl.where(better, ck, lv)
    else:
        if MASKED:
            lv = tl.where(inside, tl.load(lab_c + r, mask=inside, other=0).to(tl.int32), lcval)
        else:
            lv = tl.load(lab_c + r)
    return lv


@triton.jit
def _tile(
    img_b,
    lab_b,
    oimg_b,
    olab_b,
    meta_b,
    cls_ptr,
    vz,
    vy,
    vx,
    nz,
    ny,
    nx,
    out_off,
    store_mask,
    ovol,
    cval,
    lcval,
    NC: tl.constexpr,
    NL: tl.constexpr,
    N_OPS: tl.constexpr,
    LINEAR: tl.constexpr,
    LAB_ONEHOT: tl.constexpr,
    N_CLS: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Resample one tile given its 32.32 fixed-point source coordinates ``vz, vy, vx``."""
    svol = nz * ny * nx
    sz = ny * nx
    # trilinear taps: integer part (high word) and weight (low word) of each coordinate
    if (NC > 0 and LINEAR) or (NL > 0 and LAB_ONEHOT):
        iz = (vz >> 32).to(tl.int32)
        iy = (vy >> 32).to(tl.int32)
        ix = (vx >> 32).to(tl.int32)
        wz = vz.to(tl.uint32).to(tl.float32) * 2.3283064365386963e-10
        wy = vy.to(tl.uint32).to(tl.float32) * 2.3283064365386963e-10
        wx = vx.to(tl.uint32).to(tl.float32) * 2.3283064365386963e-10
        q = (iz * ny + iy) * nx + ix
        z0 = (iz >= 0) & (iz < nz)
        z1 = (iz >= -1) & (iz < nz - 1)
        y0 = (iy >= 0) & (iy < ny)
        y1 = (iy >= -1) & (iy < ny - 1)
        x0 = (ix >= 0) & (ix < nx)
        x1 = (ix >= -1) & (ix < nx - 1)
        m0 = z0 & y0 & x0
        m1 = z0 & y0 & x1
        m2 = z0 & y1 & x0
        m3 = z0 & y1 & x1
        m4 = z1 & y0 & x0
        m5 = z1 & y0 & x1
        m6 = z1 & y1 & x0
        m7 = z1 & y1 & x1
    else:
        q = 0
        m0 = 0
        m1 = 0
        m2 = 0
        m3 = 0
        m4 = 0
        m5 = 0
        m6 = 0
        m7 = 0
        wz = 0
        wy = 0
        wx = 0
    # nearest taps: floor(c + 0.5) is the high word of c + 2**31
    if (NC > 0 and not LINEAR) or (NL > 0 and not LAB_ONEHOT):
        rz = ((vz + 2147483648) >> 32).to(tl.int32)
        ry = ((vy + 2147483648) >> 32).to(tl.int32)
        rx = ((vx + 2147483648) >> 32).to(tl.int32)
        r = (rz * ny + ry) * nx + rx
        inside = (rz >= 0) & (rz < nz) & (ry >= 0) & (ry < ny) & (rx >= 0) & (rx < nx)
    else:
        r = 0
        inside = 0

    # the first label channel is loaded before any store: the compiler cannot move a load
    # past a store that might alias it, and this keeps all taps of a voxel in flight at once
    if NL > 0:
        lab0 = _label(
            lab_b,
            inside,
            lcval,
            r,
            q,
            m0,
            m1,
            m2,
            m3,
            m4,
            m5,
            m6,
            m7,
            nx,
            sz,
            wz,
            wy,
            wx,
            cls_ptr,
            LAB_ONEHOT,
            N_CLS,
            MASKED,
        )
    for c in tl.static_range(NC):
        p = img_b + c * svol
        if LINEAR:
            pq = p + q
            v = _lerp8(
                _tap(pq, m0, cval, MASKED),
                _tap(pq + 1, m1, cval, MASKED),
                _tap(pq + nx, m2, cval, MASKED),
                _tap(pq + nx + 1, m3, cval, MASKED),
                _tap(pq + sz, m4, cval, MASKED),
                _tap(pq + sz + 1, m5, cval, MASKED),
                _tap(pq + sz + nx, m6, cval, MASKED),
                _tap(pq + sz + nx + 1, m7, cval, MASKED),
                wz,
                wy,
                wx,
            )
        else:
            v = _tap(p + r, inside, cval, MASKED)
        if N_OPS > 0:
            v = _program(v, meta_b, out_off + c * ovol, N_OPS)
        dst = oimg_b + c * ovol + out_off
        if EVEN:
            tl.store(dst, v.to(oimg_b.dtype.element_ty))
        else:
            tl.store(dst, v.to(oimg_b.dtype.element_ty), mask=store_mask)
    for c in tl.static_range(NL):
        if c == 0:
            lv = lab0
        else:
            lv = _label(
                lab_b + c * svol,
                inside,
                lcval,
                r,
                q,
                m0,
                m1,
                m2,
                m3,
                m4,
                m5,
                m6,
                m7,
                nx,
                sz,
                wz,
                wy,
                wx,
                cls_ptr,
                LAB_ONEHOT,
                N_CLS,
                MASKED,
            )
        dst = olab_b + c * ovol + out_off
        if EVEN:
            tl.store(dst, lv.to(olab_b.dtype.element_ty))
        else:
            tl.store(dst, lv.to(olab_b.dtype.element_ty), mask=store_mask)


@triton.jit
def _bspline4(t):
    """Cubic B-spline weights of the points j - 1 .. j + 2 at fraction ``t`` in [0, 1]."""
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    return (
        s * s * s * (1.0 / 6.0),
        (3.0 * t3 - 6.0 * t2 + 4.0) * (1.0 / 6.0),
        (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) * (1.0 / 6.0),
        t3 * (1.0 / 6.0),
    )


@triton.jit
def _interval(i, step_fx, g):
    """Interval and fraction of output index ``i`` along an axis with ``g`` control points,
    ``u = 1 + i * step`` in 32.32 fixed point, clipped to ``g - 2``
    (:mod:`augment.kernels.bspline`)."""
    u = (1 << 32) + i.to(tl.int64) * step_fx
    u = tl.minimum(u, (g - 2).to(tl.int64) << 32)
    j = tl.minimum(u >> 32, (g - 3).to(tl.int64))
    t = (u - (j << 32)).to(tl.float32) * 2.3283064365386963e-10
    return j.to(tl.int32), t


@triton.jit
def _displace(plane, gy, gx, yy, xx, sy_fx, sx_fx):
    """The displacement (z, y, x components, float32) of the tile's voxels ``(yy, xx)`` of
    one output plane, from that plane's ``(3, gy, gx)`` z-contracted control vectors:
    16 taps per component."""
    jy, ty = _interval(yy, sy_fx, gy)
    jx, tx = _interval(xx, sx_fx, gx)
    wy0, wy1, wy2, wy3 = _bspline4(ty)
    wx0, wx1, wx2, wx3 = _bspline4(tx)
    cstride = gy * gx
    dz = ty * tx * 0.0
    dy = dz
    dx = dz
    for b in tl.static_range(4):
        if b == 0:
            wy = wy0
        elif b == 1:
            wy = wy1
        elif b == 2:
            wy = wy2
        else:
            wy = wy3
        row = (jy - 1 + b) * gx + jx - 1
        for k in tl.static_range(4):
            if k == 0:
                wx = wx0
            elif k == 1:
                wx = wx1
            elif k == 2:
                wx = wx2
            else:
                wx = wx3
            w = wy * wx
            p = plane + row + k
            dz += w * tl.load(p)
            dy += w * tl.load(p + cstride)
            dx += w * tl.load(p + 2 * cstride)
    return dz, dy, dx


# The output shape stays unspecialised: specialised (ow % 16 == 0), Triton vectorises the
# stores and lays lanes out 2-4 voxels apart along x, which spreads each gather over more
# cache lines. ``VEC`` brings the specialised width back (``ow_s``) for the tuner to try.
@triton.jit(do_not_specialize=["od", "oh", "ow", "tiles_y", "tiles_x"])
def warp_kernel(
    img_ptr,
    lab_ptr,
    out_img_ptr,
    out_lab_ptr,
    meta_ptr,
    cls_ptr,
    fld_ptr,
    od,
    oh,
    ow,
    ow_s,
    tiles_y,
    tiles_x,
    meta_stride,
    cval,
    lcval,
    NC: tl.constexpr,
    NL: tl.constexpr,
    N_OPS: tl.constexpr,
    LINEAR: tl.constexpr,
    LAB_ONEHOT: tl.constexpr,
    N_CLS: tl.constexpr,
    TY: tl.constexpr,
    TX: tl.constexpr,
    EVEN: tl.constexpr,
    VEC: tl.constexpr,
    ELASTIC: tl.constexpr = False,
):
    """Resample tile ``program_id(0)`` of sample ``program_id(1)``.

    ``meta`` row of a sample (int64): image and label element offsets relative to
    ``img_ptr`` / ``lab_ptr``, source (D, H, W), the (3, 4) pull map in 32.32 fixed point,
    then ``N_OPS`` program rows of four float64 words (bitcast), then with ``ELASTIC``
    the displacement's words (:data:`ELASTIC_WORDS`): the element offset of the sample's
    ``(od, 3, gy, gx)`` float32 plane table in ``fld_ptr`` (the control vectors with the
    z taps contracted per output plane), gy, gx, the y and x steps in 32.32 fixed point
    and the largest displacement per axis (fixed point).
    """
    t = tl.program_id(0)
    b = tl.program_id(1)
    tx = t % tiles_x
    rest = t // tiles_x
    ty = rest % tiles_y
    z = rest // tiles_y
    y0 = ty * TY
    x0 = tx * TX

    meta_b = meta_ptr + b.to(tl.int64) * meta_stride
    img_b = img_ptr + tl.load(meta_b)
    lab_b = lab_ptr + tl.load(meta_b + 1)
    nz = tl.load(meta_b + 2).to(tl.int32)
    ny = tl.load(meta_b + 3).to(tl.int32)
    nx = tl.load(meta_b + 4).to(tl.int32)

    jy = tl.arange(0, TY)[:, None]
    jx = tl.arange(0, TX)[None, :]
    zz = z.to(tl.int64)
    yy0 = y0.to(tl.int64)
    xx0 = x0.to(tl.int64)
    # 32.32 fixed-point coordinates of the tile, exact affine steps
    mz0 = tl.load(meta_b + 5)
    mz1 = tl.load(meta_b + 6)
    mz2 = tl.load(meta_b + 7)
    mz3 = tl.load(meta_b + 8)
    my0 = tl.load(meta_b + 9)
    my1 = tl.load(meta_b + 10)
    my2 = tl.load(meta_b + 11)
    my3 = tl.load(meta_b + 12)
    mx0 = tl.load(meta_b + 13)
    mx1 = tl.load(meta_b + 14)
    mx2 = tl.load(meta_b + 15)
    mx3 = tl.load(meta_b + 16)
    bz = mz0 * zz + mz1 * yy0 + mz2 * xx0 + mz3
    by = my0 * zz + my1 * yy0 + my2 * xx0 + my3
    bx = mx0 * zz + mx1 * yy0 + mx2 * xx0 + mx3
    vz = (bz + mz1 * jy) + mz2 * jx
    vy = (by + my1 * jy) + my2 * jx
    vx = (bx + mx1 * jy) + mx2 * jx

    # exact bounds of the tile's coordinates: the extremes sit at its corners
    ey = TY - 1
    ex = TX - 1
    lo_z = bz + tl.minimum(mz1 * ey, 0) + tl.minimum(mz2 * ex, 0)
    hi_z = bz + tl.maximum(mz1 * ey, 0) + tl.maximum(mz2 * ex, 0)
    lo_y = by + tl.minimum(my1 * ey, 0) + tl.minimum(my2 * ex, 0)
    hi_y = by + tl.maximum(my1 * ey, 0) + tl.maximum(my2 * ex, 0)
    lo_x = bx + tl.minimum(mx1 * ey, 0) + tl.minimum(mx2 * ex, 0)
    hi_x = bx + tl.maximum(mx1 * ey, 0) + tl.maximum(mx2 * ex, 0)
    if ELASTIC:
        # every voxel moves by the spline of the control vectors: at most dmax per axis
        e = meta_b + 17 + 4 * N_OPS
        plane = fld_ptr + tl.load(e) + z.to(tl.int64) * (3 * tl.load(e + 1) * tl.load(e + 2))
        gy = tl.load(e + 1).to(tl.int32)
        gx = tl.load(e + 2).to(tl.int32)
        dmz = tl.load(e + 5)
        dmy = tl.load(e + 6)
        dmx = tl.load(e + 7)
        lo_z = lo_z - dmz
        hi_z = hi_z + dmz
        lo_y = lo_y - dmy
        hi_y = hi_y + dmy
        lo_x = lo_x - dmx
        hi_x = hi_x + dmx
        fz, fy, fx = _displace(plane, gy, gx, y0 + jy, x0 + jx, tl.load(e + 3), tl.load(e + 4))
        vz = vz + (fz * 4294967296.0).to(tl.int64)
        vy = vy + (fy * 4294967296.0).to(tl.int64)
        vx = vx + (fx * 4294967296.0).to(tl.int64)
    interior = (
        (lo_z >= 0)
        & (hi_z < ((nz - 1).to(tl.int64) << 32))
        & (lo_y >= 0)
        & (hi_y < ((ny - 1).to(tl.int64) << 32))
        & (lo_x >= 0)
        & (hi_x < ((nx - 1).to(tl.int64) << 32))
    )

    if VEC:
        width = ow_s
    else:
        width = ow
    yy = y0 + jy
    xx = x0 + jx
    ovol = od * oh * width
    out_off = (z * oh + yy) * width + xx
    store_mask = (yy < oh) & (xx < ow)
    oimg_b = out_img_ptr + b.to(tl.int64) * (NC * ovol)
    olab_b = out_lab_ptr + b.to(tl.int64) * (NL * ovol)
    if interior:
        _tile(
            img_b,
            lab_b,
            oimg_b,
            olab_b,
            meta_b,
            cls_ptr,
            vz,
            vy,
            vx,
            nz,
            ny,
            nx,
            out_off,
            store_mask,
            ovol,
            cval,
            lcval,
            NC,
            NL,
            N_OPS,
            LINEAR,
            LAB_ONEHOT,
            N_CLS,
            False,
            EVEN,
        )
    else:
        _tile(
            img_b,
            lab_b,
            oimg_b,
            olab_b,
            meta_b,
            cls_ptr,
            vz,
            vy,
            vx,
            nz,
            ny,
            nx,
            out_off,
            store_mask,
            ovol,
            cval,
            lcval,
            NC,
            NL,
            N_OPS,
            LINEAR,
            LAB_ONEHOT,
            N_CLS,
            True,
            EVEN,
        )


# -- host side ------------------------------------------------------------------------------
def _sources(
    src: Any,
) -> tuple[torch.Tensor, NDArray[np.int64], NDArray[np.int64], int, list[torch.Tensor]]:
    """Reference tensor, per-sample element offsets relative to it, shapes ``(B, 3)``,
    channels, and the tensors to keep alive until the launch is queued."""
    if isinstance(src, torch.Tensor):
        x = src if src.is_contiguous() else src.contiguous()
        b, c, d, h, w = x.shape
        offsets = np.arange(b, dtype=np.int64) * (c * d * h * w)
        shapes = np.empty((b, 3), dtype=np.int64)
        shapes[:] = (d, h, w)
        return x, offsets, shapes, c, [x]
    parts = [s if s.is_contiguous() else s.contiguous() for s in src]
    ref = parts[0]
    size = ref.element_size()
    offsets = np.empty(len(parts), dtype=np.int64)
    for i, p in enumerate(parts):
        delta = p.data_ptr() - ref.data_ptr()
        if delta % size:
            raise ValueError(f"source {i} is not aligned to its {size}-byte elements")
        offsets[i] = delta // size
    shapes = np.asarray([p.shape[1:] for p in parts], dtype=np.int64).reshape(-1, 3)
    return ref, offsets, shapes, int(ref.shape[0]), parts


def fixed_point(matrices: NDArray[np.float64]) -> NDArray[np.int64]:
    """``(B, 3, 4)`` pull maps -> 32.32 fixed point, int64 ``(B, 12)``."""
    m = mx.to_3x4(matrices).reshape(-1, 12)
    if np.abs(m).max(initial=0.0) >= 2.0**30:
        raise ValueError(f"matrix entries must stay below 2**30 in magnitude, got {m.tolist()}")
    return np.rint(m * FIX_ONE).astype(np.int64)


def build_meta(
    img_offsets: NDArray[np.int64],
    lab_offsets: NDArray[np.int64],
    shapes: NDArray[np.int64],
    matrices: NDArray[np.float64],
    programs: NDArray[np.float64],
    elastic: NDArray[np.int64] | None = None,
) -> NDArray[np.int64]:
    """The per-sample int64 table the kernel reads (see :func:`warp_kernel`).

    Shape:
        offsets ``(B,)``, shapes ``(B, 3)``, matrices ``(B, 3, 4)``, programs
        ``(B, n_ops, 4)``, elastic ``(B, 8)`` (:func:`elastic_words`) ->
        ``(B, 17 + 4 * n_ops [+ 8])``.
    """
    b = len(shapes)
    n_ops = programs.shape[1]
    n_el = 0 if elastic is None else ELASTIC_WORDS
    meta = np.empty((b, META_PROG + 4 * n_ops + n_el), dtype=np.int64)
    meta[:, 0] = img_offsets
    meta[:, 1] = lab_offsets
    meta[:, 2:5] = shapes
    meta[:, META_FIXED:META_PROG] = fixed_point(matrices)
    if n_ops:
        words = np.ascontiguousarray(programs, dtype=np.float64).reshape(b, -1)
        meta[:, META_PROG : META_PROG + 4 * n_ops] = words.view(np.int64)
    if elastic is not None:
        meta[:, META_PROG + 4 * n_ops :] = elastic
    return meta


def elastic_words(field: NDArray[np.float64], out_shape: tuple[int, int, int]) -> NDArray[np.int64]:
    """The kernel's displacement words per sample (see :func:`warp_kernel`), for plane
    tables stored one sample after another.

    Shape:
        field ``(B, 3, gz, gy, gx)`` -> ``(B, 8)``.
    """
    b, _, _, gy, gx = field.shape
    od, oh, ow = out_shape
    words = np.empty((b, ELASTIC_WORDS), dtype=np.int64)
    words[:, 0] = np.arange(b) * (od * 3 * gy * gx)
    words[:, 1] = gy
    words[:, 2] = gx
    words[:, 3] = round(bspline.step(oh, gy) * FIX_ONE)
    words[:, 4] = round(bspline.step(ow, gx) * FIX_ONE)
    # the float32 spline may pass the float64 bound by a few ulps; a margin covers it
    dmax = bspline.bound(field) * (1.0 + 1e-5) + 1e-6
    words[:, 5:8] = np.ceil(dmax * FIX_ONE).astype(np.int64)
    return words


def plane_tables(field: torch.Tensor, od: int) -> torch.Tensor:
    """``(B, od, 3, gy, gx)`` float32: the control vectors with the z taps contracted for
    each output plane (``od * 3 * gy * gx`` numbers a sample, not one per voxel).

    Shape:
        field: ``(B, 3, gz, gy, gx)`` float64 on the device.
    """
    bz = spline_matrix(od, int(field.shape[2]), field.device)
    return torch.einsum("zi,bcijk->bzcjk", bz, field).to(torch.float32).contiguous()


def to_device(a: NDArray[Any], device: torch.device) -> torch.Tensor:
    """Host array -> device tensor; on CUDA through pinned memory, without a host sync."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_TUNED: dict[tuple[Any, ...], Config] = {}
# (signature key, config, best ms) of every tuning run, for reports
TUNE_LOG: list[tuple[tuple[Any, ...], Config, float]] = []


def as_config(cfg: Sequence[int]) -> Config:
    """``(TY, TX, num_warps[, VEC])`` -> a full config; TY, TX powers of two."""
    vals = tuple(int(v) for v in cfg)
    if len(vals) not in (3, 4) or any(v <= 0 or v & (v - 1) for v in vals[:3]):
        raise ValueError(f"config must be (TY, TX, num_warps[, VEC]) powers of two, got {cfg!r}")
    return (vals[0], vals[1], vals[2], vals[3] if len(vals) == 4 else 0)


def env_config() -> Config | None:
    """``AUGMENT_TRITON_CONFIG="TY,TX,num_warps[,VEC]"`` fixes the launch (experiments)."""
    raw = os.environ.get("AUGMENT_TRITON_CONFIG")
    if not raw:
        return None
    return as_config([int(v) for v in raw.split(",")])


def launch(
    args: tuple[Any, ...],
    tail: tuple[Any, ...],
    out_shape: tuple[int, int, int],
    batch: int,
    consts: dict[str, Any],
    config: Config,
) -> None:
    """Queue one :func:`warp_kernel` launch over the whole batch."""
    ty, tx, nw, vec = config
    od, oh, ow = out_shape
    tiles_y, tiles_x = -(-oh // ty), -(-ow // tx)
    grid = (od * tiles_y * tiles_x, batch)
    warp_kernel[grid](
        *args,
        od,
        oh,
        ow,
        ow,
        tiles_y,
        tiles_x,
        *tail,
        TY=ty,
        TX=tx,
        EVEN=(oh % ty == 0 and ow % tx == 0),
        VEC=bool(vec),
        num_warps=nw,
        **consts,
    )


def _tune(
    args: tuple[Any, ...],
    tail: tuple[Any, ...],
    out_shape: tuple[int, int, int],
    batch: int,
    consts: dict[str, Any],
    key: tuple[Any, ...],
) -> Config:
    """The fastest of :data:`CONFIGS` on this launch (CUDA events, best of 3 after one)."""
    best, best_t = CONFIGS[0], float("inf")
    for cfg in CONFIGS:
        times = []
        for _ in range(4):
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            launch(args, tail, out_shape, batch, consts, cfg)
            stop.record()
            stop.synchronize()  # host sync: tuning only, once per kernel signature
            times.append(start.elapsed_time(stop))
        t = min(times[1:])
        TUNE_LOG.append((key, cfg, t))
        if t < best_t:
            best, best_t = cfg, t
    return best


def tuned_configs() -> dict[tuple[Any, ...], Config]:
    """The configurations chosen so far, by launch signature (for reports)."""
    return dict(_TUNED)


@dataclass
class Prepared:
    """One batch ready to launch: calling it queues the kernel and returns the outputs.

    Calling it again re-runs the same launch into the same outputs (kernel-only timing).
    """

    args: tuple[Any, ...]
    tail: tuple[Any, ...]
    out_shape: tuple[int, int, int]
    batch: int
    consts: dict[str, Any]
    config: Config
    out_img: torch.Tensor | None
    out_lab: torch.Tensor | None
    keep: list[torch.Tensor] = field(default_factory=list)  # sources of a list, contiguous

    def __call__(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        launch(self.args, self.tail, self.out_shape, self.batch, self.consts, self.config)
        return self.out_img, self.out_lab


def prepare(
    images: torch.Tensor | Sequence[torch.Tensor] | None,
    labels: torch.Tensor | Sequence[torch.Tensor] | None,
    matrices: NDArray[np.float64],
    out_shape: tuple[int, int, int],
    *,
    image_order: int = 1,
    cval: float = 0.0,
    label_cval: int = 0,
    programs: NDArray[np.float64] | None = None,
    out_dtype: torch.dtype = torch.float32,
    label_mode: str = "nearest",
    classes: torch.Tensor | None = None,
    config: Sequence[int] | None = None,
    tune: bool = True,
    field: NDArray[np.float64] | None = None,
) -> Prepared:
    """Everything :func:`warp_batch` does short of the launch: the per-sample table (one
    async copy), the outputs, the launch configuration (tuned once per signature)."""
    keep: list[torch.Tensor] = []
    img = lab = None
    nc = nl = 0
    shapes = np.zeros((0, 3), np.int64)
    if images is not None:
        img, ioff, shapes, nc, kept = _sources(images)
        keep += kept
    if labels is not None:
        lab, loff, shapes, nl, kept = _sources(labels)
        keep += kept
    ref = img if img is not None else lab
    assert ref is not None
    device = ref.device
    batch = len(shapes)
    if img is None:
        ioff = np.zeros(batch, np.int64)
    if lab is None:
        loff = np.zeros(batch, np.int64)
    m = mx.to_3x4(matrices)
    prog = programs if img is not None and programs is not None else np.zeros((batch, 0, 4))
    if prog.shape[1] % OPS_BUCKET:
        prog = pad(list(prog), -(-prog.shape[1] // OPS_BUCKET) * OPS_BUCKET)
    od, oh, ow = (int(s) for s in out_shape)
    ovol = od * oh * ow
    svol = int(shapes.prod(axis=1).max())
    if max(nc, nl, 1) * max(svol, ovol) >= 2**31:
        raise ValueError("one sample's source or output exceeds 2**31 elements")

    elastic = None if field is None else elastic_words(field, (od, oh, ow))
    meta = to_device(build_meta(ioff, loff, shapes, m, prog, elastic), device)
    planes = None
    if field is not None:
        planes = plane_tables(to_device(np.asarray(field, dtype=np.float64), device), od)
        keep.append(planes)
    out_img = (
        torch.empty((batch, nc, od, oh, ow), dtype=out_dtype, device=device)
        if img is not None
        else None
    )
    out_lab = (
        torch.empty((batch, nl, od, oh, ow), dtype=lab.dtype, device=device)
        if lab is not None
        else None
    )
    onehot = lab is not None and label_mode == "linear_onehot"
    cls = meta  # any int64 tensor: unused without one-hot labels
    if onehot:
        assert classes is not None
        cls = classes.to(device=device, dtype=torch.int64).contiguous()
    dummy = out_img if out_img is not None else out_lab
    args = (
        img if img is not None else dummy,
        lab if lab is not None else dummy,
        dummy if out_img is None else out_img,
        dummy if out_lab is None else out_lab,
        meta,
        cls,
        planes if planes is not None else dummy,
    )
    tail = (int(meta.shape[1]), float(cval), int(label_cval))
    consts = {
        "NC": nc,
        "NL": nl,
        "N_OPS": int(prog.shape[1]),
        "LINEAR": image_order == 1,
        "LAB_ONEHOT": onehot,
        "N_CLS": int(cls.numel()) if onehot else 0,
        "ELASTIC": planes is not None,
    }

    cfg = as_config(config) if config is not None else env_config()
    if cfg is None:
        # the program length and class count hardly change the best tile: not in the key
        shape_consts = {k: v for k, v in consts.items() if k not in ("N_OPS", "N_CLS")}
        key = (
            str(device),
            str(ref.dtype),
            str(None if lab is None else lab.dtype),
            str(out_dtype),
            tuple(sorted(shape_consts.items())),
            (od, oh, ow),
            batch,
        )
        cfg = _TUNED.get(key)
        if cfg is None:
            if tune and device.type == "cuda" and batch * ovol >= TUNE_MIN_VOXELS:
                cfg = _TUNED[key] = _tune(args, tail, (od, oh, ow), batch, consts, key)
            else:
                cfg = CONFIGS[0]
    return Prepared(args, tail, (od, oh, ow), batch, consts, cfg, out_img, out_lab, keep)


def warp_batch(
    images: torch.Tensor | Sequence[torch.Tensor] | None,
    labels: torch.Tensor | Sequence[torch.Tensor] | None,
    matrices: NDArray[np.float64],
    out_shape: tuple[int, int, int],
    *,
    image_order: int = 1,
    cval: float = 0.0,
    label_cval: int = 0,
    programs: NDArray[np.float64] | None = None,
    out_dtype: torch.dtype = torch.float32,
    label_mode: str = "nearest",
    classes: torch.Tensor | None = None,
    config: Sequence[int] | None = None,
    tune: bool = True,
    field: NDArray[np.float64] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Resample a batch in one Triton launch; the signature of
    :func:`augment.kernels.torch_fallback.warp_batch` plus launch settings. Takes checked
    values as they are (the checks live in :mod:`augment.backends.torch`).

    Args:
        images: ``(B, C, D, H, W)`` or a list of ``(C, D_b, H_b, W_b)`` tensors (float32,
            float16, bfloat16, int16, ...), or None. A list is read in place.
        labels: the same layout with an integer dtype (the images' shapes), or None.
        matrices: ``(B, 3, 4)`` / ``(B, 4, 4)`` float64 pull maps (host array).
        out_shape: ``(d, h, w)``.
        image_order, cval, label_cval, programs, out_dtype, label_mode: as the torch
            fallback. classes: sorted int64 classes, needed for ``linear_onehot``.
        config: ``(TY, TX, num_warps[, VEC])``; default: env ``AUGMENT_TRITON_CONFIG``,
            else the one tuned once per launch signature on large launches, else
            ``CONFIGS[0]``.
        tune: allow that one-off tuning.
        field: ``(B, 3, gz, gy, gx)`` float64 control vectors of a displacement added to
            every coordinate (see :class:`augment.plan.Plan`), or None.

    Returns:
        ``(image, label)``: ``(B, C, d, h, w)`` in ``out_dtype``, ``(B, L, d, h, w)`` in the
        label dtype; None where the input was None.
    """
    return prepare(
        images,
        labels,
        matrices,
        out_shape,
        image_order=image_order,
        cval=cval,
        label_cval=label_cval,
        programs=programs,
        out_dtype=out_dtype,
        label_mode=label_mode,
        classes=classes,
        config=config,
        tune=tune,
        field=field,
    )()
