"""Compiled region decoding: the chunks of a local sharded blosc array, decoded and copied in
one numba loop.

``ArrayReader`` decodes a region chunk by chunk; from Python that costs a few microseconds
of bookkeeping per chunk (the chunk's box, its place in the shard index, the numcodecs call,
a numpy strided copy) on top of the decode itself. A 160^3 region touched about 100 chunks
of the cache's former 32x64x64 layout (about 250 of today's 32x32x32), so the bookkeeping
was about a quarter of a region read.
:func:`decode_region` does the whole walk in one call: for each chunk of the region it looks
the chunk up in its shard's index, checks the blosc header against the chunk's bytes, calls
c-blosc's ``blosc_decompress_ctx`` into a scratch chunk (the same library numcodecs wraps:
numcodecs' extension module exports it) and copies the part the region needs row by row.
It releases the GIL, so decoding threads run in parallel.

:data:`AVAILABLE` is False where the symbol cannot be found (a numcodecs built without
exported blosc symbols); ``ArrayReader`` then decodes through numcodecs as before.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numcodecs import blosc as _nc_blosc

__all__ = [
    "AVAILABLE",
    "CACHED",
    "DECODE",
    "EMPTY",
    "KEEP",
    "SKIP",
    "chunks_needed",
    "count_absent",
    "decode_region",
    "describe_error",
]

EMPTY = np.uint64((1 << 64) - 1)  # shard-index marker of an absent inner chunk


def _register() -> bool:
    try:
        lib = ctypes.CDLL(_nc_blosc.__file__)
        addr = ctypes.cast(lib.blosc_decompress_ctx, ctypes.c_void_p).value
    except (OSError, AttributeError, TypeError):
        return False
    if not addr:
        return False
    llvm.add_symbol("blosc_decompress_ctx", addr)
    return True


AVAILABLE: bool = _register()
"""Whether c-blosc's ``blosc_decompress_ctx`` was found (then :func:`decode_region` works)."""

_JIT: dict[str, Any] = {"cache": True, "nogil": True, "boundscheck": False}

# what decode_region does with each chunk (its ``needed`` grid)
SKIP, DECODE, KEEP, CACHED = 0, 1, 2, 3

# error codes written to ``err[0]`` (``err[1:4]`` hold the chunk index)
_OK, _OUTSIDE, _HEADER, _DECODE, _SHORT = 0, 1, 2, 3, 4


@intrinsic
def _decompress(typingctx, src, dest, destsize):
    """``blosc_decompress_ctx(src, dest, destsize, 1)`` on raw addresses."""
    sig = types.int32(types.uintp, types.uintp, types.uintp)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.IntType(32), [i8p, i8p, ir.IntType(64), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "blosc_decompress_ctx")
        src_p = builder.inttoptr(args[0], i8p)
        dst_p = builder.inttoptr(args[1], i8p)
        return builder.call(fn, [src_p, dst_p, args[2], ir.Constant(ir.IntType(32), 1)])

    return sig, codegen


