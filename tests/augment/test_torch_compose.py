"""``Compose`` on torch batches equals ``Compose`` on numpy, sample by sample, for the same
generators (the vectorisation gate), on CPU tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import augment
from augment import matrices as mx
from augment.rng import batch_rngs

REL = 1e-5


def rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    g = got.float().numpy().astype(np.float64)
    return float(np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-30))


def volumes(rng: np.random.Generator, shapes, channels: int = 1):
    imgs = [(rng.normal(0.0, 150.0, (channels, *s)) + 40.0).astype(np.float32) for s in shapes]
    labs = [rng.integers(0, 3, (1, *s)).astype(np.uint8) for s in shapes]
    return imgs, labs


def w2_like(patch=(10, 12, 14), **kw) -> augment.Compose:
    """Spatial W1 plus fused (window, gamma on a known range, noise) and post-warp
    (contrast about the patch mean) intensity transforms."""
    return augment.Compose(
        [
            augment.RandomCrop(patch),
            augment.RandomAffine(degrees=15, scale=(0.85, 1.25)),
            augment.RandomFlip(axes=(0, 1, 2), p=0.5),
            augment.Window(-200, 250),
            augment.RandomGamma((0.7, 1.5), p=0.5),
            augment.RandomNoise((0.0, 0.1), p=0.5),
            augment.RandomContrast((0.75, 1.25), p=0.5),
        ],
        **kw,
    )


def assert_same_as_numpy(aug, out, imgs, labs, seed, contexts=None):
    rngs = batch_rngs(seed, 0, range(len(imgs)))
    for b in range(len(imgs)):
        ctx = contexts[b] if contexts else {}
        ref = aug(image=imgs[b], label=None if labs is None else labs[b], rng=rngs[b], **ctx)
        assert rel_err(out["image"][b], ref["image"]) < REL
        if labs is not None:
            assert np.array_equal(out["label"][b].numpy(), ref["label"])
        single = out["params"].take(b)
        assert single.as_dict() == ref["params"].as_dict()


@pytest.mark.parametrize("as_list", [False, True])
def test_batch_equals_numpy_per_sample(as_list):
    rng = np.random.default_rng(0)
    shapes = (
        [(18, 20, 22)] * 4
        if not as_list
        else [(18, 20, 22), (15, 24, 19), (20, 14, 30), (16, 16, 16)]
    )
    imgs, labs = volumes(rng, shapes)
    aug = w2_like(cval=-7.0)
    if as_list:
        timg = [torch.from_numpy(i) for i in imgs]
        tlab = [torch.from_numpy(lab) for lab in labs]
    else:
        timg = torch.from_numpy(np.stack(imgs))
        tlab = torch.from_numpy(np.stack(labs))
    out = aug(image=timg, label=tlab, rng=batch_rngs(3, 0, range(4)))
    assert out["image"].shape == (4, 1, 10, 12, 14) and out["image"].dtype == torch.float32
    assert out["label"].dtype == torch.uint8
    assert_same_as_numpy(aug, out, imgs, labs, 3)
    # the batched params replay the call exactly
    again = aug(image=timg, label=tlab, params=out["params"])
    assert torch.equal(again["image"], out["image"]) and torch.equal(again["label"], out["label"])


def test_bfloat16_output():
    rng = np.random.default_rng(1)
    imgs, labs = volumes(rng, [(16, 16, 16)] * 2)
    timg = torch.from_numpy(np.stack(imgs))
    for aug in (w2_like(), augment.Compose([augment.RandomCrop(8), augment.Window(-200, 250)])):
        f32 = aug(image=timg, rng=batch_rngs(1, 0, range(2)))
        bf = aug(image=timg, rng=batch_rngs(1, 0, range(2)), out_dtype=torch.bfloat16)
        assert bf["image"].dtype == torch.bfloat16
        assert torch.equal(bf["image"], f32["image"].to(torch.bfloat16))


def test_region_offsets_and_source_shapes():
    """Sources given as regions of larger volumes (``offset``, ``in_shape`` per sample)."""
    rng = np.random.default_rng(2)
    full = [rng.normal(size=(1, 24, 26, 28)).astype(np.float32) for _ in range(2)]
    offsets = np.array([[2, 3, 4], [5, 0, 1]])
    regions = [
        f[:, o[0] : o[0] + 18, o[1] : o[1] + 20, o[2] : o[2] + 22]
        for f, o in zip(full, offsets, strict=True)
    ]
    regions = [np.ascontiguousarray(r) for r in regions]
    aug = augment.Compose(
        [augment.RandomCrop((8, 9, 10)), augment.RandomAffine(degrees=10, scale=(0.9, 1.1))]
    )
    out = aug(
        image=[torch.from_numpy(r) for r in regions],
        rng=batch_rngs(4, 0, range(2)),
        offset=offsets,
        in_shape=(24, 26, 28),
    )
    ctxs = [{"offset": offsets[b], "in_shape": (24, 26, 28)} for b in range(2)]
    assert_same_as_numpy(aug, out, regions, None, 4, ctxs)


def test_target_crop_extras_per_sample():
    rng = np.random.default_rng(3)
    imgs, labs = volumes(rng, [(40, 40, 40)] * 3)
    targets = np.array([[20.0, 18.0, 22.0, 6.0], [15.0, 25.0, 20.0, 10.0], [22.0, 20.0, 19.0, 4.0]])
    points = [rng.uniform(5, 35, (4, 3)) for _ in range(3)]
    aug = augment.Compose([augment.TargetCrop(16, bound_size=2, coord_stride=4)])
    out = aug(
        image=torch.from_numpy(np.stack(imgs)),
        label=torch.from_numpy(np.stack(labs)),
        rng=batch_rngs(5, 0, range(3)),
        target=targets,
        points=points,
    )
    assert out["target"].shape == (3, 4)
    assert isinstance(out["coord"], torch.Tensor) and out["coord"].shape == (3, 3, 4, 4, 4)
    rngs = batch_rngs(5, 0, range(3))
    for b in range(3):
        ref = aug(image=imgs[b], label=labs[b], rng=rngs[b], target=targets[b], points=points[b])
        assert rel_err(out["image"][b], ref["image"]) < REL
        assert np.array_equal(out["label"][b].numpy(), ref["label"])
        np.testing.assert_allclose(out["target"][b], ref["target"])
        np.testing.assert_allclose(out["points"][b], ref["points"])
        np.testing.assert_array_equal(out["coord"][b].numpy(), ref["coord"])


def test_linear_onehot_labels():
    rng = np.random.default_rng(4)
    imgs, labs = volumes(rng, [(14, 15, 16), (16, 15, 14)])
    labs[1][labs[1] == 2] = 1  # a class absent from one sample
    aug = augment.Compose(
        [augment.RandomCrop((9, 9, 9)), augment.RandomAffine(degrees=20, scale=(0.8, 1.2))],
        label_mode="linear_onehot",
        label_cval=0,
    )
    out = aug(
        image=[torch.from_numpy(i) for i in imgs],
        label=[torch.from_numpy(lab) for lab in labs],
        rng=batch_rngs(6, 0, range(2)),
    )
    assert_same_as_numpy(aug, out, imgs, labs, 6)


def test_foreground_crop_reads_the_label():
    rng = np.random.default_rng(5)
    imgs, labs = volumes(rng, [(20, 20, 20)] * 3)
    aug = augment.Compose([augment.RandomCrop(8, foreground=1.0)])
    out = aug(
        image=torch.from_numpy(np.stack(imgs)),
        label=torch.from_numpy(np.stack(labs)),
        rng=batch_rngs(7, 0, range(3)),
    )
    assert out["params"].spatial[0].foreground.all()
    assert_same_as_numpy(aug, out, imgs, labs, 7)


class Peek(augment.SpatialTransform):
    """A user transform that does not say whether it reads the label (so it gets it)."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def sample(self, rng, in_shape, **context):
        self.seen.append(isinstance(context.get("label"), np.ndarray))
        return augment.spatial.FlipParams(flip=np.zeros((1, 3), bool))

    def matrix(self, params, in_shape):
        return mx.identity(1)


