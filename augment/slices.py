"""The slice-parallel path: a volume cut along z, warped in several processes, stitched.

The original notes' idea, made exact. ``warp_slices(volume, matrix, out_shape)`` gives what
``augment.affine_warp`` gives for the same pull map (float tolerance), computed by a pool
of processes that share the input and the output through ``multiprocessing.shared_memory``:

- an in-plane map (output z reads source slice ``+-z + t`` for an integer ``t``; y and x
  do not depend on z: rotations about z, in-plane affines and shears, flips, integer z
  shifts) makes every output slice a 2D warp of one source slice; each process takes a
  run of slices and warps them with the ``"numba"`` 2D kernel
  (:mod:`augment.kernels.cpu2d`) or ``"skimage"`` (``skimage.transform.warp`` with an
  ``AffineTransform``, as the notes proposed);
- any other map cuts the OUTPUT into z-slabs; each process computes its slab from the
  whole shared input with the 3D kernel (the matrix shifted by the slab's first z).

``SlicePool`` owns the processes and the shared buffers and is meant to be reused::

    with SlicePool(processes=2) as pool:
        src = pool.shared((200, 512, 512), np.float32)   # fill in place: no copy in
        src[...] = volume
        out = pool.warp(src, matrix, src.shape, backend="numba")

Processes are spawned (safe with threads and CUDA in the caller) with one thread each, by
:class:`augment.workers.WorkerPool`, and die with the process that started them.
"""

from __future__ import annotations

import atexit
import time
import traceback
from multiprocessing import connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from augment import matrices as mx
from augment._validate import (
    IMAGE_DTYPES,
    LABEL_DTYPES,
    check_matrix,
    check_order,
    check_out_shape,
)
from augment.backends.numpy import warp_numpy
from augment.workers import Segment, WorkerDied, WorkerFailed, WorkerPool

__all__ = ["SlicePool", "in_plane", "warp_slices"]

BACKENDS = ("numba", "skimage")
_TOL = 1e-9
_DEFAULT_POOLS: dict[int, SlicePool] = {}


