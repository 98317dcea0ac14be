"""Fixtures of the loaders tests: small phantom datasets, caches and file writers.

Files are written with SimpleITK directly (not with ``loaders.write_*``) wherever a test
uses them as an independent reference.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from loaders import Case, VolumeCache
from loaders.phantom import write_msd_dataset
from loaders.remote_server import DUMMY_AWS_ENV, LocalS3Server


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
    """Three small (48x96x96) phantom cases in the MSD layout: 2x3x3 cache chunks each."""
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


# ------------------------------------------------------------------ object storage (loopback)
def aws_test_env(mp: pytest.MonkeyPatch, staging: Path) -> None:
    """``DUMMY_AWS_ENV`` and nothing else of AWS's from the machine; staging in ``staging``."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            mp.delenv(name)
    for name, value in DUMMY_AWS_ENV.items():
        mp.setenv(name, value)
    mp.setenv("XDG_CACHE_HOME", str(staging))


@pytest.fixture(scope="module")
def aws_module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``aws_test_env`` for a module's fixtures and tests."""
    with pytest.MonkeyPatch.context() as mp:
        aws_test_env(mp, tmp_path_factory.mktemp("xdg"))
        yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    """moto's S3 server on 127.0.0.1, one per test session."""
    with LocalS3Server() as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``aws_test_env`` for one test."""
    aws_test_env(monkeypatch, tmp_path / "xdg")


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Refuse (and record) every connection of this process to an address that is not
    loopback; the test fails if there was one."""
    refused: list[object] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else address
            try:
                loopback = ipaddress.ip_address(str(host)).is_loopback
            except ValueError:  # a host name: resolved elsewhere, never expected here
                loopback = False
            if not loopback:
                refused.append(address)
                raise ConnectionRefusedError(f"test guard: {address} is not loopback")
        connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield refused
    assert not refused, f"connections outside 127.0.0.1 were attempted: {refused}"
