"""RandomElastic and the displaced resampling pass.

The reference is ``scipy.ndimage.map_coordinates`` at coordinates built here in float64:
the affine map of every output voxel plus the dense displacement, which is the coarse
control grid spread by ``map_coordinates(order=3, prefilter=False)`` (scipy's own cubic
B-spline at integer knots, independent of ``augment.kernels.bspline``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import augment
from augment import matrices as mx
from augment.backends.numpy import onehot_linear_numpy, warp_numpy
from augment.backends.torch import warp_torch
from augment.elastic import ElasticParams
from augment.kernels import program as pg
from augment.kernels import torch_fallback as tk
from augment.rng import batch_rngs

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-5
HAS_CUDA = torch.cuda.is_available()


def random_matrix(rng, out_shape, in_shape, *, degrees=20.0, shift=2.0, border=False):
    """A rotation, scaling and shear about the centres; ``border``: the patch hangs over a
    face of the source."""
    lin = (
        mx.rotation(np.deg2rad(rng.uniform(-degrees, degrees, 3)))
        @ mx.scaling(rng.uniform(0.8, 1.25, 3))
        @ mx.shear(rng.uniform(-0.05, 0.05, 6))
    )
    centre = mx.centre(in_shape) + rng.uniform(-shift, shift, 3)
    if border:
        centre += rng.choice([-1, 1], 3) * np.asarray(in_shape) * 0.35
    return mx.to_3x4(mx.about(lin, mx.centre(out_shape), centre))


def dense_displacement(field, out_shape):
    """``(3, d, h, w)`` float64: the control grid spread over the output grid by scipy's
    cubic B-spline; control point j of an axis of n voxels and g points sits at output
    index (j - 1) * (n - 1) / (g - 3)."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in out_shape], indexing="ij")
    u = [
        1.0 + g * (k - 3) / (n - 1)
        for g, k, n in zip(grid, field.shape[1:], out_shape, strict=True)
    ]
    return np.stack(
        [
            ndi.map_coordinates(field[c], u, order=3, prefilter=False, mode="nearest")
            for c in (0, 1, 2)
        ]
    )


def source_coords(m, out_shape, displacement):
    grid = np.stack(
        np.meshgrid(*[np.arange(n, dtype=np.float64) for n in out_shape], indexing="ij")
    )
    return np.einsum("ij,j...->i...", m[:, :3], grid) + m[:, 3].reshape(3, 1, 1, 1) + displacement


def reference(src, coords, order, cval):
    return ndi.map_coordinates(
        src.astype(np.float64) if order == 1 else src,
        coords,
        order=order,
        mode="grid-constant",
        cval=cval,
        prefilter=False,
    )


def rel_err(got, ref):
    g = np.asarray(got, dtype=np.float64)
    return float(np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-30))


def linear_image(shape, coeffs=(3.0, -2.0, 1.5), offset=40.0):
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return (coeffs[0] * z + coeffs[1] * y + coeffs[2] * x + offset).astype(np.float32)


# -- the numba kernel -------------------------------------------------------------------------
@pytest.mark.parametrize("border", [False, True])
@pytest.mark.parametrize("points", [(4, 4, 4), (6, 7, 5), (9, 5, 12)])
def test_displaced_warp_matches_map_coordinates(points, border):
    rng = np.random.default_rng(sum(points) + border)
    in_shape, out_shape = (30, 34, 38), (18, 20, 23)
    noise = rng.normal(0.0, 50.0, in_shape).astype(np.float32)
    lab = rng.integers(0, 4, in_shape).astype(np.uint8)
    m = random_matrix(rng, out_shape, in_shape, border=border)
    field = rng.uniform(-3.0, 3.0, (3, *points))
    coords = source_coords(m, out_shape, dense_displacement(field, out_shape))
    outside = np.any(
        (coords < 0) | (coords > np.reshape(in_shape, (3, 1, 1, 1)) - 1), axis=0
    ).mean()
    assert (outside > 0.05) if border else (outside < 0.05)
    for src in (linear_image(in_shape), noise):
        got, got_lab = warp_numpy(src[None], lab[None], m, out_shape, cval=-7.0, field=field)
        assert rel_err(got[0], reference(src, coords, 1, -7.0)) < REL
        ref_lab = reference(lab, coords, 0, 0)
        assert (got_lab[0] == ref_lab).mean() >= 0.999


