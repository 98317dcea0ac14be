"""affine_warp against scipy.ndimage.affine_transform and numpy's exact index ops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

import augment
from augment import matrices as mx
from augment.backends.numpy import warp_numpy


def random_matrix(
    rng: np.random.Generator,
    out_shape,
    in_shape,
    *,
    degrees=25.0,
    scale=(0.7, 1.4),
    shear=0.1,
    jitter=3.0,
) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-degrees, degrees, 3))
    s = rng.uniform(*scale, 3)
    lin = mx.rotation(angles) @ mx.scaling(1.0 / s) @ mx.shear(rng.uniform(-shear, shear, 6))
    centre = mx.centre(in_shape) + rng.uniform(-jitter, jitter, 3)
    return mx.to_3x4(mx.about(lin, mx.centre(out_shape), centre))


def scipy_ref(src, m, out_shape, order, cval):
    return ndi.affine_transform(
        src.astype(np.float64) if order == 1 else src,
        mx.to_4x4(m),
        output_shape=out_shape,
        order=order,
        mode="grid-constant",
        cval=cval,
        prefilter=False,
    )


def interior_mask(m, in_shape, out_shape, margin=1.0):
    """Output voxels whose source point is at least ``margin`` inside the volume."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1)
    p = mx.apply_points(m, grid.reshape(-1, 3)).reshape(*out_shape, 3)
    hi = np.asarray(in_shape) - 1 - margin
    return np.all((p >= margin) & (p <= hi), axis=-1)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_linear_matches_scipy(dtype):
    rng = np.random.default_rng(1)
    in_shape, out_shape = (23, 31, 29), (17, 19, 21)
    src = (rng.normal(size=in_shape) * 50 + 100).astype(dtype)
    for _ in range(6):
        m = random_matrix(rng, out_shape, in_shape)
        cval = float(rng.uniform(-5, 5))
        got = augment.affine_warp(src, m, out_shape, order=1, cval=cval)
        assert got.dtype == np.float32 and got.shape == out_shape
        ref = scipy_ref(src, m, out_shape, 1, cval)
        inside = interior_mask(m, in_shape, out_shape)
        assert inside.mean() > 0.2
        rel = np.abs(got - ref)[inside] / np.maximum(np.abs(ref[inside]), 1.0)
        assert rel.max() < 1e-5
        # grid-constant semantics at the border too (float32 rounding only)
        assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_nearest_labels_match_scipy_except_ties():
    rng = np.random.default_rng(2)
    in_shape, out_shape = (20, 24, 28), (18, 18, 18)
    lab = rng.integers(0, 5, in_shape).astype(np.uint8)
    for _ in range(6):
        m = random_matrix(rng, out_shape, in_shape)
        got = augment.affine_warp(lab, m, out_shape, order=0, cval=7)
        assert got.dtype == np.uint8
        ref = scipy_ref(lab, m, out_shape, 0, 7)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1)
        p = mx.apply_points(m, grid.reshape(-1, 3)).reshape(*out_shape, 3)
        tie = np.any(np.abs(p - np.floor(p) - 0.5) < 1e-6, axis=-1)
        assert np.array_equal(got[~tie], ref[~tie])


def test_channels_first_and_out_argument():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(3, 12, 13, 14)).astype(np.float32)
    m = random_matrix(rng, (8, 9, 10), (12, 13, 14))
    out = np.full((3, 8, 9, 10), np.nan, np.float32)
    res = augment.affine_warp(src, m, (8, 9, 10), out=out)
    assert res is out and np.isfinite(out).all()
    for c in range(3):
        np.testing.assert_allclose(
            out[c], scipy_ref(src[c], m, (8, 9, 10), 1, 0.0), rtol=1e-5, atol=1e-5
        )


def test_int16_label_keeps_dtype_and_ignore_index():
    lab = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    m = mx.to_3x4(mx.translation([0.3, -2.2, 0.1]))
    got = augment.affine_warp(lab, m, (4, 5, 6), order=0, cval=-1)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, scipy_ref(lab, m, (4, 5, 6), 0, -1))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("axes", [(0, 1), (1, 2), (0, 2), (2, 1)])
def test_rot90_is_exact(k, axes):
    from augment.spatial import rot90_matrix

    rng = np.random.default_rng(4)
    src = rng.normal(size=(5, 6, 7)).astype(np.float32)
    expect = np.rot90(src, k, axes)
    m = rot90_matrix(k, axes, src.shape)
    got = augment.affine_warp(src, m, expect.shape, order=1)
    assert got.tobytes() == expect.astype(np.float32).tobytes()


