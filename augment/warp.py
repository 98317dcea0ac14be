"""``affine_warp``: one resampling pass for numpy arrays (numba) or torch tensors.

The matrix convention is that of :mod:`augment.matrices`: a ``(3, 4)`` (or ``(4, 4)``) pull
map from OUTPUT voxel index to INPUT voxel index, voxel centres at integers. Samples whose
interpolation taps fall outside the source read ``cval`` (scipy.ndimage's
``mode="grid-constant"``). A matrix that is a signed axis permutation with an integer
offset (flips, 90-degree rotations, axis swaps, integer crops) is served by an exact index
copy, bit-identical to ``np.flip`` / ``np.rot90`` / ``np.transpose`` plus slicing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from augment import matrices as mx
from augment.kernels import program as prog_mod

IMAGE_DTYPES = (np.float32, np.float64, np.int16, np.uint8, np.int32, np.uint16, np.float16)
LABEL_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.bool_)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def check_matrix(matrix: ArrayLike, batch: int | None = None) -> NDArray[np.float64]:
    """Validate a pull map and return it as float64 ``(3, 4)`` or ``(B, 3, 4)``."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[-2:] not in ((3, 4), (4, 4)) or m.ndim not in (2, 3):
        raise ValueError(f"matrix must have shape (3, 4), (4, 4) or (B, 3, 4), got {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"matrix must be finite, got {m.tolist()}")
    m = mx.to_3x4(m)
    if batch is not None and m.ndim == 3 and m.shape[0] != batch:
        raise ValueError(f"matrix batch {m.shape[0]} does not match the {batch} inputs")
    return m


def check_out_shape(out_shape: ArrayLike) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in np.atleast_1d(np.asarray(out_shape)))
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"out_shape must be three positive sizes (d, h, w), got {out_shape!r}")
    return shape


def check_order(order: int) -> int:
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    return int(order)