def test_displaced_general_path_matches_map_coordinates():
    """Two channels, two labels, a nearest image and per-voxel programs: the voxel-by-voxel
    path of the kernel."""
    rng = np.random.default_rng(7)
    in_shape, out_shape = (26, 30, 28), (16, 18, 20)
    img = rng.normal(0.0, 30.0, (2, *in_shape)).astype(np.float32)
    lab = rng.integers(0, 5, (2, *in_shape)).astype(np.uint8)
    m = random_matrix(rng, out_shape, in_shape, border=True)
    field = rng.uniform(-2.5, 2.5, (3, 5, 6, 7))
    coords = source_coords(m, out_shape, dense_displacement(field, out_shape))
    prog = pg.concat(pg.op(pg.CLIP, -40.0, 50.0), pg.op(pg.AFFINE, 0.5, 3.0))
    got, got_lab = warp_numpy(img, lab, m, out_shape, cval=2.0, program=prog, field=field)
    near, _ = warp_numpy(img, None, m, out_shape, image_order=0, cval=2.0, field=field)
    for c in (0, 1):
        ref = pg.run_reference(prog, reference(img[c], coords, 1, 2.0)[None])[0]
        assert rel_err(got[c], ref) < REL
        assert (got_lab[c] == reference(lab[c], coords, 0, 0)).mean() >= 0.999
        assert (near[c] == reference(img[c], coords, 0, 2.0)).mean() >= 0.999


@pytest.mark.parametrize(
    "case", ["fast", "fast+program", "image-only", "label-only", "channels", "nearest"]
)
@pytest.mark.parametrize("border", [False, True])
def test_zero_field_is_bit_identical_to_the_affine_path(case, border):
    """The displaced kernel with a zero field gives the affine kernel's bits, in each of
    the affine kernel's paths (inline interior reads, ``_row``, the tile-wise program)."""
    rng = np.random.default_rng(11)
    in_shape, out_shape = (30, 33, 36), (20, 22, 140)  # two x tiles: a partial-width tile too
    channels = 2 if case == "channels" else 1
    img = rng.normal(0.0, 80.0, (channels, *in_shape)).astype(np.float32)
    lab = rng.integers(0, 4, (channels, *in_shape)).astype(np.uint8)
    m = random_matrix(rng, out_shape, in_shape, shift=1.0, border=border)
    m = mx.to_3x4(m @ mx.to_4x4(mx.to_3x4(mx.scaling([1.0, 1.0, 0.25]))))
    prog = None
    if case in ("fast+program", "channels", "nearest"):
        prog = pg.concat(
            pg.op(pg.CLIP, -100.0, 120.0),
            pg.op(pg.AFFINE, 0.004, 0.4),
            pg.op(pg.GAMMA, 1.3, 0.0, 1.0),
            pg.op(pg.NOISE, 0.05, 12345),
        )
    kw = {"image_order": 0 if case == "nearest" else 1, "cval": -3.0, "program": prog}
    image = None if case == "label-only" else img
    label = None if case == "image-only" else lab
    zero = np.zeros((3, 5, 6, 4))
    a_img, a_lab = warp_numpy(image, label, m, out_shape, label_cval=9, **kw)
    b_img, b_lab = warp_numpy(image, label, m, out_shape, label_cval=9, field=zero, **kw)
    for a, b in ((a_img, b_img), (a_lab, b_lab)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.tobytes() == b.tobytes()
    if label is not None and border:
        assert (a_lab == 9).any()  # the border case reaches outside


def test_onehot_labels_follow_the_displacement():
    rng = np.random.default_rng(5)
    in_shape, out_shape = (24, 26, 28), (14, 16, 18)
    lab = rng.integers(0, 3, (1, *in_shape)).astype(np.uint8)
    m = random_matrix(rng, out_shape, in_shape)
    field = rng.uniform(-2.0, 2.0, (3, 4, 5, 6))
    coords = source_coords(m, out_shape, dense_displacement(field, out_shape))
    got = onehot_linear_numpy(lab, m, out_shape, 0, field=field)
    onehot = np.stack(
        [reference((lab[0] == k).astype(np.float64), coords, 1, float(k == 0)) for k in range(3)]
    )
    assert (got[0] == onehot.argmax(axis=0)).mean() >= 0.999


# -- RandomElastic in a Compose ---------------------------------------------------------------
def volume(rng, shape=(40, 44, 48)):
    img = linear_image(shape) + rng.normal(0.0, 5.0, shape).astype(np.float32)
    lab = (rng.random(shape) < 0.3).astype(np.uint8)
    return img, lab


def test_elastic_after_the_affine_moves_output_voxels():
    """Listed after crop and affine, the vectors are in output voxels: the source point of
    output p is ``M @ (p + d(p))``, built here from the drawn control grid."""
    rng = np.random.default_rng(0)
    img, lab = volume(rng)
    aug = augment.Compose(
        [
            augment.RandomCrop((20, 22, 24)),
            augment.RandomAffine(degrees=20, scale=(0.8, 1.25)),
            augment.RandomFlip(p=0.5),
            augment.RandomElastic(points=(5, 6, 7), magnitude=(1.0, 3.0)),
        ]
    )
    for seed in range(3):
        out = aug(image=img, label=lab, rng=np.random.default_rng(seed))
        params = out["params"]
        field = params.spatial[3].field[0]
        assert 1.0 <= np.abs(field).max() <= 3.0
        m = aug.matrix(params)[0]
        d = dense_displacement(field, (20, 22, 24))
        grid = np.stack(
            np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (20, 22, 24)], indexing="ij")
        )
        coords = np.einsum("ij,j...->i...", m[:3, :3], grid + d) + m[:3, 3].reshape(3, 1, 1, 1)
        assert rel_err(out["image"], reference(img, coords, 1, 0.0)) < REL
        assert (out["label"] == reference(lab, coords, 0, 0)).mean() >= 0.999