def in_plane(matrix: ArrayLike) -> tuple[int, int] | None:
    """``(s, t)`` when output slice z reads source slice ``s * z + t`` (``s`` is +-1, ``t``
    an integer) and the in-plane part does not depend on z; else None."""
    m = mx.to_3x4(check_matrix(matrix))
    if m.ndim != 2:
        raise ValueError(f"one (3, 4) matrix, got shape {m.shape}")
    s = m[0, 0]
    t = m[0, 3]
    if (
        abs(abs(s) - 1.0) > _TOL
        or abs(m[0, 1]) > _TOL
        or abs(m[0, 2]) > _TOL
        or abs(m[1, 0]) > _TOL
        or abs(m[2, 0]) > _TOL
        or abs(t - round(t)) > _TOL
    ):
        return None
    return int(round(s)), int(round(t))


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``[0, n)``, sizes differing by at most one."""
    parts = max(1, min(parts, n))
    edges = [n * k // parts for k in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _out_dtype(src: np.dtype, order: int) -> np.dtype:
    return np.dtype(np.float32) if order == 1 else src


def _fill(cval: float, dtype: np.dtype) -> Any:
    if dtype.kind in "iub":
        return np.asarray(cval).astype(dtype).item()
    return float(cval)


# ------------------------------------------------------------------------ the computation
def _warp_range(
    src: NDArray[Any],
    m: NDArray[np.float64],
    out: NDArray[Any],
    z0: int,
    z1: int,
    *,
    backend: str,
    order: int,
    cval: float,
) -> None:
    """Output slices ``[z0, z1)`` of ``out`` from ``src``: 2D per slice for an in-plane
    map, else one 3D pass over the slab. ``m`` is ``(3, 4)``. The 3D kernel is numba's
    parallel one, which the pool's processes run on their single thread (sharing the
    compiled code, and its on-disk cache, with ``affine_warp``)."""
    plane = in_plane(m)
    fill = _fill(cval, out.dtype)
    if plane is None:
        if backend != "numba":
            raise ValueError(
                f"backend {backend!r} warps z-slices and needs an in-plane "
                f"matrix; this one is 3D: {m.tolist()}"
            )
        slab = mx.to_3x4(mx.to_4x4(m) @ mx.translation([z0, 0.0, 0.0]))
        shape = (z1 - z0, out.shape[1], out.shape[2])
        if order == 1:
            warp_numpy(
                src[None],
                None,
                slab,
                shape,
                image_order=1,
                cval=float(cval),
                out_image=out[None, z0:z1],
            )
        else:
            warp_numpy(None, src[None], slab, shape, label_cval=fill, out_label=out[None, z0:z1])
        return
    s, t = plane
    zmap = s * np.arange(out.shape[0], dtype=np.int64) + t
    zmap[(zmap < 0) | (zmap >= src.shape[0])] = -1
    m2 = np.ascontiguousarray(m[1:, 1:], dtype=np.float64)
    if backend == "numba":
        from augment.kernels import cpu2d

        cpu2d.warp_slices(src, m2, zmap, out, z0, z1, fill, order == 1)
        return
    _skimage_slices(src, m2, zmap, out, z0, z1, order, cval, fill)


def _skimage_slices(
    src: NDArray[Any],
    m2: NDArray[np.float64],
    zmap: NDArray[np.int64],
    out: NDArray[Any],
    z0: int,
    z1: int,
    order: int,
    cval: float,
    fill: Any,
) -> None:
    from skimage.transform import AffineTransform, warp

    # skimage points are (x, y) = (col, row) and warp() takes the output -> input map
    (a, b, ty), (c, d, tx) = m2
    tf = AffineTransform(matrix=np.array([[d, c, tx], [b, a, ty], [0.0, 0.0, 1.0]]))
    for z in range(z0, z1):
        if zmap[z] < 0:
            out[z] = fill
            continue
        res = warp(
            src[zmap[z]],
            tf,
            output_shape=out.shape[1:],
            order=order,
            mode="constant",
            cval=cval,
            preserve_range=True,
            clip=False,
        )
        out[z] = res if order == 1 else np.rint(res).astype(out.dtype)


def _check(volume: Any, order: int, backend: str) -> NDArray[Any]:
    if not isinstance(volume, np.ndarray) or volume.ndim != 3:
        raise ValueError(
            f"volume must be a (D, H, W) numpy array, got "
            f"{getattr(volume, 'shape', type(volume).__name__)}"
        )
    allowed = IMAGE_DTYPES if order == 1 else IMAGE_DTYPES + LABEL_DTYPES
    if volume.dtype.type not in allowed or volume.dtype == np.bool_:
        raise TypeError(f"volume has unsupported dtype {volume.dtype} for order {order}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return np.ascontiguousarray(volume)


# ------------------------------------------------------------------------------ processes
def _serve(conn: connection.Connection) -> None:
    """A pool process: warp the ranges it is sent until None or the pipe's end."""
    attached: dict[str, SharedMemory] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            break
        if task is None:
            break
        (
            src_name,
            src_shape,
            src_dtype,
            out_name,
            out_shape,
            out_dtype,
            m,
            z0,
            z1,
            backend,
            order,
            cval,
        ) = task
        try:
            for name in [n for n in attached if n not in (src_name, out_name)]:
                attached.pop(name).close()
            for name in (src_name, out_name):
                if name not in attached:
                    attached[name] = SharedMemory(name=name)
            src = np.ndarray(src_shape, src_dtype, attached[src_name].buf)
            out = np.ndarray(out_shape, out_dtype, attached[out_name].buf)
            t0, c0 = time.perf_counter(), time.thread_time()
            _warp_range(src, m, out, z0, z1, backend=backend, order=order, cval=cval)
            reply: tuple[Any, ...] = ("ok", time.perf_counter() - t0, time.thread_time() - c0)
            del src, out
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    for shm in attached.values():
        shm.close()


