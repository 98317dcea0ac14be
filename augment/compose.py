"""``Compose``: a pipeline whose spatial transforms fold into one matrix and one pass.

``Compose([...])(image=img, label=lab, rng=gen)`` samples the parameters of every transform
from ``gen``, multiplies the spatial pull maps into one matrix per sample, resamples image
and label together in one fused pass (with the element-wise intensity ops inside the
same pass), runs the intensity ops that need patch statistics right after, and returns
``{"image", "label", "params"}`` (plus ``"target"``, ``"points"`` and ``"coord"`` where
asked). ``params`` replays the call bit for bit: ``aug(image=img, label=lab, params=p)``.

Intensity transforms act on the resampled patch in list order, as if listed after all
spatial transforms (padding included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from augment import matrices as mx
from augment.base import IntensityTransform, Params, Shape3, SpatialTransform, stack
from augment.kernels import program as pg
from augment.target_crop import TargetCrop, coord_channel
from augment.warp import (
    IMAGE_DTYPES,
    LABEL_DTYPES,
    _is_torch,
    as_channels,
    check_dtype,
    warp_numpy,
)

F64 = NDArray[np.float64]
LABEL_MODES = ("nearest", "linear_onehot")


@dataclass(frozen=True)
class ComposeParams:
    """Everything one call drew: per-transform parameters and each sample's source shape."""

    spatial: tuple[Params, ...]
    intensity: tuple[Params, ...]
    in_shape: NDArray[np.int64]  # (B, 3)

    @property
    def batch(self) -> int:
        return int(self.in_shape.shape[0])

    def take(self, index: int) -> ComposeParams:
        return ComposeParams(
            spatial=tuple(p.take(index) for p in self.spatial),
            intensity=tuple(p.take(index) for p in self.intensity),
            in_shape=self.in_shape[index : index + 1],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "spatial": [{"kind": type(p).__name__, **p.as_dict()} for p in self.spatial],
            "intensity": [{"kind": type(p).__name__, **p.as_dict()} for p in self.intensity],
            "in_shape": self.in_shape.tolist(),
        }


def stack_params(params: Sequence[ComposeParams]) -> ComposeParams:
    """Join single-sample parameter records into one batch."""
    return ComposeParams(
        spatial=tuple(stack([p.spatial[i] for p in params]) for i in range(len(params[0].spatial))),
        intensity=tuple(
            stack([p.intensity[i] for p in params]) for i in range(len(params[0].intensity))
        ),
        in_shape=np.concatenate([p.in_shape for p in params], axis=0),
    )