def test_elastic_listed_first_moves_source_voxels():
    rng = np.random.default_rng(1)
    img, lab = volume(rng)
    aug = augment.Compose(
        [
            augment.RandomElastic(points=6, magnitude=2.0),
            augment.RandomCrop((18, 20, 22)),
            augment.RandomAffine(degrees=25, scale=(0.7, 1.3)),
        ]
    )
    out = aug(image=img, label=lab, rng=np.random.default_rng(4))
    params = out["params"]
    m = mx.to_3x4(aug.matrix(params)[0])
    d = dense_displacement(params.spatial[0].field[0], (18, 20, 22))
    coords = source_coords(m, (18, 20, 22), d)  # the vectors act in the source as they are
    assert rel_err(out["image"], reference(img, coords, 1, 0.0)) < REL


def test_params_replay_and_batch_gate():
    rng = np.random.default_rng(2)
    img, lab = volume(rng)
    aug = augment.Compose(
        [
            augment.RandomCrop((16, 18, 20)),
            augment.RandomAffine(degrees=10),
            augment.RandomElastic(points=5, magnitude=(0.0, 3.0), p=0.7),
        ]
    )
    out = aug(image=img, label=lab, rng=np.random.default_rng(9))
    p = out["params"]
    assert isinstance(p.spatial[2], ElasticParams) and p.spatial[2].field.shape == (1, 3, 5, 5, 5)
    again = aug(image=img, label=lab, params=p)
    assert again["image"].tobytes() == out["image"].tobytes()
    assert again["label"].tobytes() == out["label"].tobytes()
    logged = p.as_dict()["spatial"][2]
    assert logged["kind"] == "ElasticParams" and np.shape(logged["field"]) == (1, 3, 5, 5, 5)
    # the drawn parameters do not depend on anything but the generator
    draws = [aug.sample(np.random.default_rng(s), img.shape) for s in range(12)]
    active = [bool(d.spatial[2].active[0]) for d in draws]
    assert any(active) and not all(active)
    assert all(np.any(d.spatial[2].field) == a for d, a in zip(draws, active, strict=True))


def test_zero_magnitude_elastic_is_the_affine_pipeline_bit_for_bit():
    rng = np.random.default_rng(3)
    img, lab = volume(rng)
    base = [augment.RandomCrop((20, 20, 20)), augment.RandomAffine(degrees=15, scale=(0.9, 1.1))]
    with pytest.warns(UserWarning, match="no-op"):
        zero = augment.RandomElastic(points=6, magnitude=0.0)
    plain, deformed = augment.Compose(base), augment.Compose([*base, zero])
    for seed in range(3):
        p = deformed.sample(np.random.default_rng(seed), img.shape)
        assert deformed.plan(p).field is None
        a = deformed(image=img, label=lab, params=p)
        b = plain(
            image=img,
            label=lab,
            params=augment.ComposeParams(p.spatial[:2], p.intensity, p.in_shape),
        )
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["label"].tobytes() == b["label"].tobytes()


