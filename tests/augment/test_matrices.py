"""Matrix helpers: conventions of DESIGN.md."""

from __future__ import annotations

import numpy as np
import pytest

from augment import matrices as mx


def test_rotation_about_z_is_in_plane():
    r = mx.rotation([np.pi / 2, 0, 0])
    np.testing.assert_allclose(mx.apply_points(r, [5, 1, 0]), [5, 0, 1], atol=1e-12)
    assert abs(np.linalg.det(r[:3, :3]) - 1.0) < 1e-12


def test_batched_constructors():
    a = np.random.default_rng(0).uniform(-1, 1, (5, 3))
    batch = mx.rotation(a)
    assert batch.shape == (5, 4, 4)
    for i in range(5):
        np.testing.assert_allclose(batch[i], mx.rotation(a[i]))


def test_about_maps_centres():
    m = mx.about(mx.rotation([0.3, 0.2, 0.1]) @ mx.scaling([2, 2, 2]), [10, 10, 10], [3, 4, 5])
    np.testing.assert_allclose(mx.apply_points(m, [10, 10, 10]), [3, 4, 5])


def test_as_exact_detects_signed_permutations():
    m = mx.permutation([2, 0, 1]) @ mx.flip([1, 0, 0], (4, 5, 6)) @ mx.translation([1, -2, 3])
    em = mx.as_exact(m)
    assert em is not None
    assert mx.as_exact(mx.rotation([0.1, 0, 0])) is None
    assert mx.as_exact(mx.translation([0.5, 0, 0])) is None
    assert mx.as_exact(mx.scaling([2, 1, 1])) is None


def test_bad_shapes():
    with pytest.raises(ValueError, match="3 values"):
        mx.translation([1, 2])
    with pytest.raises(ValueError, match="permutation"):
        mx.permutation([0, 0, 1])
    with pytest.raises(ValueError, match="shape"):
        mx.to_3x4(np.eye(3))
