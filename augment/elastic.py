"""``RandomElastic``: a smooth random deformation inside the one resampling pass.

The deformation is a coarse grid of random control vectors laid over the output patch and
interpolated by a uniform cubic B-spline (:mod:`augment.kernels.bspline`). ``Compose``
maps the vectors into the source's index space (through the linear part of the transforms
listed before this one) and every backend evaluates the spline per output voxel and adds
it to the affine-mapped coordinate, so crop, affine, flips, the deformation and the fused
intensity ops stay one pass for image and label. No dense per-voxel field is built (the
parameters hold ``3 * points**3`` numbers; batchgenerators and MONAI build 3 floats per
voxel and smooth them).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from augment.base import Params, Shape3, SpatialTransform, as_range, check_probability
from augment.kernels.bspline import MIN_POINTS

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class ElasticParams(Params):
    active: NDArray[np.bool_]  # (B,)
    field: F64  # (B, 3, gz, gy, gx) control vectors (z, y, x), voxels of the transform's grid


class RandomElastic(SpatialTransform):
    """Elastic deformation: random control vectors on a coarse grid, a cubic B-spline between.

    Where it sits in the list decides the frame of its vectors: listed after the crop and
    the affine (the usual place, as batchgenerators deforms the patch grid before rotating
    it), a vector of 1 moves a sample by one output voxel; listed first, by one source
    voxel. The control grid always spans the output patch. Mapped targets and points
    (TargetCrop) follow the affine part only.

    Args:
        points: control points per axis (one value or three (z, y, x), each >= 4). Points 1
            and ``points - 2`` sit on the patch's first and last voxel, so the spacing is
            ``(n - 1) / (points - 3)`` output voxels (a 128^3 patch with 8 points: 25.4);
            more points give a finer, more local deformation.
        magnitude: largest displacement in voxels, ``m`` or ``(lo, hi)``: per sample
            ``m ~ U(magnitude)``, each component of each control vector ``U(-m, m)``; the
            spline never moves a voxel further than its largest control vector.
        p: probability that a sample is deformed (the others get a zero field and keep the
            affine-only path, exact copies included).

    Cost: in the same pass as the trilinear read, per output voxel 12 multiply-adds
    (three components, four B-spline taps along x, a loop that vectorises) plus its share
    of the y and z taps, contracted once per row and per tile plane (float64); in the
    numba kernel on W7 (W1's 128^3 patches) about a fifth more CPU time than W1 alone,
    measured on the 2-core development VM (``python -m benchmarks.run w7``).
    """

    reads_label = False
    displaces = True

    def __init__(
        self,
        points: int | Sequence[int] = 8,
        magnitude: float | tuple[float, float] = (0.0, 4.0),
        *,
        p: float = 1.0,
    ) -> None:
        pts: tuple[Any, ...] = (points,) * 3 if np.isscalar(points) else tuple(points)  # type: ignore[arg-type]
        if len(pts) != 3 or any(int(v) != v or int(v) < MIN_POINTS for v in pts):
            raise ValueError(
                f"points must be one integer or three (z, y, x), each >= {MIN_POINTS} "
                f"(a cubic B-spline needs four per interval), got {points!r}"
            )
        self.points: Shape3 = (int(pts[0]), int(pts[1]), int(pts[2]))
        mag = (0.0, float(magnitude)) if np.isscalar(magnitude) else magnitude  # type: ignore[arg-type]
        self.magnitude = as_range(mag, "magnitude")
        if self.magnitude[0] < 0:
            raise ValueError(f"magnitude must be >= 0 voxels, got {magnitude!r}")
        self.p = check_probability(p)
        if self.p > 0 and self.magnitude == (0.0, 0.0):
            warnings.warn("RandomElastic is configured as a no-op (magnitude 0)", stacklevel=2)

    def sample(self, rng: np.random.Generator, in_shape: Shape3, **context: Any) -> ElasticParams:
        on = rng.random() < self.p
        lo, hi = self.magnitude
        m = rng.uniform(lo, hi) if hi > lo else lo
        field = rng.uniform(-1.0, 1.0, (3, *self.points)) * m
        if not on:
            field = np.zeros_like(field)
        return ElasticParams(active=np.array([on]), field=field[None])

    def matrix(self, params: Params, in_shape: Shape3) -> F64:
        assert isinstance(params, ElasticParams)
        return np.broadcast_to(np.eye(4), (params.batch, 4, 4)).copy()

    def displacement(self, params: Params) -> F64:
        assert isinstance(params, ElasticParams)
        return np.asarray(params.field, dtype=np.float64)
