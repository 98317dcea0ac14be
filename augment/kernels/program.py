"""The fused intensity program: a short list of element-wise ops every backend runs per voxel.

A program is a float64 array of shape ``(n_ops, 4)``: ``[opcode, a, b, c]`` per row, applied
in order to each resampled image value (padding included, as if the ops ran after the
warp). The same encoding is read by the numba kernel, the torch fallback and the Triton
kernel, so the three agree within float tolerance. A batch of programs is one
``(B, n_ops, 4)`` array (:func:`pad`), shorter programs padded with identity ops.

Opcodes:
- ``AFFINE``: ``x = x * a + b``
- ``CLIP``: ``x = min(max(x, a), b)``
- ``GAMMA``: ``x = lo + (hi - lo) * clip((x - lo) / (hi - lo), 0, 1) ** g`` with
  ``(a, b, c) = (g, lo, hi)``; values outside ``[lo, hi]`` are clamped first.
- ``NOISE``: ``x = x + a * n`` where ``n`` is a standard normal drawn from a counter-based
  hash of (seed ``b``, flat output index), so every backend and every thread count draws
  the same number for the same voxel.

The noise generator: ``bits(key, c) = mix(mix(c) ^ key)`` with ``mix`` the 32-bit
"lowbias32" integer hash (counters taken mod 2**32). Flat indices ``2j`` and ``2j + 1`` form
pair ``j``: its two draws (counters ``2j`` and ``2j + 1``) give the uniforms ``u1`` and
``u2`` of one Box-Muller transform, ``r = sqrt(-2 ln u1)``, and voxel ``2j`` takes
``r cos(2 pi u2)``, voxel ``2j + 1`` takes ``r sin(2 pi u2)`` (two independent normals for
one hash pair, logarithm and square root). :func:`noise_reference` is the readable numpy
definition the tests use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

AFFINE = 0
CLIP = 1
GAMMA = 2
NOISE = 3

MASK32 = 0xFFFFFFFF
HASH_M1 = 0x7FEB352D
HASH_M2 = 0x846CA68B
TWO_PI = 6.283185307179586


def empty() -> NDArray[np.float64]:
    return np.zeros((0, 4), dtype=np.float64)


def op(code: int, a: float = 0.0, b: float = 0.0, c: float = 0.0) -> NDArray[np.float64]:
    return np.array([[code, a, b, c]], dtype=np.float64)


def concat(*programs: NDArray[np.float64]) -> NDArray[np.float64]:
    if not programs:
        return empty()
    return np.ascontiguousarray(np.concatenate(programs, axis=0), dtype=np.float64)


def pad(programs: Sequence[NDArray[np.float64]], length: int = 0) -> NDArray[np.float64]:
    """Stack per-sample programs ``(n_b, 4)`` into ``(B, max(max n_b, length), 4)``,
    padding with the identity ``AFFINE(1, 0)`` (exact in every backend)."""
    n = max(max((len(p) for p in programs), default=0), length)
    out = np.zeros((len(programs), n, 4), dtype=np.float64)
    out[:, :, 0] = AFFINE
    out[:, :, 1] = 1.0
    for b, p in enumerate(programs):
        if len(p):
            out[b, : len(p)] = np.asarray(p, dtype=np.float64).reshape(-1, 4)
    return out


def _mix(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    x = np.bitwise_and(x, np.uint64(MASK32))
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(HASH_M1)) & MASK32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(HASH_M2)) & MASK32
    x ^= x >> np.uint64(16)
    return x


def noise_reference(seed: int, flat_index: NDArray[np.integer]) -> NDArray[np.float64]:
    """Standard normals for ``flat_index`` under ``seed``, the definition all backends follow."""
    i = np.asarray(flat_index, dtype=np.uint64)
    key = np.uint64(int(seed) & MASK32)
    even = i & ~np.uint64(1)  # the first counter of the voxel's pair
    b1 = _mix(_mix(even) ^ key)
    b2 = _mix(_mix(even + np.uint64(1)) ^ key)
    u1 = ((b1 >> np.uint64(8)).astype(np.float64) + 1.0) * (1.0 / 16777216.0)
    u2 = (b2 >> np.uint64(8)).astype(np.float64) * (1.0 / 16777216.0)
    radius = np.sqrt(-2.0 * np.log(u1))
    odd = (i & np.uint64(1)).astype(bool)
    return radius * np.where(odd, np.sin(TWO_PI * u2), np.cos(TWO_PI * u2))


def run_reference(program: NDArray[np.float64], x: NDArray[np.floating]) -> NDArray[np.float64]:
    """Apply ``program`` to a whole channels-first output ``x`` in numpy (float64)."""
    y = np.asarray(x, dtype=np.float64).copy()
    flat = np.arange(y.size, dtype=np.uint64).reshape(y.shape)
    for code, a, b, c in np.asarray(program, dtype=np.float64):
        if code == AFFINE:
            y = y * a + b
        elif code == CLIP:
            y = np.minimum(np.maximum(y, a), b)
        elif code == GAMMA:
            t = np.clip((y - b) / (c - b), 0.0, 1.0)
            y = b + (c - b) * t**a
        elif code == NOISE:
            y = y + a * noise_reference(int(b), flat)
        else:
            raise ValueError(f"unknown intensity opcode {code}")
    return y
