"""read_volume / write_volume: round trips against SimpleITK, geometry order, bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from loaders import (
    Volume,
    VolumeError,
    VolumeNotFoundError,
    read_volume,
    resample,
    write_array,
    write_volume,
)


def rotation_xyz(ax: float, az: float) -> np.ndarray:
    """A proper rotation (det +1) in SimpleITK's (x, y, z) order, not symmetric."""
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


ARRAY = np.random.default_rng(0).integers(-1024, 2000, size=(7, 11, 13)).astype(np.int16)
SPACING_XYZ = (0.8, 0.7, 2.5)
ORIGIN_XYZ = (3.0, 20.5, -10.0)
DIRECTION_XYZ = rotation_xyz(0.35, 0.5)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"])
def test_round_trip_from_simpleitk_files(suffix, make_volume_file):
    path = make_volume_file(
        f"vol{suffix}",
        ARRAY,
        spacing_xyz=SPACING_XYZ,
        origin_xyz=ORIGIN_XYZ,
        direction_xyz=DIRECTION_XYZ,
    )
    vol = read_volume(path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, ARRAY)  # (z, y, x) exactly as written
    assert vol.shape == (7, 11, 13)
    np.testing.assert_allclose(vol.spacing, SPACING_XYZ[::-1], rtol=1e-6)
    np.testing.assert_allclose(vol.origin, ORIGIN_XYZ[::-1], atol=1e-5)
    np.testing.assert_allclose(vol.direction, DIRECTION_XYZ[::-1, ::-1], atol=1e-5)
    assert vol.path == path
    # The documented index -> physical formula, all in (z, y, x), agrees with ITK's.
    ref = sitk.ReadImage(str(path))
    for idx in [(0, 0, 0), (6, 10, 12), (3, 1, 7)]:
        p_zyx = np.array(vol.origin) + vol.direction @ (np.array(vol.spacing) * np.array(idx))
        expected = ref.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx[::-1]))
        np.testing.assert_allclose(p_zyx[::-1], expected, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int32])
def test_round_trip_dtypes(dtype, make_volume_file):
    arr = (np.arange(5 * 6 * 7) % 97).reshape(5, 6, 7).astype(dtype)
    vol = read_volume(make_volume_file("v.nrrd", arr))
    assert vol.array.dtype == dtype
    np.testing.assert_array_equal(vol.array, arr)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".mhd"])
