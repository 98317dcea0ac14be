"""Numba CPU kernels: one fused resampling pass for image and label.

Pure functions that write into explicit outputs. Validation, dtype handling and dispatch
live in :mod:`augment.backends.numpy`. Conventions (see ``augment.matrices``): ``m`` is a 3x4 pull
map from output index to input index; voxel centres at integers; samples whose taps fall
outside the source read the constant (``cval`` for images, ``lcval`` for labels), i.e.
scipy.ndimage's ``mode="grid-constant"``. Nearest neighbour rounds with
``floor(c + 0.5)``.

Each output row (z, y) is split into an interior span, where all eight trilinear taps are
inside the source and no bounds checks are needed, and border spans handled per tap.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from augment.kernels.program import AFFINE, CLIP, GAMMA, HASH_M1, HASH_M2, MASK32, NOISE, TWO_PI

_JIT: dict[str, Any] = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}
# Compile time is the first thing a new user waits for. The helpers below are plain calls,
# not inlined into their callers' numba IR (``inline="always"``): LLVM inlines them all the
# same (W1 kernel time 0.99-1.02x in interleaved rounds, outputs bit-identical), and the
# callers' type inference no longer redoes them at every call site. With the prange loops
# passing their index as int64 (``np.int64(b)``: the parallel loop body sees it as uint64,
# which compiled ``_block`` a second time), a fresh process's first call (W1's compile
# benchmark) with an empty NUMBA_CACHE_DIR takes 0.66-0.69x the CPU time it took (14.7 to
# 9.8 s, medians of 5 interleaved runs on the 2-core VM); with the cache warm its first
# call is unchanged (0.50 s).


@njit(**_JIT)
def _mix32(x):
    x = x & MASK32
    x ^= x >> 16
    x = (x * HASH_M1) & MASK32
    x ^= x >> 15
    x = (x * HASH_M2) & MASK32
    x ^= x >> 16
    return x


@intrinsic
def _hash32(typingctx, c, key):
    """``_mix32(_mix32(c) ^ key)`` on the low 32 bits of the integers ``c`` and ``key``,
    in 32-bit operations (numba widens uint32 arithmetic to 64 bits, which halves the
    vector lanes and needs 64-bit multiplies)."""
    if not (isinstance(c, types.Integer) and isinstance(key, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)

        def low(v, t):
            if t.bitwidth > 32:
                return builder.trunc(v, i32)
            return v if t.bitwidth == 32 else builder.zext(v, i32)

        def mix(x):
            x = builder.xor(x, builder.lshr(x, i32(16)))
            x = builder.mul(x, i32(HASH_M1))
            x = builder.xor(x, builder.lshr(x, i32(15)))
            x = builder.mul(x, i32(HASH_M2))
            return builder.xor(x, builder.lshr(x, i32(16)))

        x = mix(low(args[0], sig.args[0]))
        return mix(builder.xor(x, low(args[1], sig.args[1])))

    return types.uint32(c, key), codegen


@njit(**_JIT)
def _normal(seed, index):
    key = np.uint64(seed) & MASK32
    even = np.uint64(index) & ~np.uint64(1)  # voxels 2j and 2j + 1 share pair j's draws
    b1 = _mix32(_mix32(even) ^ key)
    b2 = _mix32(_mix32(even + np.uint64(1)) ^ key)
    u1 = (float(b1 >> 8) + 1.0) * (1.0 / 16777216.0)
    u2 = float(b2 >> 8) * (1.0 / 16777216.0)
    r = math.sqrt(-2.0 * math.log(u1))
    return r * (math.sin(TWO_PI * u2) if index & 1 else math.cos(TWO_PI * u2))


@njit(**_JIT)
def _run_program(prog, v, flat_index):
    x = float(v)
    for k in range(prog.shape[0]):
        code = int(prog[k, 0])
        a = prog[k, 1]
        b = prog[k, 2]
        if code == AFFINE:
            x = x * a + b
        elif code == CLIP:
            x = min(max(x, a), b)
        elif code == GAMMA:
            c = prog[k, 3]
            t = (x - b) / (c - b)
            t = min(max(t, 0.0), 1.0)
            x = b + (c - b) * t**a
        elif code == NOISE:
            x = x + a * _normal(int(b), flat_index)
    return x


@njit(**_JIT)
def _interior_span(bk, dk, n, x0, x1):
    """Integer x range [lo, hi] within [x0, x1) where 0 <= bk + dk * x < n - 1."""
    lim = n - 1.0
    lo = x0
    hi = x1 - 1
    if abs(dk) < 1e-12:
        if not (bk >= 0.0 and bk < lim):
            return x1, x1 - 1
        return lo, hi
    t0 = (0.0 - bk) / dk
    t1 = (lim - bk) / dk
    if t0 > t1:
        t0, t1 = t1, t0
    lo = max(lo, int(math.ceil(t0)) - 1)
    hi = min(hi, int(math.floor(t1)) + 1)
    # Tighten with the exact expression the loop evaluates, so the span is never wrong.
    while lo <= hi:
        c = bk + dk * lo
        if c >= 0.0 and c < lim:
            break
        lo += 1
    while hi >= lo:
        c = bk + dk * hi
        if c >= 0.0 and c < lim:
            break
        hi -= 1
    return lo, hi


@njit(**_JIT)
def _trilinear(img, q, sy, sz, wz, wy, wx, one=1):
    """Trilinear value at base index ``q`` with strides ``sy``, ``sz`` and weights; ``one``
    is 1 in the type of ``q`` (unsigned indices stay unsigned)."""
    a0 = np.float32(img[q])
    a1 = np.float32(img[q + one])
    a2 = np.float32(img[q + sy])
    a3 = np.float32(img[q + sy + one])
    a4 = np.float32(img[q + sz])
    a5 = np.float32(img[q + sz + one])
    a6 = np.float32(img[q + sz + sy])
    a7 = np.float32(img[q + sz + sy + one])
    b0 = a0 + (a1 - a0) * wx
    b1 = a2 + (a3 - a2) * wx
    b2 = a4 + (a5 - a4) * wx
    b3 = a6 + (a7 - a6) * wx
    c0 = b0 + (b1 - b0) * wy
    c1 = b2 + (b3 - b2) * wy
    return c0 + (c1 - c0) * wz


@intrinsic
def _trilinear_pairs(typingctx, img, q, sy, sz, wz, wy, wx):
    """:func:`_trilinear` for a flat C-contiguous ``img``, read as four x-neighbour pairs
    (one load each) with the x and y steps on vectors: the same float32 operations per
    value, so the same bits, in fewer loads and instructions."""
    if not (
        isinstance(img, types.Array)
        and img.layout == "C"
        and isinstance(img.dtype, (types.Float, types.Integer))
    ):
        return None
    dt = img.dtype

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        el = context.get_value_type(dt)
        f32 = ir.FloatType()
        i32 = ir.IntType(32)

        def mask(*ix):
            return ir.Constant(ir.VectorType(i32, len(ix)), list(ix))

        def load_pair(index):
            ptr = builder.bitcast(builder.gep(ary.data, [index]), ir.VectorType(el, 2).as_pointer())
            return builder.load(ptr, align=dt.bitwidth // 8)

        def splat(x, n):
            v = builder.insert_element(ir.Constant(ir.VectorType(f32, n), None), x, i32(0))
            return builder.shuffle_vector(v, v, mask(*([0] * n)))

        def lerp(a, b, w):
            return builder.fadd(a, builder.fmul(builder.fsub(b, a), w))

        q, sy, sz = args[1], args[2], args[3]
        qz = builder.add(q, sz)
        lo = builder.shuffle_vector(load_pair(q), load_pair(builder.add(q, sy)), mask(0, 1, 2, 3))
        hi = builder.shuffle_vector(load_pair(qz), load_pair(builder.add(qz, sy)), mask(0, 1, 2, 3))
        v = builder.shuffle_vector(lo, hi, mask(0, 1, 2, 3, 4, 5, 6, 7))  # a0 .. a7
        v8 = ir.VectorType(f32, 8)
        if isinstance(dt, types.Float):
            if dt.bitwidth > 32:
                v = builder.fptrunc(v, v8)
        elif dt.signed:
            v = builder.sitofp(v, v8)
        else:
            v = builder.uitofp(v, v8)
        even = builder.shuffle_vector(v, v, mask(0, 2, 4, 6))
        odd = builder.shuffle_vector(v, v, mask(1, 3, 5, 7))
        b = lerp(even, odd, splat(args[6], 4))  # b0 .. b3
        c = lerp(
            builder.shuffle_vector(b, b, mask(0, 2)),
            builder.shuffle_vector(b, b, mask(1, 3)),
            splat(args[5], 2),
        )  # c0, c1
        c0 = builder.extract_element(c, i32(0))
        return lerp(c0, builder.extract_element(c, i32(1)), args[4])

    f = types.float32
    return f(img, types.uint64, types.uint64, types.uint64, f, f, f), codegen


@njit(**_JIT)
def _tap(src, base, z, y, x, nz, ny, nx, fill):
    if z < 0 or y < 0 or x < 0 or z >= nz or y >= ny or x >= nx:
        return fill
    return float(src[base + (z * ny + y) * nx + x])


@njit(**_JIT)
def _trilinear_checked(img, base, iz, iy, ix, nz, ny, nx, tz, ty, tx, fill):
    a0 = _tap(img, base, iz, iy, ix, nz, ny, nx, fill)
    a1 = _tap(img, base, iz, iy, ix + 1, nz, ny, nx, fill)
    a2 = _tap(img, base, iz, iy + 1, ix, nz, ny, nx, fill)
    a3 = _tap(img, base, iz, iy + 1, ix + 1, nz, ny, nx, fill)
    a4 = _tap(img, base, iz + 1, iy, ix, nz, ny, nx, fill)
    a5 = _tap(img, base, iz + 1, iy, ix + 1, nz, ny, nx, fill)
    a6 = _tap(img, base, iz + 1, iy + 1, ix, nz, ny, nx, fill)
    a7 = _tap(img, base, iz + 1, iy + 1, ix + 1, nz, ny, nx, fill)
    b0 = a0 + (a1 - a0) * tx
    b1 = a2 + (a3 - a2) * tx
    b2 = a4 + (a5 - a4) * tx
    b3 = a6 + (a7 - a6) * tx
    c0 = b0 + (b1 - b0) * ty
    c1 = b2 + (b3 - b2) * ty
    return c0 + (c1 - c0) * tz


@njit(**_JIT)
def _row(
    img,
    lab,
    m,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    out_shape,
    cval,
    lcval,
    prog,
    img_linear,
    z,
    y,
    x0,
    x1,
):
    """Resample output voxels (z, y, x0:x1) of every channel: the general path (any channel
    count, nearest images, per-voxel intensity program, borders). Arrays are flat, C order.
    """
    nz, ny, nx = src_shape
    od, oh, ow = out_shape
    sy = nx
    sz = ny * nx
    svol = nz * sz
    ovol = od * oh * ow
    has_prog = prog.shape[0] > 0
    fz, fy, fx = float(nz), float(ny), float(nx)
    dz, dy, dx = m[0, 2], m[1, 2], m[2, 2]
    bz = m[0, 0] * z + m[0, 1] * y + m[0, 3]
    by = m[1, 0] * z + m[1, 1] * y + m[1, 3]
    bx = m[2, 0] * z + m[2, 1] * y + m[2, 3]
    lo0, hi0 = _interior_span(bz, dz, fz, x0, x1)
    lo1, hi1 = _interior_span(by, dy, fy, x0, x1)
    lo2, hi2 = _interior_span(bx, dx, fx, x0, x1)
    lo = max(lo0, max(lo1, lo2))
    hi = min(hi0, min(hi1, hi2))
    if hi < lo:
        lo = x1
        hi = x1 - 1
    row = (z * oh + y) * ow
    # interior: every tap inside, no checks
    for x in range(lo, hi + 1):
        cz = bz + dz * x
        cy = by + dy * x
        cx = bx + dx * x
        o = row + x
        if nl > 0:
            r = int(cz + 0.5) * sz + int(cy + 0.5) * sy + int(cx + 0.5)
            for c in range(nl):
                out_lab[c * ovol + o] = lab[c * svol + r]
        if img_linear:
            iz = int(cz)
            iy = int(cy)
            ix = int(cx)
            wz = np.float32(cz - iz)
            wy = np.float32(cy - iy)
            wx = np.float32(cx - ix)
            p = iz * sz + iy * sy + ix
            for c in range(nc):
                v = _trilinear(img, c * svol + p, sy, sz, wz, wy, wx)
                if has_prog:
                    v = np.float32(_run_program(prog, v, c * ovol + o))
                out_img[c * ovol + o] = v
        elif nc > 0:
            r = int(cz + 0.5) * sz + int(cy + 0.5) * sy + int(cx + 0.5)
            for c in range(nc):
                v = np.float32(img[c * svol + r])
                if has_prog:
                    v = np.float32(_run_program(prog, v, c * ovol + o))
                out_img[c * ovol + o] = v
    # border spans: [x0, lo) and (hi, x1), every tap checked
    for x in range(x0, x1):
        if x >= lo and x <= hi:
            continue
        cz = bz + dz * x
        cy = by + dy * x
        cx = bx + dx * x
        o = row + x
        if nl > 0:
            rz = int(math.floor(cz + 0.5))
            ry = int(math.floor(cy + 0.5))
            rx = int(math.floor(cx + 0.5))
            inside = rz >= 0 and ry >= 0 and rx >= 0 and rz < nz and ry < ny and rx < nx
            r = (rz * ny + ry) * nx + rx
            for c in range(nl):
                out_lab[c * ovol + o] = lab[c * svol + r] if inside else lcval
        if nc == 0:
            continue
        if img_linear:
            gz = math.floor(cz)
            gy = math.floor(cy)
            gx = math.floor(cx)
            far = gz < -1.0 or gy < -1.0 or gx < -1.0 or gz > fz - 1.0 or gy > fy - 1.0
            far = far or gx > fx - 1.0
            for c in range(nc):
                if far:
                    v = np.float32(cval)
                else:
                    v = np.float32(
                        _trilinear_checked(
                            img,
                            c * svol,
                            int(gz),
                            int(gy),
                            int(gx),
                            nz,
                            ny,
                            nx,
                            cz - gz,
                            cy - gy,
                            cx - gx,
                            cval,
                        )
                    )
                if has_prog:
                    v = np.float32(_run_program(prog, v, c * ovol + o))
                out_img[c * ovol + o] = v
        else:
            rz = int(math.floor(cz + 0.5))
            ry = int(math.floor(cy + 0.5))
            rx = int(math.floor(cx + 0.5))
            for c in range(nc):
                v = np.float32(_tap(img, c * svol, rz, ry, rx, nz, ny, nx, cval))
                if has_prog:
                    v = np.float32(_run_program(prog, v, c * ovol + o))
                out_img[c * ovol + o] = v


# Output tiles (z, y, x): a tile's source footprint stays in cache while the walk crosses
# rotated planes. With the two-pass rows and the prefetch of the next row (``_block``), long
# rows win: on W1 (CPU time, one thread) 8x8x128 took 0.96x the time of 4x4x128, 8x8x32
# 1.3x, 16^3 2.0x (each row pays its first pass and prefetch set-up once).
TILE = (8, 8, 128)

# Polynomials (float32 Horner, fitted on Chebyshev nodes): log2 on [1, 2) in u = 2m - 3,
# 1.2e-7 absolute (the noise's logarithm); cos(2 pi w) on
# [0, 1/4] in s = (4w)^2, 1.4e-7 absolute; sin(2 pi w) / (4w) on [0, 1/4] in s, 1.9e-7
# absolute for the sine. libm's powf/log/cos are scalar calls (about 9 ns a voxel for powf
# here); these loops vectorise.
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = (
    0.5849624872207642,
    0.48089799284935,
    -0.08014941960573196,
    0.01781579665839672,
    -0.004455188289284706,
    0.0011707168305292726,
    -0.00032321648905053735,
    0.00011545875895535573,
    -3.4666783903958276e-05,
)
_S0, _S1, _S2, _S3, _S4 = (
    1.570796251296997,
    -0.6459634304046631,
    0.07968873530626297,
    -0.004672548267990351,
    0.00015095608250703663,
)
_C0, _C1, _C2, _C3, _C4, _C5 = (
    1.0,
    -1.2337005138397217,
    0.2536693513393402,
    -0.020862746983766556,
    0.0009177866159006953,
    -2.3848328055464663e-05,
)
_LN2 = 0.6931471805599453
# Gamma (``_gamma_span``), float32 Horner fitted by least squares on Chebyshev nodes:
# log2(1 + u) / u on [sqrt(2)/2 - 1, sqrt(2) - 1], (exp2(f) - 1) / f on [-1/2, 1/2]. Degrees as
# the lowest that keep ``t ** g`` within 2e-6 of float64 (6e-7 measured; one degree less in
# either gives 2.8e-6).
_G0, _G1, _G2, _G3, _G4, _G5, _G6 = (
    1.442696452140808,
    -0.7213640213012695,
    0.4806291460990906,
    -0.35935065150260925,
    0.29563361406326294,
    -0.2695062756538391,
    0.17212873697280884,
)
_X0, _X1, _X2, _X3, _X4, _X5 = (  # _X0 = 1: t = 1 gives 1 exactly
    1.0,
    0.6931471824645996,
    0.2402222752571106,
    0.05550327152013779,
    0.00967217143625021,
    0.0013400432653725147,
)
_SQRT2_BITS = 0x3FB504F3  # float32 sqrt(2)


@njit(**_JIT)
def _log2_mantissa(m):
    u = np.float32(2.0) * m - np.float32(3.0)
    r = np.float32(_L8)
    r = r * u + np.float32(_L7)
    r = r * u + np.float32(_L6)
    r = r * u + np.float32(_L5)
    r = r * u + np.float32(_L4)
    r = r * u + np.float32(_L3)
    r = r * u + np.float32(_L2)
    r = r * u + np.float32(_L1)
    return r * u + np.float32(_L0)


@intrinsic
def _bits(typingctx, x):
    """The int32 bit pattern of a float32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, b):
    """The float32 with the bit pattern of an int32."""
    if b != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", **_JIT)
