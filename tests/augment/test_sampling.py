"""Parameter sampling: each transform draws its documented sequence from the sample's
generator (written out here call by call), replays exactly, and a batch is the same
whatever the order its samples are drawn in."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import augment
from augment.intensity import RandomBrightness, RandomContrast, RandomGamma, RandomNoise
from augment.spatial import RandomAffine, RandomCrop, RandomFlip

SEEDS = range(40)


def _same(a: object, b: object) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):  # type: ignore[arg-type]
        x, y = np.asarray(getattr(a, f.name)), np.asarray(getattr(b, f.name))
        assert x.dtype == y.dtype and x.shape == y.shape, f.name
        assert np.array_equal(x, y), (f.name, x, y)


def _affine_reference(t: RandomAffine, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """RandomAffine's documented draw order, one generator call per number."""
    on = rng.random() < t.p
    rot = on and rng.random() < t.p_rotate
    scl = on and rng.random() < t.p_scale
    angles = np.array([rng.uniform(*r) for r in t.degrees]) * (np.pi / 180.0)
    if t.isotropic:
        s = rng.uniform(*t.scale[0])
        scale = np.array([s, s, s])
    else:
        scale = np.array([rng.uniform(*r) for r in t.scale])
    shear = np.array([rng.uniform(*t.shear) for _ in range(6)])
    translate = np.array([rng.uniform(*r) for r in t.translate])
    return {
        "angles": (angles if rot else np.zeros(3))[None],
        "scale": (scale if scl else np.ones(3))[None],
        "shear": (shear if on else np.zeros(6))[None],
        "translate": (translate if on else np.zeros(3))[None],
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(degrees=15, scale=(0.85, 1.25)),
        dict(
            degrees=(5, (-10, 20), 0),
            scale=((0.9, 1.1), (0.8, 1.2), (1.0, 1.0)),
            isotropic=False,
        ),
        dict(degrees=30, scale=(0.7, 1.4), shear=0.1, translate=(2, 3, 4), p=0.6, p_rotate=0.5),
        dict(degrees=10, p=0.0),
    ],
)
def test_affine_draws_its_documented_sequence(kwargs: dict) -> None:
    t = RandomAffine(**kwargs)
    for seed in SEEDS:
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        got = t.sample(a, (50, 60, 70))
        want = _affine_reference(t, b)
        for name, value in want.items():
            assert np.array_equal(getattr(got, name), value), (seed, name)
        assert a.random() == b.random()  # the generators stay in step


def test_crop_and_flip_draw_their_documented_sequence() -> None:
    crop = RandomCrop((8, 40, 12))
    flip = RandomFlip(axes=(2, 0), p=(0.3, 0.8))
    shape = (30, 20, 12)  # axis 1 has no room: centred, nothing drawn for it
    for seed in SEEDS:
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        got_c, got_f = crop.sample(a, shape), flip.sample(a, shape)
        start = [int(b.integers(0, 30 - 8 + 1)), (20 - 40) // 2, int(b.integers(0, 1))]
        f = np.zeros(3, bool)
        f[2] = b.random() < 0.3
        f[0] = b.random() < 0.8
        assert got_c.start.tolist() == [start] and got_c.start.dtype == np.int64
        assert got_f.flip.tolist() == [f.tolist()]
        assert a.random() == b.random()


def test_foreground_classes_are_drawn_as_documented() -> None:
    """A class uniformly among the sorted classes present, then one of its points."""
    rng = np.random.default_rng(0)
    points = rng.integers(0, 50, size=(500, 3))
    for dtype in (np.uint8, np.int32):
        classes_of = rng.choice([2, 5, 9], size=500).astype(dtype)
        crop = RandomCrop(10, foreground=1.0)
        for seed in SEEDS:
            a, b = np.random.default_rng(seed), np.random.default_rng(seed)
            got = crop.sample(a, (50, 50, 50), fg_points=points, fg_classes=classes_of)
            assert b.random() < 1.0
            k = [2, 5, 9][int(b.integers(3))]
            members = np.flatnonzero(classes_of == k)
            point = points[members[int(b.integers(len(members)))]]
            assert got.start.tolist() == [(point - 9 // 2).tolist()]
            assert bool(got.foreground[0])


def test_intensity_transforms_draw_their_documented_sequence() -> None:
    gamma, gamma_hi = RandomGamma((0.7, 1.5), p=0.5), RandomGamma((1.2, 1.5), p=0.5)
    noise, contrast = RandomNoise((0.0, 0.1), p=0.5), RandomContrast((0.75, 1.25), p=0.5)
    bright = RandomBrightness((-0.2, 0.2), p=0.5, additive=True)
    for seed in SEEDS:
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        got = [t.sample(a) for t in (gamma, gamma_hi, noise, contrast, bright)]
        on = b.random() < 0.5
        g = b.uniform(0.7, 1.0) if b.random() < 0.5 else b.uniform(1.0, 1.5)
        assert got[0].gamma.tolist() == [g if on else 1.0] and got[0].active.tolist() == [on]
        on = b.random() < 0.5
        g = b.uniform(1.2, 1.5)
        assert got[1].gamma.tolist() == [g if on else 1.0]
        on = b.random() < 0.5
        sigma = b.uniform(0.0, 0.1)
        seed_n = int(b.integers(0, 2**32))
        assert got[2].std.tolist() == [sigma if on else 0.0] and got[2].seed.tolist() == [seed_n]
        on = b.random() < 0.5
        f = b.uniform(0.75, 1.25)
        assert got[3].factor.tolist() == [f if on else 1.0]
        on = b.random() < 0.5
        f = b.uniform(-0.2, 0.2)
        assert got[4].factor.tolist() == [f if on else 0.0]
        assert a.random() == b.random()


def _pipeline() -> augment.Compose:
    return augment.Compose(
        [
            augment.RandomCrop((12, 16, 16), foreground=0.5),
            augment.RandomAffine(degrees=20, scale=(0.8, 1.2), shear=0.05),
            augment.RandomFlip(p=0.5),
            augment.Window(-100, 200),
            augment.RandomGamma((0.7, 1.5), p=0.5),
            augment.RandomNoise((0.0, 0.1), p=0.5),
            augment.RandomContrast((0.75, 1.25), p=0.5),
        ]
    )


def test_samples_depend_on_their_key_only_and_replay_exactly() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(size=(30, 40, 40)).astype(np.float32)
    lab = (img > 1.0).astype(np.uint8)
    aug = _pipeline()
    shape = img.shape
    keys = [(0, 0, i) for i in range(12)]
    forward = [aug.sample(augment.sample_rng(*k), shape, label=lab) for k in keys]
    backward = [aug.sample(augment.sample_rng(*k), shape, label=lab) for k in reversed(keys)]
    for a, b in zip(forward, reversed(backward), strict=True):
        for pa, pb in zip(a.spatial + a.intensity, b.spatial + b.intensity, strict=True):
            _same(pa, pb)
    batch = augment.stack_params(forward)
    for i, single in enumerate(forward):
        for pa, pb in zip(
            batch.take(i).spatial + batch.take(i).intensity,
            single.spatial + single.intensity,
            strict=True,
        ):
            _same(pa, pb)
    for k in keys[:4]:
        out = aug(image=img, label=lab, rng=augment.sample_rng(*k))
        again = aug(image=img, label=lab, params=out["params"])
        assert np.array_equal(out["image"].view(np.uint32), again["image"].view(np.uint32))
        assert np.array_equal(out["label"], again["label"])
