"""Hypothesis properties of the CPU kernel over shapes, dtypes and matrices."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

import augment
from augment import matrices as mx

shapes = st.tuples(*[st.integers(1, 12)] * 3)
angles = st.tuples(*[st.floats(-np.pi, np.pi)] * 3)
scales = st.tuples(*[st.floats(0.5, 2.0)] * 3)
offsets = st.tuples(*[st.floats(-6.0, 6.0)] * 3)


@settings(max_examples=60, deadline=None)
@given(
    in_shape=shapes,
    out_shape=shapes,
    a=angles,
    s=scales,
    t=offsets,
    dtype=st.sampled_from([np.float32, np.int16, np.uint8]),
    seed=st.integers(0, 2**31),
)
def test_kernel_equals_scipy_grid_constant(in_shape, out_shape, a, s, t, dtype, seed):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 200, in_shape).astype(dtype)
    m = mx.to_3x4(
        mx.about(
            mx.rotation(a) @ mx.scaling(s),
            mx.centre(out_shape),
            mx.centre(in_shape) + np.asarray(t),
        )
    )
    got = augment.affine_warp(src, m, out_shape, order=1, cval=-3.0)
    ref = ndi.affine_transform(
        src.astype(np.float64),
        mx.to_4x4(m),
        output_shape=out_shape,
        order=1,
        mode="grid-constant",
        cval=-3.0,
        prefilter=False,
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-4)
    lab = augment.affine_warp(src, m, out_shape, order=0, cval=5)
    assert lab.dtype == src.dtype and lab.shape == out_shape
    # every nearest value is either the fill or a value present in the source
    values = set(np.unique(src).tolist()) | {5}
    assert set(np.unique(lab).tolist()) <= values


@settings(max_examples=40, deadline=None)
@given(
    in_shape=shapes,
    perm=st.permutations([0, 1, 2]),
    flips=st.tuples(*[st.booleans()] * 3),
    shift=st.tuples(*[st.integers(-3, 3)] * 3),
    dtype=st.sampled_from([np.float32, np.int16, np.uint8]),
    order=st.sampled_from([0, 1]),
)
def test_exact_maps_equal_numpy(in_shape, perm, flips, shift, dtype, order):
    src = np.arange(np.prod(in_shape)).reshape(in_shape).astype(dtype)
    view = np.transpose(src, perm)
    for ax, f in enumerate(flips):
        if f:
            view = np.flip(view, ax)
    m = mx.permutation(perm) @ mx.flip(flips, view.shape) @ mx.translation(shift)
    out_shape = view.shape
    got = augment.affine_warp(src, m, out_shape, order=order, cval=0)
    # out[p] = view[p + shift] where inside, 0 elsewhere
    padded = np.pad(view, 3)
    expect = padded[tuple(slice(3 + k, 3 + k + n) for k, n in zip(shift, out_shape, strict=True))]
    expect = expect.astype(np.float32 if order == 1 else dtype)
    assert got.tobytes() == expect.tobytes()


@settings(max_examples=30, deadline=None)
@given(a=angles, s=scales, t=offsets)
def test_inverse_round_trip_of_points(a, s, t):
    m = mx.about(mx.rotation(a) @ mx.scaling(s), [3, 4, 5], np.asarray(t))
    pts = np.random.default_rng(0).uniform(-10, 10, (20, 3))
    back = mx.apply_points(np.linalg.inv(m), mx.apply_points(m, pts))
    np.testing.assert_allclose(back, pts, atol=1e-9)