def test_write_volume_is_read_by_simpleitk(tmp_path, suffix):
    vol = Volume(
        ARRAY,
        spacing=(2.5, 0.7, 0.8),
        origin=(-10.0, 20.5, 3.0),
        direction=DIRECTION_XYZ[::-1, ::-1],
    )
    path = write_volume(vol, tmp_path / f"out{suffix}")
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), ARRAY)
    np.testing.assert_allclose(ref.GetSpacing(), SPACING_XYZ, rtol=1e-6)
    np.testing.assert_allclose(ref.GetOrigin(), ORIGIN_XYZ, atol=1e-5)
    np.testing.assert_allclose(np.reshape(ref.GetDirection(), (3, 3)), DIRECTION_XYZ, atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


def test_dicom_series_round_trip_and_series_choice(tmp_path, itk_image, dicom_writer):
    rng = np.random.default_rng(1)
    big = rng.integers(-1000, 1500, size=(6, 10, 12)).astype(np.int16)
    small = rng.integers(-1000, 1500, size=(3, 10, 12)).astype(np.int16)
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 deg about z
    img_big = itk_image(
        big, spacing_xyz=(0.75, 0.5, 2.5), origin_xyz=(-50.0, 12.5, 100.0), direction_xyz=direction
    )
    img_small = itk_image(small, spacing_xyz=(1.0, 1.0, 5.0), origin_xyz=(0.0, 0.0, 0.0))
    folder = tmp_path / "dicom"
    dicom_writer(img_big, folder, series_uid="1.2.826.0.1.3680043.2.1125.1.1", prefix="a")
    dicom_writer(img_small, folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2", prefix="b")

    vol = read_volume(folder)  # the largest series by default
    np.testing.assert_array_equal(vol.array, big)
    np.testing.assert_allclose(vol.spacing, (2.5, 0.5, 0.75), rtol=1e-6)
    np.testing.assert_allclose(vol.origin, (100.0, 12.5, -50.0), atol=1e-4)
    np.testing.assert_allclose(vol.direction, direction[::-1, ::-1], atol=1e-6)

    other = read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2")
    np.testing.assert_array_equal(other.array, small)
    with pytest.raises(VolumeError, match=r"no DICOM series with UID '9\.9'") as err:
        read_volume(folder, series_uid="9.9")
    assert str(folder) in str(err.value) and "1.2.826.0.1.3680043.2.1125.1.1" in str(err.value)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(VolumeError, match="no DICOM series") as err:
        read_volume(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_resample_linear_ramp_and_nearest_label(tmp_path):
    z = np.arange(20, dtype=np.float32)[:, None, None] * 2.0  # value = physical z (mm)
    ramp = np.broadcast_to(z, (20, 8, 9)).copy()
    vol = Volume(ramp, spacing=(2.0, 1.0, 1.0))
    out = resample(vol, (3.0, 2.0, 0.5))
    assert out.shape == (13, 4, 18)
    assert out.spacing == (3.0, 2.0, 0.5)
    # linear interpolation reproduces a linear function exactly; past the last voxel the
    # nearest value is used
    expected = np.minimum(np.arange(13) * 3.0, 38.0)
    np.testing.assert_allclose(out.array[:, 0, 0], expected, atol=1e-4)

    label = Volume(
        (np.arange(20 * 8 * 9).reshape(20, 8, 9) % 5).astype(np.uint8), spacing=(2.0, 1.0, 1.0)
    )
    lab = resample(label, (1.0, 1.0, 1.0), is_label=True)
    assert lab.dtype == np.uint8 and lab.shape == (40, 8, 9)
    np.testing.assert_array_equal(lab.array[::2], label.array)  # nearest: exact copies

    ints = Volume(np.full((4, 4, 4), 7, np.int16) + np.arange(4, dtype=np.int16)[:, None, None])
    res = resample(ints, (0.5, 1.0, 1.0))
    assert res.dtype == np.int16
    # 7, 7.5, 8, 8.5, 9, 9.5, 10, (past the end) 10, rounded half to even, not truncated
    np.testing.assert_array_equal(res.array[:, 0, 0], [7, 8, 8, 8, 9, 10, 10, 10])


def test_read_volume_resamples_labels_with_nearest(make_volume_file):
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[3:7, 2:8, 4:6] = 2
    path = make_volume_file("lab.nii.gz", lab, spacing_xyz=(1.0, 1.0, 2.0))
    out = read_volume(path, spacing=(1.0, 1.0, 1.0), is_label=True)
    assert out.shape == (20, 10, 10)
    assert set(np.unique(out.array)) == {0, 2}


# ---------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeNotFoundError) as err:
        read_volume(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", ["image.png", "scan.hdr", "noext", "vol.nii.zip"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 400)
    with pytest.raises(VolumeError, match="unsupported file type") as err:
        read_volume(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_nifti(tmp_path, make_volume_file, suffix, keep):
    # ITK itself reads a truncated NIfTI silently (zero-filled): the loader must refuse it
    path = make_volume_file(f"cut{suffix}", ARRAY)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VolumeError, match="truncated") as err:
        read_volume(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".nrrd"])
def test_corrupt_header(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    payload = b"this is not a medical image\n" * 40
    path.write_bytes(gzip.compress(payload) if suffix == ".nii.gz" else payload)
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_truncated_other_formats(tmp_path, make_volume_file, suffix):
    path = make_volume_file(f"cut{suffix}", ARRAY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_truncated_raw_of_a_metaimage_names_the_sizes(tmp_path, make_volume_file):
    # ITK's own message for this is "Reason: Success"
    path = make_volume_file("cut.mhd", ARRAY)  # 7 * 11 * 13 int16 voxels = 2002 bytes
    raw = tmp_path / "cut.raw"
    assert raw.stat().st_size == ARRAY.nbytes == 2002
    raw.write_bytes(raw.read_bytes()[:1500])
    with pytest.raises(VolumeError, match="truncated") as err:
        read_volume(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and str(raw) in msg
    assert "expected 2002 bytes" in msg and "found 1500 bytes" in msg and "Success" not in msg


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_mha_names_the_sizes(tmp_path, compress):
    path = tmp_path / "cut.mha"
    sitk.WriteImage(sitk.GetImageFromArray(ARRAY), str(path), useCompression=compress)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    header = data[: data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")]
    expected = len(data) - len(header)  # every byte after the header is voxel data
    with pytest.raises(VolumeError, match="truncated") as err:
        read_volume(path)
    msg = str(err.value)
    assert f"expected {expected} bytes" in msg and f"found {expected - 100} bytes" in msg
    assert ("compressed" in msg) == compress and "Success" not in msg


def test_missing_raw_of_a_metaimage(tmp_path, make_volume_file):
    path = make_volume_file("gone.mhd", ARRAY)
    (tmp_path / "gone.raw").unlink()
    with pytest.raises(
        VolumeError, match=r"data file 'gone.raw' \(ElementDataFile\) does not exist"
    ):
        read_volume(path)


def test_complete_metaimage_with_header_size_reads(tmp_path, make_volume_file):
    # HeaderSize = -1: the voxels are the last bytes of a data file with a preamble
    path = make_volume_file("pre.mhd", ARRAY)
    raw = tmp_path / "pre.raw"
    raw.write_bytes(b"preamble" * 10 + raw.read_bytes())
    text = path.read_text().replace("ElementDataFile", "HeaderSize = -1\nElementDataFile")
    path.write_text(text)
    np.testing.assert_array_equal(read_volume(path).array, ARRAY)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), ARRAY)


def test_4d_image_is_rejected(tmp_path):
    img = sitk.JoinSeries([sitk.GetImageFromArray(ARRAY)] * 3)
    path = tmp_path / "dynamic.nii.gz"
    sitk.WriteImage(img, str(path))
    with pytest.raises(VolumeError, match="4D") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_4d_with_one_time_point_is_3d(tmp_path):
    img = sitk.JoinSeries([sitk.GetImageFromArray(ARRAY)])
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(img, str(path))
    assert sitk.ReadImage(str(path)).GetDimension() in (3, 4)
    np.testing.assert_array_equal(read_volume(path).array, ARRAY)


def test_2d_and_vector_images_are_rejected(tmp_path):
    p2 = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(ARRAY[0]), str(p2))
    with pytest.raises(VolumeError, match="2D") as err:
        read_volume(p2)
    assert str(p2) in str(err.value)
    pv = tmp_path / "rgb.mha"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(pv)
    )
    with pytest.raises(VolumeError, match="3 components") as err:
        read_volume(pv)
    assert str(pv) in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(make_volume_file, bad):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[2, 3, 1] = bad
    arr[3, 0, 0] = bad
    path = make_volume_file("nan.nii.gz", arr)
    with pytest.raises(
        VolumeError,
        match=r"2 NaN/Inf voxels \(first at \(z, y, x\) = "
        r"\(2, 3, 1\)",
    ) as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_label_validation(make_volume_file):
    frac = make_volume_file("frac.nii.gz", np.full((3, 3, 3), 0.5, np.float32))
    with pytest.raises(VolumeError, match="non-integer") as err:
        read_volume(frac, is_label=True)
    assert str(frac) in str(err.value)
    neg = make_volume_file("neg.nrrd", np.full((3, 3, 3), -1, np.int16))
    with pytest.raises(VolumeError, match="negative"):
        read_volume(neg, is_label=True)
    as_float = make_volume_file("f.nii.gz", np.full((3, 3, 3), 2.0, np.float32))
    lab = read_volume(as_float, is_label=True)
    assert lab.dtype == np.uint8 and (lab.array == 2).all()
    # the same files are fine as images
    assert read_volume(frac).dtype == np.float32


def test_nii_gz_next_to_nii_reads_the_file_asked_for(tmp_path):
    # niftilib opens x.nii when asked for x.nii.gz if both exist; the loader must not.
    write_array(ARRAY, tmp_path / "x.nii.gz")
    write_array(ARRAY[::-1], tmp_path / "x.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "x.nii.gz").array, ARRAY)
    np.testing.assert_array_equal(read_volume(tmp_path / "x.nii").array, ARRAY[::-1])


def test_volume_validates_its_fields():
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="positive"):
        Volume(np.zeros((2, 2, 2)), spacing=(1.0, 0.0, 1.0))
    vol = Volume(np.zeros((2, 3, 4)), spacing=[1, 2, 3])
    assert vol.spacing == (1.0, 2.0, 3.0) and not vol.direction.flags.writeable


def test_multi_member_gzip_nifti_is_complete(tmp_path):
    # e.g. bgzip output: the last member's length field is not the file's length
    write_array(ARRAY, tmp_path / "one.nii")
    raw = (tmp_path / "one.nii").read_bytes()
    half = len(raw) // 2
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    np.testing.assert_array_equal(read_volume(tmp_path / "two.nii.gz").array, ARRAY)
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[:half]))
    with pytest.raises(VolumeError, match="truncated NIfTI"):
        read_volume(tmp_path / "cut.nii.gz")