def _log2_split(x):
    """``(e, m)``: float32 ``x = m * 2**e`` with m in [1, 2); zero and denormals get a
    huge negative ``e``."""
    b = _bits(x)
    k = np.int32((b >> 23) & 0xFF)  # int32 keeps 16 lanes a vector (numba widens to int64)
    e = np.float32(k) - np.float32(127.0) if k > 0 else np.float32(-1.0e4)
    return e, _from_bits(np.int32((b & 0x007FFFFF) | 0x3F800000))


# Gamma and noise contract multiply-adds into FMAs: with the earlier, longer polynomials
# that took gamma from 1.04 to 0.69 ns a voxel and noise from 1.51 to 1.21 (in L1, one
# thread); results move by about one float32 ulp, well inside the program's tolerance
# against ``program.run_reference``. Today's figures are in benchmarks/W1_BOUND.md.
_JIT_FMA: dict[str, Any] = {**_JIT, "fastmath": {"contract"}}


@njit(**_JIT_FMA)
def _gamma_span(x, g, lo, inv, span, n):
    """``x[:n] = lo + span * clip((x - lo) * inv, 0, 1) ** g`` (g > 0), one vectorised
    loop: bit casts instead of int32 views and scratch arrays.

    ``t ** g = exp2(g log2 t)``. The mantissa ``m`` of ``t`` is taken in [sqrt(2)/2, sqrt(2))
    and ``log2 m = u P(u)``, ``u = m - 1``, so the logarithm is accurate relative to itself
    near ``t = 1``, where ``g`` multiplies its error: the result is within 6e-7 of float64
    ``t ** g`` for every ``g`` (tests/augment/test_intensity.py). The logarithm on [1, 2)
    in absolute terms, at the same degree, is as close at ``g = 1.5`` but its error grows
    with ``g`` (over 2e-6 at ``g = 10``). ``exp2`` rounds with the 1.5 * 2^23 trick, its
    polynomial on [-1/2, 1/2]."""
    gf = np.float32(g)
    for i in range(n):
        t = min(max((x[i] - lo) * inv, np.float32(0.0)), np.float32(1.0))
        b = _bits(t)
        k = np.int32((b >> 23) & 0xFF)  # int32 keeps 16 lanes a vector (numba widens to int64)
        mb = np.int32((b & 0x007FFFFF) | 0x3F800000)
        big = mb > np.int32(_SQRT2_BITS)
        mb = np.int32(mb - np.int32(0x00800000)) if big else mb
        e = np.float32(k) - (np.float32(126.0) if big else np.float32(127.0))
        u = _from_bits(mb) - np.float32(1.0)
        p = np.float32(_G6)
        p = p * u + np.float32(_G5)
        p = p * u + np.float32(_G4)
        p = p * u + np.float32(_G3)
        p = p * u + np.float32(_G2)
        p = p * u + np.float32(_G1)
        p = p * u + np.float32(_G0)
        y = max(gf * (e + u * p), np.float32(-126.0))
        rounded = y + np.float32(12582912.0)  # 1.5 * 2^23: its low mantissa bits are round(y)
        f = y - (rounded - np.float32(12582912.0))
        r = np.float32(_X5)
        r = r * f + np.float32(_X4)
        r = r * f + np.float32(_X3)
        r = r * f + np.float32(_X2)
        r = r * f + np.float32(_X1)
        r = r * f + np.float32(_X0)
        q = _from_bits(np.int32(_bits(r) + (_bits(rounded) << 23)))
        x[i] = lo + span * (q if k > 0 else np.float32(0.0))  # t = 0 (or denormal) gives 0


