"""Intensity transforms of the image (labels untouched).

They run on the resampled patch, in list order. Element-wise ones with known constants
(window, normalisation with given statistics, gamma on a known value range, noise,
brightness, contrast about a fixed centre) compile to the fused program of
:mod:`augment.kernels.program` and run inside the resampling pass; those that need
statistics of the patch (z-score of the patch, contrast about the patch mean, gamma on
the patch's own range) run right after it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from augment.base import IntensityTransform, Params, as_range, check_probability
from augment.kernels import program as pg

F64 = NDArray[np.float64]
Range = tuple[float, float]


def _xp(x: Any) -> Any:
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


def _minmax(x: Any) -> tuple[float, float]:
    return float(x.min()), float(x.max())


def _active_uniform(rng: np.random.Generator, p: float, bounds: Range) -> tuple[bool, float]:
    """``random() < p`` and then ``uniform(*bounds)``, from one ``rng.random(2)`` call: the
    same numbers as the two calls (``uniform`` is ``lo + (hi - lo) * random()``)."""
    u = rng.random(2)
    lo, hi = bounds
    return bool(u[0] < p), lo + (hi - lo) * float(u[1])


@dataclass(frozen=True)
class NoParams(Params):
    active: NDArray[np.bool_]  # (B,)


class Window(IntensityTransform):
    """Clip to ``[low, high]`` (e.g. HU) and map linearly onto ``out_range`` (default [0, 1])."""

    def __init__(self, low: float, high: float, out_range: Range = (0.0, 1.0)) -> None:
        if not high > low:
            raise ValueError(f"Window needs low < high, got ({low!r}, {high!r})")
        self.low, self.high = float(low), float(high)
        self.out = (float(out_range[0]), float(out_range[1]))

    def sample(self, rng: np.random.Generator) -> NoParams:
        return NoParams(active=np.array([True]))

    def _affine(self) -> tuple[float, float]:
        a = (self.out[1] - self.out[0]) / (self.high - self.low)
        return a, self.out[0] - self.low * a

    def program(self, params: Params, value_range: Range | None) -> F64:
        a, b = self._affine()
        return pg.concat(pg.op(pg.CLIP, self.low, self.high), pg.op(pg.AFFINE, a, b))

    def apply(self, x: Any, params: Params) -> Any:
        a, b = self._affine()
        return _xp(x).clip(x, self.low, self.high) * a + b

    def out_range(self, value_range: Range | None) -> Range | None:
        return self.out


@dataclass(frozen=True)
class NormalizeParams(Params):
    active: NDArray[np.bool_]


class Normalize(IntensityTransform):
    """Normalise intensities.

    ``mode="zscore"``: ``(x - mean) / std``, with the given ``mean``/``std`` (dataset
    statistics, fused) or the patch's own (after the warp). ``clip=(lo, hi)`` clips first
    (nnU-Net's CT scheme: clip to foreground percentiles, then z-score with foreground
    mean and std). ``mode="range"``: maps ``[lo, hi]`` (given, or the patch min/max) to
    [0, 1] without clipping.
    """

    def __init__(
        self,
        mode: str = "zscore",
        *,
        mean: float | None = None,
        std: float | None = None,
        clip: Range | None = None,
        range: Range | None = None,
        eps: float = 1e-8,
    ) -> None:  # noqa: A002
        if mode not in ("zscore", "range"):
            raise ValueError(f"mode must be 'zscore' or 'range', got {mode!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (patch statistics)")
        if std is not None and std <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.mode, self.mean, self.std, self.clip, self.range, self.eps = (
            mode,
            mean,
            std,
            clip,
            range,
            eps,
        )

    def sample(self, rng: np.random.Generator) -> NormalizeParams:
        return NormalizeParams(active=np.array([True]))

    def _fused_affine(self) -> tuple[float, float] | None:
        if self.mode == "zscore" and self.mean is not None and self.std is not None:
            return 1.0 / self.std, -self.mean / self.std
        if self.mode == "range" and self.range is not None:
            lo, hi = self.range
            return 1.0 / (hi - lo), -lo / (hi - lo)
        return None

    def program(self, params: Params, value_range: Range | None) -> F64 | None:
        ab = self._fused_affine()
        if ab is None:
            return None
        ops = [pg.op(pg.CLIP, *self.clip)] if self.clip is not None else []
        return pg.concat(*ops, pg.op(pg.AFFINE, *ab))

    def apply(self, x: Any, params: Params) -> Any:
        xp = _xp(x)
        if self.clip is not None:
            x = xp.clip(x, *self.clip)
        ab = self._fused_affine()
        if ab is not None:
            return x * ab[0] + ab[1]
        if self.mode == "zscore":
            std = x.std() if xp is np else x.std(correction=0)  # population std on both
            return (x - x.mean()) / (std + self.eps)
        lo, hi = _minmax(x)
        return (x - lo) / max(hi - lo, self.eps)

    def out_range(self, value_range: Range | None) -> Range | None:
        if self.mode == "range":
            return (0.0, 1.0) if self.clip is None or self.range == self.clip else None
        return None


@dataclass(frozen=True)
class GammaParams(Params):
    active: NDArray[np.bool_]
    gamma: F64


class RandomGamma(IntensityTransform):
    """``x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma`` with probability ``p``.

    ``[lo, hi]`` is the known value range at this point of the pipeline (after a Window,
    say: fused) or else the patch's own min and max (after the warp), as in nnU-Net.
    Gamma is drawn as nnU-Net does: half the time below 1, half above, when the range
    straddles 1. ``invert=True`` applies it to the inverted image.
    """

    def __init__(
        self,
        gamma: Range = (0.7, 1.5),
        p: float = 0.3,
        *,
        invert: bool = False,
        value_range: Range | None = None,
    ) -> None:
        lo, hi = as_range(gamma, "gamma")
        if lo <= 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        self.gamma = (lo, hi)
        self.p = check_probability(p)
        self.invert = invert
        self.value_range = value_range

    def sample(self, rng: np.random.Generator) -> GammaParams:
        """Draw order: ``random() < p``; when the range straddles 1, ``random() < 0.5``
        (below 1); then the gamma, ``lo + (hi - lo) * random()`` over its half (one
        ``rng.random(k)`` call: the numbers ``rng.uniform`` call by call gives)."""
        lo, hi = self.gamma
        straddle = lo < 1.0 < hi
        u = rng.random(3 if straddle else 2)
        active = bool(u[0] < self.p)
        if straddle and u[1] < 0.5:
            g = lo + (1.0 - lo) * u[2]
        else:
            a = max(lo, 1.0) if straddle else lo
            g = a + (hi - a) * u[-1]
        return GammaParams(active=np.array([active]), gamma=np.array([g if active else 1.0]))

    def program(self, params: Params, value_range: Range | None) -> F64 | None:
        assert isinstance(params, GammaParams)
        if not bool(params.active[0]):
            return pg.empty()
        vr = self.value_range or value_range
        if vr is None:
            return None
        lo, hi = vr
        g = float(params.gamma[0])
        if self.invert:
            return pg.concat(
                pg.op(pg.AFFINE, -1.0, lo + hi),
                pg.op(pg.GAMMA, g, lo, hi),
                pg.op(pg.AFFINE, -1.0, lo + hi),
            )
        return pg.op(pg.GAMMA, g, lo, hi)

    def apply(self, x: Any, params: Params) -> Any:
        assert isinstance(params, GammaParams)
        if not bool(params.active[0]):
            return x
        xp = _xp(x)
        lo, hi = self.value_range or _minmax(x)
        g = float(params.gamma[0])
        span = max(hi - lo, 1e-8)
        t = (x - lo) / span
        if self.invert:
            t = 1.0 - t
        t = xp.clip(t, 0.0, 1.0) ** g
        if self.invert:
            t = 1.0 - t
        return lo + span * t


@dataclass(frozen=True)
class NoiseParams(Params):
    active: NDArray[np.bool_]
    std: F64
    seed: NDArray[np.int64]


class RandomNoise(IntensityTransform):
    """Additive Gaussian noise, sigma ~ U(std), with probability ``p``.

    The noise is a counter-based function of (seed, voxel), drawn inside the kernel: the
    same numbers on every backend and thread count, stored as a seed in the parameters.
    """

    def __init__(self, std: float | Range = (0.0, 0.1), p: float = 0.1) -> None:
        self.std = as_range(std, "std") if not np.isscalar(std) else (0.0, float(std))  # type: ignore[arg-type]
        if self.std[0] < 0:
            raise ValueError(f"std must be >= 0, got {std!r}")
        self.p = check_probability(p)

    def sample(self, rng: np.random.Generator) -> NoiseParams:
        """Draw order: ``random() < p``, the sigma (a uniform, unless the range is one
        value), then the seed (``integers(0, 2**32)``)."""
        lo, hi = self.std
        u = rng.random(2 if hi > lo else 1)
        active = bool(u[0] < self.p)
        sigma = lo + (hi - lo) * u[1] if hi > lo else lo
        seed = int(rng.integers(0, 2**32))
        return NoiseParams(
            active=np.array([active]),
            std=np.array([sigma if active else 0.0]),
            seed=np.array([seed], dtype=np.int64),
        )

    def program(self, params: Params, value_range: Range | None) -> F64:
        assert isinstance(params, NoiseParams)
        if not bool(params.active[0]) or float(params.std[0]) == 0.0:
            return pg.empty()
        return pg.op(pg.NOISE, float(params.std[0]), float(params.seed[0]))

    def apply(self, x: Any, params: Params) -> Any:
        prog = self.program(params, None)
        if not len(prog):
            return x
        if _xp(x) is np:
            return pg.run_reference(prog, x).astype(x.dtype)
        # a tensor: torch is loaded already; the fallback's program runner is torch ops
        from augment.kernels.torch_fallback import run_program

        return run_program(x[None], prog[None])[0]

    def out_range(self, value_range: Range | None) -> Range | None:
        return None


@dataclass(frozen=True)
class ScaleParams(Params):
    active: NDArray[np.bool_]
    factor: F64


class RandomContrast(IntensityTransform):
    """``x -> (x - c) * f + c``, f ~ U(factor), with probability ``p``.

    ``centre="mean"`` uses the patch mean (after the warp, as batchgenerators does);
    a number fuses into the pass. ``preserve_range`` clips to the range before the change
    (the known range, or the patch's).
    """

    def __init__(
        self,
        factor: Range = (0.75, 1.25),
        p: float = 0.15,
        *,
        centre: float | str = "mean",
        preserve_range: bool = True,
    ) -> None:
        self.factor = as_range(factor, "factor")
        if not (centre == "mean" or isinstance(centre, (int, float))):
            raise ValueError(f"centre must be 'mean' or a number, got {centre!r}")
        self.centre = centre
        self.p = check_probability(p)
        self.preserve_range = preserve_range

    def sample(self, rng: np.random.Generator) -> ScaleParams:
        """Draw order: ``random() < p``, then the factor (a uniform)."""
        active, f = _active_uniform(rng, self.p, self.factor)
        return ScaleParams(active=np.array([active]), factor=np.array([f if active else 1.0]))

    def program(self, params: Params, value_range: Range | None) -> F64 | None:
        assert isinstance(params, ScaleParams)
        if not bool(params.active[0]):
            return pg.empty()
        if self.centre == "mean" or (self.preserve_range and value_range is None):
            return None
        f, c = float(params.factor[0]), float(self.centre)
        ops = [pg.op(pg.AFFINE, f, c * (1.0 - f))]
        if self.preserve_range and value_range is not None:
            ops.append(pg.op(pg.CLIP, *value_range))
        return pg.concat(*ops)

    def apply(self, x: Any, params: Params) -> Any:
        assert isinstance(params, ScaleParams)
        if not bool(params.active[0]):
            return x
        if _xp(x) is np and x.dtype == np.float32 and x.flags.c_contiguous:
            return self._contrast_inplace(x.copy(), params)
        f = float(params.factor[0])
        mean = self.centre == "mean"
        c = float(x.mean()) if mean else float(self.centre)
        lo, hi = _minmax(x)
        y = (x - c) * f + c
        return _xp(x).clip(y, lo, hi) if self.preserve_range else y

    def apply_owned(self, x: NDArray[np.float32], params: Params) -> NDArray[np.float32]:
        """In place: after the warp the copy :meth:`apply` makes was a third pass over the
        patch (W1's 128^3 contrast, one thread: 0.21 instead of 0.35 ns a voxel,
        benchmarks/W1_BOUND.md)."""
        assert isinstance(params, ScaleParams)
        if not bool(params.active[0]):
            return x
        if x.dtype == np.float32 and x.flags.c_contiguous:
            return self._contrast_inplace(x, params)
        return np.asarray(self.apply(x, params), dtype=np.float32)

    def _contrast_inplace(self, y: NDArray[np.float32], params: ScaleParams) -> NDArray[np.float32]:
        """The numba kernel over ``y``, which it overwrites."""
        from augment.kernels.cpu import contrast_inplace  # numba loads on first use only

        mean = self.centre == "mean"
        centre = 0.0 if mean else float(self.centre)
        contrast_inplace(y.reshape(-1), float(params.factor[0]), centre, mean, self.preserve_range)
        return y

    def out_range(self, value_range: Range | None) -> Range | None:
        return value_range if self.preserve_range else None


class RandomBrightness(IntensityTransform):
    """Multiplicative (``x * f``) or additive (``x + f``) brightness, with probability ``p``."""

    def __init__(
        self, factor: Range = (0.75, 1.25), p: float = 0.15, *, additive: bool = False
    ) -> None:
        self.factor = as_range(factor, "factor")
        self.p = check_probability(p)
        self.additive = additive
        if self.p > 0 and self.factor == ((0.0, 0.0) if additive else (1.0, 1.0)):
            warnings.warn("RandomBrightness is configured as a no-op", stacklevel=2)

    def sample(self, rng: np.random.Generator) -> ScaleParams:
        """Draw order: ``random() < p``, then the factor (a uniform)."""
        active, f = _active_uniform(rng, self.p, self.factor)
        neutral = 0.0 if self.additive else 1.0
        return ScaleParams(active=np.array([active]), factor=np.array([f if active else neutral]))

    def program(self, params: Params, value_range: Range | None) -> F64:
        assert isinstance(params, ScaleParams)
        if not bool(params.active[0]):
            return pg.empty()
        f = float(params.factor[0])
        return pg.op(pg.AFFINE, 1.0, f) if self.additive else pg.op(pg.AFFINE, f, 0.0)

    def apply(self, x: Any, params: Params) -> Any:
        assert isinstance(params, ScaleParams)
        if not bool(params.active[0]):
            return x
        f = float(params.factor[0])
        return x + f if self.additive else x * f

    def out_range(self, value_range: Range | None) -> Range | None:
        return None
