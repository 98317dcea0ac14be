"""Cache-grid probabilities back on a file's own grid: against SimpleITK resampling straight
onto the file's (flipped, permuted) grid in physical space."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from loaders import Volume, resample, to_canonical
from loaders.orientation import Geometry
from training.native import to_native

SHAPE = (11, 17, 13)  # (z, y, x) of the file
SPACING_XYZ = (0.9, 1.3, 2.7)
ORIGIN_XYZ = (-35.5, 12.25, 101.0)
DIRECTIONS = {
    "identity": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "permuted": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


def file_grid(direction_xyz: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(np.zeros(SHAPE, np.int16))
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN_XYZ)
    img.SetDirection(tuple(direction_xyz.ravel()))
    return img


def smooth_probabilities(shape: tuple[int, ...], k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 1.5) for _ in range(k)])
    e = np.exp(4.0 * logits)
    return (e / e.sum(0)).astype(np.float32)


def sitk_reference(probs: np.ndarray, cache: Geometry, reference: sitk.Image) -> np.ndarray:
    """Each class resampled with SimpleITK from the cache grid onto the file's grid (its
    direction handled by ITK in physical space), linear, nearest beyond the last voxel."""
    out = []
    for p in probs:
        img = sitk.GetImageFromArray(p)
        img.SetSpacing(cache.spacing[::-1])
        img.SetOrigin(cache.origin[::-1])
        f = sitk.ResampleImageFilter()
        f.SetReferenceImage(reference)
        f.SetInterpolator(sitk.sitkLinear)
        f.SetUseNearestNeighborExtrapolator(True)
        f.SetOutputPixelType(sitk.sitkFloat32)
        out.append(sitk.GetArrayFromImage(f.Execute(img)))
    return np.stack(out)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_native_prediction_equals_a_physical_space_resample(name):
    reference = file_grid(DIRECTIONS[name])
    canonical, reo = to_canonical(Volume.from_sitk(reference))
    cache = resample(canonical, (2.0, 2.5, 1.75))  # the training grid
    grid = Geometry.of(cache)
    probs = smooth_probabilities(cache.shape, 3, seed=len(name))
    native = to_native(probs, grid, reo, keep_probabilities=True)
    want = sitk_reference(probs, grid, reference)
    assert native.classes.shape == SHAPE and native.classes.dtype == np.uint8
    assert native.probabilities is not None
    np.testing.assert_allclose(native.probabilities, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(native.classes, np.argmax(want, axis=0))
    assert len(np.unique(native.classes)) == 3  # a real test: every class occurs
    g = native.geometry
    assert g.shape == SHAPE
    assert g.spacing == tuple(reference.GetSpacing())[::-1]
    assert g.origin == tuple(reference.GetOrigin())[::-1]
    np.testing.assert_array_equal(g.direction[::-1, ::-1].ravel(), reference.GetDirection())


def test_same_grid_is_only_reoriented():
    reference = file_grid(DIRECTIONS["ras"])
    canonical, reo = to_canonical(Volume.from_sitk(reference))
    probs = smooth_probabilities(canonical.shape, 2, seed=7)
    native = to_native(probs, Geometry.of(canonical), reo, keep_probabilities=True)
    np.testing.assert_array_equal(native.classes, reo.undo(np.argmax(probs, axis=0)))
    np.testing.assert_array_equal(native.probabilities, reo.undo(probs))
    # RAS: x and y reversed against the canonical grid
    np.testing.assert_array_equal(native.classes, np.argmax(probs, axis=0)[:, ::-1, ::-1])
