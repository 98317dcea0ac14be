"""Overlap and surface-distance metrics for binary segmentations (SLIVER07 / MedPy).

All functions take a prediction and a ground truth of the same shape, any array castable to
bool (numpy arrays, CPU or CUDA torch tensors); non-zero is object. Distances are in the unit of
``spacing`` (millimetres for CT/MRI), with spacing in the arrays' axis order, (z, y, x) in this
project. Overlap figures are fractions in [0, 1], not percent.

Conventions:
    Surface. The surface (border) of a mask is the mask minus its binary erosion with the
    structuring element ``scipy.ndimage.generate_binary_structure(ndim, connectivity)``, as in
    ``medpy.metric.binary``: a voxel is on the surface when one of its neighbours (6 for
    ``connectivity=1``, the default; 18 for 2; 26 for 3) is background. The array edge counts
    as background, so an object touching it has a surface there.
    Distance. The distance from a surface voxel of A to the surface of B is the Euclidean
    distance between voxel centres, in mm, to the nearest surface voxel of B, computed with
    ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.
    ASSD and RMSD follow SLIVER07 (Heimann et al., IEEE TMI 2009): the distances of both
    surfaces are pooled, so ``assd = (sum d(A->B) + sum d(B->A)) / (|S_A| + |S_B|)``, which
    is also ``medpy.metric.binary.assd`` from MedPy 0.5 on. Older MedPy releases averaged the two
    directed means instead; pass ``average="mean"`` for that form. MSD (maximum symmetric surface
    distance) is the Hausdorff distance between the two surfaces, equal to
    ``medpy.metric.binary.hd``.
    Empty masks. MedPy raises on empty masks; here:

    =============  ==========  ====================================
    metric         both empty  exactly one empty
    =============  ==========  ====================================
    VoE            0           1
    Dice           1           0
    RVD            0           +inf if gt is empty, -1 if pred is
    ASSD/RMSD/MSD  0           inf
    =============  ==========  ====================================

    Both empty is a correct answer (nothing to find, nothing found). A distance to a surface
    that does not exist is undefined; inf keeps such a case from passing any threshold
    silently, and makes a mean over cases inf too, so report those cases separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "abs_rvd",
    "assd",
    "case_metrics",
    "dice",
    "msd",
    "rmsd",
    "rvd",
    "surface_distances",
    "voe",
]

Average = Literal["pooled", "mean"]


def _as_bool(x: Any, name: str) -> NDArray[np.bool_]:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be an array with at least one axis, got a scalar {arr!r}")
    return arr.astype(bool, copy=False)


def _pair(pred: Any, gt: Any) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    p = _as_bool(pred, "pred")
    g = _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    return p, g


def _spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if isinstance(spacing, (int, float, np.number)):
        sp: tuple[float, ...] = (float(spacing),) * ndim
    else:
        sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing {spacing!r} has {len(sp)} entries for a {ndim}-d mask")
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return sp


def voe(pred: Any, gt: Any) -> float:
    """Volumetric overlap error, ``1 - |P & G| / |P | G|``.

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.

    Returns:
        VoE in [0, 1]; 0 when both masks are empty, 1 when exactly one is.
    """
    p, g = _pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 0.0
    return 1.0 - int(np.count_nonzero(p & g)) / union


def dice(pred: Any, gt: Any) -> float:
    """Dice coefficient, ``2 |P & G| / (|P| + |G|)``.

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.

    Returns:
        Dice in [0, 1]; 1 when both masks are empty, 0 when exactly one is.
    """
    p, g = _pair(pred, gt)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / total


def rvd(pred: Any, gt: Any, *, absolute: bool = False) -> float:
    """Relative volume difference, ``(|P| - |G|) / |G|`` (SLIVER07; MedPy's ``ravd``).

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.
        absolute: return ``|RVD|``, the form SLIVER07 scores.

    Returns:
        Signed RVD (positive: over-segmentation), or its absolute value. 0 when both masks are
        empty; +inf when only ``gt`` is empty.
    """
    p, g = _pair(pred, gt)
    vp, vg = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    if vg == 0:
        return 0.0 if vp == 0 else float("inf")
    value = (vp - vg) / vg
    return abs(value) if absolute else value


def abs_rvd(pred: Any, gt: Any) -> float:
    """Absolute relative volume difference, ``rvd(pred, gt, absolute=True)``."""
    return rvd(pred, gt, absolute=True)


def _surface(mask: NDArray[np.bool_], structure: NDArray[np.bool_]) -> NDArray[np.bool_]:
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Distances from each surface voxel of one mask to the other mask's surface.

    Both masks are cropped to the bounding box of their union plus a one-voxel background
    margin first; this changes neither surface (the array edge counts as background either way)
    nor any distance, and keeps the distance transforms small for organ-sized objects in large
    scans.

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.
        spacing: voxel size per axis (z, y, x), or one number for isotropic voxels.
        connectivity: neighbourhood that defines the surface (1: faces, 2: +edges,
            3: +corners), as ``scipy.ndimage.generate_binary_structure``.

    Returns:
        ``(d_pred, d_gt)``: ``d_pred[i]`` is the distance from the i-th surface voxel of
        ``pred`` (C order) to the surface of ``gt``, ``d_gt`` the reverse. When one mask is
        empty the other's distances are all inf and its own array is empty.

    Shape:
        pred, gt: any ``(n0, n1, ...)``; outputs ``(|S_pred|,)`` and ``(|S_gt|,)``.
    """
    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    if not 1 <= connectivity <= p.ndim:
        raise ValueError(f"connectivity must be in 1..{p.ndim}, got {connectivity!r}")
    union = p | g
    if not union.any():
        return np.zeros(0), np.zeros(0)
    nonzero = np.nonzero(union)
    box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in nonzero)
    p = np.pad(p[box], 1)
    g = np.pad(g[box], 1)
    structure = ndimage.generate_binary_structure(p.ndim, connectivity)
    sp_, sg = _surface(p, structure), _surface(g, structure)
    if not sg.any():
        return np.full(int(np.count_nonzero(sp_)), np.inf), np.zeros(0)
    if not sp_.any():
        return np.zeros(0), np.full(int(np.count_nonzero(sg)), np.inf)
    d_pred = ndimage.distance_transform_edt(~sg, sampling=sp)[sp_]
    d_gt = ndimage.distance_transform_edt(~sp_, sampling=sp)[sg]
    return np.asarray(d_pred, dtype=np.float64), np.asarray(d_gt, dtype=np.float64)


