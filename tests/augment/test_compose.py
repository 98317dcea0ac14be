"""Compose: one matrix, one pass, replayable parameters."""

from __future__ import annotations

import numpy as np
import pytest

import augment
from augment import matrices as mx
from augment.kernels import program as pg


def volume(rng, shape=(40, 44, 48)):
    img = (rng.normal(size=shape) * 100).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = np.asarray(shape) / 2
    lab[((zz - c[0]) / 12) ** 2 + ((yy - c[1]) / 15) ** 2 + ((xx - c[2]) / 10) ** 2 < 1] = 1
    return img, lab


SPATIAL = [
    augment.RandomCrop((24, 24, 24)),
    augment.RandomAffine(degrees=20, scale=(0.8, 1.25), shear=0.05, translate=2.0),
    augment.RandomFlip(axes=(0, 1, 2), p=0.5),
    augment.RandomRot90(axes=(1, 2)),
    augment.RandomSwapAxes(axes=(0, 1, 2)),
]


def test_compose_equals_one_warp_with_product_matrix():
    rng = np.random.default_rng(0)
    img, lab = volume(rng)
    aug = augment.Compose(SPATIAL)
    for seed in range(5):
        out = aug(image=img, label=lab, rng=np.random.default_rng(seed))
        p = out["params"]
        # the product of the per-transform matrices, built here independently
        shape = img.shape
        m = np.eye(4)
        for t, tp in zip(aug.spatial, p.spatial, strict=True):
            m = m @ t.matrix(tp, shape).reshape(4, 4)
            shape = t.out_shape(shape)
        want_img = augment.affine_warp(img, m, (24, 24, 24), order=1)
        want_lab = augment.affine_warp(lab, m, (24, 24, 24), order=0)
        assert out["image"].tobytes() == want_img.tobytes()
        assert out["label"].tobytes() == want_lab.tobytes()


def test_sequential_warps_approximate_fused_warp():
    # Folding is the point: warping step by step (each an interpolation) lands close to the
    # single fused pass on a smooth image.
    rng = np.random.default_rng(1)
    zz, yy, xx = np.meshgrid(*[np.linspace(0, 1, n) for n in (40, 44, 48)], indexing="ij")
    img = np.sin(3 * zz) + np.cos(4 * yy) * xx
    img = img.astype(np.float32)
    aug = augment.Compose(
        [augment.RandomCrop(30), augment.RandomAffine(10, (0.9, 1.1)), augment.RandomFlip(p=0.5)]
    )
    out = aug(image=img, rng=rng)
    x, shape = img, img.shape
    for t, tp in zip(aug.spatial, out["params"].spatial, strict=True):
        o = t.out_shape(shape)
        x = augment.affine_warp(x, t.matrix(tp, shape).reshape(4, 4), o)
        shape = o
    inner = (slice(3, -3),) * 3
    assert np.abs(x[inner] - out["image"][inner]).max() < 0.05


def test_replay_and_seed_determinism():
    rng = np.random.default_rng(2)
    img, lab = volume(rng)
    aug = augment.Compose(
        [
            *SPATIAL[:3],
            augment.Window(-150, 150),
            augment.RandomGamma(p=1.0),
            augment.RandomNoise(std=(0.01, 0.05), p=1.0),
            augment.RandomContrast(p=1.0),
            augment.RandomBrightness(p=1.0),
        ]
    )
    a = aug(image=img, label=lab, rng=np.random.default_rng(42))
    b = aug(image=img, label=lab, rng=np.random.default_rng(42))
    c = aug(image=img, label=lab, params=a["params"])
    d = aug(image=img, label=lab, rng=np.random.default_rng(43))
    for key in ("image", "label"):
        assert a[key].tobytes() == b[key].tobytes() == c[key].tobytes()
    assert a["image"].tobytes() != d["image"].tobytes()


