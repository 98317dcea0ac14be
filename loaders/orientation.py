"""Canonical orientation: every volume on one axis order, exactly, and the way back.

A volume's direction cosines say which physical axis each array axis runs along (see
``loaders.volume``). Scans stored with flipped or permuted axes (RAS NIfTI, common in
LiTS: ITK direction diag(-1, -1, 1)) hold the same anatomy as identity-direction scans in a
differently ordered array. ``to_canonical`` reorders the array so that array axis i runs
along physical axis i in the positive sense (an identity direction; SimpleITK's "LPS":
(z, y, x) towards Superior, Posterior, Left):

- only a permutation and flips of the array (no resampling, every voxel value kept);
- spacing permuted with the axes; the origin moved to the voxel that becomes (0, 0, 0), so
  every voxel keeps its physical position;
- a ``Reorientation`` records what was done and the original geometry (shape, spacing,
  origin, direction), so ``Reorientation.undo`` puts an array on the canonical grid (a
  prediction) back on the original one, bit for bit, and ``to_volume`` / ``to_sitk`` give
  it the original file's geometry.

Oblique volumes (a direction that is not a signed permutation within ``ORIENTATION_TOL``)
are refused: putting them on an axis-aligned grid would mean resampling the image and the
label, which neither keeps the voxel values nor can be undone exactly. Resample such files
onto an axis-aligned grid first if they are to be used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from loaders.errors import VolumeError
from loaders.volume import Volume

__all__ = ["ORIENTATION_TOL", "Geometry", "Reorientation", "to_canonical"]

ORIENTATION_TOL = 1e-3
"""Largest difference of a direction cosine from 0 or +-1 for which a direction counts as
a signed permutation. NIfTI quaternions (float32) and DICOM orientation strings carry
errors near 1e-6; 1e-3 is also ``read_case``'s image/label direction tolerance. Dropping a
residual this small (a rotation under 0.1 degree) keeps voxel (0, 0, 0) exactly in place
and moves a voxel d mm away from it by at most 3e-3 * d (0.9 mm at 300 mm)."""

Triple = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Geometry:
    """The grid of a volume, all in (z, y, x) order (see ``loaders.volume``).

    Attributes:
        shape: array shape.
        spacing: voxel size in mm.
        origin: physical position in mm of the centre of voxel (0, 0, 0).
        direction: 3x3 direction cosines; column j is the unit vector of array axis j.
    """

    shape: tuple[int, int, int]
    spacing: Triple
    origin: Triple
    direction: np.ndarray

    def __post_init__(self) -> None:
        direction = np.array(self.direction, dtype=np.float64).reshape(3, 3)
        direction.setflags(write=False)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", direction)

    @classmethod
    def of(cls, volume: Volume) -> Geometry:
        """The geometry of a ``Volume``."""
        return cls(volume.shape, volume.spacing, volume.origin, volume.direction)

    def physical_point(self, index: Sequence[float]) -> np.ndarray:
        """Physical position (z, y, x) in mm of a voxel index (z, y, x):
        ``origin + direction @ (spacing * index)``."""
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + self.direction @ (np.asarray(self.spacing) * idx)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (floats kept exactly by ``json``)."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Geometry:
        """The inverse of ``to_record``."""
        return cls(
            tuple(record["shape"]),
            tuple(record["spacing"]),
            tuple(record["origin"]),
            np.array(record["direction"], dtype=np.float64),
        )


def _signed_permutation(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...], float]:
    """The signed permutation nearest to ``direction`` and the largest cosine difference.

    Canonical axis i is the array axis j whose direction is closest to physical axis i
    (largest ``|direction[i, j]|``), flipped where that cosine is negative. Where two
    physical axes pick the same array axis (e.g. a 45 degree rotation) the difference is
    reported as infinite.
    """
    axes = tuple(int(j) for j in np.argmax(np.abs(direction), axis=1))
    flips = tuple(bool(direction[i, j] < 0) for i, j in enumerate(axes))
    if sorted(axes) != [0, 1, 2]:
        return axes, flips, float("inf")
    nearest = np.zeros((3, 3))
    for i, j in enumerate(axes):
        nearest[i, j] = -1.0 if flips[i] else 1.0
    return axes, flips, float(np.abs(direction - nearest).max())


@dataclass(frozen=True, eq=False)
class Reorientation:
    """How a volume's stored grid maps onto the canonical grid, and back.

    Canonical array axis i is original array axis ``axes[i]``, reversed where ``flips[i]``.
    Methods act on the last three axes of an array, so channels-first arrays
    (C, D, H, W) work as well.

    Attributes:
        axes: the permutation, (z, y, x) order.
        flips: per canonical axis, whether it runs opposite to its original axis.
        original_geometry: the stored grid (shape, spacing, origin, direction) of the file.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    original_geometry: Geometry

    def __post_init__(self) -> None:
        axes = tuple(int(a) for a in self.axes)
        if sorted(axes) != [0, 1, 2]:
            raise ValueError(f"axes must be a permutation of (0, 1, 2), got {self.axes!r}")
        if len(self.flips) != 3:
            raise ValueError(f"flips must be 3 booleans, got {self.flips!r}")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "flips", tuple(bool(f) for f in self.flips))

    @classmethod
    def of(cls, geometry: Geometry, *, tol: float = ORIENTATION_TOL) -> Reorientation:
        """The reorientation of a grid, found from its direction.

        Raises:
            ValueError: the direction is oblique (not a signed permutation within ``tol``).
        """
        axes, flips, residual = _signed_permutation(geometry.direction)
        if residual > tol:
            raise ValueError(
                f"oblique direction cosines (z, y, x) {geometry.direction.round(4).tolist()} "
                f"(SimpleITK's (x, y, z) GetDirection() "
                f"{geometry.direction[::-1, ::-1].round(4).ravel().tolist()}): not an axis "
                f"permutation/flip within {tol:g}"
            )
        return cls(axes, flips, geometry)  # type: ignore[arg-type]

    @property
    def identity(self) -> bool:
        """The stored grid already has the canonical axis order (no permutation or flip)."""
        return self.axes == (0, 1, 2) and not any(self.flips)

    def _index_of_canonical_origin(self, shape: Sequence[int]) -> list[int]:
        """The original index of the voxel that becomes canonical (0, 0, 0)."""
        idx = [0, 0, 0]
        for i, j in enumerate(self.axes):
            idx[j] = int(shape[j]) - 1 if self.flips[i] else 0
        return idx

    def canonical_of(self, geometry: Geometry) -> Geometry:
        """The canonical grid of a grid of the original shape: permuted shape and spacing,
        the origin at the physical point of the voxel that becomes (0, 0, 0), identity
        direction."""
        if tuple(geometry.shape) != self.original_geometry.shape:
            raise ValueError(
                f"shape {geometry.shape} differs from the original {self.original_geometry.shape}"
            )
        origin = geometry.physical_point(self._index_of_canonical_origin(geometry.shape))
        return Geometry(
            tuple(geometry.shape[j] for j in self.axes),  # type: ignore[arg-type]
            tuple(geometry.spacing[j] for j in self.axes),  # type: ignore[arg-type]
            tuple(float(v) for v in origin),  # type: ignore[arg-type]
            np.eye(3),
        )

    @property
    def canonical_geometry(self) -> Geometry:
        """The canonical grid of the original volume (before any resampling)."""
        return self.canonical_of(self.original_geometry)

    def _check(self, array: np.ndarray, shape: tuple[int, ...], grid: str) -> np.ndarray:
        arr = np.asarray(array)
        if arr.ndim < 3 or tuple(arr.shape[-3:]) != tuple(shape):
            raise ValueError(
                f"array of shape {arr.shape}: its last three axes must be the {grid} "
                f"grid's (z, y, x) shape {tuple(shape)}"
            )
        return arr

    def apply(self, array: np.ndarray) -> np.ndarray:
        """An array on the original grid, put on the canonical grid (a view where numpy
        allows; exact: only axes are permuted and reversed)."""
        arr = self._check(array, self.original_geometry.shape, "original")
        lead = arr.ndim - 3
        out = np.transpose(arr, (*range(lead), *(lead + j for j in self.axes)))
        flipped = tuple(lead + i for i in range(3) if self.flips[i])
        return np.flip(out, flipped) if flipped else out

    def undo(self, array: np.ndarray) -> np.ndarray:
        """An array on the canonical grid (e.g. a prediction), put back on the original
        grid: the exact inverse of ``apply`` (a view where numpy allows)."""
        arr = self._check(array, self.canonical_geometry.shape, "canonical")
        lead = arr.ndim - 3
        flipped = tuple(lead + i for i in range(3) if self.flips[i])
        out = np.flip(arr, flipped) if flipped else arr
        inverse = np.argsort(self.axes)
        return np.transpose(out, (*range(lead), *(lead + int(i) for i in inverse)))

    def apply_volume(self, volume: Volume) -> Volume:
        """A volume on the original grid (the image, or its label) on the canonical grid;
        its own spacing and origin are carried over, so each voxel keeps its position."""
        geometry = self.canonical_of(Geometry.of(volume))
        return Volume(
            self.apply(volume.array),
            spacing=geometry.spacing,
            origin=geometry.origin,
            direction=geometry.direction,
            path=volume.path,
        )

    def to_volume(self, array: np.ndarray) -> Volume:
        """A 3D array on the canonical grid as a ``Volume`` with the original file's
        geometry (write it with ``loaders.write_volume``)."""
        g = self.original_geometry
        arr = self.undo(array)
        if arr.ndim != 3:
            raise ValueError(f"to_volume takes a (z, y, x) array, got shape {np.shape(array)}")
        return Volume(arr, spacing=g.spacing, origin=g.origin, direction=g.direction)

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """A 3D array on the canonical grid as a SimpleITK image with the original file's
        size, spacing, origin and direction."""
        return self.to_volume(array).to_sitk()

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (the cache stores it per case)."""
        return {
            "axes": list(self.axes),
            "flips": list(self.flips),
            "original": self.original_geometry.to_record(),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Reorientation:
        """The inverse of ``to_record``."""
        return cls(
            tuple(record["axes"]),
            tuple(record["flips"]),
            Geometry.from_record(record["original"]),
        )

    def __repr__(self) -> str:
        return f"Reorientation(axes={self.axes}, flips={self.flips})"


def to_canonical(volume: Volume, *, tol: float = ORIENTATION_TOL) -> tuple[Volume, Reorientation]:
    """Put a volume on the canonical grid (identity direction) by permuting and flipping
    its array; see the module docstring.

    Args:
        volume: a volume as read (``read_volume``).
        tol: largest direction-cosine difference from a signed permutation accepted.

    Returns:
        ``(canonical volume, reorientation)``; ``reorientation.undo`` maps arrays on the
        canonical grid back to the stored one.

    Raises:
        VolumeError: the volume is oblique; the message names its file and direction.
    """
    try:
        reo = Reorientation.of(Geometry.of(volume), tol=tol)
    except ValueError as exc:
        raise VolumeError(
            volume.path,
            f"{exc}. Oblique volumes are not resampled: resample the file onto an "
            "axis-aligned grid (identity direction) first",
        ) from None
    return reo.apply_volume(volume), reo
