"""The slice-parallel path equals the 3D single pass: in-plane maps slice by slice (numba
and scikit-image backends), 3D maps slab by slab, in this process and in a SlicePool."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import augment
from augment import matrices as mx
from augment import slices
from augment.slices import SlicePool, in_plane, warp_slices

SRC = (13, 40, 36)
OUT = (11, 42, 38)


# Every test runs under the shared watchdog (tests/conftest.py): a hang fails the test.
pytestmark = pytest.mark.usefixtures("watchdog")


@pytest.fixture(scope="module")
def pool() -> Iterator[SlicePool]:
    with SlicePool(processes=2) as p:
        yield p


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.normal(0.0, 100.0, SRC).astype(np.float32),
        rng.integers(0, 4, SRC).astype(np.uint8),
    )


def planar(rng: np.random.Generator, *, flip_z: bool, z_shift: int = 0) -> np.ndarray:
    """A random in-plane map: rotation about z, anisotropic scale, shear, translation,
    flips, and an integer z shift."""
    lin = (
        mx.rotation([rng.uniform(-np.pi, np.pi), 0.0, 0.0])
        @ mx.scaling([1.0, *rng.uniform(0.8, 1.25, 2)])
        @ mx.shear([0.0, 0.0, 0.0, rng.uniform(-0.1, 0.1), 0.0, 0.0])
    )
    m = mx.about(lin, mx.centre(OUT), mx.centre(SRC) + [0.0, *rng.uniform(-3, 3, 2)])
    m = m @ mx.flip([flip_z, rng.random() < 0.5, rng.random() < 0.5], OUT)
    m[0, 3] = np.round(m[0, 3]) + z_shift
    return m


def spatial3d(rng: np.random.Generator) -> np.ndarray:
    return mx.about(
        mx.rotation(rng.uniform(-0.4, 0.4, 3)) @ mx.scaling(rng.uniform(0.8, 1.2, 3)),
        mx.centre(OUT),
        mx.centre(SRC),
    )


def test_in_plane_detection():
    rng = np.random.default_rng(1)
    assert in_plane(planar(rng, flip_z=False)) == (1, 1)
    assert in_plane(planar(rng, flip_z=True, z_shift=-4))[0] == -1
    assert in_plane(np.eye(4)) == (1, 0)
    assert in_plane(spatial3d(rng)) is None
    assert in_plane(mx.translation([0.5, 0.0, 0.0])) is None
    assert in_plane(mx.rotation([0.0, 0.2, 0.0])) is None


@pytest.mark.parametrize("z_shift", [0, 5, -6])
@pytest.mark.parametrize("flip_z", [False, True])
def test_numba_slices_equal_3d(volume, flip_z, z_shift):
    img, lab = volume
    rng = np.random.default_rng(10 + z_shift + 3 * flip_z)
    for _ in range(3):
        m = planar(rng, flip_z=flip_z, z_shift=z_shift)
        ref = augment.affine_warp(img, m, OUT, order=1, cval=-7.0)
        got = warp_slices(img, m, OUT, processes=0, cval=-7.0)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(
            warp_slices(lab, m, OUT, processes=0, order=0, cval=9),
            augment.affine_warp(lab, m, OUT, order=0, cval=9),
        )


def test_skimage_slices_equal_3d(volume):
    img, lab = volume
    rng = np.random.default_rng(2)
    for flip_z in (False, True):
        m = planar(rng, flip_z=flip_z, z_shift=2)
        ref = augment.affine_warp(img, m, OUT, order=1, cval=-7.0)
        got = warp_slices(img, m, OUT, processes=0, backend="skimage", cval=-7.0)
        # skimage interpolates float32 slices with float32 coordinates (~1e-5 voxel)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.ptp(img)))
        lab_ref = augment.affine_warp(lab, m, OUT, order=0)
        lab_got = warp_slices(lab, m, OUT, processes=0, backend="skimage", order=0)
        assert lab_got.dtype == np.uint8
        assert np.mean(lab_got != lab_ref) < 1e-3  # ties of .5 may round apart


def test_pool_equals_3d_in_plane_and_slabs(pool, volume):
    img, lab = volume
    rng = np.random.default_rng(3)
    m = planar(rng, flip_z=True, z_shift=1)
    ref = augment.affine_warp(img, m, OUT, order=1, cval=-7.0)
    for backend in ("numba", "skimage"):
        got = pool.warp(img, m, OUT, backend=backend, cval=-7.0)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5 * float(np.ptp(img)))
    assert len(pool.last_seconds) == 2
    for _ in range(2):
        m3 = spatial3d(rng)
        assert in_plane(m3) is None
        ref = augment.affine_warp(img, m3, OUT, order=1, cval=-7.0)
        np.testing.assert_allclose(pool.warp(img, m3, OUT, cval=-7.0), ref, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(
            pool.warp(lab, m3, OUT, order=0), augment.affine_warp(lab, m3, OUT, order=0)
        )
        np.testing.assert_allclose(
            warp_slices(img, m3, OUT, processes=0, cval=-7.0), ref, rtol=1e-6, atol=1e-4
        )


def test_pool_shared_input_and_output(pool, volume):
    img, _ = volume
    m = planar(np.random.default_rng(4), flip_z=False)
    src = pool.shared(SRC, np.float32)
    src[...] = img
    view = pool.warp(src, m, OUT, copy=False)
    np.testing.assert_allclose(view, augment.affine_warp(img, m, OUT), rtol=1e-6, atol=1e-4)
    out = np.empty(OUT, np.float32)
    assert pool.warp(src, m, OUT, out=out) is out
    np.testing.assert_array_equal(out, view)
    big = (SRC[0] * 2, SRC[1], SRC[2])  # the shared buffers grow
    vol2 = np.concatenate([img, img])
    m2 = mx.translation([SRC[0], 0, 0])
    np.testing.assert_array_equal(pool.warp(vol2, m2, big)[: SRC[0]], img)


def test_errors(pool, volume):
    img, _ = volume
    m3 = spatial3d(np.random.default_rng(5))
    with pytest.raises(ValueError, match="in-plane"):
        pool.warp(img, m3, OUT, backend="skimage")
    with pytest.raises(ValueError, match="in-plane"):
        warp_slices(img, m3, OUT, processes=0, backend="skimage")
    with pytest.raises(ValueError, match="backend"):
        warp_slices(img, np.eye(4), OUT, processes=0, backend="opencv")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        warp_slices(img[0], np.eye(4), OUT, processes=0)
    with pytest.raises(ValueError, match="processes"):
        SlicePool(processes=0)


def shm_names() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("psm_")} if shm.is_dir() else set()


def leaked(before: set[str]) -> set[str]:
    """Segments created since ``before`` and still there, other jobs' live ones aside
    (a segment some other process maps is not ours: the machine may be shared)."""

    def elsewhere(name: str) -> bool:
        for maps in Path("/proc").glob("[0-9]*/maps"):
            if maps.parent.name != str(os.getpid()):
                try:
                    if name in maps.read_text():
                        return True
                except OSError:
                    pass
        return False

    return {n for n in shm_names() - before if not elsewhere(n)}


def test_default_pool_reused_and_dead_process_detected(volume):
    img, _ = volume
    m = planar(np.random.default_rng(6), flip_z=False)
    before = shm_names()
    warp_slices(img, m, OUT, processes=1)
    pool = slices._DEFAULT_POOLS[1]
    warp_slices(img, m, OUT, processes=1)
    assert slices._DEFAULT_POOLS[1] is pool
    names = {
        n
        for n in shm_names() - before
        if any(n == b.name for b in pool._buffers.values() if b is not None)
    }
    assert len(names) == 2  # input and output
    os.kill(pool._workers.pids[0], signal.SIGKILL)
    pool._workers.processes[0].join(5)
    with pytest.raises(RuntimeError, match="died"):
        pool.warp(img, m, OUT)
    assert pool.closed and not names & shm_names()
    with pytest.raises(RuntimeError, match="closed"):
        pool.warp(img, m, OUT)
    warp_slices(img, m, OUT, processes=1)  # a fresh default pool replaces the closed one
    assert slices._DEFAULT_POOLS[1] is not pool
    slices._DEFAULT_POOLS.pop(1).close()
    assert not leaked(before)
