"""RandomGaussianBlur, RandomLowResolution and RandomBiasField against independent
references: ``scipy.ndimage.gaussian_filter``, ``scipy.ndimage.zoom`` down then up, and
the bias polynomial written out here; numpy and torch; in a Compose (after the warp,
replayable, the batch gate)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import augment
from augment.bias_field import BiasFieldParams
from augment.filters import BlurParams, LowResParams
from augment.rng import batch_rngs

REL = 1e-5


def rel_err(got, ref):
    g = np.asarray(got, dtype=np.float64)
    return float(np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-30))


def patch(rng, shape=(2, 13, 17, 20)):
    return rng.normal(40.0, 30.0, shape).astype(np.float32)


def both(t, x, params):
    """``t.apply`` on numpy and on a CPU tensor."""
    return t.apply(x, params), t.apply(torch.from_numpy(x), params).numpy()


# -- blur -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sigma", [(0.7, 0.7, 0.7), (1.3, 0.0, 2.2), (0.0, 0.0, 0.45), (3.5, 1.0, 0.8)]
)
def test_blur_equals_scipy_gaussian_filter(sigma):
    rng = np.random.default_rng(0)
    x = patch(rng, (2, 3, 17, 20))  # 3 planes: a radius wider than the axis reflects again
    t = augment.RandomGaussianBlur((0.1, 5.0), p=1.0)
    params = BlurParams(active=np.array([True]), sigma=np.array([sigma]))
    for got in both(t, x, params):
        assert got.shape == x.shape and got.dtype == np.float32
        for c in range(2):
            ref = ndi.gaussian_filter(x[c].astype(np.float64), sigma, mode="reflect", truncate=4.0)
            assert rel_err(got[c], ref) < REL


def test_blur_draws_and_gating():
    t = augment.RandomGaussianBlur((0.5, 1.0), p=0.5, axes=(1, 2))
    drawn = [t.sample(np.random.default_rng(s)) for s in range(20)]
    on = [bool(p.active[0]) for p in drawn]
    assert any(on) and not all(on)
    for p, a in zip(drawn, on, strict=True):
        assert p.sigma[0, 0] == 0.0
        if a:
            assert 0.5 <= p.sigma[0, 1] <= 1.0 and p.sigma[0, 1] != p.sigma[0, 2]
            assert t.program(p, None) is None  # after the warp
        else:
            assert not p.sigma.any() and len(t.program(p, None)) == 0  # stays fused
    iso = augment.RandomGaussianBlur((0.5, 1.0), p=1.0, isotropic=True)
    s = iso.sample(np.random.default_rng(0)).sigma[0]
    assert s[0] == s[1] == s[2]


# -- low resolution ---------------------------------------------------------------------------
def scipy_low_resolution(x, factors, order_down, order_up):
    low = ndi.zoom(x, factors, order=order_down, grid_mode=True, mode="nearest")
    back = np.asarray(x.shape, float) / np.asarray(low.shape, float)
    out = ndi.zoom(low, back, order=order_up, grid_mode=True, mode="nearest")
    assert out.shape == x.shape
    return out


@pytest.mark.parametrize("orders", [(0, 1), (1, 0), (0, 0), (1, 1)])
@pytest.mark.parametrize("zoom", [(0.5, 0.5, 0.5), (0.37, 0.8, 1.0), (0.9, 0.61, 0.25)])
def test_low_resolution_equals_scipy_zoom_down_then_up(zoom, orders):
    rng = np.random.default_rng(1)
    x = patch(rng, (2, 13, 17, 20))
    t = augment.RandomLowResolution(
        (0.2, 1.0), p=1.0, isotropic=False, order_down=orders[0], order_up=orders[1]
    )
    params = LowResParams(active=np.array([True]), zoom=np.array([zoom]))
    assert t.low_shape(params, (13, 17, 20)) == tuple(
        max(1, round(n * z)) for n, z in zip((13, 17, 20), zoom, strict=True)
    )
    for got in both(t, x, params):
        assert got.shape == x.shape and got.dtype == np.float32
        for c in range(2):
            ref = scipy_low_resolution(x[c].astype(np.float64), zoom, *orders)
            if orders == (0, 0):
                assert np.array_equal(got[c], ref.astype(np.float32))
            else:
                assert rel_err(got[c], ref) < REL


def test_low_resolution_draws_and_gating():
    t = augment.RandomLowResolution((0.5, 1.0), p=0.5, axes=(1, 2))
    drawn = [t.sample(np.random.default_rng(s)) for s in range(20)]
    on = [bool(p.active[0]) for p in drawn]
    assert any(on) and not all(on)
    for p, a in zip(drawn, on, strict=True):
        assert p.zoom[0, 0] == 1.0
        if a:
            assert 0.5 <= p.zoom[0, 1] == p.zoom[0, 2] <= 1.0  # isotropic by default
        else:
            assert np.all(p.zoom == 1.0) and len(t.program(p, None)) == 0


# -- bias field -------------------------------------------------------------------------------
def bias_reference(shape, coefficients, order):
    """exp of sum c * u0^i u1^j u2^k over i + j + k <= order, i outer, k inner, with each
    axis's coordinates running linearly from -1 to 1, in float64."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    u0, u1, u2 = np.meshgrid(*axes, indexing="ij")
    log = np.zeros(shape)
    n = 0
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                log += coefficients[n] * u0**i * u1**j * u2**k
                n += 1
    assert n == len(coefficients)
    return np.exp(log)


