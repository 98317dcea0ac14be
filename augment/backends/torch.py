"""The torch backend: ``affine_warp`` and ``Compose`` plans on CPU or CUDA tensors.

Batches are ``(B, C, D, H, W)`` tensors or lists of ``(C, D_b, H_b, W_b)`` tensors of
different sizes (one source region per sample), with one ``(3, 4)`` pull map per sample.
On CUDA the whole batch (image, label and the fused intensity program) is one Triton
launch (:mod:`augment.kernels.triton_warp`); on CPU tensors, or where Triton is missing,
the pure-torch kernels of :mod:`augment.kernels.torch_fallback` compute the same thing.
When every matrix of a batch is an exact signed permutation (flips, 90-degree rotations,
axis swaps, integer crops) the output is an index copy, bit-identical to numpy.

Everything is checked here; the kernels take the checked values as they are. Parameters
are drawn on the host by ``Compose`` exactly as for numpy (one generator per sample), so
the same generators give the same parameters and the same patches within float tolerance.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from augment import matrices as mx
from augment._validate import (
    LABEL_MODES,
    TORCH_IMAGE_DTYPES,
    TORCH_LABEL_DTYPES,
    TORCH_OUT_DTYPES,
    check_cval,
    check_field,
    check_label_mode,
    check_matrix,
    check_order,
    check_out_shape,
    check_programs,
)
from augment.kernels import torch_fallback as tk
from augment.plan import Plan, exact_maps

IMAGE_DTYPES = tuple(getattr(torch, n) for n in TORCH_IMAGE_DTYPES)
LABEL_DTYPES = tuple(getattr(torch, n) for n in TORCH_LABEL_DTYPES)
OUT_DTYPES = tuple(getattr(torch, n) for n in TORCH_OUT_DTYPES)
BACKENDS = ("auto", "triton", "torch")
OPTIONS = ("out_dtype", "backend", "classes")

Batch = torch.Tensor | list[torch.Tensor]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernel imports (``triton`` installed and working)."""
    try:
        import augment.kernels.triton_warp  # noqa: F401
    except Exception:  # any failure means: use the torch kernels
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# -- inputs ---------------------------------------------------------------------------------
def _as_batch(x: Any, name: str) -> Batch | None:
    """A ``(B, C, D, H, W)`` tensor or a list of ``(C, D, H, W)`` tensors, checked."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.dim() != 5:
            raise ValueError(
                f"a torch {name} must be (B, C, D, H, W) or a list of (C, D, H, W) tensors, "
                f"got shape {tuple(x.shape)}; for one sample use x[None]"
            )
        return x
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        bad = [tuple(t.shape) for t in x if t.dim() != 4]
        if bad:
            raise ValueError(f"each {name} of a list must be (C, D, H, W), got shapes {bad}")
        if len({(t.dtype, t.device, int(t.shape[0])) for t in x}) != 1:
            raise ValueError(
                f"the {name} tensors of a list must share dtype, device and "
                f"channel count, got "
                f"{[(str(t.dtype), str(t.device), int(t.shape[0])) for t in x]}"
            )
        return list(x)
    raise TypeError(f"{name} must be a torch tensor or a list of tensors, got {type(x).__name__}")


def _first(x: Batch) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


def _shapes(x: Batch) -> NDArray[np.int64]:
    if isinstance(x, torch.Tensor):
        return np.tile(np.asarray(x.shape[2:], dtype=np.int64), (int(x.shape[0]), 1))
    return np.asarray([t.shape[1:] for t in x], dtype=np.int64).reshape(-1, 3)


def _channels(x: Batch) -> int:
    return int(x.shape[1]) if isinstance(x, torch.Tensor) else int(x[0].shape[0])


def _check_dtype(x: Batch, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    dt = _first(x).dtype
    if dt not in allowed:
        raise TypeError(
            f"{name} has unsupported dtype {dt}; supported: {', '.join(str(d) for d in allowed)}"
        )


def _bool_as_uint8(x: Batch) -> Batch:
    if _first(x).dtype != torch.bool:
        return x
    if isinstance(x, torch.Tensor):
        return x.view(torch.uint8)
    return [t.view(torch.uint8) for t in x]


@dataclass(frozen=True)
class Inputs:
    """A checked batch: images and labels (bool labels viewed as uint8), either None."""

    images: Batch | None
    labels: Batch | None
    shapes: NDArray[np.int64]  # (B, 3)
    batched = True

    @property
    def batch(self) -> int:
        return int(self.shapes.shape[0])

    @property
    def has_label(self) -> bool:
        return self.labels is not None

    @property
    def device(self) -> torch.device:
        ref = self.images if self.images is not None else self.labels
        assert ref is not None
        return _first(ref).device

    def host_label(self, index: int) -> NDArray[Any] | None:
        """Sample ``index``'s label on the host (for transforms that sample from it)."""
        return None if self.labels is None else self.labels[index].cpu().numpy()


