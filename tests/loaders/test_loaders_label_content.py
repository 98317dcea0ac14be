"""What a label holds: undeclared values are refused, a mostly-foreground label and a
volume smaller than the patch draw a ``DataWarning``."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import augment
from loaders import (
    CaseError,
    DataWarning,
    PatchSampler,
    VolumeCache,
    label_values,
    liver_label,
    msd_cases,
    read_case,
)

SHAPE = (12, 14, 16)
IMG = np.random.default_rng(0).integers(-1000, 1000, size=SHAPE).astype(np.int16)
LAB = np.zeros(SHAPE, np.uint8)
LAB[3:8, 4:9, 5:11] = 1
LAB[5, 6, 7] = 2


def _msd(root, make_volume_file, labels, *, declared=("0", "1", "2")):
    """An MSD dataset of one case per label array; dataset.json declares ``declared``."""
    entries = []
    for i, lab in enumerate(labels):
        make_volume_file(f"{root.name}/imagesTr/c{i}.nii.gz", IMG)
        make_volume_file(f"{root.name}/labelsTr/c{i}.nii.gz", lab)
        entries.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    meta = {"labels": {v: f"class {v}" for v in declared}, "training": entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return msd_cases(root)


def test_label_values_counts_like_numpy_unique():
    rng = np.random.default_rng(2)
    for arr in (
        rng.integers(0, 7, size=(5, 6, 7)).astype(np.uint8),
        rng.choice([0, 3, 70000], size=(4, 5, 6)).astype(np.uint32),
        np.zeros((2, 2, 2), bool),
    ):
        values, counts = np.unique(arr, return_counts=True)
        assert label_values(arr) == dict(zip(values.tolist(), counts.tolist(), strict=True))


def test_label_255_is_refused_naming_value_and_file(tmp_path, make_volume_file):
    bad = LAB.copy()
    bad[0, 0, :4] = 255  # e.g. an "unlabelled" marker the dataset does not declare
    cases = _msd(tmp_path / "ds", make_volume_file, [LAB, bad])
    with pytest.raises(CaseError) as err:
        read_case(cases[1], label_map=liver_label)
    msg = str(err.value)
    assert msg.startswith(str(cases[1].label))
    assert "label values 255 (4 voxels)" in msg and "[0, 1, 2]" in msg
    cache = VolumeCache(tmp_path / "c.zarr")
    with pytest.raises(CaseError, match="label values 255"):
        cache.build(cases, workers=1, label_map=liver_label, progress=False)
    assert cache.cases == ("c0",)  # the good case is cached
    # declared (nnU-Net v2's "ignore" label), the same file is accepted
    cases = _msd(tmp_path / "ds", make_volume_file, [LAB, bad], declared=("0", "1", "2", "255"))
    _, label = read_case(cases[1])
    assert label.array.max() == 255


def test_changing_the_declared_labels_rechecks_cached_cases(tmp_path, make_volume_file):
    cases = _msd(tmp_path / "ds", make_volume_file, [LAB])
    cache = VolumeCache(tmp_path / "c.zarr")
    cache.build(cases, workers=1, progress=False)
    cases = _msd(tmp_path / "ds", make_volume_file, [LAB], declared=("0", "1"))
    with pytest.raises(CaseError, match=r"label values 2 \(1 voxels\)"):
        cache.build(cases, workers=1, progress=False)


def _swapped() -> np.ndarray:
    lab = np.ones(SHAPE, np.uint8)  # 95 % foreground: a label with inverted values
    lab.ravel()[: int(0.05 * lab.size)] = 0
    return lab


def test_mostly_foreground_label_warns(tmp_path, make_volume_file):
    cases = _msd(tmp_path / "ds", make_volume_file, [LAB, _swapped()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        read_case(cases[0])  # 5 % foreground: silent
    with pytest.warns(DataWarning, match=r"foreground is 95\.\d% of the volume") as rec:
        read_case(cases[1])
    assert str(cases[1].label) in str(rec[0].message)
    assert str(cases[1].image) in str(rec[0].message)


def test_mostly_foreground_warning_reaches_the_builder_from_workers(tmp_path, make_volume_file):
    cases = _msd(tmp_path / "ds", make_volume_file, [LAB, _swapped()])
    cache = VolumeCache(tmp_path / "c.zarr")
    with pytest.warns(DataWarning, match="foreground is 95") as rec:
        cache.build(cases, workers=2, progress=False)  # spawned build workers
    assert [str(cases[1].label) in str(w.message) for w in rec] == [True]
    assert cache.info("c0").warnings == ()
    assert "foreground is 95" in cache.info("c1").warnings[0]


def test_volume_smaller_than_the_patch_warns_at_sampler_creation(tmp_path, make_volume_file):
    cases = _msd(tmp_path / "ds", make_volume_file, [LAB])
    cache = VolumeCache(tmp_path / "c.zarr")
    cache.build(cases, workers=1, progress=False)
    fits = augment.Compose([augment.RandomCrop((12, 8, 8))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        PatchSampler(cache, fits)
    too_big = augment.Compose([augment.RandomCrop((8, 16, 16))])  # y is 14 voxels
    with pytest.warns(DataWarning, match=r"smaller than the crop \(z, y, x\) \(8, 16, 16\)") as rec:
        PatchSampler(cache, too_big)
    assert "c0 (12, 14, 16)" in str(rec[0].message) and str(cache.root) in str(rec[0].message)
