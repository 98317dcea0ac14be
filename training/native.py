"""Predictions back on each case's own grid (native resolution), in the file's voxel order.

The segnet sees a case on its cache grid: the file's voxels put on the canonical axis order
(``loaders.orientation``: an exact permutation/flip) and resampled to ``data.spacing``. The way
back, used by the native-resolution validation and by ``training.predict``, is nnU-Net's:

1. the class probabilities on the cache grid are resampled, one class at a time, with
   SimpleITK's linear interpolation onto the canonical grid at the file's own spacing
   (``Reorientation.canonical_geometry``; points past the last cache voxel take the nearest
   one, as ``loaders.resample`` does), and the argmax is taken there;
2. ``Reorientation.undo`` puts the result back on the file's grid, exactly (a
   permutation/flip), so it has the file's size, voxel order, spacing, origin and direction.

Where the two grids coincide (``data.spacing = []``) the probabilities are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from loaders.orientation import Geometry, Reorientation
from loaders.volume import Volume

__all__ = ["NativePrediction", "resample_probabilities", "same_grid", "to_native"]

_ORIGIN_ATOL = 1e-6  # mm
_SPACING_RTOL = 1e-9


def same_grid(a: Geometry, b: Geometry) -> bool:
    """Whether two grids have the same shape, spacing, origin and direction."""
    return (
        a.shape == b.shape
        and np.allclose(a.spacing, b.spacing, rtol=_SPACING_RTOL, atol=0.0)
        and np.allclose(a.origin, b.origin, rtol=0.0, atol=_ORIGIN_ATOL)
        and np.allclose(a.direction, b.direction, rtol=0.0, atol=1e-12)
    )


def _resampler(target: Geometry) -> sitk.ResampleImageFilter:
    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in target.shape[::-1]])
    f.SetOutputSpacing(target.spacing[::-1])
    f.SetOutputOrigin(target.origin[::-1])
    f.SetOutputDirection(tuple(target.direction[::-1, ::-1].ravel()))
    f.SetInterpolator(sitk.sitkLinear)
    f.SetUseNearestNeighborExtrapolator(True)
    f.SetOutputPixelType(sitk.sitkFloat32)
    return f


def resample_probabilities(
    probabilities: np.ndarray,
    source: Geometry,
    target: Geometry,
    *,
    keep: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities on one grid, resampled (linear) onto another, and their argmax.

    Args:
        probabilities: ``(K, D, H, W)`` on ``source``.
        source: their grid.
        target: the grid to resample onto.
        keep: also return the resampled probabilities (K arrays of the target's size; without
            it only the running maximum is kept).

    Returns:
        ``(classes, probabilities)``: uint8 argmax on ``target`` (ties: the lower class), and
        ``(K, *target.shape)`` float32 or None.
    """
    probs = np.asarray(probabilities)
    if probs.ndim != 4 or tuple(probs.shape[1:]) != source.shape:
        raise ValueError(
            f"probabilities of shape {probs.shape} do not fit the source grid {source.shape}"
        )
    if same_grid(source, target):
        out = probs.astype(np.float32, copy=False)
        return np.argmax(out, axis=0).astype(np.uint8), (out if keep else None)
    f = _resampler(target)
    best = np.full(target.shape, -np.inf, np.float32)
    classes = np.zeros(target.shape, np.uint8)
    kept = []
    for k in range(probs.shape[0]):
        image = Volume(
            probs[k].astype(np.float32, copy=False),
            spacing=source.spacing,
            origin=source.origin,
            direction=source.direction,
        ).to_sitk()
        p = sitk.GetArrayFromImage(f.Execute(image))
        better = p > best
        classes[better] = k
        np.maximum(best, p, out=best)
        if keep:
            kept.append(p)
    return classes, (np.stack(kept) if keep else None)


@dataclass(frozen=True)
class NativePrediction:
    """A prediction on a file's own grid.

    Attributes:
        classes: uint8 class indices, the file's (z, y, x) shape and voxel order.
        probabilities: ``(K, z, y, x)`` float32 on the same grid, or None.
        geometry: the file's grid (shape, spacing, origin, direction).
    """

    classes: np.ndarray
    probabilities: np.ndarray | None
    geometry: Geometry


def to_native(
    probabilities: np.ndarray,
    grid: Geometry,
    reorientation: Reorientation,
    *,
    keep_probabilities: bool = False,
) -> NativePrediction:
    """Cache-grid probabilities as a prediction on the file's own grid (see the module
    docstring).

    Args:
        probabilities: ``(K, D, H, W)`` on ``grid``.
        grid: the cache grid (canonical axis order, identity direction).
        reorientation: the case's ``Reorientation`` (``cache.info(case).reorientation``, or
            ``loaders.to_canonical``'s).
        keep_probabilities: also return the probabilities on the file's grid.

    Returns:
        The ``NativePrediction``.
    """
    classes, probs = resample_probabilities(
        probabilities, grid, reorientation.canonical_geometry, keep=keep_probabilities
    )
    return NativePrediction(
        classes=np.ascontiguousarray(reorientation.undo(classes)),
        probabilities=None if probs is None else np.ascontiguousarray(reorientation.undo(probs)),
        geometry=reorientation.original_geometry,
    )
