"""The torch resampling path against the numba path (the reference), on CPU tensors.

Relative error is ``max |torch - numpy| / max |numpy|`` over the whole output, padding
included; the goal is < 1e-5 for float32. Exact signed permutations must be bit-identical
to numpy's index operations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import augment
from augment import matrices as mx
from augment.backends.numpy import warp_numpy
from augment.backends.torch import affine_warp_torch, warp_torch
from augment.kernels import program as pg
from augment.kernels import torch_fallback as tk

REL = 1e-5


def random_matrix(
    rng: np.random.Generator, out_shape, in_shape, *, border: bool = False
) -> np.ndarray:
    """Rotation, anisotropic scale, shear and an off-grid shift about the centres; with
    ``border`` the patch hangs over an edge of the source."""
    lin = (
        mx.rotation(rng.uniform(-0.6, 0.6, 3))
        @ mx.scaling(rng.uniform(0.7, 1.4, 3))
        @ mx.shear(rng.uniform(-0.15, 0.15, 6))
    )
    shift = rng.uniform(-2.5, 2.5, 3)
    if border:
        shift += rng.choice([-1, 1], 3) * np.asarray(in_shape) * rng.uniform(0.3, 0.6, 3)
    return mx.to_3x4(mx.about(lin, mx.centre(out_shape), mx.centre(in_shape) + shift))


def full_program(seed: int) -> np.ndarray:
    """Every opcode, noise included."""
    return pg.concat(
        pg.op(pg.CLIP, -150.0, 200.0),
        pg.op(pg.AFFINE, 1 / 350, 150 / 350),
        pg.op(pg.GAMMA, 1.3, 0.0, 1.0),
        pg.op(pg.NOISE, 0.05, seed),
        pg.op(pg.AFFINE, 2.0, -0.5),
    )


def rel_err(got: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    g = got.float().numpy() if isinstance(got, torch.Tensor) else got
    return float(np.abs(g.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(a).to(dtype)


def numpy_of(t: torch.Tensor) -> np.ndarray:
    """The source as the numba kernel reads it: every tap converted to float32 (exact for
    these dtypes). Converting first keeps one numba signature (each costs seconds to
    compile) and covers bfloat16 (no numpy type) and float16 (numba cannot type it)."""
    return t.float().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int16])
def test_matches_numba_random_affine(dtype):
    rng = np.random.default_rng(10)
    in_shape, out_shape = (17, 21, 19), (13, 11, 15)
    b = 4
    src = to_torch((rng.normal(size=(b, 2, *in_shape)) * 80).astype(np.float32), dtype)
    lab = torch.from_numpy(rng.integers(0, 5, (b, 1, *in_shape)).astype(np.int16))
    m = np.stack([random_matrix(rng, out_shape, in_shape, border=i % 2 == 1) for i in range(b)])
    progs = np.stack([full_program(7 + i * 2**31) for i in range(b)])
    cval = -33.25
    got, got_lab = warp_torch(src, lab, m, out_shape, cval=cval, label_cval=9, programs=progs)
    assert got.dtype == torch.float32 and got.shape == (b, 2, *out_shape)
    assert got_lab.dtype == torch.int16
    for i in range(b):
        ref, ref_lab = warp_numpy(
            numpy_of(src[i]),
            lab[i].numpy(),
            m[i],
            out_shape,
            cval=cval,
            label_cval=9,
            program=progs[i],
        )
        assert rel_err(got[i], ref) < REL
        assert np.array_equal(got_lab[i].numpy(), ref_lab)
    # without a program the interior is bit-identical (same float64 coordinates and lerps)
    plain, _ = warp_torch(src, None, m, out_shape, cval=cval)
    ref, _ = warp_numpy(numpy_of(src[0]), None, m[0], out_shape, cval=cval)
    assert (plain[0].numpy() == ref).mean() > 0.9


def test_padding_reads_cval_through_the_program():
    src = torch.ones(1, 1, 4, 4, 4)
    m = mx.to_3x4(mx.translation([100.0, 0.0, 0.0]))[None]
    prog = pg.op(pg.AFFINE, 2.0, 1.0)[None]
    got, _ = warp_torch(src, None, m, (2, 3, 3), cval=5.0, programs=prog)
    assert torch.all(got == 11.0)


def test_nearest_image_and_uint8_labels():
    rng = np.random.default_rng(11)
    in_shape, out_shape = (12, 14, 16), (9, 10, 11)
    src = torch.from_numpy(rng.normal(size=(3, 1, *in_shape)).astype(np.float32))
    lab = torch.from_numpy(rng.integers(0, 3, (3, 2, *in_shape)).astype(np.uint8))
    m = np.stack([random_matrix(rng, out_shape, in_shape, border=True) for _ in range(3)])
    got, got_lab = warp_torch(src, lab, m, out_shape, image_order=0, cval=2.5, label_cval=4)
    for i in range(3):
        ref, ref_lab = warp_numpy(
            src[i].numpy(), lab[i].numpy(), m[i], out_shape, image_order=0, cval=2.5, label_cval=4
        )
        assert np.array_equal(got[i].numpy(), ref)
        assert np.array_equal(got_lab[i].numpy(), ref_lab)


def test_list_of_differently_sized_sources():
    rng = np.random.default_rng(12)
    out_shape = (10, 12, 8)
    shapes = [(14, 15, 16), (9, 20, 11), (16, 16, 16)]
    imgs = [torch.from_numpy(rng.normal(size=(1, *s)).astype(np.float32)) for s in shapes]
    labs = [torch.from_numpy(rng.integers(0, 4, (1, *s)).astype(np.uint8)) for s in shapes]
    m = np.stack([random_matrix(rng, out_shape, s, border=i == 1) for i, s in enumerate(shapes)])
    progs = pg.pad([pg.op(pg.AFFINE, 2.0, 1.0), pg.empty(), full_program(3)])
    got, got_lab = warp_torch(imgs, labs, m, out_shape, cval=0.5, programs=progs)
    assert got.shape == (3, 1, *out_shape)
    for i in range(3):
        ref, ref_lab = warp_numpy(
            imgs[i].numpy(), labs[i].numpy(), m[i], out_shape, cval=0.5, program=progs[i]
        )
        assert rel_err(got[i], ref) < REL
        assert np.array_equal(got_lab[i].numpy(), ref_lab)


def test_chunking_gives_the_same_result(monkeypatch):
    rng = np.random.default_rng(13)
    src = torch.from_numpy(rng.normal(size=(3, 1, 10, 10, 10)).astype(np.float32))
    m = np.stack([random_matrix(rng, (6, 7, 8), (10, 10, 10)) for _ in range(3)])
    whole, _ = warp_torch(src, None, m, (6, 7, 8))
    monkeypatch.setattr(tk, "CHUNK_VOXELS", 300)
    parts, _ = warp_torch(src, None, m, (6, 7, 8))
    assert torch.equal(whole, parts)


def test_bfloat16_output_is_the_rounded_float32():
    rng = np.random.default_rng(14)
    src = torch.from_numpy(rng.normal(size=(2, 1, 10, 11, 12)).astype(np.float32))
    m = np.stack([random_matrix(rng, (7, 8, 9), (10, 11, 12)) for _ in range(2)])
    f32, _ = warp_torch(src, None, m, (7, 8, 9))
    bf, _ = warp_torch(src, None, m, (7, 8, 9), out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf, f32.to(torch.bfloat16))


# -- exact index maps ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bfloat16])
def test_exact_maps_bit_identical_to_numpy(dtype):
    rng = np.random.default_rng(15)
    shape = (8, 8, 8)
    src_np = (rng.normal(size=(2, *shape)) * 100).astype(np.float32)
    src = to_torch(src_np, dtype)
    base = numpy_of(src).astype(np.float32)
    flipped = affine_warp_torch(src, mx.flip([True, False, True], shape), shape)
    assert np.array_equal(flipped.numpy(), np.flip(base, (1, 3)))
    rot = affine_warp_torch(src, augment.spatial.rot90_matrix(1, (1, 2), shape), shape)
    assert np.array_equal(rot.numpy(), np.rot90(base, 1, (2, 3)))
    swap = affine_warp_torch(src, mx.permutation([2, 0, 1]), shape)
    assert np.array_equal(swap.numpy(), np.transpose(base, (0, 3, 1, 2)))
    # an integer crop that hangs over two faces, with a flip: padding is cval
    m = mx.translation([3, -2, 0]) @ mx.flip([False, True, False], shape)
    got = affine_warp_torch(src, m, (6, 9, 8), cval=-1.0)
    ref, _ = warp_numpy(base, None, m, (6, 9, 8), cval=-1.0)
    assert np.array_equal(got.numpy(), ref)
    # labels keep their dtype, exactly
    lab = torch.from_numpy(rng.integers(0, 7, (1, *shape)).astype(np.uint8))
    got_lab = affine_warp_torch(lab, mx.flip([False, False, True], shape), shape, order=0)
    assert got_lab.dtype == torch.uint8
    assert np.array_equal(got_lab.numpy(), np.flip(lab.numpy(), 3))


def test_exact_maps_inside_an_interpolating_batch_stay_exact():
    """A mixed batch goes through the interpolating kernel: integer maps still copy."""
    rng = np.random.default_rng(16)
    shape = (9, 9, 9)
    src = torch.from_numpy((rng.normal(size=(2, 1, *shape)) * 100).astype(np.float32))
    flip = mx.to_3x4(mx.flip([True, True, False], shape))
    m = np.stack([random_matrix(rng, shape, shape), flip])
    got, _ = warp_torch(src, None, m, shape)
    assert np.array_equal(got[1].numpy(), np.flip(src[1].numpy(), (1, 2)))


def test_exact_maps_run_the_program():
    rng = np.random.default_rng(17)
    src = torch.from_numpy(rng.normal(size=(1, 1, 6, 6, 6)).astype(np.float32))
    m = mx.to_3x4(mx.flip([True, False, False], (6, 6, 6)))[None]
    prog = full_program(99)[None]
    got, _ = warp_torch(src, None, m, (6, 6, 6), programs=prog)
    ref, _ = warp_numpy(src[0].numpy(), None, m[0], (6, 6, 6), program=prog[0])
    assert rel_err(got[0], ref) < REL


# -- the intensity program -------------------------------------------------------------------
def test_noise_matches_the_reference_definition():
    idx = np.concatenate([np.arange(5000), [2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5]])
    for seed in (0, 1, 12345, 2**32 - 1, 2**40 + 3):
        got = tk.noise(seed, torch.from_numpy(idx.astype(np.int64)))
        ref = pg.noise_reference(seed, idx)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_run_program_matches_reference_per_sample():
    rng = np.random.default_rng(18)
    x = torch.from_numpy((rng.normal(size=(3, 2, 4, 5, 6)) * 120).astype(np.float32))
    progs = pg.pad(
        [
            full_program(5),
            pg.op(pg.NOISE, 0.3, 77),
            pg.concat(pg.op(pg.GAMMA, 0.7, -100.0, 100.0), pg.op(pg.CLIP, -50.0, 50.0)),
        ]
    )
    got = tk.run_program(x, progs)
    for i in range(3):
        ref = pg.run_reference(progs[i], x[i].numpy())
        assert rel_err(got[i], ref) < REL


def test_random_noise_apply_on_tensors_matches_numpy():
    t = augment.RandomNoise(0.2, p=1.0)
    p = t.sample(np.random.default_rng(3))
    x = np.random.default_rng(4).normal(size=(1, 5, 6, 7)).astype(np.float32)
    got = t.apply(torch.from_numpy(x), p)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert rel_err(got, t.apply(x, p)) < REL


# -- the public face -------------------------------------------------------------------------
def test_affine_warp_dispatches_tensors():
    rng = np.random.default_rng(19)
    x = torch.from_numpy(rng.normal(size=(2, 10, 11, 12)).astype(np.float32))
    m = random_matrix(rng, (5, 6, 7), (10, 11, 12))
    got = augment.affine_warp(x, m, (5, 6, 7))
    assert isinstance(got, torch.Tensor) and got.shape == (2, 5, 6, 7)
    assert rel_err(got, augment.affine_warp(x.numpy(), m, (5, 6, 7))) < REL
    # a batch with one shared matrix, written into out
    out = torch.empty(3, 2, 5, 6, 7)
    batch = torch.stack([x, x * 2, x - 1])
    assert affine_warp_torch(batch, m, (5, 6, 7), out=out) is out
    assert rel_err(out[1], 2 * augment.affine_warp(x.numpy(), m, (5, 6, 7))) < REL
    # nearest keeps the dtype
    lab = torch.from_numpy(rng.integers(0, 3, (1, 10, 11, 12)).astype(np.int16))
    got_lab = augment.affine_warp(lab, m, (5, 6, 7), order=0, cval=-1)
    assert got_lab.dtype == torch.int16
    assert np.array_equal(
        got_lab.numpy(), augment.affine_warp(lab.numpy(), m, (5, 6, 7), order=0, cval=-1)
    )
    bf = affine_warp_torch(x, m, (5, 6, 7), out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16


def test_bad_inputs_are_refused_with_the_value():
    x = torch.zeros(1, 1, 4, 4, 4)
    m = np.eye(4)[:3]
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        warp_torch(torch.zeros(4, 4, 4), None, m, (2, 2, 2))
    with pytest.raises(TypeError, match="complex64"):
        warp_torch(x.to(torch.complex64), None, m, (2, 2, 2))
    with pytest.raises(ValueError, match="out_dtype"):
        warp_torch(x, None, m, (2, 2, 2), out_dtype=torch.float16)
    with pytest.raises(ValueError, match="matrix"):
        warp_torch(x, None, np.eye(2), (2, 2, 2))
    with pytest.raises(ValueError, match="backend"):
        warp_torch(x, None, m, (2, 2, 2), backend="cuda")
    with pytest.raises(ValueError, match="shapes differ"):
        warp_torch(x, torch.zeros(1, 1, 4, 4, 5, dtype=torch.uint8), m, (2, 2, 2))


def test_affine_warp_takes_a_list_of_tensors():
    rng = np.random.default_rng(20)
    shapes = [(8, 9, 10), (11, 7, 9)]
    xs = [torch.from_numpy(rng.normal(size=(1, *s)).astype(np.float32)) for s in shapes]
    m = np.stack([random_matrix(rng, (5, 6, 7), s) for s in shapes])
    got = augment.affine_warp(xs, m, (5, 6, 7))
    assert got.shape == (2, 1, 5, 6, 7)
    for i in range(2):
        assert rel_err(got[i], augment.affine_warp(xs[i].numpy(), m[i], (5, 6, 7))) < REL