class Compose:
    """Fold spatial transforms into one matrix and intensity ops into one pass.

    Args:
        transforms: spatial and intensity transforms, in the order they act.
        cval: image value outside the source; defaults to a TargetCrop's ``pad_value``, else 0.
        label_cval: label value outside the source (0, or an ignore index).
        label_mode: ``"nearest"`` or ``"linear_onehot"`` (trilinear on one-hot classes, then
            argmax; smoother label edges, costs one channel per class).
        image_order: 1 trilinear (default) or 0 nearest for the image.
    """

    def __init__(
        self,
        transforms: Sequence[SpatialTransform | IntensityTransform],
        *,
        cval: float | None = None,
        label_cval: int = 0,
        label_mode: str = "nearest",
        image_order: int = 1,
    ) -> None:
        self.transforms = list(transforms)
        for t in self.transforms:
            if not isinstance(t, (SpatialTransform, IntensityTransform)):
                raise TypeError(f"not a transform: {t!r}")
        self.spatial = [t for t in self.transforms if isinstance(t, SpatialTransform)]
        self.intensity = [t for t in self.transforms if isinstance(t, IntensityTransform)]
        crops = [t for t in self.spatial if isinstance(t, TargetCrop)]
        self.target_crop = crops[-1] if crops else None
        if cval is None:
            cval = self.target_crop.pad_value if self.target_crop is not None else 0.0
        if not np.isfinite(cval):
            raise ValueError(f"cval must be finite, got {cval!r}")
        self.cval = float(cval)
        self.label_cval = int(label_cval)
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        self.label_mode = label_mode
        if image_order not in (0, 1):
            raise ValueError(f"image_order must be 0 or 1, got {image_order!r}")
        self.image_order = image_order

    def __repr__(self) -> str:
        inner = ", ".join(type(t).__name__ for t in self.transforms)
        return f"Compose([{inner}])"

    # -- parameters ---------------------------------------------------------------------
    def out_shape(self, in_shape: Shape3) -> Shape3:
        shape = tuple(int(s) for s in in_shape)
        for t in self.spatial:
            shape = t.out_shape(shape)  # type: ignore[arg-type]
        return shape  # type: ignore[return-value]

    def sample(
        self, rng: np.random.Generator, in_shape: Sequence[int], **context: Any
    ) -> ComposeParams:
        """Draw one sample's parameters. ``context`` feeds transforms that need it
        (``fg_points`` or ``label`` for foreground crops, ``target`` for TargetCrop)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != 3 or min(shape) <= 0:
            raise ValueError(f"in_shape must be three positive sizes, got {in_shape!r}")
        spatial = []
        for t in self.spatial:
            spatial.append(t.sample(rng, shape, **context))
            shape = t.out_shape(shape)
        intensity = [t.sample(rng) for t in self.intensity]
        return ComposeParams(
            spatial=tuple(spatial),
            intensity=tuple(intensity),
            in_shape=np.asarray([in_shape], dtype=np.int64),
        )

    def matrix(self, params: ComposeParams) -> F64:
        """``(B, 4, 4)`` pull maps from the output patch to the source, one per sample."""
        out = []
        for b in range(params.batch):
            shape = tuple(int(s) for s in params.in_shape[b])
            m = np.eye(4)
            for t, p in zip(self.spatial, params.spatial, strict=True):
                m = np.matmul(m, t.matrix(p.take(b), shape).reshape(4, 4))  # type: ignore[arg-type]
                shape = t.out_shape(shape)  # type: ignore[arg-type]
            out.append(m)
        return np.stack(out) if out else np.zeros((0, 4, 4))

    def program(self, params: ComposeParams, index: int = 0) -> tuple[F64, int]:
        """Sample ``index``'s fused intensity program and the position of the first
        intensity transform that must run after the warp (``len(intensity)`` if none)."""
        ops: list[F64] = []
        value_range = None
        for i, (t, p) in enumerate(zip(self.intensity, params.intensity, strict=True)):
            prog = t.program(p.take(index), value_range)
            if prog is None:
                return pg.concat(*ops), i
            ops.append(prog)
            value_range = t.out_range(value_range)
        return pg.concat(*ops), len(self.intensity)

    # -- application ----------------------------------------------------------------------
    def __call__(
        self,
        *,
        image: Any = None,
        label: Any = None,
        rng: np.random.Generator | Sequence[np.random.Generator] | None = None,
        params: ComposeParams | None = None,
        **context: Any,
    ) -> dict[str, Any]:
        """Augment one sample (numpy) or a batch (torch); see the module docstring.

        Args:
            image: ``(D, H, W)`` / ``(C, D, H, W)`` numpy, or torch ``(B, C, D, H, W)`` or a
                list of ``(C, D, H, W)`` tensors.
            label: the same layout with an integer dtype, or None.
            rng: a Generator (one sample) or one per sample (torch batches).
            params: replay these instead of sampling.
            context: ``fg_points``, ``target`` ((z, y, x, d) for TargetCrop), ``points``
                ((N, 3) source indices to map into the patch), ``offset`` (the arrays are a
                region of the source starting at this index), ``out_image`` /
                ``out_label`` (numpy: C-contiguous ``(C, d, h, w)`` float32 / label-dtype
                arrays the patch is written into, e.g. shared memory).

        Returns:
            ``{"image", "label", "params"}`` and, where relevant, ``"target"``,
            ``"points"``, ``"coord"``.
        """
        if image is None and label is None:
            raise ValueError("give an image, a label, or both")
        if _is_torch(image if image is not None else label) or isinstance(
            image if image is not None else label, list
        ):
            from augment.torch_warp import compose_torch

            return compose_torch(self, image=image, label=label, rng=rng, params=params, **context)
        return self._call_numpy(image, label, rng, params, context)

    def _call_numpy(
        self,
        image: Any,
        label: Any,
        rng: Any,
        params: ComposeParams | None,
        context: dict[str, Any],
    ) -> dict[str, Any]:
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
                    f"image and label shapes differ: {tuple(img.shape[1:])} vs "
                    f"{tuple(lab.shape[1:])}"
                )
            had_c = had_c or (img is None and had_lc)
        ref = img if img is not None else lab
        assert ref is not None
        offset = np.asarray(context.pop("offset", (0, 0, 0)), dtype=np.float64)
        in_shape = context.pop("in_shape", None)
        src_shape = tuple(int(s) for s in (in_shape if in_shape is not None else ref.shape[1:]))
        if params is None:
            if rng is None:
                raise ValueError("give rng (a numpy Generator) or params to replay")
            if label is not None and "label" not in context and "fg_points" not in context:
                context["label"] = lab
            params = self.sample(rng, src_shape, **context)
            context.pop("label", None)
        elif params.batch != 1:
            raise ValueError(f"a numpy sample takes single-sample params, got batch {params.batch}")
        m = self.matrix(params)[0]
        m_region = mx.translation(-offset) @ m
        out_shape = self.out_shape(src_shape)  # type: ignore[arg-type]
        prog, post = self.program(params)
        dst = (
            _check_out(context.pop("out_image", None), img, out_shape, np.float32, "out_image"),
            _check_out(context.pop("out_label", None), lab, out_shape, None, "out_label"),
        )
        out_img, out_lab = self._warp_numpy(img, lab, m_region, out_shape, prog, dst)
        if out_img is not None:
            for t, p in zip(self.intensity[post:], params.intensity[post:], strict=True):
                out_img = np.asarray(t.apply(out_img, p.take(0)), dtype=np.float32)
        out_img, out_lab = _into(dst[0], out_img), _into(dst[1], out_lab)
        result: dict[str, Any] = {
            "image": None if out_img is None else (out_img if had_c else out_img[0]),
            "label": None if out_lab is None else (out_lab if had_c else out_lab[0]),
            "params": params,
        }
        result.update(self._extras(m, src_shape, out_shape, context))  # type: ignore[arg-type]
        return result

    def _warp_numpy(
        self,
        img: Any,
        lab: Any,
        m: F64,
        out_shape: Shape3,
        prog: F64,
        dst: tuple[Any, Any] = (None, None),
    ) -> tuple[Any, Any]:
        if self.label_mode == "linear_onehot" and lab is not None:
            out_img, _ = (
                warp_numpy(
                    img,
                    None,
                    m,
                    out_shape,
                    image_order=self.image_order,
                    cval=self.cval,
                    program=prog,
                    out_image=dst[0],
                )
                if img is not None
                else (None, None)
            )
            return out_img, onehot_linear_numpy(lab, m, out_shape, self.label_cval)
        return warp_numpy(
            img,
            lab,
            m,
            out_shape,
            image_order=self.image_order,
            cval=self.cval,
            label_cval=self.label_cval,
            program=prog,
            out_image=dst[0],
            out_label=dst[1],
        )

    def _extras(
        self, m: F64, in_shape: Shape3, out_shape: Shape3, context: dict[str, Any]
    ) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        inv = np.linalg.inv(m)
        target = context.get("target")
        if target is not None:
            t = np.asarray(target, dtype=np.float64)
            zoom = abs(np.linalg.det(m[:3, :3])) ** (-1.0 / 3.0)
            extras["target"] = np.concatenate([mx.apply_points(inv, t[:3]), [t[3] * zoom]])
        points = context.get("points")
        if points is not None:
            extras["points"] = mx.apply_points(inv, np.asarray(points, dtype=np.float64))
        tc = self.target_crop
        if tc is not None and tc.coord_stride is not None:
            extras["coord"] = coord_channel(m, in_shape, out_shape, tc.coord_stride)
        return extras


def _check_out(out: Any, src: Any, out_shape: Shape3, dtype: Any, name: str) -> Any:
    """``out`` if it can take the ``(C, d, h, w)`` result of ``src`` (the kernel writes
    without bounds checks), else a ValueError naming what differs."""
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


def _into(dst: Any, x: Any) -> Any:
    """``x`` written into ``dst`` (when given and not already there)."""
    if dst is None or x is None or x is dst:
        return x
    np.copyto(dst, x)
    return dst


def onehot_linear_numpy(lab: NDArray[Any], m: F64, out_shape: Shape3, fill: int) -> NDArray[Any]:
    """Label resampling by trilinear interpolation of each class's indicator, then argmax."""
    out = np.empty((lab.shape[0], *out_shape), dtype=lab.dtype)
    for c in range(lab.shape[0]):
        classes = np.unique(np.concatenate([np.unique(lab[c]), [fill]]))
        onehot = np.stack([(lab[c] == k).astype(np.float32) for k in classes])
        best = np.full(out_shape, -1.0, np.float32)
        arg = np.zeros(out_shape, np.int64)
        for i, k in enumerate(classes):
            w, _ = warp_numpy(onehot[i : i + 1], None, m, out_shape, cval=1.0 if k == fill else 0.0)
            assert w is not None
            better = w[0] > best
            best = np.where(better, w[0], best)
            arg = np.where(better, i, arg)
        out[c] = classes[arg].astype(lab.dtype)
    return out