def as_channels(x: NDArray[Any], name: str) -> tuple[NDArray[Any], bool]:
    """``(D, H, W)`` or ``(C, D, H, W)`` -> C-contiguous ``(C, D, H, W)`` and whether it had C."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim == 3:
        return np.ascontiguousarray(x[None]), False
    if x.ndim == 4:
        return np.ascontiguousarray(x), True
    raise ValueError(f"{name} must be (D, H, W) or (C, D, H, W), got shape {x.shape}")


def check_dtype(x: NDArray[Any], name: str, allowed: tuple[type, ...]) -> None:
    if x.dtype.type not in allowed:
        names = ", ".join(np.dtype(t).name for t in allowed)
        raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: {names}")


def exact_copy(
    src: NDArray[Any],
    em: mx.ExactMap,
    out_shape: tuple[int, int, int],
    fill: float,
    out: NDArray[Any],
) -> NDArray[Any]:
    """Exact index copy of ``src`` (C, D, H, W) under the signed permutation ``em`` into ``out``."""
    order = [0, 0, 0]  # output axis j reads input axis order[j]
    for k in range(3):
        order[em.axis[k]] = k
    view = src.transpose((0, *(1 + k for k in order)))
    dst_sl, src_sl = [slice(None)], [slice(None)]
    for j, k in enumerate(order):
        n_in = src.shape[1 + k]
        off = em.offset[k]
        if em.sign[k] < 0:
            view = np.flip(view, axis=1 + j)
            off = n_in - 1 - off
        lo, hi = max(0, -off), min(out_shape[j], n_in - off)  # output p reads view p + off
        if hi <= lo:
            out[...] = fill
            return out
        dst_sl.append(slice(lo, hi))
        src_sl.append(slice(lo + off, hi + off))
    if any(s.start > 0 or s.stop < n for s, n in zip(dst_sl[1:], out_shape, strict=True)):
        out[...] = fill
    out[tuple(dst_sl)] = view[tuple(src_sl)]
    return out


def warp_numpy(
    image: NDArray[Any] | None,
    label: NDArray[Any] | None,
    matrix: NDArray[np.float64],
    out_shape: tuple[int, int, int],
    *,
    image_order: int = 1,
    cval: float = 0.0,
    label_cval: int = 0,
    program: NDArray[np.float64] | None = None,
    out_image: NDArray[np.float32] | None = None,
    out_label: NDArray[Any] | None = None,
    parallel: bool = True,
) -> tuple[NDArray[np.float32] | None, NDArray[Any] | None]:
    """Fused numba pass for a channels-first image and label sharing one matrix.

    Inputs are already validated ``(C, D, H, W)`` C-contiguous arrays (or None). The image
    comes out float32 (nearest or trilinear, then ``program``); the label nearest, in its
    own dtype.
    """
    from augment.kernels import cpu

    prog = prog_mod.empty() if program is None else np.ascontiguousarray(program, np.float64)
    if image is not None and image.dtype == np.float16:
        image = image.astype(np.float32)  # numba has no float16 arithmetic
    m = np.ascontiguousarray(mx.to_3x4(matrix))
    ref = image if image is not None else label
    assert ref is not None
    src_shape = tuple(int(s) for s in ref.shape[1:])
    if image is not None and out_image is None:
        out_image = np.empty((image.shape[0], *out_shape), np.float32)
    if label is not None and out_label is None:
        out_label = np.empty((label.shape[0], *out_shape), label.dtype)

    em = mx.as_exact(m)
    if em is not None:
        if image is not None and out_image is not None:
            exact_copy(image, em, out_shape, cval, out_image)
            if len(prog):
                _run_program_inplace(out_image, prog, parallel)
        if label is not None and out_label is not None:
            exact_copy(label, em, out_shape, label_cval, out_label)
        return out_image, out_label

    img = image.reshape(-1) if image is not None else np.zeros(0, np.float32)
    lab = label.reshape(-1) if label is not None else np.zeros(0, np.uint8)
    oimg = out_image.reshape(-1) if out_image is not None else np.zeros(0, np.float32)
    olab = out_label.reshape(-1) if out_label is not None else np.zeros(0, lab.dtype)
    nc = 0 if image is None else image.shape[0]
    nl = 0 if label is None else label.shape[0]
    if label is not None:
        lval = np.asarray(label_cval).astype(label.dtype).item()
    else:
        lval = 0
    kernel = cpu.warp if parallel else cpu.warp_serial
    kernel(
        img,
        lab,
        m,
        oimg,
        olab,
        nc,
        nl,
        src_shape,
        out_shape,
        float(cval),
        lval,
        prog,
        image_order == 1,
    )
    return out_image, out_label


def _run_program_inplace(x: NDArray[np.float32], prog: NDArray[np.float64], parallel: bool) -> None:
    from augment.kernels import cpu

    flat = x.reshape(-1)
    (cpu.program_inplace if parallel else cpu.program_inplace_serial)(flat, prog)


def affine_warp(
    image: Any,
    matrix: ArrayLike,
    out_shape: ArrayLike,
    order: int = 1,
    cval: float = 0.0,
    out: Any = None,
) -> Any:
    """Resample ``image`` through the pull map ``matrix`` in one pass.

    Args:
        image: numpy ``(D, H, W)`` or ``(C, D, H, W)``; or a torch tensor ``(C, D, H, W)`` /
            ``(B, C, D, H, W)``, or a list of ``(C, D_b, H_b, W_b)`` tensors (see
            :func:`augment.torch_warp.affine_warp_torch`).
        matrix: ``(3, 4)`` / ``(4, 4)`` pull map (output index -> input index), or
            ``(B, 3, 4)`` for a batch of tensors.
        out_shape: ``(d, h, w)`` of the output.
        order: 1 trilinear (output float32), 0 nearest (output keeps the input dtype).
        cval: value for samples outside the input.
        out: optional preallocated output of the right shape and dtype.

    Returns:
        The resampled array (``out`` when given), with the input's channel layout.

    Raises:
        ValueError: wrong ndim, non-finite matrix, non-positive out_shape, bad order.
        TypeError: unsupported dtype or array type.
    """
    order = check_order(order)
    shape = check_out_shape(out_shape)
    if _is_torch(image) or (isinstance(image, (list, tuple)) and image and _is_torch(image[0])):
        from augment.torch_warp import affine_warp_torch

        return affine_warp_torch(image, matrix, shape, order=order, cval=cval, out=out)
    if not np.isfinite(cval):
        raise ValueError(f"cval must be finite, got {cval!r}")
    x, had_c = as_channels(image, "image")
    check_dtype(x, "image", IMAGE_DTYPES + LABEL_DTYPES)
    m = check_matrix(matrix)
    if m.ndim == 3:
        raise ValueError(f"a numpy image takes one (3, 4) matrix, got {m.shape}")
    if order == 1:
        if x.dtype.type not in IMAGE_DTYPES:
            x = x.astype(np.float32)
        want = (x.shape[0], *shape)
        o = None
        if out is not None:
            o = out if had_c else out[None]
            if o.shape != want or o.dtype != np.float32 or not o.flags.c_contiguous:
                raise ValueError(
                    f"out must be a C-contiguous float32 array of shape "
                    f"{want if had_c else shape}, got {out.dtype} {out.shape}"
                )
        result, _ = warp_numpy(x, None, m, shape, image_order=1, cval=cval, out_image=o)
    else:
        want = (x.shape[0], *shape)
        o = None
        if out is not None:
            o = out if had_c else out[None]
            if o.shape != want or o.dtype != x.dtype or not o.flags.c_contiguous:
                raise ValueError(
                    f"out must be a C-contiguous {x.dtype} array of shape "
                    f"{want if had_c else shape}, got {out.dtype} {out.shape}"
                )
        _, result = warp_numpy(None, x, m, shape, label_cval=cval, out_label=o)  # type: ignore[arg-type]
    assert result is not None
    return result if had_c else result[0]