class SlicePool:
    """Processes (created once) that warp slices or slabs of a shared-memory volume.

    Args:
        processes: worker processes (>= 1).

    After each call ``last_seconds`` and ``last_cpu_seconds`` hold every process's wall
    and CPU time for its share.

    The pool keeps one shared input and one shared output buffer, grown as needed. Use it
    as a context manager or call ``close()``; garbage collection and interpreter exit
    close it too, so nothing is left in /dev/shm. The processes die with this one
    (``augment.workers``).
    """

    def __init__(self, processes: int = 2) -> None:
        if int(processes) != processes or processes < 1:
            raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
        self.processes = int(processes)
        self._workers = WorkerPool("SlicePool")
        self._buffers: dict[str, Segment | None] = {"in": None, "out": None}
        self.last_seconds: list[float] = []
        self.last_cpu_seconds: list[float] = []
        self._workers.start(_serve, [()] * self.processes)

    def __enter__(self) -> SlicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the processes and unlink the shared buffers (idempotent)."""
        self._buffers = {"in": None, "out": None}
        self._workers.close()

    @property
    def closed(self) -> bool:
        return self._workers.closed

    def __repr__(self) -> str:
        return f"SlicePool(processes={self.processes}{', closed' if self.closed else ''})"

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> NDArray[Any]:
        """The shared array ``key`` with this shape and dtype (its segment grown if needed;
        the segment keeps the array as its one view)."""
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        seg = self._buffers[key]
        if seg is None or seg.nbytes < nbytes:
            if seg is not None:
                self._workers.free(seg)
            seg = self._workers.segment(nbytes)
            self._buffers[key] = seg
        arr = seg.views[0] if seg.views else None
        if arr is None or arr.shape != shape or arr.dtype != dtype:
            arr = np.ndarray(shape, dtype, seg.buf)
            seg.views[:] = [arr]
        return arr

    def _current(self, key: str) -> NDArray[Any] | None:
        seg = self._buffers[key]
        return seg.views[0] if seg is not None and seg.views else None

    def shared(self, shape: tuple[int, int, int], dtype: Any = np.float32) -> NDArray[Any]:
        """The pool's shared input array: write a volume into it and pass it to
        :meth:`warp`, which then copies nothing in. Valid until the next call that
        needs a larger input."""
        if self.closed:
            raise RuntimeError("this SlicePool is closed")
        return self._buffer("in", tuple(int(s) for s in shape), np.dtype(dtype))

    def warp(
        self,
        volume: NDArray[Any],
        matrix: ArrayLike,
        out_shape: ArrayLike,
        *,
        backend: str = "numba",
        order: int = 1,
        cval: float = 0.0,
        out: NDArray[Any] | None = None,
        copy: bool = True,
    ) -> NDArray[Any]:
        """:func:`warp_slices` on this pool's processes.

        Args:
            copy: False returns the pool's shared output array itself (no copy out), valid
                until the next call.

        Returns:
            The warped volume, ``out`` when given.
        """
        if self.closed:
            raise RuntimeError("this SlicePool is closed")
        order = check_order(order)
        shape = check_out_shape(out_shape)
        src = _check(volume, order, backend)
        m = check_matrix(matrix)
        if m.ndim != 2:
            raise ValueError(f"one (3, 4) matrix, got shape {m.shape}")
        if in_plane(m) is None and backend != "numba":
            raise ValueError(
                f"backend {backend!r} warps z-slices and needs an in-plane "
                f"matrix (rotation about z, flips, ...); this one is 3D"
            )
        shared_in = self._current("in")
        if shared_in is None or not (
            shared_in.ctypes.data == src.ctypes.data
            and shared_in.shape == src.shape
            and shared_in.dtype == src.dtype
        ):
            shared_in = self._buffer("in", src.shape, src.dtype)
            np.copyto(shared_in, src)
        dtype = _out_dtype(src.dtype, order)
        shared_out = self._buffer("out", shape, dtype)
        in_seg, out_seg = self._buffers["in"], self._buffers["out"]
        assert in_seg is not None and out_seg is not None
        ranges = _split(shape[0], self.processes)
        try:
            for i, (z0, z1) in enumerate(ranges):
                self._workers.send(
                    i,
                    (
                        in_seg.name,
                        src.shape,
                        src.dtype.str,
                        out_seg.name,
                        shape,
                        dtype.str,
                        m,
                        z0,
                        z1,
                        backend,
                        order,
                        float(cval),
                    ),
                )
            self.last_seconds, self.last_cpu_seconds = self._gather(len(ranges))
        except WorkerDied as exc:
            self.close()
            if not exc.started:
                raise RuntimeError(f"{exc}; the pool is closed") from None
            raise RuntimeError(
                f"SlicePool process {exc.worker} (pid {exc.pid}) died: it {exc.how}; "
                "the pool is closed"
            ) from None
        except WorkerFailed as exc:
            self.close()
            raise RuntimeError(f"the SlicePool is closed: {exc}") from None
        if out is not None:
            if out.shape != shape or out.dtype != dtype:
                raise ValueError(
                    f"out must be {dtype} of shape {shape}, got {out.dtype} {out.shape}"
                )
            np.copyto(out, shared_out)
            return out
        return shared_out.copy() if copy else shared_out

    def _gather(self, n: int) -> tuple[list[float], list[float]]:
        """The compute seconds, wall and CPU, of workers ``0..n-1``; an error raises."""
        replies: dict[int, tuple[Any, ...]] = {}
        while len(replies) < n:
            waiting = [i for i in range(n) if i not in replies]
            for i, reply in self._workers.receive(0.5, waiting):
                replies[i] = reply
        errors = [r for r in replies.values() if r[0] == "error"]
        if errors:
            raise RuntimeError(
                f"a SlicePool process failed: {errors[0][1]}\n\nworker traceback:\n{errors[0][2]}"
            )
        return [replies[i][1] for i in range(n)], [replies[i][2] for i in range(n)]


def _default_pool(processes: int) -> SlicePool:
    pool = _DEFAULT_POOLS.get(processes)
    if pool is None or pool.closed:
        pool = SlicePool(processes)
        _DEFAULT_POOLS[processes] = pool
    return pool


@atexit.register
def _close_default_pools() -> None:
    for pool in _DEFAULT_POOLS.values():
        pool.close()
    _DEFAULT_POOLS.clear()


def warp_slices(
    volume: NDArray[Any],
    matrix: ArrayLike,
    out_shape: ArrayLike,
    *,
    processes: int = 2,
    backend: str = "numba",
    order: int = 1,
    cval: float = 0.0,
    pool: SlicePool | None = None,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """Warp a volume slice by slice (in-plane maps) or slab by slab (3D maps) in parallel.

    Args:
        volume: ``(D, H, W)`` numpy array (labels: an integer dtype with ``order=0``).
        matrix: ``(3, 4)`` / ``(4, 4)`` pull map, output index -> input index (z, y, x).
        out_shape: ``(d, h, w)``.
        processes: 0 computes in this process; else the processes of ``pool``, or of a
            pool kept for this process count and reused by later calls (closed at exit).
        backend: ``"numba"`` (2D kernel per slice, 3D kernel per slab) or ``"skimage"``
            (``skimage.transform.warp`` per slice; in-plane maps only).
        order: 1 bilinear/trilinear (float32 out), 0 nearest (the input dtype).
        cval: value outside the source.
        pool: a ``SlicePool`` to run on (``processes`` is then ignored).
        out: optional output array.

    Returns:
        ``(d, h, w)``, equal to ``augment.affine_warp(volume, matrix, out_shape, order,
        cval)`` within float tolerance (nearest: ties may round apart with skimage).

    Raises:
        ValueError: bad shapes, backend or matrix; skimage with a 3D matrix.
        RuntimeError: a process failed or died.
    """
    if pool is None and processes > 0:
        pool = _default_pool(int(processes))
    if pool is not None:
        return pool.warp(
            volume, matrix, out_shape, backend=backend, order=order, cval=cval, out=out
        )
    if processes != 0:
        raise ValueError(f"processes must be >= 0, got {processes!r}")
    order = check_order(order)
    shape = check_out_shape(out_shape)
    src = _check(volume, order, backend)
    m = check_matrix(matrix)
    if m.ndim != 2:
        raise ValueError(f"one (3, 4) matrix, got shape {m.shape}")
    dtype = _out_dtype(src.dtype, order)
    if out is None:
        out = np.empty(shape, dtype)
    elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous {dtype} array of shape {shape}, got "
            f"{out.dtype} {out.shape}"
        )
    _warp_range(src, m, out, 0, shape[0], backend=backend, order=order, cval=cval)
    return out