@njit(inline="always", **_JIT_FMA)
def _normal_pair(even, key):
    """The two float32 normals of the Box-Muller pair whose first counter is ``even``:
    ``(r cos(2 pi u2), r sin(2 pi u2))`` for flat indices ``even`` and ``even + 1``. The
    hash in 32-bit lanes (``_hash32``; with one normal a voxel: 1.5 instead of 2.0 ns)."""
    b1 = _hash32(even, key)
    b2 = _hash32(even + np.uint32(1), key)
    u1 = np.float32(np.int32(b1 >> np.uint32(8)) + np.int32(1))  # u1 * 2^24, exact
    e, mant = _log2_split(u1)
    lnu1 = np.float32(_LN2) * (e - np.float32(24.0) + _log2_mantissa(mant))
    radius = math.sqrt(max(np.float32(-2.0) * lnu1, np.float32(0.0)))
    w = np.float32(np.int32(b2 >> np.uint32(8))) * np.float32(1.0 / 16777216.0)  # u2
    # cos and sin of 2 pi w by symmetry from a quarter turn: v = |w - 1/2| in [0, 1/2],
    # cos(2 pi w) = -cos(2 pi v), sin(2 pi w) = sin(2 pi v) (w < 1/2) or -sin(2 pi v)
    v = abs(w - np.float32(0.5))
    flip = v > np.float32(0.25)
    v = np.float32(0.5) - v if flip else v
    t = np.float32(4.0) * v
    s2 = t * t
    c = np.float32(_C5)
    c = c * s2 + np.float32(_C4)
    c = c * s2 + np.float32(_C3)
    c = c * s2 + np.float32(_C2)
    c = c * s2 + np.float32(_C1)
    c = c * s2 + np.float32(_C0)
    sn = np.float32(_S4)
    sn = sn * s2 + np.float32(_S3)
    sn = sn * s2 + np.float32(_S2)
    sn = sn * s2 + np.float32(_S1)
    sn = (sn * s2 + np.float32(_S0)) * t
    return radius * (c if flip else -c), radius * (sn if w < np.float32(0.5) else -sn)