def test_fused_intensity_matches_reference_order():
    rng = np.random.default_rng(3)
    img, lab = volume(rng)
    intens = [
        augment.Window(-150, 150),
        augment.RandomGamma((0.5, 2.0), p=1.0),
        augment.RandomNoise(std=(0.02, 0.02), p=1.0),
        augment.RandomBrightness((0.9, 1.1), p=1.0),
        augment.RandomContrast((0.7, 1.3), p=1.0),
    ]  # contrast about the patch mean: after
    aug = augment.Compose([augment.RandomCrop(20), augment.RandomAffine(10), *intens])
    out = aug(image=img, label=lab, rng=rng)
    p = out["params"]
    prog, post = aug.program(p)
    assert post == 4  # the patch-mean contrast runs after the pass
    plain = augment.Compose(aug.spatial)(
        image=img,
        params=augment.ComposeParams(spatial=p.spatial, intensity=(), in_shape=p.in_shape),
    )["image"]
    ref = pg.run_reference(prog, plain[None])[0]
    f = float(p.intensity[4].factor[0])
    mean = ref.mean()
    ref = np.clip((ref - mean) * f + mean, ref.min(), ref.max())
    np.testing.assert_allclose(out["image"], ref, rtol=1e-4, atol=1e-4)


def test_window_then_gamma_fuses_on_known_range():
    aug = augment.Compose(
        [augment.Window(-200, 250), augment.RandomGamma(p=1.0), augment.RandomNoise(p=1.0)]
    )
    p = aug.sample(np.random.default_rng(0), (8, 8, 8))
    prog, post = aug.program(p)
    assert post == 3
    assert [int(c) for c in prog[:, 0]] == [pg.CLIP, pg.AFFINE, pg.GAMMA, pg.NOISE]
    assert tuple(prog[2, 2:]) == (0.0, 1.0)


