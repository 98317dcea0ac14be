"""Intensity normalisation of the segnet's input: the CT window, or a per-case z-score.

``data.normalize``:

- ``"ct"``: clip to the HU window ``data.window`` and map it linearly onto [0, 1] (the seed's
  CT scheme; Hounsfield units mean the same in every CT scan);
- ``"zscore"``: ``(x - mean) / std`` with the mean and standard deviation of the case's own
  voxels on the training grid (nnU-Net's scheme for MR, whose intensities have no absolute
  scale);
- ``"auto"``: ``"ct"`` when the dataset declares CT (dataset.json's ``modality`` /
  ``channel_names``; LiTS and SLIVER07 are CT) or declares nothing, ``"zscore"`` for any other
  modality (MR, T1, T2, ADC, ...).

In training the z-score is an affine intensity op whose constants are the sample's case's:
:class:`CaseZScore` inside a :class:`CaseCompose`, which fills them in from the sampling
context's ``case``, so it fuses into the resampling pass like the window does. Whole volumes
(the gates, validation, ``training.predict``) use :meth:`Normalization.apply` with the same
statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

import augment
from augment.base import IntensityTransform, Params
from augment.kernels import program as pg

__all__ = [
    "NORMALIZE_MODES",
    "CaseCompose",
    "CaseZScore",
    "Normalization",
    "ZScoreParams",
    "resolve_normalize",
    "zscore_stats",
]

NORMALIZE_MODES = ("auto", "ct", "zscore")
"""The values of ``data.normalize``."""
_MIN_STD = 1e-6


def resolve_normalize(mode: str, modality: str | None) -> str:
    """``"ct"`` or ``"zscore"`` for ``data.normalize`` and the dataset's modality.

    Args:
        mode: ``"auto"``, ``"ct"`` or ``"zscore"``.
        modality: the declared modality (``"CT"``, ``"MRI"``, ...) or None.

    Returns:
        The normalisation; ``"auto"`` is ``"ct"`` for CT or an undeclared modality.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"data.normalize = {mode!r}: expected one of {NORMALIZE_MODES}")
    if mode != "auto":
        return mode
    if modality is None or modality.strip().upper() in ("", "CT"):
        return "ct"
    return "zscore"


def zscore_stats(image: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (population) of a whole image, in float64.

    Returns:
        ``(mean, std)``; std is floored at 1e-6 so a constant image does not divide by 0.
    """
    arr = np.asarray(image, dtype=np.float64)
    return float(arr.mean()), max(float(arr.std()), _MIN_STD)


@dataclass(frozen=True)
class Normalization:
    """The intensity mapping of a run.

    Attributes:
        mode: ``"ct"`` or ``"zscore"``.
        window: the HU window of ``"ct"``.
    """

    mode: str
    window: tuple[float, float]

    def __post_init__(self) -> None:
        if self.mode not in ("ct", "zscore"):
            raise ValueError(f"normalisation must be 'ct' or 'zscore', got {self.mode!r}")
        object.__setattr__(self, "window", (float(self.window[0]), float(self.window[1])))

    @property
    def cval(self) -> float:
        """The image value outside a volume, in its own units: air (the window's low end)
        for CT, 0 for z-scored images (the background of most MR)."""
        return self.window[0] if self.mode == "ct" else 0.0

    def apply(self, image: np.ndarray, stats: tuple[float, float] | None = None) -> np.ndarray:
        """A whole image, normalised.

        Args:
            image: the image on the training grid.
            stats: ``(mean, std)`` for ``"zscore"`` (default: ``zscore_stats(image)``).

        Returns:
            float32, same shape.
        """
        if self.mode == "ct":
            lo, hi = self.window
            w = augment.Window(lo, hi)
            x = image.astype(np.float32)
            return np.asarray(w.apply(x, w.sample(np.random.default_rng(0))), dtype=np.float32)
        mean, std = zscore_stats(image) if stats is None else stats
        return ((np.asarray(image, dtype=np.float64) - mean) / std).astype(np.float32)

    def transform(self, stats: Mapping[str, tuple[float, float]]) -> IntensityTransform:
        """The training Compose's normalisation: ``augment.Window`` for CT, a
        :class:`CaseZScore` with the cases' statistics for z-score."""
        if self.mode == "ct":
            return augment.Window(*self.window)
        return CaseZScore(stats)


@dataclass(frozen=True)
class ZScoreParams(Params):
    active: NDArray[np.bool_]
    scale: NDArray[np.float64]
    shift: NDArray[np.float64]


class CaseZScore(IntensityTransform):
    """``x * (1 / std) - mean / std`` with the sample's case's ``(mean, std)``.

    Its parameters are filled in by :class:`CaseCompose` from the sampling context's
    ``case``; drawn alone (``sample``) they are NaN, and planning them raises.

    Args:
        stats: case id -> ``(mean, std)`` (``zscore_stats`` of the case's cached image).
    """

    def __init__(self, stats: Mapping[str, tuple[float, float]]) -> None:
        self.stats = {str(k): (float(m), float(s)) for k, (m, s) in stats.items()}
        bad = {k: s for k, (_, s) in self.stats.items() if not s > 0}
        if bad:
            raise ValueError(f"z-score std must be > 0, got {bad}")

    def sample(self, rng: np.random.Generator) -> ZScoreParams:
        return ZScoreParams(
            active=np.array([True]), scale=np.array([np.nan]), shift=np.array([np.nan])
        )

    def for_case(self, case: str) -> ZScoreParams:
        """The parameters of a sample of ``case``."""
        if case not in self.stats:
            raise KeyError(f"no z-score statistics for case {case!r}")
        mean, std = self.stats[case]
        return ZScoreParams(
            active=np.array([True]), scale=np.array([1.0 / std]), shift=np.array([-mean / std])
        )

    def _affine(self, params: Params) -> tuple[float, float]:
        assert isinstance(params, ZScoreParams)
        scale, shift = float(params.scale[0]), float(params.shift[0])
        if not (np.isfinite(scale) and np.isfinite(shift)):
            raise ValueError(
                "CaseZScore parameters without a case: use it inside a CaseCompose, whose "
                "sample() fills them from the context's case"
            )
        return scale, shift

    def program(self, params: Params, value_range: tuple[float, float] | None) -> Any:
        return pg.op(pg.AFFINE, *self._affine(params))

    def apply(self, x: Any, params: Params) -> Any:
        scale, shift = self._affine(params)
        return x * scale + shift

    def out_range(self, value_range: tuple[float, float] | None) -> tuple[float, float] | None:
        return None


class CaseCompose(augment.Compose):
    """An ``augment.Compose`` whose :class:`CaseZScore` transforms take the constants of the
    sample's case (the ``case`` entry of the sampling context, which ``PatchSampler``
    passes); everything else is the Compose's own."""

    def sample(
        self, rng: np.random.Generator, in_shape: Sequence[int], **context: Any
    ) -> augment.ComposeParams:
        params = super().sample(rng, in_shape, **context)
        if not any(isinstance(t, CaseZScore) for t in self.intensity):
            return params
        case = context.get("case")
        if case is None:
            raise ValueError("CaseCompose.sample needs the sample's case in the context (case=)")
        filled = tuple(
            t.for_case(str(case)) if isinstance(t, CaseZScore) else p
            for t, p in zip(self.intensity, params.intensity, strict=True)
        )
        return dataclasses.replace(params, intensity=filled)