@intrinsic
def _memcpy(typingctx, dst, src, nbytes):
    """``memcpy(dst, src, nbytes)`` on raw addresses."""
    sig = types.void(types.uintp, types.uintp, types.uintp)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        d = builder.inttoptr(args[0], i8p)
        s = builder.inttoptr(args[1], i8p)
        cgutils.raw_memcpy(builder, d, s, args[2], 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy64(typingctx, dst, src):
    """``memcpy(dst, src, 64)``: a constant size, which LLVM turns into vector moves."""
    sig = types.void(types.uintp, types.uintp)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        d = builder.inttoptr(args[0], i8p)
        s = builder.inttoptr(args[1], i8p)
        cgutils.raw_memcpy(builder, d, s, ir.Constant(ir.IntType(64), 64), 1)
        return context.get_dummy_value()

    return sig, codegen


# Rows of 64 bytes at a time, then the rest: 0.95x the CPU of one memcpy call per row on
# W6's regions (rows of 128 bytes; the copy is mostly bound by the writes to the region).
@njit(inline="always", **_JIT)
def _copy_row(d, s, n):
    while n >= 64:
        _copy64(d, s)
        d += 64
        s += 64
        n -= 64
    if n:
        _memcpy(d, s, n)


@intrinsic
def _load_u32(typingctx, addr):
    """The little-endian uint32 at a raw (unaligned) address."""
    sig = types.uint32(types.uintp)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        return builder.load(ptr, align=1)

    return sig, codegen


@njit(inline="always", **_JIT)
def _slot(cz, cy, cx, per_shard, shard0, shard_grid):
    """``(k, j)`` of chunk ``(cz, cy, cx)``: its shard's place in the region's shard grid
    and its own in that shard's index."""
    k = (
        (cz // per_shard[0] - shard0[0]) * shard_grid[1] + (cy // per_shard[1] - shard0[1])
    ) * shard_grid[2] + (cx // per_shard[2] - shard0[2])
    jz, jy, jx = cz % per_shard[0], cy % per_shard[1], cx % per_shard[2]
    return k, (jz * per_shard[1] + jy) * per_shard[2] + jx


@njit(**_JIT)
def decode_region(
    out, start, chunk, per_shard, shard0, shard_grid, bases, lengths, index, needed, where,
    src_at, src_len, scratch, fill, filled, part, parts, err,
):  # fmt: skip
    """Decode the chunks of the region ``out`` (voxels ``[start, start + out.shape)``).

    Args:
        out: the destination, a 3D view whose rows (last axis) are contiguous.
        start: int64 (3,), the region's first voxel.
        chunk: int64 (3,), the inner chunk shape; per_shard: int64 (3,), chunks per shard.
        shard0: int64 (3,), the first shard the region touches; shard_grid: int64 (3,), how
            many along each axis; shards and index are in that grid's C order.
        bases, lengths: uint64 (n_shards,): the address and length of each shard's mapped
            file (length 0: an absent shard); the caller keeps the mappings alive.
        index: uint64 (n_shards, chunks per shard, 2): each shard's index (offset, nbytes).
        needed: uint8, one per chunk the region touches (z, y, x): :data:`SKIP` where no
            tap reads the chunk (:func:`chunks_needed`; filled, not decoded), :data:`DECODE`
            (decoded into ``scratch``), :data:`KEEP` (decoded into the chunk-shaped buffer at
            address ``where[...]``, for the caller's cache of decoded chunks) or
            :data:`CACHED` (not decoded: copied from the decoded chunk at ``where[...]``).
        where: uint64 of ``needed``'s shape: the buffers of KEEP and CACHED chunks.
        src_at, src_len: uint64 of ``needed``'s shape: where ``src_len`` > 0, the chunk's
            compressed bytes were fetched to ``src_at`` (an unmapped shard: its ``lengths``
            entry is nonzero, its ``bases`` entry unused).
        scratch: a C-contiguous array of one chunk's shape and the array's dtype.
        fill: the fill value (absent chunks); filled: ``out`` is filled already.
        part, parts: decode only the chunks whose running number is ``part`` modulo
            ``parts`` (one share of the work per thread).
        err: int64 (4,), set to ``(code, cz, cy, cx)`` when a chunk cannot be decoded.

    Returns:
        0, or the error code also written to ``err[0]``: 1 the chunk's bytes lie outside its
        shard file, 2 a bad blosc header, 3 blosc failed to decode it, 4 the chunk is shorter
        than its header says.
    """
    item = out.itemsize
    nz, ny, nx = out.shape
    so, sy_o, sx_o = out.strides
    dst0 = out.ctypes.data
    sc = scratch.ctypes.data
    cz_, cy_, cx_ = chunk[0], chunk[1], chunk[2]
    nbytes_chunk = scratch.size * item
    c0 = (start[0] // cz_, start[1] // cy_, start[2] // cx_)
    c1 = (
        (start[0] + nz - 1) // cz_,
        (start[1] + ny - 1) // cy_,
        (start[2] + nx - 1) // cx_,
    )
    n = -1
    for cz in range(c0[0], c1[0] + 1):
        z0 = max(start[0], cz * cz_)
        z1 = min(start[0] + nz, (cz + 1) * cz_)
        for cy in range(c0[1], c1[1] + 1):
            y0 = max(start[1], cy * cy_)
            y1 = min(start[1] + ny, (cy + 1) * cy_)
            for cx in range(c0[2], c1[2] + 1):
                n += 1
                if n % parts != part:
                    continue
                x0 = max(start[2], cx * cx_)
                x1 = min(start[2] + nx, (cx + 1) * cx_)
                k, j = _slot(cz, cy, cx, per_shard, shard0, shard_grid)
                length = lengths[k]
                off = index[k, j, 0] if length > 0 else EMPTY
                how = needed[cz - c0[0], cy - c0[1], cx - c0[2]]
                if how == SKIP:
                    off = EMPTY
                if off == EMPTY:
                    if not filled:
                        out[
                            z0 - start[0] : z1 - start[0],
                            y0 - start[1] : y1 - start[1],
                            x0 - start[2] : x1 - start[2],
                        ] = fill
                    continue
                dec = sc if how == DECODE else where[cz - c0[0], cy - c0[1], cx - c0[2]]
                if how != CACHED:
                    g = (cz - c0[0], cy - c0[1], cx - c0[2])
                    if src_len[g] > 0:
                        code = _decode_chunk(
                            src_at[g], src_len[g], 0, src_len[g], dec, nbytes_chunk
                        )
                    elif bases[k] == 0:  # unmapped and not fetched: nothing to decode from
                        code = _OUTSIDE
                    else:
                        code = _decode_chunk(
                            bases[k], length, off, index[k, j, 1], dec, nbytes_chunk
                        )
                    if code:
                        err[0], err[1], err[2], err[3] = code, cz, cy, cx
                        return code
                row = (x1 - x0) * item
                src_x = (x0 - cx * cx_) * item
                dst_x = (x0 - start[2]) * sx_o
                for z in range(z0, z1):
                    src_z = ((z - cz * cz_) * cy_) * cx_ * item
                    dst_z = (z - start[0]) * so
                    for y in range(y0, y1):
                        _copy_row(
                            dst0 + dst_z + (y - start[1]) * sy_o + dst_x,
                            dec + src_z + (y - cy * cy_) * cx_ * item + src_x,
                            row,
                        )
    return _OK


@njit(**_JIT)
def _decode_chunk(base, length, off, size, dest, nbytes):
    """Decode the chunk at ``off`` (``size`` bytes) of the shard mapped at ``base``
    (``length`` bytes) into ``nbytes`` at ``dest``; 0 or an error code."""
    if off > length or size > length - off:
        return _OUTSIDE
    at = base + off
    # blosc1 header: decoded size in bytes 4-8, compressed size in 12-16
    if size < 16 or np.int64(_load_u32(at + 4)) != nbytes:
        return _HEADER
    if np.uint64(_load_u32(at + 12)) > size:
        return _SHORT
    if _decompress(at, dest, nbytes) != nbytes:
        return _DECODE
    return _OK


@njit(**_JIT)
def count_absent(start, stop, chunk, per_shard, shard0, shard_grid, lengths, index, needed):
    """How many of the chunks the region ``[start, stop)`` touches are absent or not needed
    (filled, not decoded), and how many it touches."""
    absent = 0
    total = 0
    z0, y0, x0 = start[0] // chunk[0], start[1] // chunk[1], start[2] // chunk[2]
    for cz in range(z0, (stop[0] - 1) // chunk[0] + 1):
        for cy in range(y0, (stop[1] - 1) // chunk[1] + 1):
            for cx in range(x0, (stop[2] - 1) // chunk[2] + 1):
                total += 1
                if needed[cz - z0, cy - y0, cx - x0] == SKIP:
                    absent += 1
                    continue
                k, j = _slot(cz, cy, cx, per_shard, shard0, shard_grid)
                if lengths[k] == 0 or index[k, j, 0] == EMPTY:
                    absent += 1
    return absent, total


def describe_error(err: np.ndarray) -> str:
    """The problem :func:`decode_region` reported in ``err``, in words."""
    where = f"chunk {(int(err[1]), int(err[2]), int(err[3]))}"
    code = int(err[0])
    if code == _OUTSIDE:
        return f"{where} lies outside its shard file (truncated?)"
    if code == _HEADER:
        return f"{where} is corrupt (bad blosc header)"
    if code == _SHORT:
        return f"{where} is truncated (shorter than its header says)"
    return f"cannot decode {where}: blosc reported an error"


@njit(**_JIT)
def chunks_needed(matrix, out_shape, margin, start, stop, chunk):
    """Which chunks of the region ``[start, stop)`` the taps of a pull map reach.

    The output voxels ``o`` in ``[0, out_shape - 1]`` sample the source at
    ``c = matrix @ [o, 1]``, a parallelepiped; trilinear taps (``floor(c)`` and
    ``floor(c) + 1``) and nearest taps of a source point ``c`` lie within one voxel of it, so
    a chunk whose voxel box, grown by ``1 + margin`` on every side, does not meet the
    parallelepiped is read by no tap. The test separates the two convex boxes along the 15
    axes of the separating-axis theorem (3 of the chunk, 3 face normals of the
    parallelepiped, 9 cross products of their edges).

    Args:
        matrix: float64 (3, 4), output index -> source index.
        out_shape: int64 (3,); margin: extra voxels of reach (filters, displacements).
        start, stop: int64 (3,), the region; chunk: int64 (3,), the chunk shape.

    Returns:
        uint8 (nz, ny, nx) over the chunks the region touches: 1 where a tap may read it.
    """
    lo_c = start // chunk
    hi_c = (stop - 1) // chunk
    shape = (hi_c[0] - lo_c[0] + 1, hi_c[1] - lo_c[1] + 1, hi_c[2] - lo_c[2] + 1)
    need = np.ones(shape, np.uint8)
    edges = np.empty((3, 3))  # edges[i]: the parallelepiped's i-th edge vector
    centre = np.empty(3)
    for r in range(3):
        centre[r] = matrix[r, 3]
        for i in range(3):
            edges[i, r] = matrix[r, i] * (out_shape[i] - 1)
            centre[r] += edges[i, r] / 2
    axes = np.zeros((15, 3))
    for i in range(3):
        axes[i, i] = 1.0
        a, b = edges[(i + 1) % 3], edges[(i + 2) % 3]
        axes[3 + i, 0] = a[1] * b[2] - a[2] * b[1]
        axes[3 + i, 1] = a[2] * b[0] - a[0] * b[2]
        axes[3 + i, 2] = a[0] * b[1] - a[1] * b[0]
        for j in range(3):  # unit axis i x edge j
            e = edges[j]
            k = 6 + 3 * i + j
            axes[k, (i + 1) % 3] = -e[(i + 2) % 3]
            axes[k, (i + 2) % 3] = e[(i + 1) % 3]
    # the parallelepiped's extent along each axis: half the sum of |axis . edge|
    reach = np.empty(15)
    for k in range(15):
        t = 0.0
        for i in range(3):
            t += abs(axes[k, 0] * edges[i, 0] + axes[k, 1] * edges[i, 1] + axes[k, 2] * edges[i, 2])
        reach[k] = t / 2 + 1e-6 * (1.0 + t)
    grow = 1.0 + margin
    half = np.empty(3)
    mid = np.empty(3)
    for cz in range(shape[0]):
        for cy in range(shape[1]):
            for cx in range(shape[2]):
                idx = (lo_c[0] + cz, lo_c[1] + cy, lo_c[2] + cx)
                for r in range(3):
                    a = max(start[r], idx[r] * chunk[r])
                    b = min(stop[r], (idx[r] + 1) * chunk[r]) - 1  # last voxel
                    mid[r] = (a + b) / 2
                    half[r] = (b - a) / 2 + grow
                for k in range(15):
                    ax = axes[k]
                    box = abs(ax[0]) * half[0] + abs(ax[1]) * half[1] + abs(ax[2]) * half[2]
                    gap = abs(
                        ax[0] * (centre[0] - mid[0])
                        + ax[1] * (centre[1] - mid[1])
                        + ax[2] * (centre[2] - mid[2])
                    )
                    if gap > box + reach[k]:
                        need[cz, cy, cx] = 0
                        break
    return need
