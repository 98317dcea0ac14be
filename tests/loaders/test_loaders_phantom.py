"""The synthetic abdominal CT phantom and its MSD-layout writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from loaders import DatasetError, msd_cases, read_volume
from loaders.phantom import SIZES, generate_case, write_msd_dataset


def test_deterministic_by_seed_and_seed_types():
    a = generate_case(5, shape="tiny")
    b = generate_case(5, shape="tiny")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(generate_case(6, shape="tiny")[0], a[0])
    ss = np.random.SeedSequence(5)
    np.testing.assert_array_equal(generate_case(ss, shape="tiny")[0], a[0])
    np.testing.assert_array_equal(generate_case(ss, shape="tiny")[0], a[0])  # not advanced
    g1 = generate_case(np.random.default_rng(11), shape="tiny")[0]
    g2 = generate_case(np.random.default_rng(11), shape="tiny")[0]
    np.testing.assert_array_equal(g1, g2)
    with pytest.raises(TypeError, match="seed must be"):
        generate_case(-1, shape="tiny")


def test_does_not_touch_the_global_rng():
    np.random.seed(1234)  # noqa: NPY002 - the legacy global state is what is checked
    state = np.random.get_state()  # noqa: NPY002
    generate_case(2, shape="tiny")
    after = np.random.get_state()  # noqa: NPY002
    assert all(np.array_equal(x, y) for x, y in zip(state[1:3], after[1:3], strict=True))


@pytest.mark.parametrize("size", ["tiny", "small", "default"])
def test_shapes_dtypes_and_realistic_spacing(size):
    image, label, spacing = generate_case(0, shape=size)
    assert image.shape == label.shape == SIZES[size]
    assert image.dtype == np.int16 and label.dtype == np.uint8
    d, h, w = SIZES[size]
    assert 360 <= spacing[2] * w <= 410 and spacing[1] == spacing[2]  # in-plane field of view
    assert 240 <= spacing[0] * d <= 320  # scan length
    assert spacing[0] > spacing[1]  # thicker slices than pixels, like CT
    # at full resolution that means 0.70-0.80 mm pixels (the "large" preset is 512^2)
    assert 0.70 <= spacing[2] * w / 512 <= 0.80


def test_spacing_can_be_given():
    _, _, spacing = generate_case(0, shape=(16, 32, 32), spacing=(5.0, 0.75, 0.75))
    assert spacing == (5.0, 0.75, 0.75)
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        generate_case(0, shape="tiny", spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="unknown phantom size"):
        generate_case(0, shape="huge")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anatomy_is_ct_like(seed):
    image, label, spacing = generate_case(seed, shape="default")
    liver = label >= 1
    assert 0.01 < liver.mean() < 0.2
    parts, n = ndimage.label(liver)
    assert n >= 1 and np.bincount(parts.ravel())[1:].max() >= 0.95 * liver.sum()  # one organ
    # on the patient's right, i.e. low x in LPS
    assert np.nonzero(liver)[2].mean() < image.shape[2] / 2
    liver_hu = np.median(image[label == 1])
    assert 70 <= liver_hu <= 170
    assert image[0, 0, 0] == -1024  # outside the reconstruction circle
    assert (image < -900).mean() > 0.1  # air (outside the body, lungs, gas)
    assert (image > 400).sum() > 100  # bone: spine and ribs
    # liver-like intensities elsewhere: a threshold alone cannot segment the liver
    lo, hi = np.percentile(image[label == 1], [10, 90])
    similar = (image >= lo) & (image <= hi)
    assert (similar & ~liver).sum() > 0.2 * similar.sum()


def test_tumours_are_darker_and_inside_the_liver():
    found = 0
    for seed in range(6):
        image, label, _ = generate_case(seed, shape="small")
        if (label == 2).any():
            found += 1
            assert np.median(image[label == 2]) < np.median(image[label == 1]) - 15
    assert found >= 2
    _, label, _ = generate_case(0, shape="small", tumours=False)
    assert set(np.unique(label)) == {0, 1}


def test_same_anatomy_at_any_resolution():
    coarse = generate_case(3, shape=(40, 64, 64), spacing=(7.0, 6.0, 6.0))
    fine = generate_case(3, shape=(80, 128, 128), spacing=(3.5, 3.0, 3.0))
    vols = [(c[1] >= 1).sum() * np.prod(c[2]) for c in (coarse, fine)]
    assert abs(vols[0] - vols[1]) < 0.1 * vols[1]
    centroids = [
        (np.array(np.nonzero(c[1] >= 1)).mean(axis=1) - (np.array(c[1].shape) - 1) / 2)
        * np.array(c[2])
        for c in (coarse, fine)
    ]
    assert np.abs(centroids[0] - centroids[1]).max() < 6.0  # mm, under one coarse voxel


def test_write_msd_dataset(tmp_path):
    root = tmp_path / "Task00_Phantom"
    cases = write_msd_dataset(root, n_train=2, n_test=1, seed=3, size="tiny")
    assert [c.id for c in cases] == ["phantom_000", "phantom_001"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert meta["numTraining"] == 2 and meta["test"] == ["./imagesTs/phantom_test_000.nii.gz"]
    assert msd_cases(root) == cases and msd_cases(root, split="test")[0].label is None
    vol = read_volume(cases[1].image)
    image, label, spacing = generate_case(np.random.SeedSequence(3, spawn_key=(0, 1)), shape="tiny")
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_array_equal(read_volume(cases[1].label).array, label)
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-6)
    ref = sitk.ReadImage(str(cases[1].image))  # the volume centre is the origin of mm
    centre = ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ref.GetSize()])
    np.testing.assert_allclose(centre, 0.0, atol=1e-3)

    # same configuration: nothing is rewritten
    mtime = cases[0].image.stat().st_mtime_ns
    assert write_msd_dataset(root, n_train=2, n_test=1, seed=3, size="tiny") == cases
    assert cases[0].image.stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match="overwrite=True") as err:
        write_msd_dataset(root, n_train=2, seed=4, size="tiny")
    assert "dataset.json" in str(err.value)
    again = write_msd_dataset(root, n_train=1, seed=4, size="tiny", overwrite=True)
    assert len(again) == 1
    assert json.loads((root / "dataset.json").read_text())["phantom"]["seed"] == 4


def test_worker_count_does_not_change_the_data(tmp_path):
    one = write_msd_dataset(tmp_path / "one", n_train=2, seed=8, size="tiny", workers=1)
    two = write_msd_dataset(tmp_path / "two", n_train=2, seed=8, size="tiny", workers=2)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(read_volume(a.image).array, read_volume(b.image).array)