@pytest.mark.parametrize("order", [0, 1, 3, 4])
def test_bias_field_equals_the_polynomial(order):
    rng = np.random.default_rng(2)
    x = patch(rng, (2, 11, 14, 9))
    t = augment.RandomBiasField(0.5, order=order, p=1.0)
    params = t.sample(np.random.default_rng(order))
    assert isinstance(params, BiasFieldParams)
    assert params.coefficients.shape == (1, (order + 1) * (order + 2) * (order + 3) // 6)
    field = bias_reference((11, 14, 9), params.coefficients[0], order)
    for got in both(t, x, params):
        assert got.dtype == np.float32
        for c in range(2):
            assert rel_err(got[c], x[c] * field) < REL


def test_bias_field_matches_torchio_polynomial_layout():
    """The same coefficients give TorchIO's field (its own generator) where installed."""
    pytest.importorskip("torchio")
    from torchio.transforms.augmentation.intensity.random_bias_field import BiasField

    coef = np.random.default_rng(3).uniform(-0.5, 0.5, 20)
    shape = (12, 10, 8)
    theirs = BiasField.generate_bias_field(np.zeros((1, *shape)), 3, coef)
    t = augment.RandomBiasField(order=3, p=1.0)
    params = BiasFieldParams(active=np.array([True]), coefficients=coef[None])
    ours = t.apply(np.ones((1, *shape), np.float32), params)[0]
    assert rel_err(ours, theirs.astype(np.float64)) < REL


# -- in a Compose -----------------------------------------------------------------------------
def pipeline():
    return augment.Compose(
        [
            augment.RandomCrop((12, 14, 16)),
            augment.RandomAffine(degrees=10, scale=(0.9, 1.1)),
            augment.Window(-100, 160),
            augment.RandomLowResolution((0.4, 0.9), p=0.6),
            augment.RandomGaussianBlur((0.5, 1.2), p=0.6),
            augment.RandomBiasField(0.4, p=0.6),
            augment.RandomNoise(0.05, p=0.5),
        ]
    )


def test_compose_runs_them_after_the_warp_in_list_order():
    rng = np.random.default_rng(4)
    img = rng.normal(30.0, 60.0, (30, 32, 34)).astype(np.float32)
    aug = pipeline()
    seen = 0
    for seed in range(8):
        out = aug(image=img, rng=np.random.default_rng(seed))
        p = out["params"]
        plan = aug.plan(p)
        if plan.post[0] == len(aug.intensity):
            continue  # nothing after the warp for this draw
        seen += 1
        # the warp with the fused part, then each remaining transform in order, by hand
        warped = aug(image=img, params=p)["image"]
        assert warped.tobytes() == out["image"].tobytes()  # replay
        first = augment.Compose(aug.spatial + aug.intensity[: plan.post[0]])
        x = first(
            image=img,
            params=augment.ComposeParams(p.spatial, p.intensity[: plan.post[0]], p.in_shape),
        )["image"][None]
        for t, tp in zip(aug.intensity[plan.post[0] :], p.intensity[plan.post[0] :], strict=True):
            x = np.asarray(t.apply(x, tp), dtype=np.float32)
        assert rel_err(out["image"], x[0].astype(np.float64)) < REL
    assert seen >= 3


def test_torch_batch_equals_numpy_samples():
    rng = np.random.default_rng(5)
    imgs = [rng.normal(30.0, 60.0, (1, 24, 26, 28)).astype(np.float32) for _ in range(4)]
    aug = pipeline()
    out = aug(image=torch.from_numpy(np.stack(imgs)), rng=batch_rngs(2, 0, range(4)))
    rngs = batch_rngs(2, 0, range(4))
    for b in range(4):
        ref = aug(image=imgs[b], rng=rngs[b])
        assert out["params"].take(b).as_dict() == ref["params"].as_dict()
        assert rel_err(out["image"][b].numpy(), ref["image"]) < REL
    again = aug(image=torch.from_numpy(np.stack(imgs)), params=out["params"])
    assert torch.equal(again["image"], out["image"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        augment.RandomGaussianBlur((-1.0, 1.0))
    with pytest.raises(ValueError, match="axes"):
        augment.RandomGaussianBlur(axes=(0, 3))
    with pytest.raises(ValueError, match="zoom"):
        augment.RandomLowResolution((0.0, 0.5))
    with pytest.raises(ValueError, match="zoom"):
        augment.RandomLowResolution((0.5, 1.5))
    with pytest.raises(ValueError, match="order_up"):
        augment.RandomLowResolution(order_up=3)
    with pytest.raises(ValueError, match="order"):
        augment.RandomBiasField(order=-1)