def test_an_undisplaced_flip_stays_an_exact_copy():
    rng = np.random.default_rng(4)
    img, lab = volume(rng, (20, 20, 20))
    aug = augment.Compose(
        [augment.RandomFlip(p=1.0), augment.RandomElastic(points=4, magnitude=2.0, p=0.0)]
    )
    out = aug(image=img, label=lab, rng=np.random.default_rng(0))
    assert np.array_equal(out["image"], img[::-1, ::-1, ::-1])
    assert np.array_equal(out["label"], lab[::-1, ::-1, ::-1])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="points"):
        augment.RandomElastic(points=3)
    with pytest.raises(ValueError, match="points"):
        augment.RandomElastic(points=(6, 6))
    with pytest.raises(ValueError, match="magnitude"):
        augment.RandomElastic(magnitude=(-1.0, 2.0))
    with pytest.raises(ValueError, match="one displacing transform"):
        augment.Compose([augment.RandomElastic(), augment.RandomElastic()])
    with pytest.raises(ValueError, match="field must be"):
        warp_torch(
            torch.zeros(1, 1, 4, 4, 4),
            None,
            np.eye(4)[:3],
            (4, 4, 4),
            field=np.zeros((1, 3, 3, 4, 4)),
        )


# -- torch ------------------------------------------------------------------------------------
def torch_batch(rng, b, in_shape, out_shape, points=(5, 6, 7)):
    img = rng.normal(0.0, 40.0, (b, 1, *in_shape)).astype(np.float32)
    lab = rng.integers(0, 4, (b, 1, *in_shape)).astype(np.uint8)
    m = np.stack([random_matrix(rng, out_shape, in_shape, border=i % 2 == 1) for i in range(b)])
    field = rng.uniform(-2.5, 2.5, (b, 3, *points))
    field[0] = 0.0  # a sample without displacement in a displaced batch
    return img, lab, m, field


def test_torch_fallback_matches_numpy():
    rng = np.random.default_rng(12)
    in_shape, out_shape = (24, 26, 30), (12, 14, 16)
    img, lab, m, field = torch_batch(rng, 3, in_shape, out_shape)
    prog = np.stack(
        [pg.concat(pg.op(pg.AFFINE, 0.5, 1.0), pg.op(pg.NOISE, 0.1, 7 + b)) for b in range(3)]
    )
    got, got_lab = warp_torch(
        torch.from_numpy(img),
        torch.from_numpy(lab),
        m,
        out_shape,
        cval=-1.0,
        programs=prog,
        field=field,
        backend="torch",
    )
    for b in range(3):
        ref, ref_lab = warp_numpy(
            img[b], lab[b], m[b], out_shape, cval=-1.0, program=prog[b], field=field[b]
        )
        assert rel_err(got[b].numpy(), ref) < REL
        assert (got_lab[b].numpy() == ref_lab).mean() >= 0.999


def test_torch_displacement_is_the_spline():
    rng = np.random.default_rng(13)
    field = rng.normal(size=(2, 3, 4, 6, 5))
    shift = tk.displacement(torch.from_numpy(field), (7, 9, 11))
    for b in range(2):
        want = dense_displacement(field[b], (7, 9, 11))
        for k in range(3):
            assert np.abs(shift[k][b].numpy() - want[k]).max() < 1e-12


