"""Fixtures of the loaders tests: small phantom datasets, caches and file writers.

Files are written with SimpleITK directly (not with ``loaders.write_*``) wherever a test
uses them as an independent reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from loaders import Case, VolumeCache
from loaders.phantom import write_msd_dataset


def sitk_image(
    array: np.ndarray,
    *,
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction_xyz: np.ndarray | None = None,
) -> sitk.Image:
    """A SimpleITK image with geometry given in SimpleITK's own (x, y, z) order."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin_xyz)
    if direction_xyz is not None:
        img.SetDirection(tuple(np.asarray(direction_xyz, dtype=float).ravel()))
    return img


def write_dicom_series(
    image: sitk.Image,
    folder: Path,
    *,
    series_uid: str,
    prefix: str = "slice",
) -> list[Path]:
    """Write a 3D int16 image as a DICOM series, one file per slice, with the tags GDCM
    needs to put it back together (position, orientation, instance number, series UID)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    tags = [
        ("0008|0031", "101010"),
        ("0008|0021", "20240101"),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000e", series_uid),
        ("0020|0037", orientation),
        ("0008|103e", "loaders test"),
        ("0008|0060", "CT"),
        ("0018|0050", str(image.GetSpacing()[2])),
    ]
    paths = []
    for i in range(image.GetDepth()):
        sl = image[:, :, i]
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series_uid}.{i + 1}")  # SOP instance UID
        position = image.TransformIndexToPhysicalPoint((0, 0, i))
        sl.SetMetaData("0020|0032", "\\".join(map(str, position)))
        sl.SetMetaData("0020|0013", str(i + 1))
        path = folder / f"{prefix}_{i:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    """Three small (48x96x96) phantom cases in the MSD layout: 2x2x2 cache chunks each."""
    root = tmp_path_factory.mktemp("phantom") / "Task00_Phantom"
    return write_msd_dataset(root, n_train=3, seed=0, size="small")


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory: pytest.TempPathFactory, phantom_cases: list[Case]) -> Path:
    """A cache of ``phantom_cases`` built once per session (read-only for tests)."""
    root = tmp_path_factory.mktemp("cache") / "phantom.zarr"
    VolumeCache(root).build(phantom_cases, workers=1, progress=False)
    return root


@pytest.fixture
def make_volume_file(tmp_path: Path) -> Callable[..., Path]:
    """Write an array with SimpleITK; geometry in (x, y, z) like SimpleITK's setters."""

    def make(name: str, array: np.ndarray, **geometry: object) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk_image(array, **geometry), str(path))  # type: ignore[arg-type]
        return path

    return make


@pytest.fixture
def itk_image() -> Callable[..., sitk.Image]:
    """``sitk_image`` (an array plus geometry in SimpleITK's (x, y, z) order)."""
    return sitk_image


@pytest.fixture
def dicom_writer() -> Callable[..., list[Path]]:
    """``write_dicom_series`` (one file per slice, GDCM-readable tags)."""
    return write_dicom_series
