"""The numpy backend: one sample, the numba kernels of :mod:`augment.kernels.cpu`.

``execute`` runs a :class:`~augment.plan.Plan` of one sample: the fused pass (or the exact
index copy the plan found), the intensity transforms left for after the warp, the extras.
``warp_numpy`` is the fused pass itself for channels-first arrays that are already
checked; ``affine_warp_numpy`` is ``augment.affine_warp`` for numpy arrays.

The matrix convention is that of :mod:`augment.matrices`: a ``(3, 4)`` pull map from
OUTPUT voxel index to INPUT voxel index, voxel centres at integers. Samples whose
interpolation taps fall outside the source read ``cval`` (scipy.ndimage's
``mode="grid-constant"``). A matrix that is a signed axis permutation with an integer
offset (flips, 90-degree rotations, axis swaps, integer crops) is served by an exact index
copy, bit-identical to ``np.flip`` / ``np.rot90`` / ``np.transpose`` plus slicing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from augment import matrices as mx
from augment._validate import (
    IMAGE_DTYPES,
    LABEL_DTYPES,
    as_channels,
    check_cval,
    check_dtype,
    check_matrix,
    check_out,
)
from augment.kernels import bspline
from augment.kernels import program as prog_mod
from augment.plan import Plan

OPTIONS = ("out_image", "out_label")


@dataclass(frozen=True)
class Inputs:
    """One checked sample: C-contiguous ``(C, D, H, W)`` arrays (a bool label viewed as
    uint8) and whether the caller gave a channel axis."""

    image: NDArray[Any] | None
    label: NDArray[Any] | None
    had_channels: bool
    batched = False
    batch = 1

    @property
    def shapes(self) -> NDArray[np.int64]:
        ref = self.image if self.image is not None else self.label
        assert ref is not None
        return np.asarray([ref.shape[1:]], dtype=np.int64)

    @property
    def has_label(self) -> bool:
        return self.label is not None

    def host_label(self, index: int) -> NDArray[Any] | None:
        return self.label


def inputs(image: Any, label: Any) -> Inputs:
    """Check one sample's image and label (either may be None, not both).

    Raises:
        TypeError: not numpy arrays, unsupported dtypes.
        ValueError: wrong ndim, image and label shapes that differ.
    """
    img = lab = None
    had_c = False
    if image is not None:
        img, had_c = as_channels(image, "image")
        check_dtype(img, "image", IMAGE_DTYPES)
    if label is not None:
        lab, had_lc = as_channels(label, "label")
        check_dtype(lab, "label", LABEL_DTYPES)
        if lab.dtype == np.bool_:
            lab = lab.view(np.uint8)
        if img is not None and lab.shape[1:] != img.shape[1:]:
            raise ValueError(
                f"image and label shapes differ: {tuple(img.shape[1:])} vs {tuple(lab.shape[1:])}"
            )
        had_c = had_c or (img is None and had_lc)
    if img is None and lab is None:
        raise ValueError("give an image, a label, or both")
    return Inputs(img, lab, had_c)


def execute(
    plan: Plan,
    inputs: Inputs,
    *,
    out_image: NDArray[np.float32] | None = None,
    out_label: NDArray[Any] | None = None,
) -> dict[str, Any]:
    """Run a one-sample plan.

    Args:
        plan: from ``Compose.plan`` (batch 1).
        inputs: from :func:`inputs`.
        out_image, out_label: C-contiguous ``(C, d, h, w)`` float32 / label-dtype arrays
            the patch is written into (e.g. shared memory).

    Returns:
        ``{"image", "label", "params"}`` in the caller's channel layout, plus ``"target"``,
        ``"points"``, ``"coord"`` where the plan has them.
    """
    if plan.batch != 1:
        raise ValueError(f"a numpy sample takes a plan of one sample, got {plan.batch}")
    img, lab = inputs.image, inputs.label
    shape = plan.out_shape
    dst_img = check_out(out_image, img, shape, np.float32, "out_image")
    dst_lab = check_out(out_label, lab, shape, None, "out_label")
    m, em, prog = plan.matrices[0], plan.exact[0], plan.programs[0]
    field = None if plan.field is None else plan.field[0]
    out_img: NDArray[np.float32] | None
    out_lab: NDArray[Any] | None
    if plan.label_mode == "linear_onehot" and lab is not None:
        out_img = None
        if img is not None:
            out_img, _ = _warp(
                img,
                None,
                m,
                em,
                shape,
                image_order=plan.image_order,
                cval=plan.cval,
                program=prog,
                out_image=dst_img,
                field=field,
            )
        out_lab = onehot_linear_numpy(lab, m, shape, plan.label_cval, field=field)
    else:
        out_img, out_lab = _warp(
            img,
            lab,
            m,
            em,
            shape,
            image_order=plan.image_order,
            cval=plan.cval,
            label_cval=plan.label_cval,
            program=prog,
            out_image=dst_img,
            out_label=dst_lab,
            field=field,
        )
    if out_img is not None:
        for t, p in plan.after_warp[0]:
            out_img = t.apply_owned(out_img, p)  # the warp's own output (or out_image)
    out_img, out_lab = _into(dst_img, out_img), _into(dst_lab, out_lab)
    had_c = inputs.had_channels
    result: dict[str, Any] = {
        "image": None if out_img is None else (out_img if had_c else out_img[0]),
        "label": None if out_lab is None else (out_lab if had_c else out_lab[0]),
        "params": plan.params,
    }
    if plan.target is not None and plan.target[0] is not None:
        result["target"] = plan.target[0]
    if plan.points is not None:
        result["points"] = plan.points[0]
    if plan.coord is not None:
        result["coord"] = plan.coord[0]
    return result


def _into(dst: Any, x: Any) -> Any:
    """``x`` written into ``dst`` (when given and not already there)."""
    if dst is None or x is None or x is dst:
        return x
    np.copyto(dst, x)
    return dst


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
    field: NDArray[np.float64] | None = None,
) -> tuple[NDArray[np.float32] | None, NDArray[Any] | None]:
    """Fused numba pass for a channels-first image and label sharing one matrix.

    Inputs are already validated ``(C, D, H, W)`` C-contiguous arrays (or None). The image
    comes out float32 (nearest or trilinear, then ``program``); the label nearest, in its
    own dtype. A signed-permutation matrix is an exact index copy, unless ``field`` (the
    ``(3, gz, gy, gx)`` control vectors of a displacement in source index units, see
    :class:`~augment.plan.Plan`) is given: then every coordinate gets the displacement.
    """
    m = np.ascontiguousarray(mx.to_3x4(matrix))
    return _warp(
        image,
        label,
        m,
        mx.as_exact(m) if field is None else None,
        out_shape,
        image_order=image_order,
        cval=cval,
        label_cval=label_cval,
        program=program,
        out_image=out_image,
        out_label=out_label,
        parallel=parallel,
        field=field,
    )


def _warp(
    image: NDArray[Any] | None,
    label: NDArray[Any] | None,
    m: NDArray[np.float64],
    em: mx.ExactMap | None,
    out_shape: tuple[int, int, int],
    *,
    image_order: int = 1,
    cval: float = 0.0,
    label_cval: int = 0,
    program: NDArray[np.float64] | None = None,
    out_image: NDArray[np.float32] | None = None,
    out_label: NDArray[Any] | None = None,
    parallel: bool = True,
    field: NDArray[np.float64] | None = None,
) -> tuple[NDArray[np.float32] | None, NDArray[Any] | None]:
    """:func:`warp_numpy` with the C-contiguous ``(3, 4)`` matrix ``m`` and its exact map
    ``em`` (or None) already worked out."""
    # numba compiles (or loads from its cache) on first use; not at ``import augment``
    from augment.kernels import cpu

    prog = prog_mod.empty() if program is None else np.ascontiguousarray(program, np.float64)
    if image is not None and image.dtype == np.float16:
        image = image.astype(np.float32)  # numba has no float16 arithmetic
    ref = image if image is not None else label
    assert ref is not None
    src_shape = tuple(int(s) for s in ref.shape[1:])
    if image is not None and out_image is None:
        out_image = np.empty((image.shape[0], *out_shape), np.float32)
    if label is not None and out_label is None:
        out_label = np.empty((label.shape[0], *out_shape), label.dtype)

    if em is not None and field is None:
        if image is not None and out_image is not None:
            exact_copy(image, em, out_shape, cval, out_image)
            if len(prog):
                flat = out_image.reshape(-1)
                (cpu.program_inplace if parallel else cpu.program_inplace_serial)(flat, prog)
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
    if field is not None:
        _warp_displaced(
            cpu.warp_elastic if parallel else cpu.warp_elastic_serial,
            (img, lab, m, oimg, olab, nc, nl, src_shape, out_shape, float(cval), lval, prog),
            image_order == 1,
            field,
        )
        return out_image, out_label
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


def _warp_displaced(
    kernel: Any, args: tuple[Any, ...], linear: bool, field: NDArray[np.float64]
) -> None:
    """Run ``cpu.warp_elastic`` (or its serial twin) on ``field`` ((3, gz, gy, gx) control
    vectors) over the output shape ``args[8]``, with the tables the kernel reads."""
    coef = np.asarray(field, dtype=np.float64)
    if coef.ndim != 4 or coef.shape[0] != 3:
        raise ValueError(f"field must be (3, gz, gy, gx) control vectors, got {coef.shape}")
    gz, gy, gx = (int(g) for g in coef.shape[1:])
    d, h, w = (int(n) for n in args[8])
    jz, wz = bspline.basis(d, gz)
    jy, wy = bspline.basis(h, gy)
    jx, wx = bspline.basis(w, gx)
    kernel(
        *args,
        linear,
        np.ascontiguousarray(coef.transpose(1, 2, 0, 3)).reshape(gz, gy, 3 * gx),
        jz,
        np.ascontiguousarray(wz.T),
        jy,
        np.ascontiguousarray(wy.T),
        np.searchsorted(jx, np.arange(gx - 1)).astype(np.int64),  # first x of interval j
        np.ascontiguousarray(wx.T),
        bspline.bound(coef),
    )


def onehot_linear_numpy(
    lab: NDArray[Any],
    m: NDArray[np.float64],
    out_shape: Any,
    fill: int,
    field: NDArray[np.float64] | None = None,
) -> NDArray[Any]:
    """Label resampling by trilinear interpolation of each class's indicator, then argmax
    (``field``: a displacement, as :func:`warp_numpy`)."""
    out = np.empty((lab.shape[0], *out_shape), dtype=lab.dtype)
    for c in range(lab.shape[0]):
        classes = np.unique(np.concatenate([np.unique(lab[c]), [fill]]))
        onehot = np.stack([(lab[c] == k).astype(np.float32) for k in classes])
        best = np.full(out_shape, -1.0, np.float32)
        arg = np.zeros(out_shape, np.int64)
        for i, k in enumerate(classes):
            w, _ = warp_numpy(
                onehot[i : i + 1],
                None,
                m,
                out_shape,
                cval=1.0 if k == fill else 0.0,
                field=field,
            )
            assert w is not None
            better = w[0] > best
            best = np.where(better, w[0], best)
            arg = np.where(better, i, arg)
        out[c] = classes[arg].astype(lab.dtype)
    return out


def affine_warp_numpy(
    image: NDArray[Any],
    matrix: Any,
    shape: tuple[int, int, int],
    *,
    order: int,
    cval: float,
    out: NDArray[Any] | None,
) -> NDArray[Any]:
    """``augment.affine_warp`` for a numpy array (``order`` and ``shape`` checked)."""
    check_cval(cval)
    x, had_c = as_channels(image, "image")
    check_dtype(x, "image", IMAGE_DTYPES + LABEL_DTYPES)
    m = check_matrix(matrix)
    if m.ndim == 3:
        raise ValueError(f"a numpy image takes one (3, 4) matrix, got {m.shape}")
    want = (x.shape[0], *shape)
    if order == 1 and x.dtype.type not in IMAGE_DTYPES:
        x = x.astype(np.float32)
    dtype = np.dtype(np.float32) if order == 1 else x.dtype
    o = None
    if out is not None:
        o = out if had_c else out[None]
        if o.shape != want or o.dtype != dtype or not o.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous {dtype} array of shape "
                f"{want if had_c else shape}, got {out.dtype} {out.shape}"
            )
    if order == 1:
        result, _ = warp_numpy(x, None, m, shape, image_order=1, cval=cval, out_image=o)
    else:
        _, result = warp_numpy(None, x, m, shape, label_cval=cval, out_label=o)  # type: ignore[arg-type]
    assert result is not None
    return result if had_c else result[0]