@njit(**_JIT_FMA)
def _noise_span(x, a, seed, first, n):
    """``x[:n] += a * normal(first + i)``: the program's normals for flat indices
    ``first + i``, the same numbers as ``_normal`` within float32 rounding. One vectorised
    loop over whole pairs (one hash pair, log and sqrt per two voxels: 0.89 instead of 1.33
    ns a voxel in L1, one thread, against one Box-Muller transform per voxel); a span that
    starts or ends inside a pair takes that pair's sine or cosine alone."""
    if n <= 0:
        return
    fa = np.float32(a)
    key = np.uint32(np.uint64(seed) & MASK32)
    h = first & 1
    if h:  # the span starts on the second voxel of a pair
        _, s = _normal_pair(np.uint32((first - 1) & MASK32), key)  # _hash32 reads 32 bits
        x[0] = x[0] + fa * s
    seg = x[h:n]
    even = first + h
    for k in range((n - h) // 2):
        c, s = _normal_pair(np.uint32((even + 2 * k) & MASK32), key)
        seg[2 * k] = seg[2 * k] + fa * c
        seg[2 * k + 1] = seg[2 * k + 1] + fa * s
    if (n - h) & 1:  # and ends on the first voxel of one
        c, _ = _normal_pair(np.uint32((first + n - 1) & MASK32), key)
        x[n - 1] = x[n - 1] + fa * c


@njit(**_JIT)
def _program_span(out, prog, start, stop, base):
    """Run ``prog`` over ``out[start:stop]`` op by op; flat output index = base + i.

    Loops run over a fresh slice from 0: with ``out[start + i]`` numba keeps a negative-index
    branch that stops vectorisation (about 10x slower).
    """
    n = stop - start
    seg = out[start:stop]
    for k in range(prog.shape[0]):
        code = int(prog[k, 0])
        a = prog[k, 1]
        b = prog[k, 2]
        if code == AFFINE:
            fa = np.float32(a)
            fb = np.float32(b)
            for i in range(n):
                seg[i] = seg[i] * fa + fb
        elif code == CLIP:
            fa = np.float32(a)
            fb = np.float32(b)
            for i in range(n):
                seg[i] = min(max(seg[i], fa), fb)
        elif code == GAMMA:
            c = prog[k, 3]
            _gamma_span(seg, a, np.float32(b), np.float32(1.0 / (c - b)), np.float32(c - b), n)
        elif code == NOISE:
            _noise_span(seg, a, int(b), base + start, n)


@njit(**_JIT)
def _tile_inside(m, za, zb, ya, yb, xa, xb, fz, fy, fx):
    """Whether every trilinear tap of the output box [za..zb] x [ya..yb] x [xa..xb] is inside
    the source (0 <= c < n - 1 on each axis), checked at the 8 corners with a margin: the
    map is affine, so the corners bound the box. About 10% faster than per-row spans."""
    eps = 1e-6
    for cz in (za, zb):
        for cy in (ya, yb):
            for cx in (xa, xb):
                pz = m[0, 0] * cz + m[0, 1] * cy + m[0, 2] * cx + m[0, 3]
                py = m[1, 0] * cz + m[1, 1] * cy + m[1, 2] * cx + m[1, 3]
                px = m[2, 0] * cz + m[2, 1] * cy + m[2, 2] * cx + m[2, 3]
                if not (
                    pz >= eps
                    and py >= eps
                    and px >= eps
                    and pz < fz - 1.0 - eps
                    and py < fy - 1.0 - eps
                    and px < fx - 1.0 - eps
                ):
                    return False
    return True


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask for the cache line of ``arr[index]`` (x86 ``prefetcht0``); no effect on results."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@njit(inline="always", **_JIT)
def _tile_origin(b, out_shape, tile):
    """Output tile ``b``'s first z, first y and x range ``[x0, x1)`` (tiles in C order)."""
    od, oh, ow = out_shape
    tz, ty, tx = tile
    ny_ = (oh + ty - 1) // ty
    nx_ = (ow + tx - 1) // tx
    x0 = (b % nx_) * tx
    return (b // (ny_ * nx_)) * tz, ((b // nx_) % ny_) * ty, x0, min(x0 + tx, ow)


@njit(inline="always", **_JIT)
def _fold_prefix(prog):
    """The leading element-wise ops the interpolation applies as it stores: ``CLIP``,
    ``AFFINE``, ``CLIP`` then ``AFFINE`` (a window) or ``AFFINE`` then ``CLIP``.

    Returns:
        ``(n_ops, mode, lo, hi, a, b)``: mode bit 1 clips first, bit 2 scales, bit 4 clips
        last; the bounds and coefficients in float32, as the program pass rounds them.
    """
    n = 0
    mode = 0
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    a = np.float32(1.0)
    b = np.float32(0.0)
    if prog.shape[0] > 0 and int(prog[0, 0]) == CLIP:
        mode = 1
        lo = np.float32(prog[0, 1])
        hi = np.float32(prog[0, 2])
        n = 1
        if prog.shape[0] > 1 and int(prog[1, 0]) == AFFINE:
            mode = 3
            a = np.float32(prog[1, 1])
            b = np.float32(prog[1, 2])
            n = 2
    elif prog.shape[0] > 0 and int(prog[0, 0]) == AFFINE:
        mode = 2
        a = np.float32(prog[0, 1])
        b = np.float32(prog[0, 2])
        n = 1
        if prog.shape[0] > 1 and int(prog[1, 0]) == CLIP:
            mode = 6
            lo = np.float32(prog[1, 1])
            hi = np.float32(prog[1, 2])
            n = 2
    return n, mode, lo, hi, a, b


@njit(inline="always", **_JIT)
def _fold(v, mode, lo, hi, a, b):
    """The ops of :func:`_fold_prefix` on one float32 value, as ``_program_span`` runs them."""
    if mode & 1:
        v = min(max(v, lo), hi)
    if mode & 2:
        v = v * a + b
    if mode & 4:
        v = min(max(v, lo), hi)
    return v


@njit(**_JIT)
def _fold_span(out, start, stop, mode, lo, hi, a, b):
    """:func:`_fold` over ``out[start:stop]`` (the border voxels of a tile)."""
    if mode == 0:
        return
    seg = out[start:stop]
    for i in range(stop - start):
        seg[i] = _fold(seg[i], mode, lo, hi, a, b)


@njit(inline="always", **_JIT)
def _row_span(m, z, y, x0, x1, fz, fy, fx, inside):
    """The interior span ``[lo, hi]`` of output row (z, y, x0:x1): all eight taps inside."""
    if inside:
        return x0, x1 - 1
    bz = m[0, 0] * z + m[0, 1] * y + m[0, 3]
    by = m[1, 0] * z + m[1, 1] * y + m[1, 3]
    bx = m[2, 0] * z + m[2, 1] * y + m[2, 3]
    lo0, hi0 = _interior_span(bz, m[0, 2], fz, x0, x1)
    lo1, hi1 = _interior_span(by, m[1, 2], fy, x0, x1)
    lo2, hi2 = _interior_span(bx, m[2, 2], fx, x0, x1)
    return max(lo0, max(lo1, lo2)), min(hi0, min(hi1, hi2))


@njit(inline="always", **_JIT)
def _row_taps(m, z, y, lo, n, sz, sy, q, r, w):
    """First pass over the interior voxels (z, y, lo:lo + n): base index ``q``, nearest
    index ``r`` and float32 weights ``w`` (3, n). No loads from the source: it vectorises."""
    bz = m[0, 0] * z + m[0, 1] * y + m[0, 3]
    by = m[1, 0] * z + m[1, 1] * y + m[1, 3]
    bx = m[2, 0] * z + m[2, 1] * y + m[2, 3]
    dz, dy, dx = m[0, 2], m[1, 2], m[2, 2]
    wz = w[0]
    wy = w[1]
    wx = w[2]
    for i in range(n):
        x = lo + i
        cz = bz + dz * x
        cy = by + dy * x
        cx = bx + dx * x
        iz = int(cz)
        iy = int(cy)
        ix = int(cx)
        tz = cz - iz
        ty = cy - iy
        tx = cx - ix
        p = iz * sz + iy * sy + ix
        q[i] = p
        # nearest from the same base: floor(c + 0.5) == floor(c) + (frac >= 0.5)
        r[i] = p + (sz if tz >= 0.5 else 0) + (sy if ty >= 0.5 else 0) + (1 if tx >= 0.5 else 0)
        wz[i] = np.float32(tz)
        wy[i] = np.float32(ty)
        wx[i] = np.float32(tx)


@njit(inline="always", **_JIT)
def _interp_run(img, lab, oimg, olab, start, stop, q, r, w, qn, rn, usy, usz, label, ahead):
    """Voxels ``start:stop`` of a row: the eight taps at ``q`` interpolated with the
    weights ``w`` into ``oimg``, the label at ``r`` copied into ``olab`` (if ``label``); if
    ``ahead``, the cache lines the next row's taps (``qn``, ``rn``) will read are prefetched
    on the way. Every index is non-negative here: unsigned indices spare numba's
    negative-index wraparound on the loads and stores (1.2x on W1)."""
    wz = w[0]
    wy = w[1]
    wx = w[2]
    for j in range(start, stop):
        i = np.uint64(j)
        if ahead:
            pn = np.uint64(qn[i])
            _prefetch(img, pn)
            _prefetch(img, pn + usy)
            _prefetch(img, pn + usz)
            _prefetch(img, pn + usz + usy)
            if label:
                _prefetch(lab, np.uint64(rn[i]))
        if label:
            olab[i] = lab[np.uint64(r[i])]
        oimg[i] = _trilinear_pairs(img, np.uint64(q[i]), usy, usz, wz[i], wy[i], wx[i])


@njit(**_JIT)
def _row_interp(img, lab, oimg, olab, n, q, r, w, qn, rn, nn, usy, usz, nl, mode, lo, hi, a, b):
    """Second pass over an interior row (``n`` voxels, ``oimg``/``olab`` start at its first
    voxel), prefetching the next row's ``nn`` voxels, then the folded ops over the row
    while it is in L1."""
    k = min(n, nn)
    if nl == 1:
        _interp_run(img, lab, oimg, olab, 0, k, q, r, w, qn, rn, usy, usz, True, True)
        _interp_run(img, lab, oimg, olab, k, n, q, r, w, qn, rn, usy, usz, True, False)
    else:
        _interp_run(img, lab, oimg, olab, 0, k, q, r, w, qn, rn, usy, usz, False, True)
        _interp_run(img, lab, oimg, olab, k, n, q, r, w, qn, rn, usy, usz, False, False)
    for j in range(k, nn):
        i = np.uint64(j)
        pn = np.uint64(qn[i])
        _prefetch(img, pn)
        _prefetch(img, pn + usy)
        _prefetch(img, pn + usz)
        _prefetch(img, pn + usz + usy)
        if nl == 1:
            _prefetch(lab, np.uint64(rn[i]))
    if mode != 0:
        seg = oimg[:n]
        for i in range(n):
            seg[i] = _fold(seg[i], mode, lo, hi, a, b)


@njit(**_JIT)
def _block(
    img,
    lab,
    m,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    out_shape,
    cval,
    lcval,
    prog,
    img_linear,
    b,
    tile,
):
    """Resample output tile ``b``.

    Single-channel trilinear images (+ one nearest label) take the fast path: each row's
    interior in two passes, ``_row_taps`` (indices and weights, vectorised) then
    ``_row_interp`` (the eight loads and the lerps), with the next row's taps worked out
    first so that its cache lines are prefetched while this row is interpolated. W1 reads
    a 128^3 patch's source footprint from DRAM once; without the prefetch each of its
    cache lines was a stall: on W1 (CPU time, one thread) the prefetch took the kernel from
    13.8 to 6.6 ns a voxel, the two passes from 14.9 to 13.8. The program's leading
    clip/affine ops (a window) are applied to each finished row (``_fold_prefix``); the
    rest runs over the finished tile."""
    od, oh, ow = out_shape
    tz, ty, tx = tile
    z0, y0, x0, x1 = _tile_origin(b, out_shape, tile)
    if not (nc == 1 and nl <= 1 and img_linear):
        for z in range(z0, min(z0 + tz, od)):
            for y in range(y0, min(y0 + ty, oh)):
                _row(
                    img,
                    lab,
                    m,
                    out_img,
                    out_lab,
                    nc,
                    nl,
                    src_shape,
                    out_shape,
                    cval,
                    lcval,
                    prog,
                    img_linear,
                    z,
                    y,
                    x0,
                    x1,
                )
        return
    nz, ny, nx = src_shape
    sy = nx
    sz = ny * nx
    usy = np.uint64(sy)
    usz = np.uint64(sz)
    fz, fy, fx = float(nz), float(ny), float(nx)
    z1 = min(z0 + tz, od)
    y1 = min(y0 + ty, oh)
    nfold, mode, f_lo, f_hi, f_a, f_b = _fold_prefix(prog)
    rest = prog[nfold:]
    inside = _tile_inside(m, z0, z1 - 1, y0, y1 - 1, x0, x1 - 1, fz, fy, fx)
    nb = n_blocks(out_shape, tile)
    # Two row buffers: while row k is interpolated, the taps of the next row (this tile's,
    # or the first row of tile b + 1) are in the other one and their cache lines are
    # prefetched.
    q = np.empty((2, tx), np.int64)
    r = np.empty((2, tx), np.int64)
    w = np.empty((2, 3, tx), np.float32)
    ky = y1 - y0
    rows = (z1 - z0) * ky
    lo_n, hi_n = _row_span(m, z0, y0, x0, x1, fz, fy, fx, inside)
    _row_taps(m, z0, y0, lo_n, hi_n - lo_n + 1, sz, sy, q[0], r[0], w[0])
    for k in range(rows):
        z = z0 + k // ky
        y = y0 + k % ky
        cur = k & 1
        lo = lo_n
        hi = hi_n
        n_next = 0
        if k + 1 < rows or b + 1 < nb:
            if k + 1 < rows:
                zn = z0 + (k + 1) // ky
                yn = y0 + (k + 1) % ky
                lo_n, hi_n = _row_span(m, zn, yn, x0, x1, fz, fy, fx, inside)
            else:
                zn, yn, xa, xb = _tile_origin(b + 1, out_shape, tile)
                lo_n, hi_n = _row_span(m, zn, yn, xa, xb, fz, fy, fx, False)
            n_next = max(hi_n - lo_n + 1, 0)
            _row_taps(m, zn, yn, lo_n, n_next, sz, sy, q[1 - cur], r[1 - cur], w[1 - cur])
        row = (z * oh + y) * ow
        if hi < lo:  # no interior voxel
            lo = x1
            hi = x1 - 1
        if lo > x0:
            _row(
                img,
                lab,
                m,
                out_img,
                out_lab,
                nc,
                nl,
                src_shape,
                out_shape,
                cval,
                lcval,
                prog[:0],
                img_linear,
                z,
                y,
                x0,
                lo,
            )
            _fold_span(out_img, row + x0, row + lo, mode, f_lo, f_hi, f_a, f_b)
        if hi + 1 < x1:
            _row(
                img,
                lab,
                m,
                out_img,
                out_lab,
                nc,
                nl,
                src_shape,
                out_shape,
                cval,
                lcval,
                prog[:0],
                img_linear,
                z,
                y,
                hi + 1,
                x1,
            )
            _fold_span(out_img, row + hi + 1, row + x1, mode, f_lo, f_hi, f_a, f_b)
        _row_interp(
            img,
            lab,
            out_img[row + lo : row + hi + 1],
            out_lab[row + lo : row + hi + 1] if nl == 1 else out_lab[:0],
            hi - lo + 1,
            q[cur],
            r[cur],
            w[cur],
            q[1 - cur],
            r[1 - cur],
            n_next,
            usy,
            usz,
            nl,
            mode,
            f_lo,
            f_hi,
            f_a,
            f_b,
        )
    if rest.shape[0] > 0:
        # rows (z, y0..y1) of a full-width tile are one contiguous span
        full = x0 == 0 and x1 == ow
        for z in range(z0, z1):
            if full:
                _program_span(out_img, rest, (z * oh + y0) * ow, (z * oh + y1) * ow, 0)
            else:
                for y in range(y0, y1):
                    row = (z * oh + y) * ow
                    _program_span(out_img, rest, row + x0, row + x1, 0)


@njit(**_JIT)
def n_blocks(out_shape, tile):
    od, oh, ow = out_shape
    tz, ty, tx = tile
    return ((od + tz - 1) // tz) * ((oh + ty - 1) // ty) * ((ow + tx - 1) // tx)


@njit(parallel=True, **_JIT)
def warp(
    img,
    lab,
    m,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    out_shape,
    cval,
    lcval,
    prog,
    img_linear,
    tile=TILE,
):
    """Resample ``img`` into ``out_img`` and ``lab`` into ``out_lab`` in one pass.

    Args:
        img: flat C-order source image (nc, D, H, W), any real dtype; nc may be 0.
        lab: flat C-order source label (nl, D, H, W); nl may be 0.
        m: (3, 4) float64 pull map (output index -> input index).
        out_img: flat float32 output (nc, d, h, w).  out_lab: flat output (nl, d, h, w).
        src_shape: (D, H, W).  out_shape: (d, h, w).
        cval: image value outside the source.  lcval: label value outside.
        prog: (n, 4) float64 intensity program run on each image value.
        img_linear: trilinear image if True, else nearest.
    """
    for b in prange(n_blocks(out_shape, tile)):
        _block(
            img,
            lab,
            m,
            out_img,
            out_lab,
            nc,
            nl,
            src_shape,
            out_shape,
            cval,
            lcval,
            prog,
            img_linear,
            np.int64(b),
            tile,
        )


@njit(**_JIT)
def warp_serial(
    img,
    lab,
    m,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    out_shape,
    cval,
    lcval,
    prog,
    img_linear,
    tile=TILE,
):
    """:func:`warp` on the calling thread (worker processes, nested parallelism)."""
    for b in range(n_blocks(out_shape, tile)):
        _block(
            img,
            lab,
            m,
            out_img,
            out_lab,
            nc,
            nl,
            src_shape,
            out_shape,
            cval,
            lcval,
            prog,
            img_linear,
            b,
            tile,
        )


_CHUNK = 4096


@njit(**_JIT)
def _program_chunk(x, prog, c):
    start = c * _CHUNK
    stop = min(start + _CHUNK, x.shape[0])
    _program_span(x, prog, start, stop, 0)


@njit(parallel=True, **_JIT)
def program_inplace(x, prog):
    """Run the intensity program over a flat float32 array (the exact-copy path)."""
    for c in prange((x.shape[0] + _CHUNK - 1) // _CHUNK):
        _program_chunk(x, prog, np.int64(c))


@njit(**_JIT)
def program_inplace_serial(x, prog):
    for c in range((x.shape[0] + _CHUNK - 1) // _CHUNK):
        _program_chunk(x, prog, c)


@njit(**{**_JIT, "fastmath": {"reassoc"}})
def _sum_min_max(x):
    """``(sum, min, max)`` of a flat float32 array in one vectorised pass: the sum may be
    reassociated, min and max are taken on order-preserving integer keys of the float
    bits, NaNs left out (as the float comparisons left them out); 0.2 instead of 1.7 ms
    for 128^3 voxels."""
    bits = x.view(np.int32)
    total = 0.0
    klo = np.int32(0x7FFFFFFF)
    khi = np.int32(-0x80000000)
    for i in range(x.shape[0]):
        total += x[i]
        bi = bits[i]
        key = np.int32(bi ^ ((bi >> 31) & 0x7FFFFFFF))
        nan = (bi & 0x7FFFFFFF) > 0x7F800000
        klo = min(klo, np.int32(0x7FFFFFFF) if nan else key)
        khi = max(khi, np.int32(-0x80000000) if nan else key)
    if klo > khi:
        return total, np.inf, -np.inf
    lo = _from_bits(np.int32(klo ^ ((klo >> 31) & 0x7FFFFFFF)))
    hi = _from_bits(np.int32(khi ^ ((khi >> 31) & 0x7FFFFFFF)))
    return total, float(lo), float(hi)


@njit(**_JIT)
def contrast_inplace(x, factor, centre, use_mean, preserve_range):
    """``x = (x - c) * factor + c`` over a flat float32 array, ``c`` the mean of ``x`` when
    ``use_mean``; clipped to the range before the change when ``preserve_range``. Two passes
    instead of numpy's six (mean, min, max, subtract, scale, clip)."""
    n = x.shape[0]
    total, lo, hi = _sum_min_max(x)
    c = total / max(n, 1) if use_mean else centre
    f = np.float32(factor)
    off = np.float32(c - c * factor)
    flo = np.float32(lo)
    fhi = np.float32(hi)
    if preserve_range:
        for i in range(n):
            x[i] = min(max(x[i] * f + off, flo), fhi)
    else:
        for i in range(n):
            x[i] = x[i] * f + off


# -- elastic: the same pass with a cubic B-spline displacement on every coordinate ---------
# Separate functions, compiled on the first displaced plan only, so the affine path's code,
# speed and compile time stay as they are. Every voxel takes the formulas the affine path
# gives it (fast reads inside, ``_row``'s outside), so a zero field reproduces the affine
# path bit for bit: the coordinate is (affine) + 0.0.


@njit(**_JIT)
def _field_plane(coef, jz, wz, jy, z, y0, y1, plane):
    """Contract the four z taps of output plane ``z`` for the control rows that output rows
    ``y0 .. y1 - 1`` read: ``plane[r - r0] = sum_a wz[a, z] * coef[jz[z] - 1 + a, r]``.
    Returns ``r0``. Once per tile and plane: per row instead, the 16 (z, y) taps cost
    about a third more of the displacement's time on W7."""
    kz = jz[z] - 1
    r0 = jy[y0] - 1
    m = coef.shape[2]
    for r in range(jy[y1 - 1] + 3 - r0):
        dst = plane[r]
        for k in range(m):
            dst[k] = 0.0
        for a in range(4):
            w = wz[a, z]
            src = coef[kz + a, r0 + r]
            for k in range(m):
                dst[k] += w * src[k]
    return r0


@njit(**_JIT)
def _field_row(plane, r0, jy, wy, xseg, wx, y, x0, x1, acc, ez, ey, ex):
    """The displacement of output voxels (z, y, x0:x1) into ``ez, ey, ex[: x1 - x0]`` from
    the plane ``_field_plane`` made (``r0`` its first control row).

    The four y taps give the row's control values ``acc`` (3 * gx); then each run of
    voxels in one x interval (``xseg[j] <= x < xseg[j + 1]``) takes its four taps per
    component as scalars, a loop that vectorises: 12 multiply-adds a voxel. (Gathering
    the four taps per voxel instead cost about twice as much.)
    """
    gx = acc.shape[0] // 3
    ky = jy[y] - 1 - r0
    m = 3 * gx
    for k in range(m):
        acc[k] = 0.0
    for b in range(4):
        w = wy[b, y]
        src = plane[ky + b]
        for k in range(m):
            acc[k] += w * src[k]
    w0 = wx[0]
    w1 = wx[1]
    w2 = wx[2]
    w3 = wx[3]
    for j in range(1, gx - 2):
        lo = max(xseg[j], x0)
        hi = min(xseg[j + 1], x1)
        if hi <= lo:
            continue
        k = j - 1
        a0, a1, a2, a3 = acc[k], acc[k + 1], acc[k + 2], acc[k + 3]
        k += gx
        b0, b1, b2, b3 = acc[k], acc[k + 1], acc[k + 2], acc[k + 3]
        k += gx
        c0, c1, c2, c3 = acc[k], acc[k + 1], acc[k + 2], acc[k + 3]
        # fresh slices from 0 keep the loop free of negative-index branches (see
        # ``_program_span``)
        sz = ez[lo - x0 : hi - x0]
        sy = ey[lo - x0 : hi - x0]
        sx = ex[lo - x0 : hi - x0]
        v0 = w0[lo:hi]
        v1 = w1[lo:hi]
        v2 = w2[lo:hi]
        v3 = w3[lo:hi]
        for t in range(hi - lo):
            sz[t] = v0[t] * a0 + v1[t] * a1 + v2[t] * a2 + v3[t] * a3
            sy[t] = v0[t] * b0 + v1[t] * b1 + v2[t] * b2 + v3[t] * b3
            sx[t] = v0[t] * c0 + v1[t] * c1 + v2[t] * c2 + v3[t] * c3


@njit(**_JIT)
def _voxel(
    img,
    lab,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    ovol,
    cval,
    lcval,
    prog,
    img_linear,
    o,
    cz,
    cy,
    cx,
):
    """Output voxel ``o`` of every channel sampled at source (cz, cy, cx), with the formulas
    ``_row`` uses for it: its interior reads when all eight taps are inside, else its
    checked border reads; the program per voxel."""
    nz, ny, nx = src_shape
    sy = nx
    sz = ny * nx
    svol = nz * sz
    fz, fy, fx = float(nz), float(ny), float(nx)
    has_prog = prog.shape[0] > 0
    inner = (
        cz >= 0.0 and cz < fz - 1.0 and cy >= 0.0 and cy < fy - 1.0 and cx >= 0.0 and cx < fx - 1.0
    )
    if inner:
        if nl > 0:
            r = int(cz + 0.5) * sz + int(cy + 0.5) * sy + int(cx + 0.5)
            for c in range(nl):
                out_lab[c * ovol + o] = lab[c * svol + r]
        if img_linear:
            iz = int(cz)
            iy = int(cy)
            ix = int(cx)
            wz = np.float32(cz - iz)
            wy = np.float32(cy - iy)
            wx = np.float32(cx - ix)
            p = iz * sz + iy * sy + ix
            for c in range(nc):
                v = _trilinear(img, c * svol + p, sy, sz, wz, wy, wx)
                if has_prog:
                    v = np.float32(_run_program(prog, v, c * ovol + o))
                out_img[c * ovol + o] = v
        elif nc > 0:
            r = int(cz + 0.5) * sz + int(cy + 0.5) * sy + int(cx + 0.5)
            for c in range(nc):
                v = np.float32(img[c * svol + r])
                if has_prog:
                    v = np.float32(_run_program(prog, v, c * ovol + o))
                out_img[c * ovol + o] = v
        return
    if nl > 0:
        rz = int(math.floor(cz + 0.5))
        ry = int(math.floor(cy + 0.5))
        rx = int(math.floor(cx + 0.5))
        inside = rz >= 0 and ry >= 0 and rx >= 0 and rz < nz and ry < ny and rx < nx
        r = (rz * ny + ry) * nx + rx
        for c in range(nl):
            out_lab[c * ovol + o] = lab[c * svol + r] if inside else lcval
    if nc == 0:
        return
    if img_linear:
        gz = math.floor(cz)
        gy = math.floor(cy)
        gx = math.floor(cx)
        far = gz < -1.0 or gy < -1.0 or gx < -1.0 or gz > fz - 1.0 or gy > fy - 1.0
        far = far or gx > fx - 1.0
        for c in range(nc):
            if far:
                v = np.float32(cval)
            else:
                v = np.float32(
                    _trilinear_checked(
                        img,
                        c * svol,
                        int(gz),
                        int(gy),
                        int(gx),
                        nz,
                        ny,
                        nx,
                        cz - gz,
                        cy - gy,
                        cx - gx,
                        cval,
                    )
                )
            if has_prog:
                v = np.float32(_run_program(prog, v, c * ovol + o))
            out_img[c * ovol + o] = v
    else:
        rz = int(math.floor(cz + 0.5))
        ry = int(math.floor(cy + 0.5))
        rx = int(math.floor(cx + 0.5))
        for c in range(nc):
            v = np.float32(_tap(img, c * svol, rz, ry, rx, nz, ny, nx, cval))
            if has_prog:
                v = np.float32(_run_program(prog, v, c * ovol + o))
            out_img[c * ovol + o] = v


@njit(inline="always", **_JIT)
def _tile_inside_by(m, za, zb, ya, yb, xa, xb, fz, fy, fx, dmax):
    """:func:`_tile_inside` for samples that may move up to ``dmax`` (3,) off the affine
    map: the corners must clear the borders by that much more."""
    eps = 1e-6
    ez = eps + dmax[0]
    ey = eps + dmax[1]
    ex = eps + dmax[2]
    for cz in (za, zb):
        for cy in (ya, yb):
            for cx in (xa, xb):
                pz = m[0, 0] * cz + m[0, 1] * cy + m[0, 2] * cx + m[0, 3]
                py = m[1, 0] * cz + m[1, 1] * cy + m[1, 2] * cx + m[1, 3]
                px = m[2, 0] * cz + m[2, 1] * cy + m[2, 2] * cx + m[2, 3]
                if not (
                    pz >= ez
                    and py >= ey
                    and px >= ex
                    and pz < fz - 1.0 - ez
                    and py < fy - 1.0 - ey
                    and px < fx - 1.0 - ex
                ):
                    return False
    return True


@njit(inline="always", **_JIT)
def _row_taps_displaced(m, z, y, x0, n, e, sz, sy, lz, ly, lx, inside, q, r, w, ok):
    """:func:`_row_taps` for output row (z, y, x0:x0 + n) displaced by ``e`` (3, n):
    ``ok[i]`` whether voxel i's eight taps are inside (``inside``: the whole tile is), its
    ``q``, ``r`` (0 when not) and weights. Returns the count of voxels not ``ok``."""
    bz = m[0, 0] * z + m[0, 1] * y + m[0, 3]
    by = m[1, 0] * z + m[1, 1] * y + m[1, 3]
    bx = m[2, 0] * z + m[2, 1] * y + m[2, 3]
    dz, dy, dx = m[0, 2], m[1, 2], m[2, 2]
    ez = e[0]
    ey = e[1]
    ex = e[2]
    wz = w[0]
    wy = w[1]
    wx = w[2]
    bad = 0
    for i in range(n):
        x = x0 + i
        cz = bz + dz * x + ez[i]
        cy = by + dy * x + ey[i]
        cx = bx + dx * x + ex[i]
        good = inside or (cz >= 0.0 and cz < lz and cy >= 0.0 and cy < ly and cx >= 0.0 and cx < lx)
        if not good:
            cz = 0.0
            cy = 0.0
            cx = 0.0
            bad += 1
        iz = int(cz)
        iy = int(cy)
        ix = int(cx)
        tz = cz - iz
        ty = cy - iy
        tx = cx - ix
        p = iz * sz + iy * sy + ix
        q[i] = p
        r[i] = p + (sz if tz >= 0.5 else 0) + (sy if ty >= 0.5 else 0) + (1 if tx >= 0.5 else 0)
        wz[i] = np.float32(tz)
        wy[i] = np.float32(ty)
        wx[i] = np.float32(tx)
        ok[i] = good
    return bad


@njit(**_JIT)
def _block_elastic(
    img,
    lab,
    m,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    out_shape,
    cval,
    lcval,
    prog,
    img_linear,
    b,
    tile,
    coef,
    jz,
    wz,
    jy,
    wy,
    xseg,
    wx,
    dmax,
):
    """Output tile ``b`` of :func:`warp_elastic`: per row, the displacement (``_field_row``),
    then each voxel at its affine coordinate plus the displacement. Single-channel
    trilinear images (+ one nearest label) read inside voxels inline and run the program
    over the finished tile, as ``_block`` does; the rest go voxel by voxel (``_voxel``)."""
    od, oh, ow = out_shape
    tz, ty, tx = tile
    ny_ = (oh + ty - 1) // ty
    nx_ = (ow + tx - 1) // tx
    z0 = (b // (ny_ * nx_)) * tz
    y0 = ((b // nx_) % ny_) * ty
    x0 = (b % nx_) * tx
    x1 = min(x0 + tx, ow)
    z1 = min(z0 + tz, od)
    y1 = min(y0 + ty, oh)
    nz, ny, nx = src_shape
    sy = nx
    sz = ny * nx
    usy = np.uint64(sy)
    usz = np.uint64(sz)
    u1 = np.uint64(1)
    fz, fy, fx = float(nz), float(ny), float(nx)
    lz, ly, lx = fz - 1.0, fy - 1.0, fx - 1.0
    dz, dy, dx = m[0, 2], m[1, 2], m[2, 2]
    ovol = od * oh * ow
    fast = nc == 1 and nl <= 1 and img_linear
    voxel_prog = prog[:0]
    n = x1 - x0
    ez = np.empty(n)
    ey = np.empty(n)
    ex = np.empty(n)
    acc = np.empty(coef.shape[2])
    plane = np.empty((coef.shape[1], coef.shape[2]))
    inside = fast and _tile_inside_by(m, z0, z1 - 1, y0, y1 - 1, x0, x1 - 1, fz, fy, fx, dmax)
    if fast:
        # as ``_block``: two passes per row, the next row's field and taps worked out first
        # so that its cache lines are prefetched while this row is interpolated
        e = np.empty((2, 3, n))
        q = np.empty((2, n), np.int64)
        r = np.empty((2, n), np.int64)
        w = np.empty((2, 3, n), np.float32)
        ok = np.empty((2, n), np.bool_)
        ky = y1 - y0
        rows = (z1 - z0) * ky
        r0 = 0
        bad_n = 0
        for k in range(rows + 1):
            if k < rows:  # the taps of row k, into buffer k & 1
                z = z0 + k // ky
                y = y0 + k % ky
                if y == y0:
                    r0 = _field_plane(coef, jz, wz, jy, z, y0, y1, plane)
                nxt = k & 1
                en = e[nxt]
                _field_row(plane, r0, jy, wy, xseg, wx, y, x0, x1, acc, en[0], en[1], en[2])
                bad_n = _row_taps_displaced(
                    m, z, y, x0, n, en, sz, sy, lz, ly, lx, inside, q[nxt], r[nxt], w[nxt], ok[nxt]
                )
            if k == 0:
                bad = bad_n
                continue
            # interpolate row k - 1 while prefetching row k
            cur = (k - 1) & 1
            z = z0 + (k - 1) // ky
            y = y0 + (k - 1) % ky
            row = (z * oh + y) * ow
            nn = n if k < rows else 0
            _row_interp(
                img,
                lab,
                out_img[row + x0 : row + x1],
                out_lab[row + x0 : row + x1] if nl == 1 else out_lab[:0],
                n if bad == 0 else 0,
                q[cur],
                r[cur],
                w[cur],
                q[1 - cur],
                r[1 - cur],
                nn,
                usy,
                usz,
                nl,
                0,
                np.float32(0.0),
                np.float32(0.0),
                np.float32(1.0),
                np.float32(0.0),
            )
            if bad != 0:
                ec = e[cur]
                bz = m[0, 0] * z + m[0, 1] * y + m[0, 3]
                by = m[1, 0] * z + m[1, 1] * y + m[1, 3]
                bx = m[2, 0] * z + m[2, 1] * y + m[2, 3]
                okc = ok[cur]
                qc = q[cur]
                rc = r[cur]
                wc = w[cur]
                for i in range(n):
                    x = x0 + i
                    o = np.uint64(row + x)
                    if okc[i]:
                        if nl == 1:
                            out_lab[o] = lab[np.uint64(rc[i])]
                        out_img[o] = _trilinear(
                            img, np.uint64(qc[i]), usy, usz, wc[0, i], wc[1, i], wc[2, i], u1
                        )
                    else:
                        _voxel(
                            img,
                            lab,
                            out_img,
                            out_lab,
                            nc,
                            nl,
                            src_shape,
                            ovol,
                            cval,
                            lcval,
                            voxel_prog,
                            img_linear,
                            row + x,
                            bz + dz * x + ec[0, i],
                            by + dy * x + ec[1, i],
                            bx + dx * x + ec[2, i],
                        )
            bad = bad_n
    else:
        for z in range(z0, z1):
            r0 = _field_plane(coef, jz, wz, jy, z, y0, y1, plane)
            for y in range(y0, y1):
                _field_row(plane, r0, jy, wy, xseg, wx, y, x0, x1, acc, ez, ey, ex)
                bz = m[0, 0] * z + m[0, 1] * y + m[0, 3]
                by = m[1, 0] * z + m[1, 1] * y + m[1, 3]
                bx = m[2, 0] * z + m[2, 1] * y + m[2, 3]
                row = (z * oh + y) * ow
                for i in range(n):
                    x = x0 + i
                    _voxel(
                        img,
                        lab,
                        out_img,
                        out_lab,
                        nc,
                        nl,
                        src_shape,
                        ovol,
                        cval,
                        lcval,
                        prog,
                        img_linear,
                        row + x,
                        bz + dz * x + ez[i],
                        by + dy * x + ey[i],
                        bx + dx * x + ex[i],
                    )
    if fast and prog.shape[0] > 0:
        # as ``_block``: the program over the finished tile, full-width rows as one span
        full = x0 == 0 and x1 == ow
        for z in range(z0, z1):
            if full:
                _program_span(out_img, prog, (z * oh + y0) * ow, (z * oh + y1) * ow, 0)
            else:
                for y in range(y0, y1):
                    row = (z * oh + y) * ow
                    _program_span(out_img, prog, row + x0, row + x1, 0)


@njit(parallel=True, **_JIT)
def warp_elastic(
    img,
    lab,
    m,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    out_shape,
    cval,
    lcval,
    prog,
    img_linear,
    coef,
    jz,
    wz,
    jy,
    wy,
    xseg,
    wx,
    dmax,
    tile=TILE,
):
    """:func:`warp` with a displacement: output voxel p samples ``m @ (p, 1) + d(p)``.

    Args:
        img ... img_linear: as :func:`warp`.
        coef: (gz, gy, 3 * gx) float64: the control vectors of ``d`` in source index
            units, each (z, y) control row holding its z, then y, then x components.
        jz, wz, jy, wy: per output index along z and y, the B-spline interval (int64
            (n,)) and weights (float64 (4, n)) (``bspline.basis``, weights transposed).
        xseg: (gx - 1,) int64: interval j covers output x in ``[xseg[j], xseg[j + 1])``.
        wx: (4, w) float64 weights along x.
        dmax: (3,) float64, the largest ``|d|`` per axis (``bspline.bound``).
    """
    for b in prange(n_blocks(out_shape, tile)):
        _block_elastic(
            img,
            lab,
            m,
            out_img,
            out_lab,
            nc,
            nl,
            src_shape,
            out_shape,
            cval,
            lcval,
            prog,
            img_linear,
            b,
            tile,
            coef,
            jz,
            wz,
            jy,
            wy,
            xseg,
            wx,
            dmax,
        )


@njit(**_JIT)
def warp_elastic_serial(
    img,
    lab,
    m,
    out_img,
    out_lab,
    nc,
    nl,
    src_shape,
    out_shape,
    cval,
    lcval,
    prog,
    img_linear,
    coef,
    jz,
    wz,
    jy,
    wy,
    xseg,
    wx,
    dmax,
    tile=TILE,
):
    """:func:`warp_elastic` on the calling thread."""
    for b in range(n_blocks(out_shape, tile)):
        _block_elastic(
            img,
            lab,
            m,
            out_img,
            out_lab,
            nc,
            nl,
            src_shape,
            out_shape,
            cval,
            lcval,
            prog,
            img_linear,
            b,
            tile,
            coef,
            jz,
            wz,
            jy,
            wy,
            xseg,
            wx,
            dmax,
        )
