"""Intensity transforms: fused program == post-pass definition; sampling; noise statistics."""

from __future__ import annotations

import numpy as np
import pytest

import augment
from augment.backends.numpy import warp_numpy
from augment.kernels import program as pg


def test_noise_is_standard_normal_and_thread_independent():
    z = pg.noise_reference(1234, np.arange(200_000))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(z**3)) < 0.03 and abs(np.mean(z**4) - 3.0) < 0.1
    other = pg.noise_reference(1235, np.arange(200_000))
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.01
    # voxels 2j and 2j + 1 share one Box-Muller pair (cosine, sine): uncorrelated, and so
    # are their squares (the shared radius would show there), as are neighbouring pairs
    even, odd = z[0::2], z[1::2]
    assert abs(np.corrcoef(even, odd)[0, 1]) < 0.01
    assert abs(np.corrcoef(even**2, odd**2)[0, 1]) < 0.015
    assert abs(np.corrcoef(odd[:-1], even[1:])[0, 1]) < 0.01
    for part in (even, odd):
        assert abs(part.mean()) < 0.015 and abs(part.std() - 1.0) < 0.015
    # kernel (parallel and serial) draws exactly the reference numbers
    x = np.zeros((2, 10, 11, 12), np.float32)
    prog = pg.op(pg.NOISE, 1.0, 99.0)
    eye = np.eye(4)
    a, _ = warp_numpy(x, None, eye, (10, 11, 12), program=prog)
    m = eye.copy()
    m[0, 3] = 1e-7  # not an exact map: through the interpolating kernel
    b, _ = warp_numpy(x, None, m, (10, 11, 12), program=prog, parallel=False)
    ref = pg.noise_reference(99, np.arange(x.size)).reshape(x.shape)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("parallel", [True, False])
def test_noise_spans_that_start_or_end_inside_a_pair(parallel):
    """Odd row lengths and partial x tiles (width 131 > the tile's 128) give the kernel's
    program spans odd starts and lengths; a rotation puts some voxels on the border path
    and one channel more runs the per-voxel float64 path: every voxel draws the
    reference's number."""
    rng = np.random.default_rng(6)
    shape = (3, 5, 131)
    prog = pg.concat(pg.op(pg.AFFINE, 0.0, 0.0), pg.op(pg.NOISE, 0.5, 4321.0))
    eye = np.eye(4)
    rot = eye.copy()
    rot[1:3, 1:3] = [[0.96, -0.28], [0.28, 0.96]]
    for channels in (1, 2):
        x = rng.normal(size=(channels, *shape)).astype(np.float32)
        ref = 0.5 * pg.noise_reference(4321, np.arange(x.size)).reshape(x.shape)
        for m in (eye, rot):
            got, _ = warp_numpy(x, None, m, shape, program=prog, parallel=parallel)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "transform",
    [
        augment.Window(-100, 300),
        augment.Normalize("zscore", mean=40.0, std=80.0, clip=(-100.0, 200.0)),
        augment.Normalize("range", range=(-50.0, 150.0)),
        augment.RandomBrightness((0.8, 1.2), p=1.0),
        augment.RandomBrightness((-0.1, 0.1), p=1.0, additive=True),
        augment.RandomContrast((0.7, 1.3), p=1.0, centre=50.0, preserve_range=False),
    ],
)
def test_fused_program_equals_apply(transform):
    rng = np.random.default_rng(0)
    x = rng.normal(50, 120, (1, 6, 7, 8)).astype(np.float32)
    p = transform.sample(rng)
    prog = transform.program(p, None)
    assert prog is not None
    np.testing.assert_allclose(
        pg.run_reference(prog, x), transform.apply(x, p), rtol=1e-5, atol=1e-5
    )


def test_gamma_on_known_range_and_patch_range():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (1, 5, 5, 5)).astype(np.float32)
    g = augment.RandomGamma((0.5, 2.0), p=1.0)
    p = g.sample(rng)
    prog = g.program(p, (0.0, 1.0))
    gamma = float(p.gamma[0])
    np.testing.assert_allclose(pg.run_reference(prog, x), x.astype(np.float64) ** gamma, rtol=1e-6)
    assert g.program(p, None) is None  # needs the patch's range: runs after the warp
    lo, hi = float(x.min()), float(x.max())
    np.testing.assert_allclose(
        g.apply(x, p), lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma, rtol=1e-5
    )