def inputs(image: Any, label: Any) -> Inputs:
    """Check a batch of images and labels (either may be None, not both).

    Raises:
        TypeError: not tensors, unsupported dtypes.
        ValueError: wrong ndim; image and label shapes or devices that differ.
    """
    imgs = _as_batch(image, "image")
    labs = _as_batch(label, "label")
    if imgs is None and labs is None:
        raise ValueError("give images, labels, or both")
    if imgs is not None:
        _check_dtype(imgs, "image", IMAGE_DTYPES)
    if labs is not None:
        _check_dtype(labs, "label", LABEL_DTYPES)
        labs = _bool_as_uint8(labs)
    ref = imgs if imgs is not None else labs
    assert ref is not None
    shapes = _shapes(ref)
    if imgs is not None and labs is not None:
        lshapes = _shapes(labs)
        if shapes.shape != lshapes.shape or not np.array_equal(shapes, lshapes):
            raise ValueError(
                f"image and label shapes differ: {shapes.tolist()} vs {lshapes.tolist()}"
            )
        if _first(imgs).device != _first(labs).device:
            raise ValueError("image and label must be on the same device")
    return Inputs(imgs, labs, shapes)


def label_classes(labels: Batch, fill: int) -> torch.Tensor:
    """Sorted classes present in any sample, plus ``fill`` (a superset of each sample's own
    classes gives the same one-hot argmax, so one list serves the batch)."""
    parts = [labels] if isinstance(labels, torch.Tensor) else labels
    present = [torch.unique(p).to(torch.int64) for p in parts]
    fill_t = torch.tensor([fill], dtype=torch.int64, device=present[0].device)
    return torch.unique(torch.cat([*present, fill_t]))


