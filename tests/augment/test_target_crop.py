"""TargetCrop against a plain reading of the DSB2017 crop + augment semantics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import augment
from augment import matrices as mx


def blob_volume(shape, centre, radius):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
    img = np.full(shape, 20.0, np.float32)
    img[r2 <= radius**2] = 1000.0
    lab = (r2 <= radius**2).astype(np.uint8)
    return img, lab


def test_target_inside_with_bound_margin_without_scale_or_rotation():
    shape, target = (90, 100, 110), np.array([40.0, 52.0, 61.0, 10.0])
    img, _ = blob_volume(shape, target[:3], 5)
    crop = augment.TargetCrop(48, bound_size=12, scale=None, rotate=False, swap=False, flip_axes=())
    aug = augment.Compose([crop])
    rng = np.random.default_rng(0)
    for _ in range(30):
        out = aug(image=img, rng=rng, target=target)
        start = out["params"].spatial[0].start[0]
        r = target[3] / 2
        # DSB2017: start in [ceil(t + r) + 1 + b - crop, floor(t - r) + 1 - b)
        assert np.all(start >= np.ceil(target[:3] + r) + 1 + 12 - 48)
        assert np.all(start < np.floor(target[:3] - r) + 1 - 12)
        t = out["target"]
        np.testing.assert_allclose(t[:3], target[:3] - start)
        assert np.all(t[:3] - r >= 12 - 1) and np.all(t[:3] + r <= 48 - 12)
        # pure integer crop: exact copy, blob intensity at the target
        assert out["image"][tuple(np.rint(t[:3]).astype(int))] == 1000.0


def test_pad_value_outside_volume():
    shape = (40, 40, 40)
    img = np.zeros(shape, np.float32)
    target = np.array([3.0, 3.0, 3.0, 4.0])  # near the corner: the crop sticks out
    aug = augment.Compose(
        [
            augment.TargetCrop(
                32, bound_size=2, scale=None, rotate=False, swap=False, flip_axes=(), pad_value=170
            )
        ]
    )
    out = aug(image=img, rng=np.random.default_rng(1), target=target)
    start = out["params"].spatial[0].start[0].astype(int)
    assert np.any(start < 0)
    expect = np.full((32, 32, 32), 170.0, np.float32)
    lo = np.maximum(-start, 0)
    hi = np.minimum(shape - start, 32)
    expect[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 0.0
    np.testing.assert_array_equal(out["image"], expect)


def test_scale_keeps_diameter_within_limits():
    crop = augment.TargetCrop(64, scale=(0.75, 1.25), diameter_limits=(8.0, 120.0))
    assert crop._scale_range(4.0) == (1.0, 1.25)  # small nodules only zoom in
    assert crop._scale_range(200.0) == (0.75, 1.0)  # huge ones only zoom out
    lo, hi = crop._scale_range(20.0)
    assert (lo, hi) == (0.75, 1.25)
    img, _ = blob_volume((80, 80, 80), (40, 40, 40), 3)
    aug = augment.Compose([crop])
    rng = np.random.default_rng(2)
    for _ in range(10):
        out = aug(image=img, rng=rng, target=[40, 40, 40, 6.0])
        s = float(out["params"].spatial[0].scale[0])
        assert 1.0 <= s <= 1.25
        assert out["target"][3] == pytest.approx(6.0 * s)


def test_rotation_keeps_target_one_diameter_inside_and_tracks_it():
    shape, target = (100, 120, 120), np.array([50.0, 60.0, 58.0, 8.0])
    img, _ = blob_volume(shape, target[:3], 4)
    aug = augment.Compose(
        [
            augment.TargetCrop(
                48, bound_size=12, scale=(0.75, 1.25), rotate=True, swap=True, flip_axes=(1, 2)
            )
        ]
    )
    rng = np.random.default_rng(3)
    rotated = 0
    for _ in range(20):
        out = aug(image=img, rng=rng, target=target)
        p = out["params"].spatial[0]
        t = out["target"]
        if p.angle[0] != 0.0:
            rotated += 1
            assert np.all(t[:3] > t[3]) and np.all(t[:3] < 48 - t[3])
        # the blob centre lands at the returned coordinates
        idx = tuple(np.clip(np.rint(t[:3]).astype(int), 0, 47))
        assert out["image"][idx] > 900.0
    assert rotated > 10


def test_swap_only_for_cubic_patches():
    assert augment.TargetCrop((32, 32, 32)).swap
    assert not augment.TargetCrop((32, 32, 48)).swap


def test_coord_channel_values():
    shape = (64, 64, 64)
    img = np.zeros(shape, np.float32)
    crop = augment.TargetCrop(
        32, bound_size=4, scale=None, rotate=False, swap=False, flip_axes=(), coord_stride=4
    )
    out = augment.Compose([crop])(image=img, rng=np.random.default_rng(4), target=[30, 31, 32, 6])
    coord = out["coord"]
    assert coord.shape == (3, 8, 8, 8) and coord.dtype == np.float32
    start = out["params"].spatial[0].start[0]
    # DSB2017: normalised source position (index / shape - 0.5) of each stride cell
    centres = np.arange(8) * 4 + 1.5
    for axis in range(3):
        expect = (start[axis] + centres) / 64 - 0.5
        sl = [0, 0, 0]
        sl[axis] = slice(None)
        np.testing.assert_allclose(coord[(axis, *sl)], expect, rtol=1e-6)


def test_coord_channel_follows_flip():
    img = np.zeros((64, 64, 64), np.float32)
    kw = dict(bound_size=4, scale=None, rotate=False, swap=False, coord_stride=4)
    aug = augment.Compose([augment.TargetCrop(32, flip_axes=(2,), p_flip=1.0, **kw)])
    plain = augment.Compose([augment.TargetCrop(32, flip_axes=(), **kw)])
    a = aug(image=img, rng=np.random.default_rng(5), target=[30, 31, 32, 6])
    pa = a["params"].spatial[0]
    assert bool(pa.flip[0, 2])
    unflipped = dataclasses.replace(pa, flip=np.zeros_like(pa.flip))
    b = plain(
        image=img,
        params=augment.ComposeParams(
            spatial=(unflipped,), intensity=(), in_shape=a["params"].in_shape
        ),
        target=[30, 31, 32, 6],
    )
    # same crop, the flipped coordinate channel is the mirror image along x
    m_plain = plain.matrix(b["params"])[0]
    assert np.allclose(mx.apply_points(m_plain, [0, 0, 0]), a["params"].spatial[0].start[0])
    np.testing.assert_allclose(a["coord"], np.flip(b["coord"], axis=3), rtol=1e-6)


def test_random_crop_without_target():
    img = np.zeros((50, 50, 50), np.float32)
    out = augment.Compose([augment.TargetCrop(32, scale=None)])(
        image=img, rng=np.random.default_rng(6)
    )
    assert out["image"].shape == (32, 32, 32)
    assert "target" not in out


def test_bad_target_and_stride():
    with pytest.raises(ValueError, match="target"):
        augment.Compose([augment.TargetCrop(16)])(
            image=np.zeros((20, 20, 20), np.float32), rng=np.random.default_rng(0), target=[1, 2, 3]
        )
    with pytest.raises(ValueError, match="coord_stride"):
        augment.TargetCrop(30, coord_stride=4)


def test_targets_context_picks_a_target_and_the_params_record_it():
    shape = (60, 64, 64)
    targets = np.array([[20.0, 22.0, 30.0, 8.0], [40.0, 40.0, 36.0, 6.0]])
    img, _ = blob_volume(shape, targets[0, :3], 4)
    rng = np.random.default_rng(2)
    chosen = []
    crop = augment.TargetCrop(
        24, bound_size=2, scale=None, rotate=False, swap=False, flip_axes=(), p_target=1.0
    )
    aug = augment.Compose([crop])
    for _ in range(40):
        out = aug(image=img, rng=rng, targets=targets)
        recorded = out["params"].spatial[0].target[0]
        k = [i for i, t in enumerate(targets) if np.array_equal(t, recorded)]
        assert len(k) == 1
        chosen.append(k[0])
        # the recorded target is mapped again on a replay without any context
        again = aug(image=img, params=out["params"])
        np.testing.assert_allclose(again["target"], out["target"])
        # and it is where a plain crop puts it: the crop's start subtracted
        start = out["params"].spatial[0].start[0]
        np.testing.assert_allclose(out["target"], [*(recorded[:3] - start), recorded[3]])
    assert 0 < sum(chosen) < 40  # both targets drawn
    never = augment.Compose([augment.TargetCrop(24, p_target=0.0)])
    out = never(image=img, rng=rng, targets=targets)
    assert np.isnan(out["params"].spatial[0].target).all() and "target" not in out
    with pytest.raises(ValueError, match="p_target"):
        augment.TargetCrop(24, p_target=1.5)
