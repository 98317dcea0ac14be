"""VolumeCache: region reads against SimpleITK + numpy, statistics, incremental and atomic
builds (a build killed with SIGKILL), concurrent readers in spawned processes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import zarr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import loaders
from loaders import (
    CacheError,
    Case,
    CaseError,
    VolumeCache,
    liver_label,
    msd_cases,
    pair_cases,
    write_array,
)
from loaders.phantom import write_msd_dataset
from training.config import DataConfig

REPO = Path(loaders.__file__).resolve().parents[1]


def itk_arrays(case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    """The source voxels read with SimpleITK alone (the independent reference)."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image)))
    label = None if case.label is None else sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    return image, label


def padded(arr: np.ndarray, start, stop, pad) -> np.ndarray:
    """``arr[start:stop]`` with out-of-bounds voxels set to ``pad`` (numpy reference)."""
    out = np.full([b - a for a, b in zip(start, stop, strict=True)], pad, arr.dtype)
    lo = [max(a, 0) for a in start]
    hi = [min(b, n) for b, n in zip(stop, arr.shape, strict=True)]
    if all(h > low for low, h in zip(lo, hi, strict=True)):
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
        out[dst] = arr[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    return out


def case_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and "@" in p.name}


# ------------------------------------------------------------------------- basic reads
def test_build_and_read_whole_cases(built_cache, phantom_cases):
    cache = VolumeCache(built_cache)
    assert cache.cases == tuple(c.id for c in phantom_cases) and cache.complete
    assert len(cache) == 3 and "phantom_001" in cache
    for case in phantom_cases:
        image, label = itk_arrays(case)
        got = cache.read(case.id)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got, image)
        lab = cache.read(case.id, array="label")
        assert lab.dtype == np.uint8
        np.testing.assert_array_equal(lab, label)
        ref = sitk.ReadImage(str(case.image))
        assert cache.shape(case.id) == image.shape
        np.testing.assert_allclose(cache.spacing(case.id), ref.GetSpacing()[::-1])
        info = cache.info(case.id)
        np.testing.assert_allclose(info.origin, ref.GetOrigin()[::-1])
        np.testing.assert_allclose(info.direction, np.eye(3))
        assert info.source_image == str(case.image) and info.source_label == str(case.label)


SHAPE = (48, 96, 96)  # phantom_cases; the cache chunks are 32x32x32
regions = st.tuples(*[st.tuples(st.integers(-12, n + 4), st.integers(0, 70)) for n in SHAPE]).map(
    lambda t: ([a for a, _ in t], [a + s for a, s in t])
)


@pytest.fixture(scope="module")
def readers(built_cache):
    return {
        "default": VolumeCache(built_cache),
        "no-lru-2-threads": VolumeCache(built_cache, cache_bytes=0, threads=2),
        "tiny-lru": VolumeCache(built_cache, cache_bytes=300_000),
    }


@pytest.fixture(scope="module")
def sources(phantom_cases):
    return {c.id: itk_arrays(c) for c in phantom_cases}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    region=regions,
    case=st.sampled_from(["phantom_000", "phantom_001", "phantom_002"]),
    array=st.sampled_from(["image", "label"]),
    which=st.sampled_from(["default", "no-lru-2-threads", "tiny-lru"]),
    as_slices=st.booleans(),
)
@example(  # chunk boundaries (32 and 64 on every axis) and the volume's far corner
    region=((31, 63, 64), (33, 65, 97)),
    case="phantom_001",
    array="image",
    which="default",
    as_slices=True,
)
@example(
    region=((-1, 64, -3), (49, 96, 64)),
    case="phantom_002",
    array="label",
    which="no-lru-2-threads",
    as_slices=False,
)
def test_read_region_equals_numpy_slicing(readers, sources, region, case, array, which, as_slices):
    cache = readers[which]
    start, stop = region
    src = sources[case][0 if array == "image" else 1]
    pad = cache.info(case).pad_value if array == "image" else 0
    assert pad == src.min() or array == "label"
    req = tuple(slice(a, b) for a, b in zip(start, stop, strict=True)) if as_slices else region
    got = cache.read_region(case, req, array=array)
    assert got.shape == tuple(b - a for a, b in zip(start, stop, strict=True))
    np.testing.assert_array_equal(got, padded(src, start, stop, pad))


