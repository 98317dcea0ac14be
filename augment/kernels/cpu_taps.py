"""Numba kernels for the tap tables of :mod:`augment.kernels.taps`: one axis at a time,
float32 in and out, writing into an explicit output.

The array is viewed as ``(a, n, b)`` with the filtered axis in the middle: every output
row ``(a, i)`` is a weighted sum of ``K`` input rows, a loop over the contiguous ``b``
that vectorises. The last axis (``b == 1``) has its own loop over the row instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

_JIT: dict[str, Any] = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}


@njit(**_JIT)
def along_middle(src, idx, w, dst):
    """``dst[a, i, :] = sum_k w[i, k] * src[a, idx[i, k], :]``.

    Args:
        src: (a, n_in, b) float32. idx: (n_out, K) int64. w: (n_out, K) float32.
        dst: (a, n_out, b) float32, written.
    """
    na = src.shape[0]
    no, nk = idx.shape
    nb = src.shape[2]
    for a in range(na):
        for i in range(no):
            d = dst[a, i]
            s = src[a, idx[i, 0]]
            wk = w[i, 0]
            for t in range(nb):
                d[t] = wk * s[t]
            for k in range(1, nk):
                s = src[a, idx[i, k]]
                wk = w[i, k]
                for t in range(nb):
                    d[t] += wk * s[t]


@njit(**_JIT)
def along_last(src, idx, w, dst):
    """``dst[a, i] = sum_k w[i, k] * src[a, idx[i, k]]``: src (a, n_in), dst (a, n_out)."""
    na = src.shape[0]
    no, nk = idx.shape
    for a in range(na):
        s = src[a]
        d = dst[a]
        for i in range(no):
            acc = w[i, 0] * s[idx[i, 0]]
            for k in range(1, nk):
                acc += w[i, k] * s[idx[i, k]]
            d[i] = acc


def apply(x: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Run a tap table along ``axis`` of the float32 array ``x``; a new C-contiguous array.

    Shape:
        x ``(..., n_in, ...)`` -> ``(..., n_out, ...)`` along ``axis``.
    """
    src = np.ascontiguousarray(x, dtype=np.float32)
    shape = src.shape
    a = int(np.prod(shape[:axis], dtype=np.int64))
    b = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    out_shape = (*shape[:axis], len(idx), *shape[axis + 1 :])
    dst = np.empty(out_shape, np.float32)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if b == 1:
        along_last(src.reshape(a, shape[axis]), idx, w32, dst.reshape(a, len(idx)))
    else:
        along_middle(src.reshape(a, shape[axis], b), idx, w32, dst.reshape(a, len(idx), b))
    return dst