def test_torch_compose_batch_equals_numpy_samples():
    """The vectorisation gate with a deformation: the batch equals each sample alone."""
    rng = np.random.default_rng(14)
    shapes = [(26, 28, 30), (24, 30, 26), (28, 26, 28)]
    imgs = [rng.normal(0.0, 100.0, (1, *s)).astype(np.float32) for s in shapes]
    labs = [rng.integers(0, 3, (1, *s)).astype(np.uint8) for s in shapes]
    aug = augment.Compose(
        [
            augment.RandomCrop((14, 16, 18)),
            augment.RandomAffine(degrees=15, scale=(0.85, 1.2)),
            augment.RandomFlip(p=0.5),
            augment.RandomElastic(points=6, magnitude=(0.0, 3.0), p=0.7),
            augment.Window(-150, 200),
            augment.RandomNoise(0.05, p=0.5),
        ]
    )
    out = aug(
        image=[torch.from_numpy(i) for i in imgs],
        label=[torch.from_numpy(lab) for lab in labs],
        rng=batch_rngs(1, 0, range(3)),
    )
    rngs = batch_rngs(1, 0, range(3))
    for b in range(3):
        ref = aug(image=imgs[b], label=labs[b], rng=rngs[b])
        assert out["params"].take(b).as_dict() == ref["params"].as_dict()
        assert rel_err(out["image"][b].numpy(), ref["image"]) < REL
        assert (out["label"][b].numpy() == ref["label"]).mean() >= 0.999


# -- Triton under the interpreter -------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from augment.kernels import triton_warp as trw

    d = dict(np.load(sys.argv[1]))
    res = {}
    img, lab = trw.warp_batch(torch.from_numpy(d["img"]), torch.from_numpy(d["lab"]), d["m"],
                              tuple(d["out"]), cval=-1.0, label_cval=3, programs=d["prog"],
                              field=d["field"], config=(8, 16, 1))
    res["img"], res["lab"] = img.numpy(), lab.numpy()
    _, onehot = trw.warp_batch(None, torch.from_numpy(d["lab"]), d["m"], tuple(d["out"]),
                               label_mode="linear_onehot", classes=torch.tensor([0, 1, 2, 3]),
                               field=d["field"], config=(4, 8, 1))
    res["onehot"] = onehot.numpy()
    np.savez(sys.argv[2], **res)
""")


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1"
    or not __import__("importlib").util.find_spec("triton"),
    reason="triton is not installed: the Triton kernel cannot be interpreted here",
)
def test_triton_displaced_kernel_under_the_interpreter(tmp_path):
    rng = np.random.default_rng(15)
    in_shape, out_shape = (20, 22, 26), (3, 10, 20)
    img, lab, m, field = torch_batch(rng, 2, in_shape, out_shape, points=(4, 5, 6))
    prog = np.stack(
        [pg.concat(pg.op(pg.CLIP, -50.0, 60.0), pg.op(pg.NOISE, 0.2, 99 + b)) for b in range(2)]
    )
    field[0] = rng.uniform(-1.0, 1.0, field[0].shape)
    np.savez(
        tmp_path / "in.npz", img=img, lab=lab, m=m, prog=prog, field=field, out=np.array(out_shape)
    )
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = dict(np.load(tmp_path / "out.npz"))
    for b in range(2):
        ref, ref_lab = warp_numpy(
            img[b],
            lab[b],
            m[b],
            out_shape,
            cval=-1.0,
            label_cval=3,
            program=prog[b],
            field=field[b],
        )
        assert rel_err(got["img"][b], ref) < REL
        assert (got["lab"][b] == ref_lab).mean() >= 0.999
        ref_onehot = onehot_linear_numpy(lab[b], m[b], out_shape, 0, field=field[b])
        assert (got["onehot"][b] == ref_onehot).mean() >= 0.999


# -- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_displaced_warp_matches_numpy(backend):
    rng = np.random.default_rng(16)
    in_shape, out_shape = (40, 48, 52), (24, 32, 40)
    img, lab, m, field = torch_batch(rng, 4, in_shape, out_shape, points=(6, 8, 10))
    dev = torch.device("cuda")
    got, got_lab = warp_torch(
        torch.from_numpy(img).to(dev),
        torch.from_numpy(lab).to(dev),
        m,
        out_shape,
        cval=-2.0,
        field=field,
        backend=backend,
    )
    for b in range(4):
        ref, ref_lab = warp_numpy(img[b], lab[b], m[b], out_shape, cval=-2.0, field=field[b])
        assert rel_err(got[b].cpu().numpy(), ref) < REL
        assert (got_lab[b].cpu().numpy() == ref_lab).mean() >= 0.999


def test_no_warning_for_an_active_deformation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        augment.RandomElastic(points=8, magnitude=(0.0, 4.0))
        augment.RandomElastic(points=8, magnitude=0.0, p=0.0)