def test_read_region_options(built_cache, sources):
    cache = VolumeCache(built_cache)
    image = sources["phantom_000"][0]
    got = cache.read_region("phantom_000", ((-4, 60, 60), (4, 70, 70)), pad_value=-2000)
    np.testing.assert_array_equal(got, padded(image, (-4, 60, 60), (4, 70, 70), -2000))
    out = np.zeros((3, 4, 5), np.int16)
    assert cache.read_region("phantom_000", ((1, 2, 3), (4, 6, 8)), out=out) is out
    np.testing.assert_array_equal(out, image[1:4, 2:6, 3:8])
    with pytest.raises(ValueError, match="out has shape"):
        cache.read_region("phantom_000", ((1, 2, 3), (4, 6, 9)), out=out)
    with pytest.raises(ValueError, match="pad_value 100000"):
        cache.read_region("phantom_000", ((-1, 0, 0), (2, 2, 2)), pad_value=100000)
    with pytest.raises(ValueError, match="pad_value 0.5"):
        cache.read_region("phantom_000", ((-1, 0, 0), (2, 2, 2)), array="label", pad_value=0.5)
    with pytest.raises(ValueError, match="array must be one of"):
        cache.read_region("phantom_000", ((0, 0, 0), (2, 2, 2)), array="mask")
    with pytest.raises(KeyError, match="'nope' is not in the cache"):
        cache.read_region("nope", ((0, 0, 0), (2, 2, 2)))
    empty = cache.read_region("phantom_000", ((5, 5, 5), (5, 9, 9)))
    assert empty.shape == (0, 4, 4)
    outside = cache.read_region("phantom_000", ((50, 0, 0), (52, 2, 2)))
    assert (outside == image.min()).all()


def test_volume_smaller_than_the_patch(tmp_path):
    rng = np.random.default_rng(7)
    image = rng.integers(-100, 100, size=(5, 6, 7)).astype(np.int16)
    label = (image > 50).astype(np.uint8)
    write_array(image, tmp_path / "small.nii.gz")
    write_array(label, tmp_path / "small_seg.nii.gz")
    cache = VolumeCache(tmp_path / "cache")
    cache.build(
        pair_cases([(tmp_path / "small.nii.gz", tmp_path / "small_seg.nii.gz")]),
        workers=1,
        progress=False,
    )
    start, stop = (-6, -5, -4), (10, 11, 12)  # a 16^3 patch centred on a 5x6x7 volume
    got = cache.read_region("small", (start, stop))
    assert got.shape == (16, 16, 16)
    np.testing.assert_array_equal(got, padded(image, start, stop, image.min()))
    np.testing.assert_array_equal(
        cache.read_region("small", (start, stop), array="label"), padded(label, start, stop, 0)
    )


def test_info_statistics_match_numpy(built_cache, sources):
    cache = VolumeCache(built_cache)
    for case, (image, label) in sources.items():
        info = cache.info(case)
        assert info.shape == image.shape and info.dtype == np.int16 and info.has_label
        nz = np.nonzero(label)
        assert info.fg_bbox == tuple((int(a.min()), int(a.max()) + 1) for a in nz)
        counts = np.bincount(label.ravel())
        assert info.class_voxels == {c: int(n) for c, n in enumerate(counts) if c and n}
        assert info.intensity["min"] == image.min() and info.intensity["max"] == image.max()
        np.testing.assert_allclose(info.intensity["percentiles"]["50.0"], np.median(image))
        np.testing.assert_allclose(
            info.intensity["percentiles"]["99.5"], np.percentile(image, 99.5)
        )
        np.testing.assert_allclose(info.fg_intensity["mean"], image[label > 0].mean())
        idx, cls = info.fg_indices, info.fg_classes
        assert idx.dtype == np.int32 and idx.shape == (len(cls), 3)
        np.testing.assert_array_equal(label[tuple(idx.T)], cls)  # every sample is foreground
        assert len(np.unique(idx, axis=0)) == len(idx)
        for c, n in info.class_voxels.items():
            assert (cls == c).sum() == min(n, 10_000)
        assert info.pad_value == image.min()


