"""Canonical orientation: flipped and permuted files cache like their identity-direction
twin, the recorded reorientation undoes it bit for bit, oblique files are refused.

The flipped and permuted files are made from the identity one with SimpleITK's own
``Flip`` / ``PermuteAxes`` (which keep every voxel's physical position), and positions are
checked with SimpleITK's ``TransformIndexToPhysicalPoint``: independent references.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from loaders import (
    ORIENTATION_TOL,
    CacheError,
    Case,
    Reorientation,
    Volume,
    VolumeCache,
    VolumeError,
    read_case,
    read_volume,
    to_canonical,
)
from loaders.cache import CACHE_FORMAT

SHAPE = (9, 11, 13)  # (z, y, x)
SPACING_XYZ = (0.8, 0.7, 2.5)
ORIGIN_XYZ = (3.0, 20.5, -10.0)


def _pair() -> tuple[sitk.Image, sitk.Image]:
    """An identity-direction image and label (random CT-like values, a blob label)."""
    rng = np.random.default_rng(3)
    image = rng.integers(-1024, 2000, size=SHAPE).astype(np.int16)
    zz, yy, xx = np.indices(SHAPE)
    label = ((zz - 3) ** 2 + (yy - 6) ** 2 + (xx - 4) ** 2 < 12).astype(np.uint8)
    label[1, 1, 10] = 2  # an asymmetric second class: any wrong flip shows
    out = []
    for arr in (image, label):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(SPACING_XYZ)
        img.SetOrigin(ORIGIN_XYZ)
        out.append(img)
    return out[0], out[1]


# name -> (how the identity pair is re-stored, file suffix)
VARIANTS = {
    "ident": (lambda im: im, ".nii.gz"),
    "ras": (lambda im: sitk.Flip(im, [True, True, False]), ".nii.gz"),  # diag(-1, -1, 1)
    "perm": (lambda im: sitk.PermuteAxes(im, [2, 0, 1]), ".mha"),
    "permflip": (
        lambda im: sitk.PermuteAxes(sitk.Flip(im, [False, True, True]), [1, 2, 0]),
        ".nrrd",
    ),
}


@pytest.fixture(scope="module")
def variant_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("orient")
    image, label = _pair()
    files = {}
    for name, (restore, suffix) in VARIANTS.items():
        paths = []
        for kind, img in (("img", image), ("lab", label)):
            path = root / f"{name}_{kind}{suffix}"
            sitk.WriteImage(restore(img), str(path))
            paths.append(path)
        files[name] = (paths[0], paths[1])
    return files


@pytest.fixture(scope="module")
def variant_cache(
    tmp_path_factory: pytest.TempPathFactory, variant_files: dict[str, tuple[Path, Path]]
) -> VolumeCache:
    cases = [Case(name, img, lab) for name, (img, lab) in variant_files.items()]
    cache = VolumeCache(tmp_path_factory.mktemp("orient_cache") / "c.zarr")
    cache.build(cases, workers=1, progress=False)
    return cache


def test_the_variants_really_differ_as_stored(variant_files):
    ident = read_volume(variant_files["ident"][0])
    for name in ("ras", "perm", "permflip"):
        vol = read_volume(variant_files[name][0])
        assert not np.allclose(vol.direction, np.eye(3))
        assert vol.shape != ident.shape or not np.array_equal(vol.array, ident.array)
    ras = read_volume(variant_files["ras"][0])
    np.testing.assert_allclose(ras.direction, np.diag([1.0, -1.0, -1.0]))  # (z, y, x)


@pytest.mark.parametrize("name", ["ras", "perm", "permflip"])
def test_cached_arrays_equal_the_identity_case(variant_cache, name):
    for array in ("image", "label"):
        np.testing.assert_array_equal(
            variant_cache.read(name, array=array), variant_cache.read("ident", array=array)
        )
    got, ref = variant_cache.info(name), variant_cache.info("ident")
    assert got.shape == ref.shape == SHAPE
    np.testing.assert_allclose(got.spacing, SPACING_XYZ[::-1], rtol=1e-6)
    np.testing.assert_allclose(got.origin, ref.origin, atol=1e-6)
    np.testing.assert_array_equal(got.direction, np.eye(3))
    np.testing.assert_array_equal(got.fg_indices, ref.fg_indices)
    assert not got.reorientation.identity and ref.reorientation.identity


@pytest.mark.parametrize("name", list(VARIANTS))
def test_undo_reproduces_the_stored_file_bit_for_bit(variant_cache, variant_files, name):
    info = variant_cache.info(name)
    for array, path in zip(("image", "label"), variant_files[name], strict=True):
        stored = sitk.ReadImage(str(path))
        back = info.reorientation.undo(variant_cache.read(name, array=array))
        np.testing.assert_array_equal(back, sitk.GetArrayFromImage(stored))
        assert back.dtype == sitk.GetArrayFromImage(stored).dtype
        written = info.reorientation.to_sitk(variant_cache.read(name, array=array))
        assert written.GetSize() == stored.GetSize()
        assert written.GetSpacing() == stored.GetSpacing()
        assert written.GetOrigin() == stored.GetOrigin()
        assert written.GetDirection() == stored.GetDirection()
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(stored)
        )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_voxel_keeps_its_physical_position(variant_files, name):
    stored = sitk.ReadImage(str(variant_files[name][0]))
    canon, reo = to_canonical(read_volume(variant_files[name][0]))
    canon_img = canon.to_sitk()
    # voxel (0, 0, 0) of the canonical grid sits where SimpleITK puts that voxel in the file
    p0 = canon_img.TransformIndexToPhysicalPoint((0, 0, 0))
    src0 = stored.TransformPhysicalPointToIndex(p0)
    np.testing.assert_allclose(stored.TransformIndexToPhysicalPoint(src0), p0, atol=1e-9)
    assert canon_img[0, 0, 0] == stored[src0]
    # and so do the file's voxel (0, 0, 0) and a spread of others
    rng = np.random.default_rng(0)
    for idx in [
        (0, 0, 0),
        *(tuple(int(v) for v in rng.integers(0, stored.GetSize())) for _ in range(25)),
    ]:
        p = stored.TransformIndexToPhysicalPoint(idx)
        dst = canon_img.TransformPhysicalPointToIndex(p)
        np.testing.assert_allclose(canon_img.TransformIndexToPhysicalPoint(dst), p, atol=1e-9)
        assert canon_img[dst] == stored[idx]
    # the documented (z, y, x) formula of Geometry agrees with SimpleITK
    g = reo.canonical_geometry
    np.testing.assert_allclose(g.physical_point((0, 0, 0))[::-1], p0, atol=1e-9)


def test_channels_first_arrays_undo_per_channel(variant_files):
    canon, reo = to_canonical(read_volume(variant_files["permflip"][0]))
    probs = np.random.default_rng(1).random((3, *canon.shape)).astype(np.float32)
    back = reo.undo(probs)
    for c in range(3):
        np.testing.assert_array_equal(back[c], reo.undo(probs[c]))
    np.testing.assert_array_equal(reo.apply(back), probs)
    with pytest.raises(ValueError, match="canonical grid"):
        reo.undo(probs[:, :-1])


def test_reorientation_record_round_trips_through_json(variant_files):
    _, reo = to_canonical(read_volume(variant_files["permflip"][0]))
    again = Reorientation.from_record(json.loads(json.dumps(reo.to_record())))
    assert (again.axes, again.flips) == (reo.axes, reo.flips)
    g, h = reo.original_geometry, again.original_geometry
    assert (g.shape, g.spacing, g.origin) == (h.shape, h.spacing, h.origin)
    np.testing.assert_array_equal(g.direction, h.direction)


def test_read_case_canonical_gives_the_cached_grid(variant_files, variant_cache):
    image, label = read_case(Case("p", *variant_files["perm"]), canonical=True)
    np.testing.assert_array_equal(image.array, variant_cache.read("ident"))
    np.testing.assert_array_equal(label.array, variant_cache.read("ident", array="label"))


def _rotation_xyz(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_oblique_volume_is_refused_naming_file_and_direction(tmp_path, make_volume_file):
    arr = np.zeros(SHAPE, np.int16)
    lab = np.zeros(SHAPE, np.uint8)
    lab[4, 5, 6] = 1
    rot = _rotation_xyz(np.deg2rad(20))
    img = make_volume_file("oblique.nii.gz", arr, direction_xyz=rot)
    labp = make_volume_file("oblique_lab.nii.gz", lab, direction_xyz=rot)
    with pytest.raises(VolumeError, match="oblique direction cosines") as err:
        to_canonical(read_volume(img))
    msg = str(err.value)
    assert str(img) in msg and "0.9397" in msg and "resample" in msg
    cache = VolumeCache(tmp_path / "c.zarr")
    with pytest.raises(VolumeError, match="oblique") as err:
        cache.build([Case("ob", img, labp)], workers=1, progress=False)
    assert str(img) in str(err.value)
    assert "ob" not in VolumeCache(tmp_path / "c.zarr")


def test_direction_within_tolerance_counts_as_axis_aligned():
    # a residual rotation under the tolerance on top of a y flip: accepted, the direction
    # becomes the identity, and voxel (0, 0, 0) keeps its position exactly (per SimpleITK)
    angle = 0.5 * ORIENTATION_TOL
    direction = np.diag([1.0, -1.0, 1.0]) @ _rotation_xyz(angle)[::-1, ::-1]
    vol = Volume(
        np.arange(60, dtype=np.int16).reshape(3, 4, 5),
        spacing=(2.0, 0.5, 0.7),
        origin=(5.0, -3.0, 12.0),
        direction=direction,
    )
    canon, reo = to_canonical(vol)
    np.testing.assert_array_equal(canon.array, vol.array[:, ::-1])
    np.testing.assert_array_equal(canon.direction, np.eye(3))
    stored, canon_img = vol.to_sitk(), canon.to_sitk()
    np.testing.assert_allclose(
        canon_img.TransformIndexToPhysicalPoint((0, 0, 0)),
        stored.TransformIndexToPhysicalPoint((0, 3, 0)),  # (x, y, z): the last y row
        rtol=0,
        atol=1e-12,
    )
    # the far corner moves by less than the documented 3 * tol * distance
    far = np.subtract(
        canon_img.TransformIndexToPhysicalPoint((4, 3, 2)),
        stored.TransformIndexToPhysicalPoint((4, 0, 2)),
    )
    dist = np.subtract(
        stored.TransformIndexToPhysicalPoint((4, 0, 2)),
        stored.TransformIndexToPhysicalPoint((0, 3, 0)),
    )
    assert 0 < np.linalg.norm(far) <= 3 * ORIENTATION_TOL * np.linalg.norm(dist)
    np.testing.assert_array_equal(reo.original_geometry.direction, direction)
    with pytest.raises(VolumeError, match="oblique"):
        to_canonical(vol, tol=0.1 * ORIENTATION_TOL)


def test_a_cache_of_the_old_format_is_rebuilt_not_misread(tmp_path, variant_files):
    root = tmp_path / "c.zarr"
    cases = [Case(n, *variant_files[n]) for n in ("ident", "ras")]
    VolumeCache(root).build(cases, workers=1, progress=False)
    # what a format-1 cache looked like: no reorientation record, arrays as stored
    meta = json.loads((root / "zarr.json").read_text())
    manifest = meta["attributes"]["voxaug_cache"]
    manifest["format"] = 1
    for entry in manifest["cases"].values():
        del entry["reorientation"]
    (root / "zarr.json").write_text(json.dumps(meta))
    old_dirs = {p.name for p in root.iterdir() if "@" in p.name}
    cache = VolumeCache(root)  # opens, but every read is refused
    for read in (lambda: cache.cases, lambda: cache.read("ras"), lambda: cache.info("ras")):
        with pytest.raises(
            CacheError, match=f"cache format 1; this version reads {CACHE_FORMAT}: rebuild"
        ):
            read()
    assert "cache format 1" in repr(cache) and not cache.complete
    report = cache.build(cases, workers=1, progress=False)
    assert sorted(report.built) == ["ident", "ras"] and not report.kept
    assert not old_dirs & {p.name for p in root.iterdir()}
    assert cache.complete
    np.testing.assert_array_equal(cache.read("ras"), cache.read("ident"))
