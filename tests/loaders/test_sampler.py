"""PatchSampler: a patch from its cache region equals the patch from the whole volume, reads
are bounded by the footprint, centres follow the foreground fraction, draws are keyed by
(seed, epoch, index)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import augment
from augment import matrices as mx
from loaders import VolumeCache
from loaders.phantom import write_msd_dataset
from loaders.sampler import PatchSampler, clip_box, footprint

PATCH = (15, 21, 19)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> VolumeCache:
    """Two tiny phantom cases (24x40x40, liver and tumour labels)."""
    root = tmp_path_factory.mktemp("sampler")
    cases = write_msd_dataset(root / "ds", n_train=2, seed=3, size=(24, 40, 40))
    cache = VolumeCache(root / "cache.zarr")
    cache.build(cases, workers=1, progress=False)
    return cache


@pytest.fixture(scope="module")
def volumes(cache: VolumeCache) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {c: (cache.read(c), cache.read(c, array="label")) for c in cache.cases}


def pipeline(patch=PATCH, foreground=0.0, **kw) -> augment.Compose:
    return augment.Compose(
        [
            augment.RandomCrop(patch, foreground=foreground),
            augment.RandomAffine(degrees=25, scale=(0.7, 1.3), shear=0.05),
            augment.RandomFlip(axes=(0, 1, 2), p=0.5),
            augment.Window(-200, 250),
            augment.RandomNoise((0.0, 0.1), p=0.5),
            augment.RandomContrast((0.75, 1.25), p=0.5),
        ],
        **kw,
    )


def test_region_patch_equals_whole_volume_patch(cache, volumes):
    sampler = PatchSampler(cache, pipeline(foreground=0.5, cval=-1024), seed=11)
    outside = 0
    for i in range(40):
        out = sampler.sample(0, i)
        img, lab = volumes[out["case"]]
        ref = sampler.compose(image=img, label=lab, params=out["params"])
        assert out["image"].shape == (1, *PATCH) and out["image"].dtype == np.float32
        assert out["label"].shape == (1, *PATCH) and out["label"].dtype == np.uint8
        np.testing.assert_allclose(out["image"][0], ref["image"], rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(out["label"][0], ref["label"])
        m = sampler.compose.matrix(out["params"])[0]
        start, stop = footprint(m, PATCH)
        outside += bool(np.any(np.asarray(start) < 0) or np.any(np.asarray(stop) > img.shape))
    assert outside >= 5, "the draws should include patches that stick out of the volume"


def test_region_patch_equals_whole_volume_patch_with_a_deformation(cache, volumes):
    """The region also covers how far the elastic displacement moves samples."""
    aug = augment.Compose(
        [*pipeline(cval=-1024).transforms[:3], augment.RandomElastic(points=4, magnitude=4.0)],
        cval=-1024,
    )
    sampler = PatchSampler(cache, aug, seed=12)
    for i in range(12):
        out = sampler.sample(0, i)
        img, lab = volumes[out["case"]]
        ref = sampler.compose(image=img, label=lab, params=out["params"])
        np.testing.assert_allclose(out["image"][0], ref["image"], rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(out["label"][0], ref["label"])


def test_reads_only_the_footprint(cache, volumes, monkeypatch):
    sampler = PatchSampler(cache, pipeline(foreground=0.5), seed=2)
    reads: list[tuple[str, tuple, tuple, str]] = []
    real = cache.read_region

    def spy(case, region, *, array="image", **kw):
        reads.append((case, tuple(region[0]), tuple(region[1]), array))
        return real(case, region, array=array, **kw)

    monkeypatch.setattr(cache, "read_region", spy)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in PATCH], indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    for i in range(10):
        reads.clear()
        d = sampler.draw(0, i)
        out = sampler.sample(0, i)
        assert [r[3] for r in reads] == ["image", "label"]
        case, start, stop, _ = reads[0]
        assert case == d.case and reads[1][1:3] == (start, stop)
        shape = cache.shape(case)
        # every tap of every output voxel, computed independently, clipped to the volume
        c = mx.apply_points(sampler.compose.matrix(out["params"])[0], grid)
        lo = np.clip(np.floor(c).min(0), 0, np.asarray(shape) - 1).astype(int)
        hi = np.clip(np.floor(c).max(0) + 2, lo + 1, shape).astype(int)
        assert np.all(np.asarray(start) <= lo) and np.all(np.asarray(stop) >= hi)
        assert np.all(np.asarray(start) >= lo - 1) and np.all(np.asarray(stop) <= hi + 1)
        assert np.prod(np.subtract(stop, start)) < np.prod(shape)


def test_sample_region_then_compose_equals_sample(cache):
    sampler = PatchSampler(cache, pipeline(cval=-1024), seed=5)
    for i in range(4):
        reg = sampler.sample_region(1, i)
        assert reg["image"].dtype == np.int16 and reg["label"].dtype == np.uint8
        again = sampler.compose(
            image=reg["image"],
            label=reg["label"],
            params=reg["params"],
            offset=reg["offset"],
            in_shape=reg["in_shape"],
        )
        out = sampler.sample(1, i)
        np.testing.assert_array_equal(again["image"], out["image"])
        np.testing.assert_array_equal(again["label"], out["label"])


def test_draws_are_keyed_by_seed_epoch_index(cache):
    sampler = PatchSampler(cache, pipeline(), seed=7)
    a, b = sampler.sample(3, 9), sampler.sample(3, 9)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["params"].as_dict() == b["params"].as_dict()
    assert sampler.draw(4, 9).params.as_dict() != a["params"].as_dict()
    other = PatchSampler(cache, pipeline(), seed=8)
    assert other.draw(3, 9).params.as_dict() != a["params"].as_dict()
    clone = pickle.loads(pickle.dumps(sampler))
    np.testing.assert_array_equal(clone.sample(3, 9)["image"], a["image"])


def crop_then(size, foreground, *rest) -> augment.Compose:
    return augment.Compose([augment.RandomCrop(size, foreground=foreground), *rest])


def test_foreground_fraction_and_centres(cache, volumes):
    odd = (9, 11, 13)  # odd sizes: the patch centre is a voxel and maps onto the chosen one
    rot = augment.RandomAffine(degrees=30)
    always = PatchSampler(cache, crop_then(odd, 1.0, rot), seed=1)
    for i in range(12):
        out = always.sample(0, i)
        assert bool(out["params"].spatial[0].foreground[0])
        assert out["label"][0][tuple((n - 1) // 2 for n in odd)] > 0
    never = PatchSampler(cache, crop_then(odd, 0.0, rot), seed=1)
    for i in range(30):
        d = never.draw(0, i)
        start = d.params.spatial[0].start[0]
        assert np.all(start >= 0) and np.all(start + odd <= cache.shape(d.case))
    # the README's crop, unchanged, in the sampler
    third = PatchSampler(cache, crop_then(odd, 1 / 3, rot), seed=1)
    n = 600
    fg = sum(bool(third.draw(0, i).params.spatial[0].foreground[0]) for i in range(n))
    assert abs(fg / n - 1 / 3) < 4 * np.sqrt(1 / 3 * 2 / 3 / n)


def test_draw_is_the_compose_sample_with_the_case_context(cache):
    """One owner: the sampler picks the case, the Compose draws everything else."""
    aug = pipeline(foreground=0.5)
    sampler = PatchSampler(cache, aug, seed=9)
    for i in range(20):
        d = sampler.draw(2, i)
        rng = augment.sample_rng(9, 2, i)
        case = sampler.cases[int(rng.integers(len(sampler.cases)))]
        info = cache.info(case)
        ref = aug.sample(
            rng, cache.shape(case), fg_points=info.fg_indices, fg_classes=info.fg_classes
        )
        assert d.case == case
        assert d.params.as_dict() == ref.as_dict()
        np.testing.assert_array_equal(d.plan.matrices, mx.to_3x4(aug.matrix(ref)))


def test_the_region_read_reuses_the_plan(cache, monkeypatch):
    sampler = PatchSampler(cache, pipeline(foreground=0.5), seed=6)
    calls = []
    real = sampler.compose.matrix

    def spy(params):
        calls.append(params.batch)
        return real(params)

    monkeypatch.setattr(sampler.compose, "matrix", spy)
    for i in range(3):
        calls.clear()
        sampler.sample(0, i)
        assert calls == [1], "one matrix per sample: the region and the warp share the plan"


def test_foreground_on_the_sampler_says_where_it_went(cache):
    with pytest.raises(TypeError, match=r"augment.RandomCrop\(size, foreground=0.33"):
        PatchSampler(cache, pipeline(), foreground=0.33)


def test_foreground_classes_are_balanced(cache):
    aug = crop_then(PATCH, 1.0)
    has_two = [c for c in cache.cases if len(np.unique(cache.info(c).fg_classes)) == 2]
    if not has_two:
        pytest.skip("the phantom cases drew no tumour")
    counts = {1: 0, 2: 0}
    sampler = PatchSampler(cache, aug, cases=has_two[:1], seed=0)
    lab = cache.read(has_two[0], array="label")
    for i in range(200):
        start = sampler.draw(0, i).params.spatial[0].start[0]
        centre = tuple(start + (np.asarray(PATCH) - 1) // 2)
        counts[int(lab[centre])] += 1
    assert 0.35 < counts[2] / 200 < 0.65, counts  # classes drawn uniformly, as nnU-Net


def test_case_weights(cache):
    a, b = cache.cases
    sampler = PatchSampler(cache, pipeline(), case_weights={a: 1.0, b: 0.0})
    assert {sampler.draw(0, i).case for i in range(20)} == {a}
    sampler = PatchSampler(cache, pipeline(), case_weights=[1.0, 3.0])
    share = np.mean([sampler.draw(0, i).case == b for i in range(400)])
    assert 0.65 < share < 0.85


def test_target_crop_patch(cache, volumes):
    case = cache.cases[0]
    target = np.array([12.0, 20.0, 18.0, 6.0])
    tc = augment.TargetCrop(
        16, bound_size=2, scale=(0.8, 1.2), diameter_limits=(4, 12), pad_value=170, coord_stride=4
    )
    aug = augment.Compose([tc])
    sampler = PatchSampler(cache, aug, cases=[case], targets={case: [target]})
    img, lab = volumes[case]
    for i in range(6):
        out = sampler.sample(0, i)
        ref = aug(image=img, label=lab, params=out["params"], target=target)
        np.testing.assert_allclose(out["image"][0], ref["image"], atol=1e-4)
        np.testing.assert_array_equal(out["label"][0], ref["label"])
        np.testing.assert_allclose(out["target"], ref["target"])
        np.testing.assert_allclose(out["coord"], ref["coord"])
        assert np.all(out["target"][:3] >= 0) and np.all(out["target"][:3] < 16)


def test_target_crop_probability_is_the_crop_s(cache):
    case = cache.cases[0]
    targets = {case: [[12.0, 20.0, 18.0, 6.0], [10.0, 15.0, 22.0, 4.0]]}
    picked = []
    for p in (0.0, 0.5, 1.0):
        aug = augment.Compose([augment.TargetCrop(16, bound_size=2, p_target=p)])
        sampler = PatchSampler(cache, aug, cases=[case], targets=targets, seed=3)
        draws = [sampler.draw(0, i) for i in range(200)]
        picked.append(np.mean([d.target is not None for d in draws]))
        for d in draws:
            if d.target is not None:
                assert any(np.array_equal(d.target, t) for t in np.asarray(targets[case]))
    assert picked[0] == 0.0 and picked[2] == 1.0
    assert 0.4 < picked[1] < 0.6


def test_clip_box_never_empty():
    assert clip_box(((-9, 2, 3), (-4, 5, 50)), (10, 10, 10)) == ((0, 2, 3), (1, 5, 10))
    assert clip_box(((12, 0, 0), (20, 4, 4)), (10, 10, 10)) == ((9, 0, 0), (10, 4, 4))


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            dict(compose=augment.Compose([augment.RandomAffine(10), augment.RandomCrop(8)])),
            "first spatial transform",
        ),
        (dict(cases=["nope"]), "not in the cache"),
        (dict(case_weights=[1.0]), "one weight per case"),
        (dict(case_weights=[0.0, 0.0]), "not all 0"),
        (dict(seed=-1), "seed must be"),
    ],
)
def test_errors_name_the_problem(cache, bad, match):
    kw = {"compose": augment.Compose([augment.RandomCrop(8)]), **bad}
    with pytest.raises(ValueError, match=match):
        PatchSampler(cache, **kw)


def test_sample_into_given_arrays(cache):
    sampler = PatchSampler(cache, pipeline(cval=-1024), seed=4)
    img = np.full((1, *PATCH), np.nan, np.float32)
    lab = np.full((1, *PATCH), 77, np.uint8)
    out = sampler.sample(2, 5, out_image=img, out_label=lab)
    assert out["image"] is img and out["label"] is lab
    ref = sampler.sample(2, 5)
    np.testing.assert_array_equal(img, ref["image"])
    np.testing.assert_array_equal(lab, ref["label"])
    with pytest.raises(ValueError, match="out_image must be"):
        sampler.sample(2, 5, out_image=np.empty((1, 4, 4, 4), np.float32))
    flat_img, flat_lab = np.zeros(10**5, np.int16), np.zeros(10**5, np.uint8)
    reg = sampler.sample_region(2, 5, out_image=flat_img, out_label=flat_lab)
    assert np.shares_memory(reg["image"], flat_img) and np.shares_memory(reg["label"], flat_lab)
    small = sampler.sample_region(2, 5, out_image=flat_img[:10], out_label=flat_lab[:10])
    assert not np.shares_memory(small["image"], flat_img)
    np.testing.assert_array_equal(small["image"], reg["image"])