def test_foreground_sample_is_capped_and_seeded(tmp_path, phantom_cases):
    a = VolumeCache(tmp_path / "a")
    a.build(phantom_cases[:1], workers=1, progress=False, n_foreground=50, seed=1)
    b = VolumeCache(tmp_path / "b")
    b.build(phantom_cases[:1], workers=1, progress=False, n_foreground=50, seed=1)
    c = VolumeCache(tmp_path / "c")
    c.build(phantom_cases[:1], workers=1, progress=False, n_foreground=50, seed=2)
    ia, ib, ic = (x.info("phantom_000") for x in (a, b, c))
    assert len(ia.fg_indices) == 50 * len(ia.class_voxels)
    np.testing.assert_array_equal(ia.fg_indices, ib.fg_indices)
    assert not np.array_equal(ia.fg_indices, ic.fg_indices)


def test_cache_is_a_plain_zarr_hierarchy(built_cache, sources):
    group = zarr.open_group(str(built_cache), mode="r")
    manifest = group.attrs["voxaug_cache"]
    assert manifest["complete"] and set(manifest["cases"]) == set(sources)
    for case, (image, label) in sources.items():
        sub = group[manifest["cases"][case]["dir"]]
        np.testing.assert_array_equal(sub["image"][...], image)
        np.testing.assert_array_equal(sub["label"][...], label)
        attrs = sub.attrs["voxaug_case"]
        assert attrs["shape"] == list(image.shape) and len(attrs["spacing"]) == 3


def test_pickles_without_state_and_reads_in_spawned_processes(built_cache, sources):
    cache = VolumeCache(built_cache, threads=2)
    cache.read("phantom_000")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.threads == 2 and clone.cache_stats()["entries"] == 0
    jobs = [
        (cache, case, (i, 2 * i, 3 * i), (i + 20, 2 * i + 30, 3 * i + 40))
        for i, case in enumerate(sorted(sources) * 2)
    ]
    with get_context("spawn").Pool(2) as pool:
        results = pool.map(_read_in_worker, jobs)
    for (_, case, start, stop), (pid, got) in zip(jobs, results, strict=True):
        assert pid != os.getpid()
        np.testing.assert_array_equal(got, padded(sources[case][0], start, stop, -1024))


def _read_in_worker(job):
    cache, case, start, stop = job
    return os.getpid(), cache.read_region(case, (start, stop))


# ------------------------------------------------------------------------------ builds
@pytest.fixture
def dataset(tmp_path):
    return write_msd_dataset(tmp_path / "ds", n_train=3, seed=4, size="tiny")