def _reduce(
    d_pred: NDArray[np.float64],
    d_gt: NDArray[np.float64],
    kind: Literal["assd", "rmsd", "msd"],
    average: Average,
) -> float:
    if d_pred.size == 0 and d_gt.size == 0:
        return 0.0
    if d_pred.size == 0 or d_gt.size == 0:
        return float("inf")
    if kind == "msd":
        return float(max(d_pred.max(), d_gt.max()))
    if average not in ("pooled", "mean"):
        raise ValueError(f"average must be 'pooled' or 'mean', got {average!r}")
    if kind == "assd":
        if average == "mean":
            return float((d_pred.mean() + d_gt.mean()) / 2.0)
        return float((d_pred.sum() + d_gt.sum()) / (d_pred.size + d_gt.size))
    if average == "mean":
        return float(np.sqrt(((d_pred**2).mean() + (d_gt**2).mean()) / 2.0))
    return float(np.sqrt(((d_pred**2).sum() + (d_gt**2).sum()) / (d_pred.size + d_gt.size)))


def assd(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    average: Average = "pooled",
) -> float:
    """Average symmetric surface distance, in the unit of ``spacing``.

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.
        spacing: voxel size per axis (z, y, x), or one number for isotropic voxels.
        connectivity: surface neighbourhood, see the module docstring.
        average: ``"pooled"`` (SLIVER07 and MedPy >= 0.5: mean over both surfaces' distances
            together) or ``"mean"`` (older MedPy: mean of the two directed averages).

    Returns:
        ASSD; 0 when both masks are empty, inf when exactly one is.
    """
    d = surface_distances(pred, gt, spacing, connectivity=connectivity)
    return _reduce(*d, "assd", average)


def rmsd(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    average: Average = "pooled",
) -> float:
    """Root-mean-square symmetric surface distance (SLIVER07), in the unit of ``spacing``.

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.
        spacing: voxel size per axis (z, y, x), or one number for isotropic voxels.
        connectivity: surface neighbourhood, see the module docstring.
        average: ``"pooled"`` (SLIVER07) or ``"mean"`` (mean of the two directed mean
            squares, the analogue of MedPy's ``assd``).

    Returns:
        RMSD; 0 when both masks are empty, inf when exactly one is.
    """
    d = surface_distances(pred, gt, spacing, connectivity=connectivity)
    return _reduce(*d, "rmsd", average)


def msd(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
) -> float:
    """Maximum symmetric surface distance (Hausdorff distance of the surfaces; MedPy's ``hd``).

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.
        spacing: voxel size per axis (z, y, x), or one number for isotropic voxels.
        connectivity: surface neighbourhood, see the module docstring.

    Returns:
        MSD; 0 when both masks are empty, inf when exactly one is.
    """
    d = surface_distances(pred, gt, spacing, connectivity=connectivity)
    return _reduce(*d, "msd", "pooled")


def case_metrics(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float],
    *,
    connectivity: int = 1,
    average: Average = "pooled",
) -> dict[str, float]:
    """All metrics of one case, computing the surface distances once.

    Args:
        pred: predicted mask, any array castable to bool.
        gt: ground-truth mask, same shape.
        spacing: voxel size per axis (z, y, x), or one number for isotropic voxels.
        connectivity: surface neighbourhood, see the module docstring.
        average: ASSD / RMSD averaging, see :func:`assd`.

    Returns:
        ``{"voe", "dice", "rvd", "abs_rvd", "assd_mm", "msd_mm", "rmsd_mm"}``; ``rvd`` is
        signed.
    """
    p, g = _pair(pred, gt)
    d_pred, d_gt = surface_distances(p, g, spacing, connectivity=connectivity)
    signed = rvd(p, g)
    return {
        "voe": voe(p, g),
        "dice": dice(p, g),
        "rvd": signed,
        "abs_rvd": abs(signed),
        "assd_mm": _reduce(d_pred, d_gt, "assd", average),
        "msd_mm": _reduce(d_pred, d_gt, "msd", "pooled"),
        "rmsd_mm": _reduce(d_pred, d_gt, "rmsd", average),
    }
