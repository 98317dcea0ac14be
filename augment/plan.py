"""What a ``Compose`` call drew (``ComposeParams``) and what a backend executes (``Plan``).

``Compose.sample`` draws parameters; ``Compose.plan`` turns a batch of them into a
:class:`Plan`: one pull map per sample (region offsets included), the fused intensity
programs, which samples are exact index copies, the intensity transforms left for after
the warp, the output shape and the extras (mapped target and points, the coordinate
channel). A backend (:mod:`augment.backends.numpy`, :mod:`augment.backends.torch`) needs
nothing else: it never looks at the transforms' configuration or redraws anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from augment import matrices as mx
from augment.base import IntensityTransform, Params, Shape3, stack
from augment.kernels import bspline

F64 = NDArray[np.float64]
# per sample: the intensity transforms that run after the warp, with their parameters
AfterWarp = tuple[tuple[IntensityTransform, Params], ...]


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


@dataclass(frozen=True)
class Plan:
    """One batch's resampling, decided on the host; backends execute it as it is.

    Attributes:
        params: the parameters it was planned from (returned with the result).
        matrices: ``(B, 3, 4)`` pull maps from an output voxel index to the index in the
            arrays given to the backend (a source region starting at ``offsets``).
        exact: per sample, the signed axis permutation of ``matrices[b]`` when it is one
            (served by an exact index copy), else None.
        programs: ``(B, n_ops, 4)`` fused intensity programs, padded with identity ops.
        post: per sample, the index of the first intensity transform that runs after the
            warp (``len(compose.intensity)`` when all are fused).
        after_warp: per sample, those transforms with their single-sample parameters.
        out_shape: ``(d, h, w)`` of every output.
        in_shapes: ``(B, 3)`` shapes of the whole sources.
        offsets: ``(B, 3)`` where the given arrays start within the sources.
        image_order, cval, label_cval, label_mode: resampling settings of the Compose.
        target: per sample, the target ``(z, y, x, d)`` in patch coordinates (None where a
            sample has none), or None when no sample has one.
        points: per sample, the ``(N, 3)`` points mapped into the patch, or None.
        coord: ``(B, 3, d / s, h / s, w / s)`` float32 coordinate channel (TargetCrop's
            ``coord_stride``), or None.
        field: ``(B, 3, gz, gy, gx)`` control vectors of a cubic B-spline displacement
            laid over the output grid (:mod:`augment.kernels.bspline`), in index units of
            the given arrays: every sampled coordinate is ``matrices[b] @ (z, y, x, 1)``
            plus the spline's value there. None when no sample is displaced; a displaced
            sample is never an exact copy.
    """

    params: ComposeParams
    matrices: F64
    exact: tuple[mx.ExactMap | None, ...]
    programs: F64
    post: tuple[int, ...]
    after_warp: tuple[AfterWarp, ...]
    out_shape: Shape3
    in_shapes: NDArray[np.int64]
    offsets: F64
    image_order: int
    cval: float
    label_cval: int
    label_mode: str
    target: tuple[F64 | None, ...] | None = None
    points: tuple[F64, ...] | None = None
    coord: NDArray[np.float32] | None = None
    field: F64 | None = None

    @property
    def batch(self) -> int:
        return int(self.matrices.shape[0])

    @property
    def reach(self) -> F64:
        """``(B, 3)``: how far the displacement moves a sample off its affine coordinate,
        at most, per axis (index units; 0 without a field). A region read for a patch
        needs this much more on every side than the matrix's footprint."""
        if self.field is None:
            return np.zeros((self.batch, 3))
        return bspline.bound(self.field)

    @property
    def post_warp(self) -> bool:
        """Whether any sample has intensity transforms left for after the warp."""
        return any(self.after_warp)

    def offset_by(self, offsets: ArrayLike) -> Plan:
        """The same plan for arrays that are regions starting at ``offsets`` ((3,) or
        (B, 3)) of the arrays this plan was made for."""
        off = np.broadcast_to(np.asarray(offsets, dtype=np.float64), (self.batch, 3))
        m = mx.to_3x4(mx.translation(-off) @ mx.to_4x4(self.matrices))
        return dataclasses.replace(
            self,
            matrices=m,
            exact=exact_maps(m, self.field),
            offsets=self.offsets + off,
        )


def exact_maps(matrices: F64, field: F64 | None) -> tuple[mx.ExactMap | None, ...]:
    """Per sample, the exact index map of ``matrices[b]`` (None where it is not one, or
    where the sample has a non-zero displacement ``field[b]``)."""
    return tuple(
        None if field is not None and np.any(field[b]) else mx.as_exact(mb)
        for b, mb in enumerate(matrices)
    )