def test_incremental_rebuild(tmp_path, dataset):
    root = tmp_path / "cache"
    cache = VolumeCache(root)
    first = cache.build(dataset, workers=1, progress=False)
    assert set(first.built) == {"phantom_000", "phantom_001", "phantom_002"}
    assert first.voxel_bytes == 3 * 32 * 64 * 64 * 3  # int16 image + uint8 label
    dirs = case_dirs(root)

    again = cache.build(dataset, workers=1, progress=False)
    assert again.built == () and len(again.kept) == 3 and case_dirs(root) == dirs

    # a new mtime with the same contents: the content fingerprint keeps the case
    os.utime(dataset[0].image, ns=(10**18, 10**18))
    assert cache.build(dataset, workers=1, progress=False).built == ()
    sources = json.loads((root / "zarr.json").read_text())["attributes"]["voxaug_cache"]["cases"]
    assert str(10**18) in sources["phantom_000"]["sources"]["image"]["stat"]  # not hashed again

    # change one source: only that case is rebuilt, the others keep their folders
    changed = dataset[1]
    new_image = itk_arrays(changed)[0] + 5
    ref = sitk.ReadImage(str(changed.image))
    out = sitk.GetImageFromArray(new_image)
    out.CopyInformation(ref)
    sitk.WriteImage(out, str(changed.image))
    before = VolumeCache(root)
    before.read("phantom_001")  # a reader opened on the old version
    report = cache.build(dataset, workers=1, progress=False)
    assert report.built == ("phantom_001",) and set(report.kept) == {"phantom_000", "phantom_002"}
    after = case_dirs(root)
    assert len(after) == 3 and len(after & dirs) == 2
    np.testing.assert_array_equal(cache.read("phantom_001"), new_image)
    # the old reader follows the rebuild instead of reading a removed folder as zeros
    before.refresh()
    np.testing.assert_array_equal(
        before.read_region("phantom_001", ((0, 0, 0), (32, 64, 64))), new_image
    )

    # add one, drop one
    extra = Case("extra", dataset[0].image, dataset[0].label)
    report = cache.build([dataset[0], dataset[1], extra], workers=1, progress=False)
    assert report.built == ("extra",) and report.removed == ("phantom_002",)
    assert cache.cases == ("extra", "phantom_000", "phantom_001") and len(case_dirs(root)) == 3

    # other build options change every fingerprint
    report = cache.build([dataset[0]], workers=1, progress=False, label_map=liver_label)
    assert report.built == ("phantom_000",) and set(report.removed) == {"extra", "phantom_001"}
    assert cache.read("phantom_000", array="label").max() == 1
    assert cache.build(
        [dataset[0]], workers=1, progress=False, label_map=liver_label, force=True
    ).built == ("phantom_000",)


def test_former_chunk_layout_is_read_and_rebuilt(tmp_path, dataset, monkeypatch):
    """A cache built with the former 32x64x64 chunks reads as before (readers take the
    chunk shape from each array's metadata); a build rewrites its cases in today's layout."""
    import loaders.cache as cache_module

    root = tmp_path / "cache"
    monkeypatch.setattr(cache_module, "CACHE_CHUNKS", (32, 64, 64))
    VolumeCache(root).build(dataset, workers=1, progress=False)
    monkeypatch.undo()

    def chunk_shapes() -> set[tuple[int, ...]]:
        group = zarr.open_group(str(root), mode="r")
        cases = group.attrs["voxaug_cache"]["cases"]
        return {tuple(group[c["dir"]]["image"].chunks) for c in cases.values()}

    assert chunk_shapes() == {(32, 64, 64)}
    old = VolumeCache(root)
    for case in dataset:
        image, label = itk_arrays(case)
        box = ((3, 5, 7), (29, 61, 50))  # crosses chunk faces of both layouts
        want = image[3:29, 5:61, 7:50]
        np.testing.assert_array_equal(old.read_region(case.id, box), want)
        np.testing.assert_array_equal(old.read(case.id, array="label"), label)
    report = VolumeCache(root).build(dataset, workers=1, progress=False)
    assert set(report.built) == {c.id for c in dataset}
    assert chunk_shapes() == {cache_module.CACHE_CHUNKS} == {(32, 32, 32)}


