"""``Compose``: a pipeline whose spatial transforms fold into one matrix and one pass.

A call runs in three steps, each a public method:

1. :meth:`Compose.sample` draws one sample's parameters from its generator (spatial
   transforms in list order, then intensity transforms in list order; a transform may
   read per-case context such as ``fg_points`` or ``targets``);
2. :meth:`Compose.plan` turns a batch of parameters into a :class:`~augment.plan.Plan`:
   one pull map per sample, the fused intensity programs, exact-copy flags, extras;
3. a backend executes the plan: :mod:`augment.backends.numpy` (numba) for numpy arrays,
   :mod:`augment.backends.torch` (Triton or torch) for tensors; :meth:`Compose.execute`.

``Compose([...])(image=img, label=lab, rng=gen)`` does all three and returns
``{"image", "label", "params"}`` (plus ``"target"``, ``"points"`` and ``"coord"`` where
relevant). ``params`` replays the call bit for bit: ``aug(image=img, label=lab, params=p)``.

Intensity transforms act on the resampled patch in list order, as if listed after all
spatial transforms (padding included).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from augment import matrices as mx
from augment._validate import check_cval, check_label_mode, is_torch
from augment.backends import numpy as numpy_backend
from augment.base import IntensityTransform, Shape3, SpatialTransform
from augment.kernels import program as pg
from augment.plan import ComposeParams, Plan, exact_maps, stack_params
from augment.target_crop import TargetCrop, TargetCropParams, coord_channel

__all__ = ["Compose", "ComposeParams", "stack_params"]

F64 = NDArray[np.float64]
# Per-sample context entries of a batch and the number of dimensions of one sample's value.
_SAMPLE_NDIM = {
    "offset": 1,
    "in_shape": 1,
    "target": 1,
    "points": 2,
    "fg_points": 2,
    "fg_classes": 1,
    "targets": 2,
}


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
        displacing = [t for t in self.spatial if t.displaces]
        if len(displacing) > 1:
            raise ValueError(
                f"a Compose takes one displacing transform (one RandomElastic), got "
                f"{len(displacing)}: {[type(t).__name__ for t in displacing]}; keep one "
                "with the combined settings"
            )
        self.intensity = [t for t in self.transforms if isinstance(t, IntensityTransform)]
        crops = [t for t in self.spatial if isinstance(t, TargetCrop)]
        self.target_crop = crops[-1] if crops else None
        if cval is None:
            cval = self.target_crop.pad_value if self.target_crop is not None else 0.0
        self.cval = check_cval(cval)
        self.label_cval = int(label_cval)
        self.label_mode = check_label_mode(label_mode)
        if image_order not in (0, 1):
            raise ValueError(f"image_order must be 0 or 1, got {image_order!r}")
        self.image_order = image_order

    def __repr__(self) -> str:
        inner = ", ".join(type(t).__name__ for t in self.transforms)
        return f"Compose([{inner}])"

    @property
    def reads_label(self) -> bool:
        """Whether sampling reads the label (some spatial transform says it does)."""
        return any(t.reads_label for t in self.spatial)

    # -- parameters ---------------------------------------------------------------------
    def out_shape(self, in_shape: Shape3) -> Shape3:
        shape = tuple(int(s) for s in in_shape)
        for t in self.spatial:
            shape = t.out_shape(shape)  # type: ignore[arg-type]
        return shape  # type: ignore[return-value]

    def sample(
        self, rng: np.random.Generator, in_shape: Sequence[int], **context: Any
    ) -> ComposeParams:
        """Draw one sample's parameters: each spatial transform in list order, then each
        intensity transform in list order, all from ``rng``.

        Args:
            rng: the sample's generator.
            in_shape: ``(D, H, W)`` of the whole source.
            context: per-case data transforms may read: ``fg_points`` ``(N, 3)`` and
                ``fg_classes`` ``(N,)`` or ``label`` (RandomCrop's foreground centres),
                ``target`` ``(4,)`` or ``targets`` ``(N, 4)`` (TargetCrop), anything a
                custom transform or ``centre_sampler`` wants (e.g. ``case``).
        """
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
        one = params.batch == 1  # a batch of one is its own sample 0: no take()
        for b in range(params.batch):
            shape = tuple(int(s) for s in params.in_shape[b])
            m = np.eye(4)
            for t, p in zip(self.spatial, params.spatial, strict=True):
                pb = p if one else p.take(b)
                m = np.matmul(m, t.matrix(pb, shape).reshape(4, 4))  # type: ignore[arg-type]
                shape = t.out_shape(shape)  # type: ignore[arg-type]
            out.append(m)
        return np.stack(out) if out else np.zeros((0, 4, 4))

    def field(self, params: ComposeParams) -> F64 | None:
        """``(B, 3, gz, gy, gx)`` control vectors of the displacement (see
        :class:`~augment.plan.Plan`) in source index units, or None when no sample is
        displaced: the displacing transform's vectors mapped through the linear part of
        the transforms listed before it."""
        k = next((i for i, t in enumerate(self.spatial) if t.displaces), None)
        if k is None:
            return None
        d = self.spatial[k].displacement(params.spatial[k])
        if d is None or not np.any(d):
            return None
        out = np.empty_like(np.asarray(d, dtype=np.float64))
        for b in range(params.batch):
            shape = tuple(int(s) for s in params.in_shape[b])
            m = np.eye(4)
            for t, p in zip(self.spatial[:k], params.spatial[:k], strict=True):
                m = np.matmul(m, t.matrix(p.take(b), shape).reshape(4, 4))  # type: ignore[arg-type]
                shape = t.out_shape(shape)  # type: ignore[arg-type]
            out[b] = np.einsum("ij,j...->i...", m[:3, :3], d[b])
        return out

    def program(self, params: ComposeParams, index: int = 0) -> tuple[F64, int]:
        """Sample ``index``'s fused intensity program and the position of the first
        intensity transform that must run after the warp (``len(intensity)`` if none)."""
        ops: list[F64] = []
        value_range = None
        one = params.batch == 1
        for i, (t, p) in enumerate(zip(self.intensity, params.intensity, strict=True)):
            prog = t.program(p if one else p.take(index), value_range)
            if prog is None:
                return pg.concat(*ops), i
            ops.append(prog)
            value_range = t.out_range(value_range)
        return pg.concat(*ops), len(self.intensity)

    def plan(
        self,
        params: ComposeParams,
        in_shapes: ArrayLike | None = None,
        offsets: ArrayLike | None = None,
        *,
        target: Sequence[Any] | None = None,
        points: Sequence[Any] | None = None,
    ) -> Plan:
        """Everything a backend needs to execute ``params`` on a batch.

        Args:
            params: a batch of parameters (``B`` samples).
            in_shapes: ``(B, 3)`` or ``(3,)`` shapes of the whole sources (default: those
                the parameters were drawn for).
            offsets: ``(B, 3)`` or ``(3,)`` start of the given arrays within the sources,
                when they are regions (default: 0).
            target: per sample, a ``(z, y, x, d)`` to map into the patch, or None (default:
                the target a TargetCrop recorded in ``params``).
            points: per sample, ``(N, 3)`` source indices to map into the patch.

        Returns:
            The :class:`~augment.plan.Plan`.

        Raises:
            ValueError: samples that would give different output shapes.
        """
        batch = params.batch
        shapes = params.in_shape if in_shapes is None else np.asarray(in_shapes, dtype=np.int64)
        if shapes.shape != (batch, 3):
            shapes = np.broadcast_to(shapes, (batch, 3))
        src: list[Shape3] = [
            (int(shapes[b][0]), int(shapes[b][1]), int(shapes[b][2])) for b in range(batch)
        ]
        out_shapes = {self.out_shape(s) for s in src}
        if len(out_shapes) != 1:
            raise ValueError(
                f"a batch needs one output shape, got {sorted(out_shapes)}; "
                "add a crop to the pipeline"
            )
        out_shape = out_shapes.pop()
        m = self.matrix(params)
        if offsets is None:
            off = np.zeros((batch, 3))
            region = mx.to_3x4(m)
        else:
            off = np.asarray(offsets, dtype=np.float64)
            if off.shape != (batch, 3):
                off = np.broadcast_to(off, (batch, 3))
            region = mx.to_3x4(mx.translation(-off) @ m)
        programs, posts = [], []
        for b in range(batch):
            prog, post = self.program(params, b)
            programs.append(prog)
            posts.append(post)
        after = tuple(
            tuple(
                (t, p if batch == 1 else p.take(b))
                for t, p in zip(self.intensity[post:], params.intensity[post:], strict=True)
            )
            for b, post in enumerate(posts)
        )
        targets = self._targets(params, target)
        mapped_t: tuple[F64 | None, ...] | None = None
        if targets is not None:
            mapped_t = tuple(
                None if t is None else _map_target(m[b], t) for b, t in enumerate(targets)
            )
        mapped_p: tuple[F64, ...] | None = None
        if points is not None and points[0] is not None:
            mapped_p = tuple(
                mx.apply_points(np.linalg.inv(m[b]), np.asarray(p, dtype=np.float64))
                for b, p in enumerate(points)
            )
        coord = None
        tc = self.target_crop
        if tc is not None and tc.coord_stride is not None:
            stride = tc.coord_stride
            coord = np.stack(
                [coord_channel(m[b], src[b], out_shape, stride) for b in range(batch)]
            ).astype(np.float32, copy=False)
        field = self.field(params)
        return Plan(
            params=params,
            matrices=region,
            exact=exact_maps(region, field),
            programs=pg.pad(programs),
            post=tuple(posts),
            after_warp=after,
            out_shape=out_shape,
            in_shapes=np.asarray(src, dtype=np.int64).reshape(batch, 3),
            offsets=np.array(off, dtype=np.float64),
            image_order=self.image_order,
            cval=self.cval,
            label_cval=self.label_cval,
            label_mode=self.label_mode,
            target=mapped_t,
            points=mapped_p,
            coord=coord,
            field=field,
        )

    def _targets(
        self, params: ComposeParams, given: Sequence[Any] | None
    ) -> list[F64 | None] | None:
        """Per sample, the target to map: the one given, else the one a TargetCrop drew."""
        if given is None and self.target_crop is None:
            return None
        found: list[F64 | None] = [None] * params.batch
        if given is not None:
            found = [None if t is None else np.asarray(t, dtype=np.float64) for t in given]
        else:
            for p in params.spatial:
                if isinstance(p, TargetCropParams):
                    found = [None if np.isnan(t).any() else t for t in p.target]
        return found if any(t is not None for t in found) else None

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
        """Augment one sample (numpy) or a batch (torch): check the inputs, draw the
        parameters (unless given), plan, and let the backend execute the plan.

        Args:
            image: ``(D, H, W)`` / ``(C, D, H, W)`` numpy, or torch ``(B, C, D, H, W)`` or a
                list of ``(C, D, H, W)`` tensors.
            label: the same layout with an integer dtype, or None.
            rng: a Generator (one sample, or drawn sample after sample for a batch) or one
                per sample.
            params: replay these instead of sampling.
            context: sampling context (see :meth:`sample`); ``points`` ((N, 3) source
                indices to map into the patch); ``offset`` (the arrays are a region of the
                source starting at this index) and ``in_shape`` (the whole source's
                shape); backend options: numpy ``out_image`` / ``out_label`` (C-contiguous
                ``(C, d, h, w)`` float32 / label-dtype arrays the patch is written into,
                e.g. shared memory); torch ``out_dtype``, ``backend``, ``classes`` (see
                :func:`augment.backends.torch.execute`). For a torch batch each entry is
                shared, or per sample (a list of B values, or an array with a leading B
                axis).

        Returns:
            ``{"image", "label", "params"}`` and, where relevant, ``"target"``,
            ``"points"``, ``"coord"``.
        """
        if image is None and label is None:
            raise ValueError("give an image, a label, or both")
        backend = _backend(image if image is not None else label)
        options = {k: context.pop(k) for k in backend.OPTIONS if k in context}
        inputs = backend.inputs(image, label)
        batch = inputs.batch
        offsets = context.pop("offset", None)
        in_shapes = context.pop("in_shape", None)
        if inputs.batched:
            ctx = [
                {k: _per_sample(v, b, batch, k) for k, v in context.items()} for b in range(batch)
            ]
            if offsets is not None:
                offsets = [_per_sample(offsets, b, batch, "offset") for b in range(batch)]
            if in_shapes is not None:
                in_shapes = [_per_sample(in_shapes, b, batch, "in_shape") for b in range(batch)]
        else:
            ctx = [context]
        src = inputs.shapes if in_shapes is None else _shapes(in_shapes, batch)
        if params is None:
            if rng is None:
                raise ValueError(
                    "give rng (a numpy Generator, or one per sample of a batch) or params to replay"
                )
            params = self._draw(rng, inputs, src, ctx)
        elif params.batch != batch:
            raise ValueError(f"params hold {params.batch} samples for a batch of {batch}")
        targets = [c.get("target") for c in ctx] if "target" in context else None
        points = [c.get("points") for c in ctx] if "points" in context else None
        plan = self.plan(params, src, offsets, target=targets, points=points)
        result: dict[str, Any] = backend.execute(plan, inputs, **options)
        return result

    def execute(
        self, plan: Plan, *, image: Any = None, label: Any = None, **options: Any
    ) -> dict[str, Any]:
        """Run a plan (from :meth:`plan`) on ``image`` / ``label``: the last step of a
        call, for callers that plan first (e.g. to read only the region a patch needs,
        then :meth:`Plan.offset_by` its start).

        Args:
            plan: the plan; its batch must match the inputs'.
            image, label: as for a call.
            options: backend options (see :meth:`__call__`).

        Returns:
            As a call.
        """
        if image is None and label is None:
            raise ValueError("give an image, a label, or both")
        backend = _backend(image if image is not None else label)
        inputs = backend.inputs(image, label)
        if plan.batch != inputs.batch:
            raise ValueError(f"the plan holds {plan.batch} samples for a batch of {inputs.batch}")
        result: dict[str, Any] = backend.execute(plan, inputs, **options)
        return result

    def _draw(
        self, rng: Any, inputs: Any, src: NDArray[np.int64], ctx: list[dict[str, Any]]
    ) -> ComposeParams:
        """Each sample's parameters from its own generator (or one shared in turn)."""
        batch = inputs.batch
        if inputs.batched:
            gens = _generators(rng, batch)
        else:
            gens = [rng]
        give_label = inputs.has_label and self.reads_label
        drawn = []
        for b in range(batch):
            c = ctx[b]
            if give_label and "label" not in c and "fg_points" not in c:
                c = {**c, "label": inputs.host_label(b)}
            drawn.append(self.sample(gens[b], src[b], **c))
        return drawn[0] if batch == 1 else stack_params(drawn)


def _backend(x: Any) -> ModuleType:
    """The backend module for inputs like ``x``: torch for tensors and lists, else numpy."""
    if is_torch(x) or isinstance(x, (list, tuple)):
        # torch is optional: its backend loads on the first tensor
        from augment.backends import torch as torch_backend

        return torch_backend
    return numpy_backend


def _shapes(in_shapes: Any, batch: int) -> NDArray[np.int64]:
    """``in_shape`` context -> ``(B, 3)`` int64."""
    a = np.asarray(in_shapes, dtype=np.int64)
    if a.size != 3 * batch:
        raise ValueError(f"in_shape must be three sizes per sample, got {in_shapes!r}")
    return a.reshape(batch, 3)


def _map_target(m: F64, t: F64) -> F64:
    """A target ``(z, y, x, d)`` in source indices -> patch indices, the diameter zoomed."""
    zoom = abs(np.linalg.det(m[:3, :3])) ** (-1.0 / 3.0)
    return np.concatenate([mx.apply_points(np.linalg.inv(m), t[:3]), [t[3] * zoom]])


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