def test_the_label_goes_to_the_host_only_for_transforms_that_read_it(monkeypatch):
    from augment.backends import torch as torch_backend

    copies: list[int] = []
    real = torch_backend.Inputs.host_label

    def spy(self, index):
        copies.append(index)
        return real(self, index)

    monkeypatch.setattr(torch_backend.Inputs, "host_label", spy)
    rng = np.random.default_rng(9)
    imgs, labs = volumes(rng, [(10, 10, 10)] * 2)
    batch = dict(image=torch.from_numpy(np.stack(imgs)), label=torch.from_numpy(np.stack(labs)))
    gens = batch_rngs(0, 0, range(2))
    label_free = [
        augment.RandomAffine(degrees=5),
        augment.RandomFlip(),
        augment.RandomRot90(),
        augment.RandomSwapAxes(),
        augment.TargetCrop(8),
        augment.RandomCrop(8),
    ]
    assert not any(t.reads_label for t in label_free)
    augment.Compose(label_free)(**batch, rng=gens)
    assert copies == []
    augment.Compose([augment.RandomCrop(8, foreground=0.1)])(**batch, rng=gens)
    assert copies == [0, 1]
    copies.clear()
    peek = Peek()
    augment.Compose([peek, augment.RandomCrop(8)])(**batch, rng=gens)
    assert copies == [0, 1] and peek.seen == [True, True]
    peek.seen.clear()
    augment.Compose([peek, augment.RandomCrop(8)])(image=batch["image"], rng=gens)
    assert peek.seen == [False, False]


