"""The torch face of the engine: ``affine_warp`` and ``Compose`` on CPU or CUDA tensors.

Batches are ``(B, C, D, H, W)`` tensors or lists of ``(C, D_b, H_b, W_b)`` tensors of
different sizes (one source region per sample), with one ``(3, 4)`` pull map per sample.
On CUDA the whole batch (image, label and the fused intensity program) is one Triton
launch (:mod:`augment.kernels.triton_warp`); on CPU tensors, or where Triton is missing,
the pure-torch kernels of :mod:`augment.kernels.torch_warp` compute the same thing.
When every matrix of a batch is an exact signed permutation (flips, 90-degree rotations,
axis swaps, integer crops) the output is an index copy, bit-identical to numpy.

Parameters are drawn on the host exactly as on the numpy path (``Compose.sample`` per
sample with its own generator, then :func:`augment.compose.stack_params`), so the same
generators give the same parameters and the same patches within float tolerance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from augment import matrices as mx
from augment.compose import Compose, ComposeParams, stack_params
from augment.kernels import torch_warp as tk
from augment.spatial import RandomAffine, RandomCrop, RandomFlip, RandomRot90, RandomSwapAxes
from augment.target_crop import TargetCrop
from augment.warp import check_matrix, check_order, check_out_shape

IMAGE_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int16,
    torch.uint8,
    torch.int32,
)
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
OUT_DTYPES = (torch.float32, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")

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
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _sample(x: Batch, b: int) -> torch.Tensor:
    return x[b]


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


def _batch_matrices(matrix: Any, batch: int) -> NDArray[np.float64]:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    m = check_matrix(matrix, batch)
    if m.ndim == 2:
        m = np.broadcast_to(m, (batch, 3, 4)).copy()
    return m


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

    Returns:
        ``(image (B, C, d, h, w), label (B, L, d, h, w))``, None where not given.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, matrices or options.
    """
    imgs = _as_batch(images, "image")
    labs = _as_batch(labels, "label")
    if imgs is None and labs is None:
        raise ValueError("give images, labels, or both")
    if imgs is not None:
        _check_dtype(imgs, "image", IMAGE_DTYPES)
    if labs is not None:
        _check_dtype(labs, "label", LABEL_DTYPES)
        labs = _bool_as_uint8(labs)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    if label_mode not in ("nearest", "linear_onehot"):
        raise ValueError(f"label_mode must be 'nearest' or 'linear_onehot', got {label_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_order(image_order)
    shape = check_out_shape(out_shape)
    ref = imgs if imgs is not None else labs
    assert ref is not None
    shapes = _shapes(ref)
    batch = len(shapes)
    if imgs is not None and labs is not None:
        if not np.array_equal(_shapes(imgs), _shapes(labs)) or len(_shapes(labs)) != batch:
            raise ValueError(
                f"image and label shapes differ: {_shapes(imgs).tolist()} vs "
                f"{_shapes(labs).tolist()}"
            )
        if _first(imgs).device != _first(labs).device:
            raise ValueError("image and label must be on the same device")
    if not np.isfinite(cval):
        raise ValueError(f"cval must be finite, got {cval!r}")
    m = _batch_matrices(matrices, batch)
    prog = tk.as_programs(programs, batch)
    device = _first(ref).device

    exact = [mx.as_exact(mb) for mb in m]
    if label_mode == "nearest" and all(e is not None for e in exact):
        return _exact_batch(
            imgs,
            labs,
            exact,  # type: ignore[arg-type]
            shape,
            cval,
            label_cval,
            prog,
            out_dtype,
        )
    kw: dict[str, Any] = {
        "image_order": image_order,
        "cval": float(cval),
        "label_cval": label_cval,
        "programs": prog,
        "out_dtype": out_dtype,
        "label_mode": label_mode,
        "classes": classes,
    }
    if _use_triton(backend, device):
        from augment.kernels import triton_warp

        kw["label_cval"] = int(label_cval)
        return triton_warp.warp_batch(imgs, labs, m, shape, **kw)
    return tk.warp_batch(imgs, labs, m, shape, **kw)


def _exact_batch(
    imgs: Batch | None,
    labs: Batch | None,
    exact: list[mx.ExactMap],
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
            tk.exact_copy(_sample(imgs, b), em, shape, cval, out_img[b])
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
            tk.exact_copy(_sample(labs, b), em, shape, fill, out_lab[b])
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


# -- Compose on tensors -----------------------------------------------------------------------
# Transforms whose sampling never reads the label (anything else gets it, copied to the host).
_LABEL_FREE = (RandomAffine, RandomFlip, RandomRot90, RandomSwapAxes, TargetCrop)
# Per-sample context entries and the number of dimensions of one sample's value.
_SAMPLE_NDIM = {"offset": 1, "in_shape": 1, "target": 1, "points": 2, "fg_points": 2}


def _needs_label(compose: Compose) -> bool:
    for t in compose.spatial:
        if isinstance(t, RandomCrop):
            if t.foreground > 0 or t.centre_sampler is not None:
                return True
        elif not isinstance(t, _LABEL_FREE):
            return True
    return False


def _per_sample(value: Any, b: int, batch: int, key: str) -> Any:
    """Sample ``b``'s value of a context entry: a list of ``batch`` per-sample values, an
    array with a leading batch axis (for the known keys), or one value shared by all."""
    if (
        isinstance(value, (list, tuple))
        and len(value) == batch
        and not all(np.isscalar(v) for v in value)
    ):
        return value[b]
    ndim = _SAMPLE_NDIM.get(key)
    if ndim is not None and isinstance(value, np.ndarray) and value.ndim == ndim + 1:
        if value.shape[0] != batch:
            raise ValueError(f"{key} has {value.shape[0]} rows for a batch of {batch}")
        return value[b]
    return value


def _generators(rng: Any, batch: int) -> list[np.random.Generator]:
    if isinstance(rng, np.random.Generator):
        return [rng] * batch  # one generator drawn sample after sample
    gens = list(rng)
    if len(gens) != batch or not all(isinstance(g, np.random.Generator) for g in gens):
        raise TypeError(f"rng must be a numpy Generator or {batch} of them (one per sample)")
    return gens


def compose_torch(
    compose: Compose,
    *,
    image: Any = None,
    label: Any = None,
    rng: Any = None,
    params: ComposeParams | None = None,
    **context: Any,
) -> dict[str, Any]:
    """Run ``compose`` on a batch of tensors: host-side sampling, one fused launch.

    Args:
        compose: the pipeline.
        image: ``(B, C, D, H, W)`` tensor or a list of ``(C, D_b, H_b, W_b)`` tensors.
        label: the same layout (integer or bool), or None.
        rng: one numpy Generator per sample (or one Generator drawn sample after sample).
        params: a batched :class:`ComposeParams` to replay instead of sampling.
        context: as the numpy path (``offset``, ``in_shape``, ``target``, ``points``,
            ``fg_points``), each either shared or per sample (a list of B values, or an
            array with a leading B axis); plus ``out_dtype`` (``torch.float32`` or
            ``torch.bfloat16``), ``backend`` (see :func:`warp_torch`) and ``classes``
            (sorted label classes for ``linear_onehot``; default: computed on the device).

    Returns:
        ``{"image": (B, C, d, h, w) tensor, "label": (B, L, d, h, w) tensor, "params"}``,
        plus ``"target"`` (numpy ``(B, 4)``; a list with None for samples without a target),
        ``"points"`` (list of B arrays) and
        ``"coord"`` (tensor ``(B, 3, ...)`` on the image's device) where relevant.
    """
    out_dtype = context.pop("out_dtype", torch.float32)
    backend = context.pop("backend", "auto")
    classes = context.pop("classes", None)
    imgs = _as_batch(image, "image")
    labs = _as_batch(label, "label")
    ref = imgs if imgs is not None else labs
    if ref is None:
        raise ValueError("give an image, a label, or both")
    batch = len(_shapes(ref))
    offsets = context.pop("offset", None)
    in_shapes = context.pop("in_shape", None)
    ctx = [{k: _per_sample(v, b, batch, k) for k, v in context.items()} for b in range(batch)]
    region = _shapes(ref)
    src_shapes = [
        tuple(
            int(s)
            for s in (
                region[b] if in_shapes is None else _per_sample(in_shapes, b, batch, "in_shape")
            )
        )
        for b in range(batch)
    ]

    if params is None:
        if rng is None:
            raise ValueError("give rng (numpy Generators, one per sample) or params to replay")
        gens = _generators(rng, batch)
        give_label = (
            labs is not None
            and "label" not in context
            and "fg_points" not in context
            and _needs_label(compose)
        )
        drawn = []
        for b in range(batch):
            c = dict(ctx[b])
            if give_label:
                c["label"] = _sample(labs, b).cpu().numpy()  # type: ignore[arg-type]
            drawn.append(compose.sample(gens[b], src_shapes[b], **c))
        params = stack_params(drawn)
    elif params.batch != batch:
        raise ValueError(f"params hold {params.batch} samples for a batch of {batch}")

    m = compose.matrix(params)
    m_region = m.copy()
    if offsets is not None:
        for b in range(batch):
            off = np.asarray(_per_sample(offsets, b, batch, "offset"), dtype=np.float64)
            m_region[b] = mx.translation(-off) @ m[b]
    out_shapes = {compose.out_shape(s) for s in src_shapes}  # type: ignore[arg-type]
    if len(out_shapes) != 1:
        raise ValueError(
            f"a batch needs one output shape, got {sorted(out_shapes)}; add a crop to the pipeline"
        )
    out_shape = out_shapes.pop()
    fused, posts = zip(*(compose.program(params, b) for b in range(batch)), strict=True)
    n_int = len(compose.intensity)
    post_ops = imgs is not None and any(p < n_int for p in posts)
    img, lab = warp_torch(
        imgs,
        labs,
        m_region,
        out_shape,
        image_order=compose.image_order,
        cval=compose.cval,
        label_cval=compose.label_cval,
        programs=tk.pad_programs(list(fused)),
        out_dtype=torch.float32 if post_ops else out_dtype,
        label_mode=compose.label_mode,
        classes=classes,
        backend=backend,
    )
    if img is not None and post_ops:
        # patch-statistic transforms: per sample, after the warp, with torch ops
        for b, post in enumerate(posts):
            x = img[b]
            for t, p in zip(compose.intensity[post:], params.intensity[post:], strict=True):
                x = torch.as_tensor(t.apply(x, p.take(b)), dtype=torch.float32)
            img[b] = x
        img = img.to(out_dtype)

    result: dict[str, Any] = {"image": img, "label": lab, "params": params}
    extras = [
        compose._extras(m[b], src_shapes[b], out_shape, ctx[b])  # type: ignore[arg-type]
        for b in range(batch)
    ]
    targets: list[Any] = [e.get("target") for e in extras]
    if any(t is not None for t in targets):
        result["target"] = np.stack(targets) if all(t is not None for t in targets) else targets
    if "points" in extras[0]:
        result["points"] = [e["points"] for e in extras]
    if "coord" in extras[0]:
        result["coord"] = torch.from_numpy(np.stack([e["coord"] for e in extras])).to(
            _first(ref).device
        )
    return result
