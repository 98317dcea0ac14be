"""Interfaces shared by all transforms: parameters as data, sampling separate from applying.

A transform samples a small frozen dataclass of numpy arrays with a leading batch axis
(``B = 1`` for one sample) from an explicit ``numpy.random.Generator``; applying it is
deterministic given those parameters, so a call can be logged and replayed.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

Shape3 = tuple[int, int, int]
P = TypeVar("P")


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of every parameter record: all fields are arrays with a leading batch axis."""

    @property
    def batch(self) -> int:
        first = dataclasses.fields(self)[0]
        return int(np.shape(getattr(self, first.name))[0])

    def take(self: P, index: int) -> P:
        """The parameters of sample ``index`` as a batch of one."""
        values = {
            f.name: np.asarray(getattr(self, f.name))[index : index + 1]
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }
        return type(self)(**values)

    def as_dict(self) -> dict[str, Any]:
        """Plain lists, for logging as JSON."""
        return {
            f.name: np.asarray(getattr(self, f.name)).tolist() for f in dataclasses.fields(self)
        }


def stack(params: list[P]) -> P:
    """Concatenate single-sample parameter records along the batch axis."""
    if not params:
        raise ValueError("cannot stack an empty list of parameters")
    kind = type(params[0])
    if any(type(p) is not kind for p in params):
        raise TypeError(f"cannot stack parameters of different kinds: {[type(p) for p in params]}")
    values = {
        f.name: np.concatenate([np.asarray(getattr(p, f.name)) for p in params], axis=0)
        for f in dataclasses.fields(kind)  # type: ignore[arg-type]
    }
    return kind(**values)


class SpatialTransform(ABC):
    """A geometric transform: a pull map from its output grid to its input grid."""

    @property
    def reads_label(self) -> bool:
        """Whether :meth:`sample` reads the ``label`` context (a torch batch's label is then
        copied to the host for it). True unless a transform says otherwise: label-free
        transforms set the class attribute ``reads_label = False``."""
        return True

    @abstractmethod
    def sample(self, rng: np.random.Generator, in_shape: Shape3, **context: Any) -> Params:
        """Draw the parameters for one sample whose input grid has ``in_shape``."""

    def out_shape(self, in_shape: Shape3) -> Shape3:
        """Shape of the output grid (the input shape unless the transform crops)."""
        return in_shape

    @abstractmethod
    def matrix(self, params: Params, in_shape: Shape3) -> NDArray[np.float64]:
        """``(B, 4, 4)`` pull maps from the output grid to the input grid."""

    def displacement(self, params: Params) -> NDArray[np.float64] | None:
        """A smooth displacement on top of :meth:`matrix`, or None (the default: a matrix
        is all there is).

        Returns:
            ``(B, 3, gz, gy, gx)`` control vectors of a cubic B-spline laid over the
            pipeline's output grid (:mod:`augment.kernels.bspline`), in voxels of this
            transform's grid; ``Compose`` maps them into the source and the kernels add
            the interpolated vector to every sampled coordinate. A transform that returns
            one sets the class attribute ``displaces = True``.
        """
        return None

    displaces = False


class IntensityTransform(ABC):
    """An element-wise or patch-statistic intensity change of the image (labels untouched)."""

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> Params:
        """Draw the parameters for one sample."""

    @abstractmethod
    def program(
        self, params: Params, value_range: tuple[float, float] | None
    ) -> NDArray[np.float64] | None:
        """Fused ops (see :mod:`augment.kernels.program`) for a single sample, or ``None``
        when this sample needs statistics of the patch and must run after the warp."""

    @abstractmethod
    def apply(self, x: Any, params: Params) -> Any:
        """Apply to a resampled image ``(C, D, H, W)`` (numpy or torch) of a single sample."""

    def apply_owned(self, x: NDArray[np.float32], params: Params) -> NDArray[np.float32]:
        """:meth:`apply` to a C-contiguous float32 numpy image that the caller owns and
        gives up (the numpy backend's image after the warp): a transform may overwrite
        ``x`` and return it instead of making a new array."""
        return np.asarray(self.apply(x, params), dtype=np.float32)

    def out_range(self, value_range: tuple[float, float] | None) -> tuple[float, float] | None:
        """The value range after this transform, when known (used by range-relative ops)."""
        return value_range


def uniform(rng: np.random.Generator, bounds: tuple[float, float], size: int | None = None) -> Any:
    lo, hi = bounds
    return rng.uniform(lo, hi, size) if hi > lo else (np.full(size, lo) if size else lo)


def as_range(
    value: float | tuple[float, float], name: str, centre: float = 0.0
) -> tuple[float, float]:
    """``v`` -> ``(centre - v, centre + v)``; a pair is checked and returned."""
    if np.isscalar(value):
        v = float(value)  # type: ignore[arg-type]
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return (centre - v, centre + v)
    lo, hi = (float(t) for t in value)  # type: ignore[union-attr]
    if hi < lo:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    return (lo, hi)


def size3(size: int | Sequence[int], name: str = "size") -> Shape3:
    """One positive size or three (z, y, x) -> three positive ints."""
    v: tuple[Any, ...] = (size,) * 3 if np.isscalar(size) else tuple(size)  # type: ignore[arg-type]
    if len(v) != 3:
        raise ValueError(f"{name} needs one value or three (z, y, x), got {size!r}")
    s = tuple(int(t) for t in v)
    if min(s) <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return s  # type: ignore[return-value]


def check_probability(p: float, name: str = "p") -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    return float(p)