def test_failed_case_leaves_the_others_usable(tmp_path, dataset):
    bad_label = tmp_path / "bad_label.nii.gz"
    write_array(np.ones((32, 64, 60), np.uint8), bad_label)
    cases = [dataset[0], Case("broken", dataset[1].image, bad_label), dataset[2]]
    cache = VolumeCache(tmp_path / "cache")
    with pytest.raises(CaseError, match="label shape") as err:
        cache.build(cases, workers=1, progress=False)
    assert str(bad_label) in str(err.value)
    assert cache.cases == ("phantom_000", "phantom_002") and not cache.complete
    np.testing.assert_array_equal(cache.read("phantom_002"), itk_arrays(dataset[2])[0])
    fixed = [dataset[0], Case("broken", dataset[1].image, dataset[1].label), dataset[2]]
    report = cache.build(fixed, workers=1, progress=False)
    assert report.built == ("broken",) and cache.complete


def test_build_in_worker_processes_matches_in_process(tmp_path, dataset):
    a = VolumeCache(tmp_path / "a")
    a.build(dataset[:2], workers=2, progress=False)
    b = VolumeCache(tmp_path / "b")
    b.build(dataset[:2], workers=1, progress=False)
    for case in ("phantom_000", "phantom_001"):
        np.testing.assert_array_equal(a.read(case), b.read(case))
        np.testing.assert_array_equal(a.info(case).fg_indices, b.info(case).fg_indices)
        assert a.info(case).fingerprint == b.info(case).fingerprint


def test_build_options_resample_and_dtype(tmp_path, dataset):
    cache = VolumeCache(tmp_path / "cache")
    cache.build(dataset[:1], workers=1, progress=False, spacing=(10.0, 10.0, 10.0))
    expected = loaders.read_case(dataset[0], spacing=(10.0, 10.0, 10.0))
    assert cache.shape("phantom_000") == expected[0].shape
    np.testing.assert_array_equal(cache.read("phantom_000"), expected[0].array)
    np.testing.assert_array_equal(cache.read("phantom_000", array="label"), expected[1].array)
    assert cache.spacing("phantom_000") == (10.0, 10.0, 10.0)

    frac = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6)
    write_array(frac, tmp_path / "frac.nrrd")
    write_array(np.round(frac * 100), tmp_path / "whole.nrrd")
    c2 = VolumeCache(tmp_path / "c2")
    c2.build(
        pair_cases([(tmp_path / "frac.nrrd",), (tmp_path / "whole.nrrd",)]),
        workers=1,
        progress=False,
    )
    assert c2.info("frac").dtype == np.float32 and c2.info("whole").dtype == np.int16
    np.testing.assert_allclose(c2.read("frac"), frac.astype(np.float32))
    assert not c2.has_label("frac")
    with pytest.raises(CacheError, match="has no label"):
        c2.read("frac", array="label")
    with pytest.raises(CaseError, match=r"cannot be stored exactly as uint8") as err:
        VolumeCache(tmp_path / "c3").build(
            pair_cases([(tmp_path / "frac.nrrd",)]), workers=1, progress=False, image_dtype="uint8"
        )
    assert "frac.nrrd" in str(err.value)


def test_refuses_foreign_folders_and_reports_missing_cache(tmp_path, dataset):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a volume cache") as err:
        VolumeCache(tmp_path / "busy").build(dataset, workers=1, progress=False)
    assert "busy" in str(err.value)
    zarr.create_group(str(tmp_path / "other.zarr"))
    with pytest.raises(CacheError, match="not a volume cache"):
        VolumeCache(tmp_path / "other.zarr")
    nothing = VolumeCache(tmp_path / "none")
    assert nothing.cases == () and not nothing.complete
    with pytest.raises(CacheError, match="no volume cache here"):
        nothing.read_region("x", ((0, 0, 0), (1, 1, 1)))
    with pytest.raises(loaders.DatasetError, match="duplicate case id"):
        nothing.build([dataset[0], dataset[0]], workers=1, progress=False)