def test_exact_pipeline_is_bit_identical():
    rng = np.random.default_rng(6)
    imgs, labs = volumes(rng, [(12, 12, 12)] * 4, channels=2)
    aug = augment.Compose(
        [
            augment.RandomCrop(10),
            augment.RandomFlip(p=0.5),
            augment.RandomRot90(axes=(1, 2)),
            augment.RandomSwapAxes(),
        ]
    )
    out = aug(
        image=torch.from_numpy(np.stack(imgs)),
        label=torch.from_numpy(np.stack(labs)),
        rng=batch_rngs(8, 0, range(4)),
    )
    rngs = batch_rngs(8, 0, range(4))
    for b in range(4):
        ref = aug(image=imgs[b], label=labs[b], rng=rngs[b])
        assert np.array_equal(out["image"][b].numpy(), ref["image"])
        assert np.array_equal(out["label"][b].numpy(), ref["label"])


def test_patch_zscore_matches_numpy():
    rng = np.random.default_rng(7)
    imgs, _ = volumes(rng, [(12, 12, 12)] * 2)
    aug = augment.Compose([augment.RandomCrop(8), augment.Normalize("zscore")])
    out = aug(image=torch.from_numpy(np.stack(imgs)), rng=batch_rngs(9, 0, range(2)))
    assert_same_as_numpy(aug, out, imgs, None, 9)


def test_one_generator_for_the_batch_and_errors():
    rng = np.random.default_rng(8)
    imgs, _ = volumes(rng, [(12, 12, 12)] * 2)
    aug = augment.Compose([augment.RandomCrop(6), augment.RandomAffine(degrees=10)])
    a = aug(image=torch.from_numpy(np.stack(imgs)), rng=np.random.default_rng(1))
    b = aug(image=torch.from_numpy(np.stack(imgs)), rng=np.random.default_rng(1))
    assert torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError, match=r"x\[None\]"):
        aug(image=torch.from_numpy(imgs[0]), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="one output shape"):
        augment.Compose([augment.RandomAffine(degrees=5)])(
            image=[torch.zeros(1, 5, 5, 5), torch.zeros(1, 6, 5, 5)], rng=batch_rngs(0, 0, range(2))
        )
    with pytest.raises(TypeError, match="one per sample"):
        aug(image=torch.from_numpy(np.stack(imgs)), rng=batch_rngs(0, 0, range(3)))
    with pytest.raises(ValueError, match="params hold"):
        aug(image=torch.from_numpy(np.stack(imgs))[:1], params=a["params"])