def test_region_offset_equals_full_volume():
    rng = np.random.default_rng(4)
    img, lab = volume(rng)
    aug = augment.Compose(SPATIAL[:3])
    full = aug(image=img, label=lab, rng=np.random.default_rng(9))
    m = aug.matrix(full["params"])[0]
    corners = np.stack(np.meshgrid(*[[0, 23]] * 3, indexing="ij"), -1).reshape(-1, 3)
    src = mx.apply_points(m, corners)
    lo = np.maximum(np.floor(src.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(src.max(0)).astype(int) + 2, img.shape)
    region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    part = aug(
        image=np.ascontiguousarray(img[region]),
        label=np.ascontiguousarray(lab[region]),
        params=full["params"],
        offset=lo,
        in_shape=img.shape,
    )
    np.testing.assert_allclose(part["image"], full["image"], rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(part["label"], full["label"])


def test_points_follow_the_transform():
    rng = np.random.default_rng(5)
    img = np.zeros((40, 40, 40), np.float32)
    img[20, 15, 25] = 1.0
    aug = augment.Compose(
        [augment.RandomCrop(30), augment.RandomRot90(axes=(1, 2)), augment.RandomFlip(p=0.5)]
    )
    for _ in range(5):
        out = aug(image=img, rng=rng, points=[[20, 15, 25]])
        p = out["points"][0]
        if np.all((p >= 0) & (p < 30)):
            assert out["image"][tuple(np.rint(p).astype(int))] == 1.0


def test_foreground_oversampling_centres_on_foreground():
    rng = np.random.default_rng(6)
    img = np.zeros((60, 60, 60), np.float32)
    lab = np.zeros((60, 60, 60), np.uint8)
    lab[50:54, 5:9, 50:54] = 1
    aug = augment.Compose([augment.RandomCrop(16, foreground=1.0)])
    for _ in range(10):
        out = aug(image=img, label=lab, rng=rng)
        assert out["label"].any()
        assert bool(out["params"].spatial[0].foreground[0])
    plain = augment.Compose([augment.RandomCrop(16)])
    hits = sum(plain(image=img, label=lab, rng=rng)["label"].any() for _ in range(20))
    assert hits < 10


def centre_classes(aug, lab, n, **context):
    """The label class at the patch centre of ``n`` draws (odd patch: a voxel)."""
    rng = np.random.default_rng(11)
    half = (np.asarray(aug.spatial[0].size) - 1) // 2
    out = []
    for _ in range(n):
        p = aug.sample(rng, lab.shape, **context)
        assert bool(p.spatial[0].foreground[0])
        out.append(int(lab[tuple(p.spatial[0].start[0] + half)]))
    return np.asarray(out)


def test_foreground_classes_are_drawn_uniformly():
    """nnU-Net's rule: a class uniformly among those present, then one of its voxels; a
    class of 8 voxels is centred on as often as one of 27000."""
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[5:35, 5:35, 5:35] = 1
    lab[36:38, 36:38, 36:38] = 3
    aug = augment.Compose([augment.RandomCrop(9, foreground=1.0)])
    n = 400
    from_label = centre_classes(aug, lab, n, label=lab)
    assert set(from_label) == {1, 3}
    assert abs(np.mean(from_label == 3) - 0.5) < 4 * np.sqrt(0.25 / n)
    # the cache's context: stored points with their classes
    pts = np.argwhere(lab > 0)
    cls = lab[tuple(pts.T)]
    from_points = centre_classes(aug, lab, n, fg_points=pts, fg_classes=cls)
    assert abs(np.mean(from_points == 3) - 0.5) < 4 * np.sqrt(0.25 / n)
    # points without classes are one class: the small one is hit in proportion
    plain = centre_classes(aug, lab, n, fg_points=pts)
    assert np.mean(plain == 3) < 0.02
    with pytest.raises(ValueError, match="fg_classes needs one class per fg_points row"):
        aug.sample(np.random.default_rng(0), lab.shape, fg_points=pts, fg_classes=cls[:5])


def test_foreground_falls_back_to_uniform_without_foreground():
    aug = augment.Compose([augment.RandomCrop(8, foreground=1.0)])
    empty = np.zeros((20, 20, 20), np.uint8)
    rng = np.random.default_rng(12)
    for context in ({"label": empty}, {"fg_points": np.zeros((0, 3))}, {}):
        p = aug.sample(rng, empty.shape, **context)
        start = p.spatial[0].start[0]
        assert not p.spatial[0].foreground[0] and np.all((start >= 0) & (start <= 12))


def test_linear_onehot_label_mode():
    rng = np.random.default_rng(7)
    img, lab = volume(rng)
    nearest = augment.Compose([augment.RandomAffine(15, (0.9, 1.1))])
    smooth = augment.Compose([augment.RandomAffine(15, (0.9, 1.1))], label_mode="linear_onehot")
    a = nearest(image=img, label=lab, rng=np.random.default_rng(1))
    b = smooth(image=img, label=lab, params=a["params"])
    assert b["label"].dtype == np.uint8
    assert (a["label"] != b["label"]).mean() < 0.02
    assert a["image"].tobytes() == b["image"].tobytes()


def test_image_label_shape_mismatch_and_bad_rng():
    aug = augment.Compose([augment.RandomFlip()])
    with pytest.raises(ValueError, match="shapes differ"):
        aug(
            image=np.zeros((4, 4, 4), np.float32),
            label=np.zeros((4, 4, 5), np.uint8),
            rng=np.random.default_rng(0),
        )
    with pytest.raises(TypeError, match="Generator"):
        aug(image=np.zeros((4, 4, 4), np.float32), rng=np.random.RandomState(0))
    with pytest.raises(TypeError, match="label has unsupported dtype float32"):
        aug(
            image=np.zeros((4, 4, 4), np.float32),
            label=np.zeros((4, 4, 4), np.float32),
            rng=np.random.default_rng(0),
        )
    with pytest.raises(ValueError, match="equal sizes"):
        augment.Compose([augment.RandomSwapAxes()])(
            image=np.zeros((4, 4, 5), np.float32), rng=np.random.default_rng(0)
        )


def test_no_global_rng_use():
    # the legacy global RNG is touched here on purpose: to show the library never is
    np.random.seed(123)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    img, lab = volume(np.random.default_rng(0))
    aug = augment.Compose([*SPATIAL, augment.RandomNoise(p=1.0), augment.RandomGamma(p=1.0)])
    aug(image=img[:24, :24, :24], label=lab[:24, :24, :24], rng=np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002


def test_sample_rng_is_keyed_not_ordered():
    a = [augment.sample_rng(7, 1, i).random() for i in range(5)]
    b = [augment.sample_rng(7, 1, i).random() for i in reversed(range(5))][::-1]
    assert a == b
    assert augment.sample_rng(7, 1, 0).random() != augment.sample_rng(7, 2, 0).random()
    with pytest.raises(ValueError, match="seed"):
        augment.sample_rng(-1, 0, 0)