@pytest.mark.parametrize("order", [0, 1])
def test_flips_and_transposes_are_exact(order):
    rng = np.random.default_rng(5)
    src = rng.normal(size=(6, 7, 8)).astype(np.float32)
    for perm in [(0, 1, 2), (2, 0, 1), (1, 2, 0), (0, 2, 1)]:
        for flips in [(0, 0, 0), (1, 0, 1), (1, 1, 1)]:
            expect = np.transpose(src, perm)
            for a, f in enumerate(flips):
                if f:
                    expect = np.flip(expect, a)
            m = mx.permutation(perm) @ mx.flip(flips, expect.shape)
            got = augment.affine_warp(src, m, expect.shape, order=order)
            assert got.tobytes() == np.ascontiguousarray(expect).tobytes()


def test_integer_crop_with_padding_is_exact():
    src = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    m = mx.translation([-1, 2, 3])  # out[p] = in[p + offset]
    got = augment.affine_warp(src, m, (6, 4, 4), cval=-9.0)
    expect = np.full((6, 4, 4), -9.0, np.float32)
    expect[1:5, 0:3, 0:3] = src[0:4, 2:5, 3:6]
    assert got.tobytes() == expect.tobytes()


def test_exact_matches_interpolated_path_within_rounding():
    # the exact path and the kernel agree: nudge the matrix off the exact set
    rng = np.random.default_rng(6)
    src = rng.normal(size=(9, 10, 11)).astype(np.float32)
    m = mx.to_3x4(mx.flip((1, 0, 1), (9, 10, 11)))
    exact = augment.affine_warp(src, m, (9, 10, 11))
    nudged = m.copy()
    nudged[0, 3] += 1e-7
    interp = augment.affine_warp(src, nudged, (9, 10, 11))
    np.testing.assert_allclose(exact, interp, atol=1e-5)


def test_serial_and_parallel_kernels_agree():
    rng = np.random.default_rng(7)
    src = rng.normal(size=(1, 30, 31, 32)).astype(np.float32)
    lab = rng.integers(0, 3, (1, 30, 31, 32)).astype(np.uint8)
    m = random_matrix(rng, (20, 20, 20), (30, 31, 32))
    a = warp_numpy(src, lab, m, (20, 20, 20), parallel=True)
    b = warp_numpy(src, lab, m, (20, 20, 20), parallel=False)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        (dict(image=np.zeros((4, 4)), matrix=np.eye(4), out_shape=(2, 2, 2)), ValueError, "image"),
        (
            dict(image=np.zeros((2, 4, 4, 4, 4)), matrix=np.eye(4), out_shape=(2, 2, 2)),
            ValueError,
            "(D, H, W)",
        ),
        (
            dict(image=np.zeros((4, 4, 4)), matrix=np.full((3, 4), np.nan), out_shape=(2, 2, 2)),
            ValueError,
            "finite",
        ),
        (
            dict(image=np.zeros((4, 4, 4)), matrix=np.eye(3), out_shape=(2, 2, 2)),
            ValueError,
            "shape",
        ),
        (
            dict(image=np.zeros((4, 4, 4)), matrix=np.eye(4), out_shape=(2, 0, 2)),
            ValueError,
            "out_shape",
        ),
        (
            dict(image=np.zeros((4, 4, 4)), matrix=np.eye(4), out_shape=(2, 2)),
            ValueError,
            "out_shape",
        ),
        (
            dict(image=np.zeros((4, 4, 4), np.complex64), matrix=np.eye(4), out_shape=(2, 2, 2)),
            TypeError,
            "complex64",
        ),
        (dict(image=[[[1.0]]], matrix=np.eye(4), out_shape=(1, 1, 1)), TypeError, "list"),
        (
            dict(image=np.zeros((4, 4, 4)), matrix=np.eye(4), out_shape=(2, 2, 2), order=3),
            ValueError,
            "order",
        ),
    ],
)
def test_bad_input_errors(kwargs, exc, text):
    with pytest.raises(exc, match=None) as info:
        augment.affine_warp(**kwargs)
    assert text in str(info.value)


def test_bad_out_buffer():
    with pytest.raises(ValueError, match="out must be"):
        augment.affine_warp(
            np.zeros((4, 4, 4), np.float32),
            np.eye(4),
            (2, 2, 2),
            out=np.zeros((3, 3, 3), np.float32),
        )


def test_float16_source_is_computed_in_float32():
    rng = np.random.default_rng(8)
    src = rng.normal(size=(9, 10, 11)).astype(np.float16)
    m = random_matrix(rng, (7, 7, 7), (9, 10, 11))
    got = augment.affine_warp(src, m, (7, 7, 7))
    assert got.dtype == np.float32
    np.testing.assert_allclose(
        got, scipy_ref(src.astype(np.float32), m, (7, 7, 7), 1, 0.0), rtol=1e-5, atol=1e-5
    )
