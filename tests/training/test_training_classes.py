"""Classes from the data (values, names, regions) and the intensity normalisation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import augment
from loaders.layouts import LAYOUTS
from training.classes import CLASS_MODES, Classes, ClassesError, resolve_classes
from training.config import (
    CLASS_NAMES,
    LAYOUT_NAMES,
    NORMALIZE_NAMES,
    ConfigError,
    resolve_config,
)
from training.normalize import (
    NORMALIZE_MODES,
    CaseCompose,
    CaseZScore,
    Normalization,
    resolve_normalize,
    zscore_stats,
)

LITS = {0: "background", 1: "liver", 2: "tumour"}


def test_config_accepts_exactly_the_modes_the_modules_know():
    assert LAYOUT_NAMES == ("auto", *LAYOUTS)
    assert NORMALIZE_NAMES == NORMALIZE_MODES and CLASS_NAMES == CLASS_MODES


def test_nested_and_separate_lookup_tables():
    label = np.array([0, 1, 2, 3, 4, 5, 7], np.uint8)
    nested = Classes((0, 2, 5), ("background", "organ", "lesion"), "nested")
    # by hand: class k where label >= values[k] and < values[k + 1]
    np.testing.assert_array_equal(nested.index(label), [0, 0, 1, 1, 1, 2, 2])
    separate = Classes((0, 2, 5), ("background", "organ", "lesion"), "separate")
    np.testing.assert_array_equal(separate.index(label), [0, 0, 1, 0, 0, 2, 0])
    np.testing.assert_array_equal(nested.label_values(np.array([0, 1, 2])), [0, 2, 5])
    # regions, on class indices: LiTS liver includes its tumour when nested
    lits = Classes((0, 1, 2), ("background", "liver", "tumour"))
    classes = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(lits.region(classes, 1), [False, True, True, True])
    np.testing.assert_array_equal(lits.region(classes, 2), [False, False, True, True])
    sep = Classes((0, 1, 2), ("background", "liver", "tumour"), "separate")
    np.testing.assert_array_equal(sep.region(classes, 1), [False, True, False, False])
    assert lits.describe(1) == "liver (label >= 1)" and sep.describe(2) == "tumour (label == 2)"
    assert lits.as_dict() == {"1": "liver", "2": "tumour"}
    # a uint16 label beyond the table's 256 entries
    big = np.array([0, 1, 300], np.uint16)
    np.testing.assert_array_equal(lits.index(big), [0, 1, 2])
    with pytest.raises(ValueError, match="not a foreground class"):
        lits.region(classes, 0)


@pytest.mark.parametrize(
    "values, names, message",
    [
        ((1, 2), ("a", "b"), "start with 0"),
        ((0,), ("a",), "at least one foreground"),
        ((0, 2, 1), ("a", "b", "c"), "increase"),
        ((0, 1), ("a",), "1 class names"),
        ((0, 1), ("a", "a"), "distinct"),
        ((0, 300), ("a", "b"), "at most 255"),
    ],
)
def test_bad_classes(values, names, message):
    with pytest.raises(ClassesError, match=message):
        Classes(values, names)


def test_classes_from_the_data():
    # all: every declared value, with its name
    c = resolve_classes(mode="all", regions="nested", declared=LITS, present=[1])
    assert (c.values, c.names) == ((0, 1, 2), ("background", "liver", "tumour"))
    # auto is all for a dataset of one's own, liver for the generated phantom
    assert resolve_classes(mode="auto", regions="nested", declared=LITS, present=[]).count == 3
    liver = resolve_classes(mode="auto", regions="nested", declared=LITS, present=[], phantom=True)
    assert (liver.values, liver.names) == ((0, 1), ("background", "liver"))
    np.testing.assert_array_equal(liver.index(np.array([0, 1, 2])), [0, 1, 1])  # label >= 1
    # nothing declared: the values present, named by value
    c = resolve_classes(mode="all", regions="nested", declared=None, present=[255])
    assert (c.values, c.names) == ((0, 255), ("background", "label_255"))
    # explicit values and names win
    c = resolve_classes(
        mode="all", regions="nested", declared=LITS, present=[], values=[0, 2], names=["bg", "t"]
    )
    assert (c.values, c.names) == ((0, 2), ("bg", "t"))
    with pytest.raises(ClassesError, match="nothing to segment"):
        resolve_classes(mode="all", regions="nested", declared=None, present=[])
    with pytest.raises(ClassesError, match="needs data.regions"):
        resolve_classes(mode="liver", regions="separate", declared=LITS, present=[])


def test_class_settings_are_checked_when_read():
    base = ["data.class_values=[0, 1, 2]"]
    assert resolve_config(preset="smoke", overrides=base).data.class_values == (0, 1, 2)
    for bad, message in [
        ("data.class_values=[1, 2]", "data.class_values"),
        ("data.gate_class=0", "data.gate_class"),
        ("data.gate_class=3", "data.gate_class"),
        ('data.class_names=["a"]', "data.class_names"),
        ("data.layout=nifti", "data.layout"),
        ("data.normalize=minmax", "data.normalize"),
        ("data.regions=overlapping", "data.regions"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_config(preset="smoke", overrides=[*base, bad])
    with pytest.raises(ConfigError, match='nested with data.classes = "liver"'):
        resolve_config(preset="smoke", overrides=["data.classes=liver", "data.regions=separate"])


def test_normalisation_modes():
    assert resolve_normalize("auto", "CT") == "ct" and resolve_normalize("auto", None) == "ct"
    assert resolve_normalize("auto", "MRI") == "zscore"
    assert resolve_normalize("auto", "T2") == "zscore"
    assert resolve_normalize("ct", "MRI") == "ct"
    x = np.array([[[-1000, -200, 25, 250, 3000]]], np.int16)
    ct = Normalization("ct", (-200.0, 250.0)).apply(x)
    np.testing.assert_allclose(ct, np.clip((x + 200.0) / 450.0, 0, 1), atol=1e-6)
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, (4, 5, 6)).astype(np.float32)
    z = Normalization("zscore", (-200.0, 250.0)).apply(mr)
    assert z.dtype == np.float32
    np.testing.assert_allclose(
        z, (mr - mr.astype(np.float64).mean()) / mr.std(dtype=np.float64), atol=1e-5
    )
    assert zscore_stats(np.full((2, 2, 2), 7.0)) == (7.0, 1e-6)


def test_case_zscore_takes_the_sample_case_constants():
    rng = np.random.default_rng(1)
    img = rng.normal(300.0, 50.0, (8, 10, 12)).astype(np.float32)
    stats = {"a": (300.0, 50.0), "b": (100.0, 25.0)}
    compose = CaseCompose([augment.RandomCrop((8, 10, 12)), CaseZScore(stats)])
    for case, (mean, std) in stats.items():
        params = compose.sample(np.random.default_rng(0), img.shape, case=case)
        out = compose(image=img, params=params)["image"]
        np.testing.assert_allclose(out, (img - mean) / std, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the sample's case"):
        compose.sample(np.random.default_rng(0), img.shape)
    with pytest.raises(ValueError, match="inside a CaseCompose"):
        plain = augment.Compose([augment.RandomCrop((8, 10, 12)), CaseZScore(stats)])
        plain(image=img, rng=np.random.default_rng(0))
    # without a CaseZScore it draws exactly what a Compose draws
    transforms = [augment.RandomCrop(4), augment.RandomGamma(p=1.0)]
    a = CaseCompose(transforms).sample(np.random.default_rng(5), img.shape, case="a")
    b = augment.Compose(transforms).sample(np.random.default_rng(5), img.shape, case="a")
    assert a.as_dict() == b.as_dict()


def test_case_zscore_on_a_torch_batch_and_through_pickle():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    img = rng.normal(300.0, 50.0, (6, 8, 10)).astype(np.float32)
    stats = {"a": (300.0, 50.0), "b": (100.0, 25.0)}
    compose = CaseCompose(
        [augment.RandomCrop((4, 6, 8)), augment.RandomAffine(10), CaseZScore(stats)]
    )
    compose = pickle.loads(pickle.dumps(compose))  # as the loader's spawned workers get it
    params = [
        compose.sample(np.random.default_rng(i), img.shape, case=c) for i, c in enumerate("ab")
    ]
    # the batched torch path (the loader's GPU mode, here on the CPU) against numpy per sample
    batch = compose(
        image=[torch.from_numpy(img)[None], torch.from_numpy(img)[None]],
        params=augment.stack_params(params),
    )["image"]
    for b, p in enumerate(params):
        want = compose(image=img, params=p)["image"]
        np.testing.assert_allclose(batch[b, 0].numpy(), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(batch[0].numpy(), batch[1].numpy())
