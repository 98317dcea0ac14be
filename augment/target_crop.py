"""``TargetCrop``: the DSB2017 lung-nodule crop and augment, folded into one matrix.

A plain reading of the DSB2017 detector's ``Crop`` and ``augment``: crop a cube around a
target ``(z, y, x, diameter)`` so that the target plus a ``bound_size`` margin lies inside;
optionally zoom by ``s`` (the crop taken from the source is ``size / s``; ``s`` is kept so
that the zoomed diameter stays within ``diameter_limits``); rotate in the (y, x) plane by
U(0, 180) degrees, retrying up to ``rotate_tries`` times until the target stays one
diameter inside the patch (else no rotation); permute the axes of a cubic patch; flip the
chosen axes. Everything becomes one pull map, so the image is interpolated once (the
original zoomed, rotated and cropped in three interpolations). ``Compose`` returns the
target's new coordinates and, with ``coord_stride``, the normalised coordinate channel.
Without a target (``target=None``) the crop position is random, as DSB2017's negatives.

Where the target comes from (sampling context): ``target`` (one ``(4,)``, used as given),
or ``targets`` (the case's ``(N, 4)`` targets): then one uniform draw decides whether the
sample is centred on a target (probability ``p_target``), and a second picks the target
uniformly; a case without targets gets a random crop. The chosen target is recorded in
the parameters (``TargetCropParams.target``), so a replay maps it into the patch again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from augment import matrices as mx
from augment.base import Params, Shape3, SpatialTransform, as_range, check_probability, size3

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class TargetCropParams(Params):
    start: F64  # (B, 3) source index of the crop's first voxel
    scale: F64  # (B,) magnification
    angle: F64  # (B,) in-plane (y, x) rotation, radians; 0 when no valid rotation was found
    order: NDArray[np.int64]  # (B, 3) axis permutation
    flip: NDArray[np.bool_]  # (B, 3)
    target: F64  # (B, 4) the (z, y, x, diameter) the crop was placed around; NaN for none


class TargetCrop(SpatialTransform):
    """DSB2017-style target-centred crop with scale, rotation, swap and flips.

    Args:
        size: output patch size (cubic for the swap).
        bound_size: margin in voxels kept between the target and the crop's faces.
        scale: magnification range, or ``None`` for no scaling.
        diameter_limits: the zoomed diameter is kept within these (voxels) when possible.
        rotate: rotate in the (y, x) plane by U(0, 180) degrees.
        rotate_tries: attempts to find a rotation that keeps the target one diameter inside.
        swap: permute the three axes (only when the patch is cubic).
        flip_axes: axes flipped with probability ``p_flip`` each.
        pad_value: image value outside the source (DSB2017: 170).
        coord_stride: stride of the normalised coordinate channel, or ``None``.
        p_target: probability that a sample given ``targets`` is centred on one of them
            (DSB2017 trains with 0.7; the rest are random crops, its negatives).
    """

    reads_label = False

    def __init__(
        self,
        size: int | Sequence[int] = 128,
        *,
        bound_size: int = 12,
        scale: tuple[float, float] | None = (0.75, 1.25),
        diameter_limits: tuple[float, float] = (8.0, 120.0),
        rotate: bool = True,
        rotate_tries: int = 3,
        swap: bool = True,
        flip_axes: Sequence[int] = (1, 2),
        p_flip: float = 0.5,
        pad_value: float = 170.0,
        coord_stride: int | None = None,
        p_target: float = 1.0,
    ) -> None:
        self.size = size3(size)
        if bound_size < 0:
            raise ValueError(f"bound_size must be >= 0, got {bound_size!r}")
        self.bound_size = int(bound_size)
        self.scale = as_range(scale, "scale") if scale is not None else None
        self.diameter_limits = diameter_limits
        self.rotate = rotate
        self.rotate_tries = int(rotate_tries)
        self.swap = swap and len(set(self.size)) == 1
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.p_flip = check_probability(p_flip, "p_flip")
        self.pad_value = float(pad_value)
        if coord_stride is not None and any(s % coord_stride for s in self.size):
            raise ValueError(f"coord_stride {coord_stride} must divide the size {self.size}")
        self.coord_stride = coord_stride
        self.p_target = check_probability(p_target, "p_target")

    def out_shape(self, in_shape: Shape3) -> Shape3:
        return self.size

    def _scale_range(self, diameter: float) -> tuple[float, float]:
        assert self.scale is not None
        lo_s, hi_s = self.scale
        dmin, dmax = self.diameter_limits
        if diameter <= 0 or not np.isfinite(diameter):
            return (lo_s, hi_s)
        return (min(max(dmin / diameter, lo_s), 1.0), max(min(dmax / diameter, hi_s), 1.0))

    def sample(
        self, rng: np.random.Generator, in_shape: Shape3, **context: Any
    ) -> TargetCropParams:
        target = context.get("target")
        if target is None:
            target = self._choose(rng, context.get("targets"))
        size = np.asarray(self.size, dtype=np.float64)
        n = np.asarray(in_shape, dtype=np.float64)
        t = None if target is None else np.asarray(target, dtype=np.float64)
        if t is not None and (t.shape != (4,) or not np.isfinite(t).all()):
            raise ValueError(f"target must be (z, y, x, diameter), got {target!r}")
        s = 1.0
        if self.scale is not None:
            lo, hi = self._scale_range(float(t[3]) if t is not None else 0.0)
            s = float(rng.uniform(lo, hi)) if hi > lo else lo
        crop = np.floor(size / s)  # source extent, as DSB2017's int(crop_size / scale)
        b = self.bound_size
        start = np.zeros(3)
        for i in range(3):
            if t is not None:
                r = t[3] / 2.0
                hi_ = np.floor(t[i] - r) + 1 - b
                lo_ = np.ceil(t[i] + r) + 1 + b - crop[i]
            else:
                hi_ = max(n[i] - crop[i] / 2.0, n[i] / 2.0 + b)
                lo_ = min(crop[i] / 2.0, n[i] / 2.0 - b)
            if hi_ > lo_:
                start[i] = rng.integers(int(np.floor(lo_)), int(np.ceil(hi_)))
            else:
                centre = t[i] if t is not None else n[i] / 2.0
                start[i] = int(centre) - crop[i] // 2 + rng.integers(-(b // 2), b // 2 + 1)
        base = self._crop_scale(start, s)
        angle = 0.0
        if self.rotate:
            for _ in range(self.rotate_tries):
                a = float(rng.uniform(0.0, np.pi))
                if t is None:
                    angle = a
                    break
                m = base @ self._rotation(a)
                p = mx.apply_points(np.linalg.inv(m), t[:3])
                d = t[3] * s
                if np.all(p > d) and np.all(p < size - d):
                    angle = a
                    break
        order = np.arange(3)
        if self.swap:
            order = rng.permutation(3)
        flip = np.zeros(3, dtype=bool)
        for a in self.flip_axes:
            flip[a] = rng.random() < self.p_flip
        return TargetCropParams(
            start=start[None],
            scale=np.array([s]),
            angle=np.array([angle]),
            order=order[None].astype(np.int64),
            flip=flip[None],
            target=(np.full(4, np.nan) if t is None else t)[None],
        )

    def _choose(self, rng: np.random.Generator, targets: Any) -> F64 | None:
        """A target from the case's ``(N, 4)`` ``targets``, or None (a random crop)."""
        if targets is None:
            return None
        tg = np.asarray(targets, dtype=np.float64).reshape(-1, 4)
        if not len(tg) or not rng.random() < self.p_target:
            return None
        return tg[int(rng.integers(len(tg)))]

    def _crop_scale(self, start: F64, s: float) -> F64:
        return mx.translation(start) @ mx.scaling([1.0 / s] * 3)

    def _rotation(self, angle: float) -> F64:
        c = mx.centre(self.size)
        return mx.about(mx.rotation([angle, 0.0, 0.0]), c, c)

    def matrix(self, params: Params, in_shape: Shape3) -> F64:
        assert isinstance(params, TargetCropParams)
        out = []
        for i in range(params.batch):
            m = (
                self._crop_scale(params.start[i], float(params.scale[i]))
                @ self._rotation(float(params.angle[i]))
                @ mx.permutation(params.order[i])
                @ mx.flip(params.flip[i], self.size)
            )
            out.append(m)
        return np.stack(out)


def coord_channel(matrix: F64, in_shape: Shape3, out_shape: Shape3, stride: int) -> F64:
    """Normalised source coordinates ``index / in_shape - 0.5`` of the output grid's cells.

    Shape ``(3, d / stride, h / stride, w / stride)``, float32; each value is the source
    position of a ``stride``-cell's centre under ``matrix`` (the whole pipeline), so it
    follows scaling, rotation, swap and flips exactly.
    """
    grids = [np.arange(n // stride) * stride + (stride - 1) / 2.0 for n in out_shape]
    pts = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1)
    src = mx.apply_points(matrix, pts)
    return np.moveaxis(src / np.asarray(in_shape, float) - 0.5, -1, 0).astype(np.float32)