@pytest.mark.parametrize("parallel", [True, False])
def test_fused_gamma_is_within_2e6_of_float64_power(parallel):
    """The kernel's ``t ** g`` (a polynomial exp2 of a polynomial log2) against numpy's
    float64 power on a dense float32 grid of [0, 1], values near 0 and just below 1
    included, for exponents well beyond the sampled range (its error must not grow with
    ``g``). Below ``g = 0.2`` a denormal ``t`` (under 2**-126), read as 0, would cost
    ``(2**-126) ** g``."""
    near0 = np.geomspace(np.finfo(np.float32).tiny, 1e-3, 20_000)
    near1 = 1.0 - np.arange(1, 20_001) * 2.0**-24
    grid = np.concatenate([np.linspace(0.0, 1.0, 400_001), near0, near1, [0.0, 1.0]])
    t = np.unique(grid.astype(np.float32))
    width = -(-t.size // (8 * 64))
    x = np.ascontiguousarray(np.resize(t, 8 * 64 * width).reshape(1, 8, 64, width))
    for g in (0.2, 0.35, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 40.0):
        prog = pg.op(pg.GAMMA, g, 0.0, 1.0)
        got, _ = warp_numpy(x, None, np.eye(4), x.shape[1:], program=prog, parallel=parallel)
        err = np.abs(got.astype(np.float64) - x.astype(np.float64) ** g)
        assert err.max() <= 2e-6, (g, float(err.max()), float(x.reshape(-1)[err.argmax()]))
        assert np.all(got[x == 0.0] == 0.0) and np.all(got[x == 1.0] == 1.0)


def test_gamma_sampling_balances_below_and_above_one():
    g = augment.RandomGamma((0.7, 1.5), p=1.0)
    rng = np.random.default_rng(2)
    gs = np.array([float(g.sample(rng).gamma[0]) for _ in range(2000)])
    assert 0.4 < (gs < 1).mean() < 0.6
    assert gs.min() >= 0.7 and gs.max() <= 1.5


def test_probability_gates_give_identity_params():
    rng = np.random.default_rng(3)
    t = augment.RandomNoise(p=0.25)
    ps = [t.sample(rng) for _ in range(4000)]
    active = np.array([bool(p.active[0]) for p in ps])
    assert 0.22 < active.mean() < 0.28
    assert all(float(p.std[0]) == 0.0 for p, a in zip(ps, active, strict=True) if not a)
    assert all(len(t.program(p, None)) == 0 for p, a in zip(ps, active, strict=True) if not a)


def test_contrast_about_patch_mean_preserves_range():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (1, 6, 6, 6)).astype(np.float32)
    c = augment.RandomContrast((1.5, 1.5), p=1.0)
    p = c.sample(rng)
    y = c.apply(x, p)
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6
    assert c.program(p, None) is None


def test_bad_intensity_arguments():
    with pytest.raises(ValueError, match="low < high"):
        augment.Window(10, 5)
    with pytest.raises(ValueError, match="gamma"):
        augment.RandomGamma((0.0, 1.0))
    with pytest.raises(ValueError, match="p must be"):
        augment.RandomNoise(p=1.5)
    with pytest.raises(ValueError, match="std"):
        augment.Normalize(mean=1.0, std=0.0)
    with pytest.warns(UserWarning, match="no-op"):
        augment.RandomBrightness((1.0, 1.0), p=0.5)


@pytest.mark.parametrize("centre, preserve", [("mean", True), ("mean", False), (0.3, True)])
def test_contrast_kernel_equals_numpy_definition(centre, preserve):
    rng = np.random.default_rng(5)
    x = rng.normal(0.4, 0.2, (1, 7, 8, 9)).astype(np.float32)
    c = augment.RandomContrast((0.6, 0.6), p=1.0, centre=centre, preserve_range=preserve)
    p = c.sample(rng)
    fast = c.apply(x, p)  # float32, contiguous: the numba kernel
    ref = c.apply(x.astype(np.float64), p)  # numpy
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)
    assert fast is not x and np.array_equal(x, x.copy())


def test_contrast_after_the_warp_runs_in_place_with_the_same_result():
    """The backend's post-warp call overwrites the warp's output instead of copying it;
    the numbers are those of ``apply`` (numba) and of the float64 numpy definition."""
    rng = np.random.default_rng(7)
    x = rng.normal(0.4, 0.2, (1, 9, 10, 11)).astype(np.float32)
    c = augment.RandomContrast((0.6, 0.6), p=1.0)
    p = c.sample(rng)
    owned = x.copy()
    got = c.apply_owned(owned, p)
    assert got is owned
    np.testing.assert_array_equal(got, c.apply(x, p))
    ref = c.apply(x.astype(np.float64), p)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    off = augment.RandomContrast((0.6, 0.6), p=0.0)
    assert off.apply_owned(x, off.sample(rng)) is x
    # the default for other transforms: a new array from ``apply``
    g = augment.RandomGamma((2.0, 2.0), p=1.0)
    pg_ = g.sample(rng)
    y = g.apply_owned(x, pg_)
    np.testing.assert_array_equal(y, np.asarray(g.apply(x, pg_), np.float32))
    # through a pipeline: the warp's output, then contrast about its mean
    aug = augment.Compose([augment.RandomAffine(degrees=10), c])
    big = rng.normal(0.0, 1.0, (12, 13, 14)).astype(np.float32)
    out = aug(image=big, rng=augment.sample_rng(0, 0, 1))
    plain = augment.Compose([augment.RandomAffine(degrees=10)])
    warped = plain(image=big, rng=augment.sample_rng(0, 0, 1))["image"].astype(np.float64)
    mean, lo, hi = warped.mean(), warped.min(), warped.max()
    f = float(out["params"].intensity[0].factor[0])
    expect = np.clip((warped - mean) * f + mean, lo, hi)
    np.testing.assert_allclose(out["image"], expect, rtol=1e-5, atol=1e-5)
