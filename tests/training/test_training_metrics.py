"""training.metrics against an independent brute-force reference and hand-computed cases.

The reference finds surface voxels by shifting the padded mask (no morphology) and distances by
a k-d tree over physical voxel-centre coordinates (no distance transform), straight from the
SLIVER07 / MedPy definitions.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from scipy.spatial import cKDTree

from training import metrics as M

ANISO = (2.5, 0.7, 0.8)


def ref_surface(mask: np.ndarray, connectivity: int) -> np.ndarray:
    padded = np.pad(mask, 1)
    border = np.zeros_like(mask)
    for offset in itertools.product((-1, 0, 1), repeat=mask.ndim):
        if not 1 <= sum(map(abs, offset)) <= connectivity:
            continue
        shifted = tuple(slice(1 + o, n + 1 + o) for o, n in zip(offset, mask.shape, strict=True))
        border |= mask & ~padded[shifted]
    return border


def ref_distances(a, b, spacing, connectivity=1):
    pa = np.argwhere(ref_surface(a, connectivity)) * np.asarray(spacing)
    pb = np.argwhere(ref_surface(b, connectivity)) * np.asarray(spacing)
    return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]


def ref_metrics(a, b, spacing, connectivity=1):
    da, db = ref_distances(a, b, spacing, connectivity)
    both = np.concatenate([da, db])
    inter, union = np.sum(a & b), np.sum(a | b)
    return {
        "voe": 1 - inter / union,
        "dice": 2 * inter / (a.sum() + b.sum()),
        "rvd": (a.sum() - b.sum()) / b.sum(),
        "abs_rvd": abs(a.sum() - b.sum()) / b.sum(),
        "assd_mm": both.mean(),
        "msd_mm": both.max(),
        "rmsd_mm": math.sqrt(np.mean(both**2)),
    }


def blobs(rng: np.random.Generator, shape, threshold=0.5) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 1.5) > threshold


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_random_blobs_match_reference(connectivity):
    rng = np.random.default_rng(1234 + connectivity)
    for _ in range(8):
        shape = tuple(int(s) for s in rng.integers(6, 24, size=3))
        a, b = blobs(rng, shape), blobs(rng, shape, 0.49)
        if not a.any() or not b.any():
            continue
        got = M.case_metrics(a, b, ANISO, connectivity=connectivity)
        want = ref_metrics(a, b, ANISO, connectivity)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        da, db = M.surface_distances(a, b, ANISO, connectivity=connectivity)
        ra, rb = ref_distances(a, b, ANISO, connectivity)
        np.testing.assert_allclose(da, ra, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db, rb, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    a=arrays(np.bool_, st.tuples(*[st.integers(1, 7)] * 3)),
    seed=st.integers(0, 2**32 - 1),
    spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3),
)
def test_property_matches_reference(a, seed, spacing):
    b = np.random.default_rng(seed).random(a.shape) < 0.4
    if not a.any() or not b.any():
        return
    got = M.case_metrics(a, b, spacing)
    for key, value in ref_metrics(a, b, spacing).items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert M.assd(a, b, spacing) == pytest.approx(M.assd(b, a, spacing), abs=1e-12)
    assert M.msd(a, b, spacing) == pytest.approx(M.msd(b, a, spacing), abs=1e-12)


def test_mean_average_is_mean_of_directed_means():
    rng = np.random.default_rng(7)
    a, b = blobs(rng, (14, 15, 16)), blobs(rng, (14, 15, 16), 0.47)
    da, db = ref_distances(a, b, ANISO)
    want = (da.mean() + db.mean()) / 2
    assert M.assd(a, b, ANISO, average="mean") == pytest.approx(want, rel=1e-12)
    want_rms = math.sqrt((np.mean(da**2) + np.mean(db**2)) / 2)
    assert M.rmsd(a, b, ANISO, average="mean") == pytest.approx(want_rms, rel=1e-12)


def test_two_cubes_offset_by_one_slice_hand_computed():
    a = np.zeros((12, 12, 12), bool)
    b = np.zeros_like(a)
    a[2:8, 2:8, 2:8] = True
    b[3:9, 2:8, 2:8] = True
    # Per direction: the 36 voxels of the uncovered face lie one slice (2.5 mm) away; the 16
    # interior voxels of the covered face are 0.7, 0.7, 0.8 or 1.4 mm (4 each) from the side
    # faces; the other 100 of the 152 surface voxels lie on the other surface.
    sum_d = 36 * 2.5 + 4 * (0.7 + 0.7 + 0.8 + 1.4)
    sum_d2 = 36 * 2.5**2 + 4 * (0.7**2 + 0.7**2 + 0.8**2 + 1.4**2)
    assert M.msd(a, b, ANISO) == pytest.approx(2.5)
    assert M.assd(a, b, ANISO) == pytest.approx(2 * sum_d / 304)
    assert M.rmsd(a, b, ANISO) == pytest.approx(math.sqrt(2 * sum_d2 / 304))
    assert M.voe(a, b) == pytest.approx(1 - 180 / 252)
    assert M.dice(a, b) == pytest.approx(5 / 6)
    assert M.rvd(a, b) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_cubes_offset_by_k_slices_msd(k):
    a = np.zeros((16, 12, 12), bool)
    b = np.zeros_like(a)
    a[2:8, 2:8, 2:8] = True
    b[2 + k : 8 + k, 2:8, 2:8] = True
    assert M.msd(a, b, ANISO) == pytest.approx(2.5 * k)


def test_single_voxels():
    a = np.zeros((5, 5, 5), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = b[3, 2, 1] = True
    d = math.hypot(2 * 2.5, 0.7)
    assert M.assd(a, b, ANISO) == pytest.approx(d)
    assert M.msd(a, b, ANISO) == pytest.approx(d)
    assert M.rmsd(a, b, ANISO) == pytest.approx(d)
    assert M.voe(a, b) == 1.0 and M.dice(a, b) == 0.0


def test_array_edge_counts_as_background():
    full = np.ones((5, 5, 5), bool)
    d_pred, d_gt = M.surface_distances(full, full, 1.0)
    assert d_pred.size == d_gt.size == 125 - 27
    assert M.case_metrics(full, full, ANISO)["msd_mm"] == 0.0


def test_identical_masks():
    a = blobs(np.random.default_rng(3), (10, 11, 12))
    out = M.case_metrics(a, a, ANISO)
    assert out == {
        "voe": 0.0,
        "dice": 1.0,
        "rvd": 0.0,
        "abs_rvd": 0.0,
        "assd_mm": 0.0,
        "msd_mm": 0.0,
        "rmsd_mm": 0.0,
    }


def test_rvd_sign_and_absolute():
    gt = np.zeros((4, 4, 4), bool)
    gt[:2] = True
    pred = np.zeros_like(gt)
    pred[:1] = True
    assert M.rvd(pred, gt) == -0.5
    assert M.rvd(gt, pred) == 1.0
    assert M.rvd(pred, gt, absolute=True) == 0.5 == M.abs_rvd(pred, gt)


def test_empty_masks():
    empty = np.zeros((6, 6, 6), bool)
    some = empty.copy()
    some[2:4, 2:4, 2:4] = True
    both = M.case_metrics(empty, empty, ANISO)
    assert both == {
        "voe": 0.0,
        "dice": 1.0,
        "rvd": 0.0,
        "abs_rvd": 0.0,
        "assd_mm": 0.0,
        "msd_mm": 0.0,
        "rmsd_mm": 0.0,
    }
    missed = M.case_metrics(empty, some, ANISO)
    assert missed["voe"] == 1.0 and missed["dice"] == 0.0 and missed["rvd"] == -1.0
    assert missed["assd_mm"] == missed["msd_mm"] == missed["rmsd_mm"] == math.inf
    spurious = M.case_metrics(some, empty, ANISO)
    assert spurious["voe"] == 1.0 and spurious["dice"] == 0.0 and spurious["rvd"] == math.inf
    assert spurious["assd_mm"] == spurious["msd_mm"] == spurious["rmsd_mm"] == math.inf
    d_pred, d_gt = M.surface_distances(some, empty, ANISO)
    assert d_gt.size == 0 and np.all(np.isinf(d_pred)) and d_pred.size == 8


def test_inputs_castable_to_bool_and_torch():
    rng = np.random.default_rng(5)
    a, b = blobs(rng, (9, 10, 11)), blobs(rng, (9, 10, 11), 0.48)
    want = M.case_metrics(a, b, ANISO)
    assert M.case_metrics(a.astype(np.uint8) * 3, b.astype(np.float32), ANISO) == want
    assert M.case_metrics(torch.from_numpy(a), torch.from_numpy(b).long(), ANISO) == want
    assert M.assd(a, b, [2.5, 0.7, 0.8]) == M.assd(a, b, np.array(ANISO))


def test_isotropic_scalar_spacing_scales_distances():
    rng = np.random.default_rng(6)
    a, b = blobs(rng, (9, 10, 11)), blobs(rng, (9, 10, 11), 0.48)
    assert M.assd(a, b, 2.0) == pytest.approx(2 * M.assd(a, b, 1.0))
    assert M.msd(a, b, (2.0, 2.0, 2.0)) == pytest.approx(2 * M.msd(a, b, 1))


def test_bad_arguments_raise():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shapes differ"):
        M.voe(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="2 entries"):
        M.assd(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        M.assd(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="connectivity"):
        M.msd(a, a, 1.0, connectivity=4)
    with pytest.raises(ValueError, match="average"):
        a[1, 1, 1] = True
        M.assd(a, a, 1.0, average="median")  # type: ignore[arg-type]
