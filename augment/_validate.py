"""Input checks and dtype tables shared by the public entry points and both backends.

Every user-facing value is checked here once, with an error that echoes it; the backends
and kernels downstream take the checked values as they are. The torch dtype tables are
names (``getattr(torch, name)``), so this module stays importable without torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from augment import matrices as mx

IMAGE_DTYPES = (np.float32, np.float64, np.int16, np.uint8, np.int32, np.uint16, np.float16)
LABEL_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.bool_)
TORCH_IMAGE_DTYPES = ("float32", "float16", "bfloat16", "float64", "int16", "uint8", "int32")
TORCH_LABEL_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "bool")
TORCH_OUT_DTYPES = ("float32", "bfloat16")
LABEL_MODES = ("nearest", "linear_onehot")


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch object (checked by its module, without importing torch)."""
    return type(x).__module__.startswith("torch")


def check_matrix(matrix: ArrayLike, batch: int | None = None) -> NDArray[np.float64]:
    """Validate a pull map and return it as float64 ``(3, 4)`` or ``(B, 3, 4)``."""
    if is_torch(matrix):
        matrix = matrix.detach().cpu().numpy()  # type: ignore[union-attr]
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


def check_cval(cval: float, name: str = "cval") -> float:
    if not np.isfinite(cval):
        raise ValueError(f"{name} must be finite, got {cval!r}")
    return float(cval)


def check_label_mode(mode: str) -> str:
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}")
    return mode


def check_programs(programs: Any, batch: int) -> NDArray[np.float64]:
    """``None`` / ``(n, 4)`` / ``(B, n, 4)`` (numpy or tensor) -> float64 ``(B, n, 4)``."""
    if programs is None:
        return np.zeros((batch, 0, 4), dtype=np.float64)
    if is_torch(programs):
        programs = programs.detach().cpu().numpy()
    p = np.asarray(programs, dtype=np.float64)
    if p.ndim == 2:
        p = np.broadcast_to(p, (batch, *p.shape))
    if p.ndim != 3 or p.shape[0] != batch or p.shape[2] != 4:
        raise ValueError(f"programs must be (n_ops, 4) or ({batch}, n_ops, 4), got {p.shape}")
    return np.ascontiguousarray(p)


def check_field(field: Any, batch: int) -> NDArray[np.float64] | None:
    """``None`` or ``(B, 3, gz, gy, gx)`` control vectors (numpy or tensor) -> float64,
    each control axis with at least 4 points, every value finite."""
    if field is None:
        return None
    if is_torch(field):
        field = field.detach().cpu().numpy()
    f = np.asarray(field, dtype=np.float64)
    if f.ndim != 5 or f.shape[0] != batch or f.shape[1] != 3 or min(f.shape[2:]) < 4:
        raise ValueError(
            f"field must be ({batch}, 3, gz, gy, gx) control vectors with gz, gy, gx >= 4, "
            f"got shape {f.shape}"
        )
    if not np.isfinite(f).all():
        raise ValueError("field must be finite")
    return np.ascontiguousarray(f)


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


def check_out(out: Any, src: Any, out_shape: tuple[int, int, int], dtype: Any, name: str) -> Any:
    """``out`` if it can take the ``(C, d, h, w)`` result of ``src`` (the kernel writes
    without bounds checks), else a ValueError naming what differs; None passes through."""
    if out is None or src is None:
        return None
    want = (src.shape[0], *out_shape)
    dt = np.dtype(dtype if dtype is not None else src.dtype)
    if (
        not isinstance(out, np.ndarray)
        or out.shape != want
        or out.dtype != dt
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"{name} must be a writeable C-contiguous {dt} array of shape {want}, "
            f"got {getattr(out, 'dtype', type(out).__name__)} "
            f"{getattr(out, 'shape', '')}"
        )
    return out