def test_orphans_and_stale_temporaries_are_cleaned(tmp_path, dataset):
    root = tmp_path / "cache"
    cache = VolumeCache(root)
    cache.build(dataset, workers=1, progress=False)
    dirs = case_dirs(root)
    # a build killed between renaming a case into place and publishing it
    shutil.copytree(root / sorted(dirs)[0], root / "phantom_000@000000000000-dead00")
    (root / ".tmp" / "phantom_001@111111111111-beef00.123").mkdir(parents=True)
    report = cache.build(dataset, workers=1, progress=False)
    assert report.built == () and case_dirs(root) == dirs and not (root / ".tmp").exists()


KILLED_BUILD = """
import asyncio, sys
import zarr.storage
_set = zarr.storage.LocalStore.set
async def slow_set(self, key, value, *args, **kwargs):
    await asyncio.sleep(0.1)  # slow every write, so that the kill lands mid-case
    return await _set(self, key, value, *args, **kwargs)
zarr.storage.LocalStore.set = slow_set
from loaders import VolumeCache, msd_cases
VolumeCache(sys.argv[1]).build(msd_cases(sys.argv[2]), workers=1, progress=False)
"""


def test_build_killed_mid_write_is_redone(tmp_path):
    ds = tmp_path / "ds"
    cases = write_msd_dataset(ds, n_train=4, seed=9, size="tiny")
    expected = {c.id: itk_arrays(c) for c in cases}
    root = tmp_path / "cache"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(root), str(ds)], env=env)
    seen_while_building: set[str] = set()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "the build finished before it could be killed"
            assert time.monotonic() < deadline, "the build never reached a case mid-write"
            partial = (
                [d for d in (root / ".tmp").glob("*") if (d / "image").exists()]
                if (root / ".tmp").exists()
                else []
            )
            # concurrent reader: whatever it lists is complete and correct
            reader = VolumeCache(root) if (root / "zarr.json").exists() else None
            listed = reader.cases if reader is not None else ()
            for case in listed:
                np.testing.assert_array_equal(reader.read(case), expected[case][0])
                np.testing.assert_array_equal(reader.read(case, array="label"), expected[case][1])
            seen_while_building |= set(listed)
            if listed and partial:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    partial = sorted((root / ".tmp").iterdir())
    assert partial, "expected a half-written case under .tmp"
    half = partial[0].name.split("@")[0]
    cache = VolumeCache(root)
    assert not cache.complete and half not in cache.cases and cache.cases
    published = set(cache.cases)
    for case in published:
        np.testing.assert_array_equal(cache.read(case), expected[case][0])

    report = cache.build(msd_cases(ds), workers=1, progress=False)
    assert set(report.kept) == published and half in report.built
    assert set(report.built) | published == set(expected)
    assert cache.complete and not (root / ".tmp").exists()
    manifest = json.loads((root / "zarr.json").read_text())["attributes"]["voxaug_cache"]
    assert case_dirs(root) == {e["dir"] for e in manifest["cases"].values()}
    for case, (image, label) in expected.items():
        np.testing.assert_array_equal(cache.read(case), image)
        np.testing.assert_array_equal(cache.read(case, array="label"), label)
    assert seen_while_building <= published


def test_default_cache_root_keeps_dotted_dataset_names_apart(tmp_path, monkeypatch):
    assert loaders.default_cache_root("data/ds_v1.2") == Path("data/ds_v1.2.zarr")
    assert loaders.default_cache_root("data/ds_v1.3/") == Path("data/ds_v1.3.zarr")
    assert loaders.default_cache_root("data/Task03_Liver") == Path("data/Task03_Liver.zarr")
    monkeypatch.chdir(tmp_path)
    assert loaders.default_cache_root(".") == tmp_path.parent / f"{tmp_path.name}.zarr"
    for root in ("data/ds_v1.2", "data/ds_v1.3/", "data/phantom", ".", ".."):
        assert DataConfig(root=root).cache_root == loaders.default_cache_root(root)
    assert DataConfig(root="a", cache="elsewhere.zarr").cache_root == Path("elsewhere.zarr")