# -- resampling -----------------------------------------------------------------------------
def _use_triton(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return False
    usable = triton_available() and (device.type == "cuda" or _interpreting())
    if backend == "triton" and not usable:
        raise RuntimeError(
            "the Triton backend needs triton and a CUDA tensor "
            "(or TRITON_INTERPRET=1 for CPU tensors)"
        )
    return usable if backend == "triton" else (usable and device.type == "cuda")


def _check_options(out_dtype: torch.dtype, backend: str) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def warp_torch(
    images: Any,
    labels: Any,
    matrices: Any,
    out_shape: Sequence[int],
    *,
    image_order: int = 1,
    cval: float = 0.0,
    label_cval: float = 0,
    programs: Any = None,
    out_dtype: torch.dtype = torch.float32,
    label_mode: str = "nearest",
    classes: torch.Tensor | None = None,
    backend: str = "auto",
    field: Any = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Resample a batch of images and labels in one pass, one pull map per sample.

    Args:
        images: ``(B, C, D, H, W)`` tensor or list of ``(C, D_b, H_b, W_b)`` tensors, or None.
        labels: the same layout, integer (or bool) dtype, or None.
        matrices: ``(B, 3, 4)`` / ``(B, 4, 4)`` pull maps, or one ``(3, 4)`` for all.
        out_shape: ``(d, h, w)``.
        image_order: 1 trilinear, 0 nearest (the image comes out in ``out_dtype`` either way).
        cval: image value outside the source.  label_cval: label value outside.
        programs: fused intensity programs ``(B, n_ops, 4)`` / ``(n_ops, 4)`` or None.
        out_dtype: image dtype, ``torch.float32`` or ``torch.bfloat16``.
        label_mode: ``"nearest"`` or ``"linear_onehot"``.
        classes: sorted classes for ``linear_onehot`` (default: those present plus the fill).
        backend: ``"auto"`` (Triton on CUDA when importable), ``"triton"`` or ``"torch"``.
        field: ``(B, 3, gz, gy, gx)`` control vectors of a displacement added to every
            sampled coordinate (see :class:`augment.plan.Plan`), or None.

    Returns:
        ``(image (B, C, d, h, w), label (B, L, d, h, w))``, None where not given.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, matrices or options.
    """
    src = inputs(images, labels)
    _check_options(out_dtype, backend)
    check_label_mode(label_mode)
    check_order(image_order)
    shape = check_out_shape(out_shape)
    check_cval(cval)
    batch = src.batch
    m = check_matrix(matrices, batch)
    if m.ndim == 2:
        m = np.broadcast_to(m, (batch, 3, 4)).copy()
    prog = check_programs(programs, batch)
    fld = check_field(field, batch)
    exact = exact_maps(m, fld)
    return _warp(
        src,
        m,
        exact,
        shape,
        image_order=image_order,
        cval=float(cval),
        label_cval=label_cval,
        programs=prog,
        out_dtype=out_dtype,
        label_mode=label_mode,
        classes=classes,
        backend=backend,
        field=fld,
    )


def _warp(
    src: Inputs,
    m: NDArray[np.float64],
    exact: tuple[mx.ExactMap | None, ...],
    shape: tuple[int, int, int],
    *,
    image_order: int,
    cval: float,
    label_cval: float,
    programs: NDArray[np.float64],
    out_dtype: torch.dtype,
    label_mode: str,
    classes: torch.Tensor | None,
    backend: str,
    field: NDArray[np.float64] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The checked batch through the exact copy, the Triton kernel or the fallback."""
    imgs, labs = src.images, src.labels
    if field is not None and not np.any(field):
        field = None  # zero displacements: the affine path gives the same bits
    if label_mode == "nearest" and field is None and all(e is not None for e in exact):
        return _exact_batch(
            imgs,
            labs,
            exact,  # type: ignore[arg-type]
            shape,
            cval,
            label_cval,
            programs,
            out_dtype,
        )
    if labs is not None and label_mode == "linear_onehot" and classes is None:
        classes = label_classes(labs, int(label_cval))
    if _use_triton(backend, src.device):
        # imported here: triton is optional, and importing it costs seconds
        from augment.kernels import triton_warp

        return triton_warp.warp_batch(
            imgs,
            labs,
            m,
            shape,
            image_order=image_order,
            cval=cval,
            label_cval=int(label_cval),
            programs=programs,
            out_dtype=out_dtype,
            label_mode=label_mode,
            classes=classes,
            field=field,
        )
    return tk.warp_batch(
        imgs,
        labs,
        m,
        shape,
        image_order=image_order,
        cval=cval,
        label_cval=label_cval,
        programs=programs,
        out_dtype=out_dtype,
        label_mode=label_mode,
        classes=classes,
        field=field,
    )


def _exact_batch(
    imgs: Batch | None,
    labs: Batch | None,
    exact: Sequence[mx.ExactMap],
    shape: tuple[int, int, int],
    cval: float,
    label_cval: float,
    prog: NDArray[np.float64],
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Index copies (a few tensor ops per sample), then the program over the batch."""
    out_img = out_lab = None
    if imgs is not None:
        first = _first(imgs)
        out_img = torch.empty(
            (len(exact), _channels(imgs), *shape), dtype=torch.float32, device=first.device
        )
        for b, em in enumerate(exact):
            tk.exact_copy(imgs[b], em, shape, cval, out_img[b])
        if prog.shape[1]:
            out_img = tk.run_program(out_img, prog)
        out_img = out_img.to(out_dtype)
    if labs is not None:
        first = _first(labs)
        out_lab = torch.empty(
            (len(exact), _channels(labs), *shape), dtype=first.dtype, device=first.device
        )
        fill = torch.tensor(label_cval).to(first.dtype).item()
        for b, em in enumerate(exact):
            tk.exact_copy(labs[b], em, shape, fill, out_lab[b])
    return out_img, out_lab


def affine_warp_torch(
    image: Any,
    matrix: Any,
    out_shape: Sequence[int],
    *,
    order: int = 1,
    cval: float = 0.0,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`augment.affine_warp` for tensors.

    Args:
        image: ``(C, D, H, W)``, ``(B, C, D, H, W)`` or a list of ``(C, D_b, H_b, W_b)``.
        matrix: ``(3, 4)`` / ``(4, 4)`` pull map (shared by a batch) or ``(B, 3, 4)``.
        out_shape: ``(d, h, w)``.
        order: 1 trilinear (float32 output, or ``out_dtype``), 0 nearest (keeps the dtype).
        cval: value outside the source.
        out: optional tensor to write the result into.
        out_dtype: for ``order=1``, ``torch.float32`` (default) or ``torch.bfloat16``.
        backend: see :func:`warp_torch`.

    Returns:
        The resampled tensor, ``(C, d, h, w)`` for a single sample, else ``(B, C, d, h, w)``.
    """
    order = check_order(order)
    single = isinstance(image, torch.Tensor) and image.dim() == 4
    batch = image[None] if single else image
    if (
        single
        and np.asarray(matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else matrix).ndim
        == 3
    ):
        raise ValueError("a single (C, D, H, W) tensor takes one (3, 4) matrix")
    if out_dtype is None:
        out_dtype = out.dtype if (out is not None and order == 1) else torch.float32
    first = _first(_as_batch(batch, "image"))  # type: ignore[arg-type]
    if order == 1:
        img, _ = warp_torch(
            batch,
            None,
            matrix,
            out_shape,
            image_order=1,
            cval=cval,
            out_dtype=out_dtype,
            backend=backend,
        )
        result = img
    elif first.dtype in LABEL_DTYPES:
        _, result = warp_torch(None, batch, matrix, out_shape, label_cval=cval, backend=backend)
    else:
        if first.dtype not in IMAGE_DTYPES:
            raise TypeError(f"image has unsupported dtype {first.dtype}")
        img, _ = warp_torch(
            batch,
            None,
            matrix,
            out_shape,
            image_order=0,
            cval=cval,
            backend=backend if first.dtype != torch.float64 else "torch",
        )
        assert img is not None
        result = img.to(first.dtype)
    assert result is not None
    if single:
        result = result[0]
    if out is not None:
        if tuple(out.shape) != tuple(result.shape) or out.dtype != result.dtype:
            raise ValueError(
                f"out must be a {result.dtype} tensor of shape "
                f"{tuple(result.shape)}, got {out.dtype} {tuple(out.shape)}"
            )
        out.copy_(result)
        return out
    return result


# -- Compose plans ----------------------------------------------------------------------------
def execute(
    plan: Plan,
    inputs: Inputs,
    *,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    classes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run a plan on a batch: one fused launch, then any post-warp intensity transforms.

    Args:
        plan: from ``Compose.plan``, one sample per input.
        inputs: from :func:`inputs`.
        out_dtype: image dtype, ``torch.float32`` or ``torch.bfloat16``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`warp_torch`).
        classes: sorted label classes for ``linear_onehot`` (default: computed on the
            device).

    Returns:
        ``{"image": (B, C, d, h, w) tensor, "label": (B, L, d, h, w) tensor, "params"}``,
        plus ``"target"`` (numpy ``(B, 4)``; a list with None for samples without a target),
        ``"points"`` (list of B arrays) and ``"coord"`` (tensor ``(B, 3, ...)`` on the
        inputs' device) where the plan has them.
    """
    _check_options(out_dtype, backend)
    assert plan.label_mode in LABEL_MODES
    post_ops = inputs.images is not None and plan.post_warp
    img, lab = _warp(
        inputs,
        plan.matrices,
        plan.exact,
        plan.out_shape,
        image_order=plan.image_order,
        cval=plan.cval,
        label_cval=plan.label_cval,
        programs=plan.programs,
        out_dtype=torch.float32 if post_ops else out_dtype,
        label_mode=plan.label_mode,
        classes=classes,
        backend=backend,
        field=plan.field,
    )
    if img is not None and post_ops:
        # patch-statistic transforms: per sample, after the warp, with torch ops
        for b, ops in enumerate(plan.after_warp):
            x = img[b]
            for t, p in ops:
                x = torch.as_tensor(t.apply(x, p), dtype=torch.float32)
            img[b] = x
        img = img.to(out_dtype)
    result: dict[str, Any] = {"image": img, "label": lab, "params": plan.params}
    if plan.target is not None:
        targets = list(plan.target)
        result["target"] = (
            np.stack(targets) if all(t is not None for t in targets) else targets  # type: ignore[arg-type]
        )
    if plan.points is not None:
        result["points"] = list(plan.points)
    if plan.coord is not None:
        result["coord"] = torch.from_numpy(plan.coord).to(inputs.device)
    return result
