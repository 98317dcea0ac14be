"""Volume I/O through SimpleITK, in the project's (z, y, x) convention.

SimpleITK reports geometry in (x, y, z) order; a ``Volume`` stores everything in (z, y, x),
the order of ``GetArrayFromImage``:

- ``spacing`` and ``origin`` are SimpleITK's tuples reversed.
- ``direction`` is SimpleITK's 3x3 matrix (row-major ``GetDirection()``; row i is physical
  axis x/y/z, column j is index axis i/j/k) with both its rows and its columns reversed:
  ``direction_zyx = np.reshape(GetDirection(), (3, 3))[::-1, ::-1]``. So column j of
  ``direction_zyx`` is the unit vector, in physical (z, y, x) components, along which array
  axis j advances, and a voxel index (z, y, x) sits at the physical point (z, y, x)
  ``origin + direction @ (spacing * index)``, the same formula as ITK's with every vector
  reversed.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from loaders.errors import VolumeError, VolumeNotFoundError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Volume",
    "dicom_series",
    "detached_data_names",
    "read_volume",
    "resample",
    "volume_suffix",
    "write_array",
    "write_volume",
]

# suffix -> SimpleITK ImageIO used to read it (pinning the IO means a file whose content
# does not match its name fails loudly instead of being read by some other IO).
_IMAGE_IOS = {
    ".nii": "NiftiImageIO",
    ".nii.gz": "NiftiImageIO",
    ".mha": "MetaImageIO",
    ".mhd": "MetaImageIO",
    ".nrrd": "NrrdImageIO",
    ".nhdr": "NrrdImageIO",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_IMAGE_IOS)
"""File suffixes ``read_volume`` accepts; a folder is read as a DICOM series."""

Triple = tuple[float, float, float]


def _triple(value: Sequence[float], name: str) -> Triple:
    out = tuple(float(v) for v in value)
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be 3 finite numbers (z, y, x), got {value!r}")
    return out


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scalar volume with its geometry, all in (z, y, x) order.

    Attributes:
        array: the voxels, shape (z, y, x) (= (D, H, W)).
        spacing: voxel size (z, y, x) in mm.
        origin: physical position (z, y, x) in mm of the centre of voxel (0, 0, 0).
        direction: 3x3 direction cosines in (z, y, x) order (see the module docstring).
        path: the file or DICOM folder it was read from, if any.
    """

    array: np.ndarray
    spacing: Triple = (1.0, 1.0, 1.0)
    origin: Triple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    path: Path | None = None

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ValueError(f"Volume array must be 3D (z, y, x), got shape {arr.shape}")
        spacing = _triple(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing!r}")
        direction = np.array(self.direction, dtype=np.float64).reshape(3, 3)
        direction.setflags(write=False)
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", _triple(self.origin, "origin"))
        object.__setattr__(self, "direction", direction)
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry and path with other voxels of the same shape."""
        if np.shape(array) != self.shape:
            raise ValueError(f"shape {np.shape(array)} differs from the volume's {self.shape}")
        return replace(self, array=array)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with the same voxels and geometry (converted to (x, y, z))."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing[::-1])
        img.SetOrigin(self.origin[::-1])
        img.SetDirection(tuple(self.direction[::-1, ::-1].ravel()))
        return img

    @classmethod
    def from_sitk(cls, image: sitk.Image, *, path: str | os.PathLike[str] | None = None) -> Volume:
        """Convert a 3D scalar SimpleITK image (geometry reversed into (z, y, x))."""
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(image.GetSpacing())[::-1],
            origin=tuple(image.GetOrigin())[::-1],
            direction=np.reshape(image.GetDirection(), (3, 3))[::-1, ::-1],
            path=None if path is None else Path(path),
        )


def volume_suffix(path: str | os.PathLike[str]) -> str:
    """The (possibly double, like ``.nii.gz``) lower-case suffix of a file name."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _itk_message(exc: Exception) -> str:
    """The informative line of an ITK exception (they span several lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "description" in ln.lower():
            return ln.split(":", 1)[-1].strip()
    return lines[-1] if lines else type(exc).__name__


def dicom_series(folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The DICOM series in a folder (GDCM), as {series instance UID: sorted file names}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeNotFoundError(folder, "no such DICOM folder")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    return {
        uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids
    }


def _read_dicom(folder: Path, series_uid: str | None) -> sitk.Image:
    series = dicom_series(folder)
    if not series:
        raise VolumeError(folder, "folder holds no DICOM series (GDCM found none)")
    if series_uid is None:
        series_uid = max(sorted(series), key=lambda uid: len(series[uid]))
    elif series_uid not in series:
        raise VolumeError(
            folder, f"no DICOM series with UID {series_uid!r}; found {sorted(series)}"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[series_uid])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(
            folder, f"cannot read DICOM series {series_uid}: {_itk_message(exc)}"
        ) from None


@dataclass(frozen=True)
class _NiftiHeader:
    order: str  # byte order, "<" or ">"
    dims: tuple[int, ...]  # (x, y, z, ...) sizes
    datatype: int
    bitpix: int
    offset: int  # of the voxel data

    @property
    def nbytes(self) -> int:
        """Header + voxel bytes of a complete file."""
        return self.offset + math.prod(self.dims) * self.bitpix // 8


def _nifti_header(header: bytes, path: Path) -> _NiftiHeader:
    """The fields of a NIfTI-1 / NIfTI-2 header needed to validate the voxel data."""
    for order in "<>":
        if len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] in (348, 540):
            break
    else:
        raise VolumeError(path, "not a NIfTI file (bad sizeof_hdr)")
    if struct.unpack(order + "i", header[:4])[0] == 348:
        if len(header) < 348:
            raise VolumeError(path, f"truncated NIfTI header ({len(header)} of 348 bytes)")
        datatype, bitpix = struct.unpack(order + "2h", header[70:74])
        dim = struct.unpack(order + "8h", header[40:56])
        offset = max(int(struct.unpack(order + "f", header[108:112])[0]), 352)
    else:
        if len(header) < 540:
            raise VolumeError(path, f"truncated NIfTI-2 header ({len(header)} of 540 bytes)")
        datatype, bitpix = struct.unpack(order + "2h", header[12:16])
        dim = struct.unpack(order + "8q", header[16:80])
        offset = max(int(struct.unpack(order + "q", header[168:176])[0]), 544)
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 0 for d in dim[1 : ndim + 1]) or bitpix <= 0:
        raise VolumeError(path, f"corrupt NIfTI header (dim {dim}, bitpix {bitpix})")
    return _NiftiHeader(order, tuple(dim[1 : ndim + 1]), datatype, bitpix, offset)


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


class _NonFinite:
    """Counts NaN/Inf values in a stream of voxel bytes (x fastest, as NIfTI stores)."""

    def __init__(self, dtype: str | None):
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.count = 0
        self.first = -1
        self._seen = 0
        self._rest = b""

    def feed(self, block: bytes) -> None:
        if self.dtype is None:
            return
        data = self._rest + block
        n = len(data) // self.dtype.itemsize * self.dtype.itemsize
        self._rest = data[n:]
        values = np.frombuffer(data[:n], dtype=self.dtype)
        bad = ~np.isfinite(values)
        if bad.any():
            if self.first < 0:
                self.first = self._seen + int(np.argmax(bad))
            self.count += int(bad.sum())
        self._seen += values.size


def _gzip_length(path: Path) -> int:
    """The uncompressed length (mod 2^32) a gzip file's trailer records."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


def _check_nifti(path: Path) -> None:
    """Refuse truncated NIfTI files and NIfTI files with NaN/Inf voxels.

    ITK reads a truncated NIfTI without complaint (zero-filled), and niftilib turns NaN
    and Inf voxels into 0, so both are checked on the raw bytes. Integer files: the size
    of a .nii, or the gzip trailer's length field of a .nii.gz (a truncated stream ends in
    arbitrary bytes; on a mismatch, e.g. a multi-member gzip, the stream is decompressed
    to be sure). Float files are decompressed and scanned for NaN/Inf.
    """
    compressed = volume_suffix(path) == ".nii.gz"
    size = 0
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as fh:
            head = fh.read(544)
            hdr = _nifti_header(head, path)
            if not compressed and hdr.datatype not in _NIFTI_FLOATS:
                size = path.stat().st_size  # no need to read the voxels
            elif hdr.datatype not in _NIFTI_FLOATS and _gzip_length(path) == hdr.nbytes % 2**32:
                size = hdr.nbytes
            else:
                dtype = _NIFTI_FLOATS.get(hdr.datatype)
                scan = _NonFinite(None if dtype is None else hdr.order + dtype)
                voxels_end = hdr.nbytes
                size = len(head)
                scan.feed(head[hdr.offset : voxels_end])
                while block := fh.read(1 << 22):
                    lo = max(hdr.offset - size, 0)
                    hi = max(min(voxels_end - size, len(block)), 0)
                    if lo < hi:
                        scan.feed(block[lo:hi])
                    size += len(block)
                if scan.count:
                    first = np.unravel_index(scan.first, hdr.dims, order="F")[::-1]
                    raise VolumeError(
                        path,
                        f"has {scan.count} NaN/Inf voxels (first at (z, y, x) = "
                        f"{tuple(int(i) for i in first[-3:])})",
                    )
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise VolumeError(path, f"truncated or corrupt gzip stream ({exc})") from None
    if size < hdr.nbytes:
        raise VolumeError(
            path,
            f"truncated NIfTI: {size} bytes of header and voxel data, the header "
            f"announces {hdr.nbytes}",
        )


_HEADER_LIMIT = 1 << 20  # bytes of a MetaImage / NRRD header searched for its fields
_META_FIELD = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
_NRRD_DATA_FILE = re.compile(r"^\s*data ?file\s*:\s*(.*?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class _TextHeader:
    fields: dict[str, str]  # MetaImage "Key = Value" lines; NRRD: only "data file"
    data_offset: int  # byte offset just past the data-file line (attached data follows)
    rest: list[str]  # the lines after the data-file line (a LIST of files)


def _text_header(path: Path) -> _TextHeader:
    """The fields of a MetaImage (``.mhd`` / ``.mha``) or NRRD (``.nhdr`` / ``.nrrd``)
    header, up to its data-file line (MetaImage's last field) or its end."""
    metaimage = volume_suffix(path) in (".mhd", ".mha")
    fields: dict[str, str] = {}
    offset = 0
    rest: list[str] = []
    with open(path, "rb") as fh:
        for raw in fh:
            offset += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            if metaimage:
                m = _META_FIELD.match(line)
                if m is not None:
                    fields[m.group(1)] = m.group(2)
                    if m.group(1) == "ElementDataFile":
                        break
            else:
                if not line.strip():
                    break  # a blank line ends a NRRD header
                m = _NRRD_DATA_FILE.match(line)
                if m is not None:
                    fields["data file"] = m.group(1)
                    break
            if offset > _HEADER_LIMIT:
                break
        else:
            return _TextHeader(fields, offset, rest)
        key = "ElementDataFile" if metaimage else "data file"
        if key in fields and fields[key].upper().startswith("LIST"):
            text = fh.read(_HEADER_LIMIT).decode("latin-1")
            rest = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return _TextHeader(fields, offset, rest)


def _pattern_names(value: str) -> list[str] | None:
    """The file names of a ``format min max step`` data-file pattern, or None if
    ``value`` is not one."""
    parts = value.split()
    if len(parts) < 4 or "%" not in parts[0]:
        return None
    try:
        lo, hi, step = (int(v) for v in parts[1:4])
        if step == 0 or (hi - lo) // step > 1_000_000:
            return None
        return [parts[0] % i for i in range(lo, hi + (1 if step > 0 else -1), step)]
    except (ValueError, TypeError):
        return None


def detached_data_names(path: str | os.PathLike[str]) -> list[str]:
    """The data files a MetaImage or NRRD header names, as written in it.

    Names are relative to the header's folder unless absolute. A MetaImage's
    ``ElementDataFile`` or a NRRD's ``data file`` field may name one file, a ``LIST`` of
    files (the lines that follow) or a ``format min max step`` pattern (expanded here).

    Args:
        path: a ``.mhd`` / ``.mha`` / ``.nhdr`` / ``.nrrd`` file (other files: none).

    Returns:
        The names; empty where the voxels are in the header's own file (``LOCAL``).
    """
    p = Path(path)
    if volume_suffix(p) not in (".mhd", ".mha", ".nhdr", ".nrrd") or not p.is_file():
        return []
    try:
        header = _text_header(p)
    except OSError:
        return []
    value = header.fields.get("ElementDataFile", header.fields.get("data file", "")).strip()
    if not value or value.upper() == "LOCAL":
        return []
    if value.upper().startswith("LIST"):
        return header.rest
    names = _pattern_names(value)
    return [value] if names is None else names


def _check_metaimage_data(path: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse a MetaImage whose data file is missing or shorter than its header announces.

    ITK fails on these with "Reason: Success" (or a misleading "No such file"), so the
    sizes are compared first. Lists and patterns of data files are left to ITK.
    """
    header = _text_header(path)
    value = header.fields.get("ElementDataFile", "").strip()
    if not value or value.upper().startswith("LIST") or _pattern_names(value) is not None:
        return
    local = value.upper() == "LOCAL"
    data = path if local else path.parent / value
    if not data.is_file():
        raise VolumeError(
            path, f"its data file {value!r} (ElementDataFile) does not exist: looked for {data}"
        )
    pixel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())
    itemsize = pixel.GetSizeOfPixelComponent() * reader.GetNumberOfComponents()
    n_voxels = math.prod(reader.GetSize())
    if header.fields.get("CompressedData", "False").strip().lower() == "true":
        size_field = header.fields.get("CompressedDataSize", "").strip()
        if not size_field.isdigit():
            return  # a compressed stream of unknown length: ITK's zlib decides
        expected = int(size_field)
        what = f"{expected} bytes of compressed voxel data (CompressedDataSize)"
    else:
        expected = n_voxels * itemsize
        what = (
            f"{expected} bytes of voxel data ({n_voxels} voxels of {itemsize} bytes, "
            f"DimSize {' '.join(str(n) for n in reader.GetSize())})"
        )
    try:
        header_size = int(header.fields.get("HeaderSize", "0"))
    except ValueError:
        header_size = 0
    size = data.stat().st_size
    if header_size == -1:  # the voxels are the last bytes of the file
        start = 0
    elif local:
        start = header.data_offset
    else:
        start = max(header_size, 0)
    found = size - start
    if found < expected:
        where = (
            "after its header"
            if local
            else f"in {data}" + (f" after HeaderSize {header_size}" if start else "")
        )
        whole = f" ({data.name} is {size} bytes)" if start else ""
        raise VolumeError(
            path, f"truncated: expected {what} {where}, found {max(found, 0)} bytes{whole}"
        )


@contextmanager
def _unambiguous(path: Path) -> Iterator[Path]:
    """A name ITK will resolve to ``path`` itself.

    niftilib, asked for ``x.nii.gz``, opens ``x.nii`` instead when that file exists too;
    such a file is read through a symbolic link (or a copy) in a private folder.
    """
    name = path.name
    if not (name.lower().endswith(".nii.gz") and path.with_name(name[:-3]).exists()):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="loaders-") as tmp:
        alias = Path(tmp) / "volume.nii.gz"
        try:
            alias.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, alias)
        yield alias


def _read_file(path: Path) -> sitk.Image:
    suffix = volume_suffix(path)
    if suffix not in _IMAGE_IOS:
        raise VolumeError(
            path,
            f"unsupported file type {suffix or '(no suffix)'!r}; expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} or a DICOM series folder",
        )
    if suffix in (".nii", ".nii.gz"):
        _check_nifti(path)
    with _unambiguous(path) as name:
        return _read_with_itk(path, name, suffix)


def _read_with_itk(path: Path, name: Path, suffix: str) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IMAGE_IOS[suffix])
    reader.SetFileName(str(name))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(path, f"corrupt or unreadable header: {_itk_message(exc)}") from None
    size = reader.GetSize()
    dim = reader.GetDimension()
    if dim == 4 and size[3] == 1:
        reader.SetExtractIndex((0, 0, 0, 0))
        reader.SetExtractSize((*size[:3], 0))  # a 4D file with one time point: drop t
    elif dim != 3:
        raise VolumeError(
            path, f"is {dim}D with size (x, y, z, ...) {size}; a 3D volume is expected"
        )
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(
            path,
            f"has {reader.GetNumberOfComponents()} components per voxel "
            "(vector/RGB image); a scalar volume is expected",
        )
    if suffix in (".mhd", ".mha"):
        _check_metaimage_data(path, reader)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(path, f"truncated or corrupt voxel data: {_itk_message(exc)}") from None


def resample(volume: Volume, spacing: Sequence[float], *, is_label: bool = False) -> Volume:
    """Resample to a target spacing (z, y, x) in mm with SimpleITK.

    The first voxel centre and the direction are kept; the size becomes
    ``round(shape * old_spacing / spacing)``. Images use linear interpolation (integer
    images are interpolated in float32 and rounded back to their dtype), labels nearest
    neighbour; samples past the last voxel take the nearest voxel's value.

    Args:
        volume: the volume to resample.
        spacing: target spacing (z, y, x) in mm.
        is_label: nearest-neighbour interpolation instead of linear.

    Returns:
        A new ``Volume`` with the same dtype.
    """
    target = _triple(spacing, "spacing")
    if min(target) <= 0:
        raise ValueError(f"target spacing must be positive, got {spacing!r}")
    size = [
        max(1, round(n * s / t))
        for n, s, t in zip(volume.shape, volume.spacing, target, strict=True)
    ]
    dtype = volume.dtype
    src = volume
    if not is_label and dtype.kind in "iub":
        src = volume.with_array(volume.array.astype(np.float32))
    img = src.to_sitk()
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(target[::-1])
    f.SetSize([int(n) for n in size[::-1]])
    f.SetOutputOrigin(img.GetOrigin())
    f.SetOutputDirection(img.GetDirection())
    f.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear)
    f.SetUseNearestNeighborExtrapolator(True)
    out = Volume.from_sitk(f.Execute(img), path=volume.path)
    arr = out.array
    if arr.dtype != dtype:
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            arr = np.clip(np.rint(arr), info.min, info.max)
        arr = arr.astype(dtype)
    return out.with_array(arr)


def _check_voxels(array: np.ndarray, path: Path | None, *, is_label: bool) -> np.ndarray:
    if 0 in array.shape:
        raise VolumeError(path, f"is empty: shape (z, y, x) {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = ~np.isfinite(array)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise VolumeError(
            path,
            f"has {int(bad.sum())} NaN/Inf voxels (first at (z, y, x) = {first}, "
            f"value {array[first]})",
        )
    if array.dtype.kind == "c":
        raise VolumeError(path, f"has complex voxels ({array.dtype}); a real volume is expected")
    if not is_label:
        return array
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            frac = array[array != np.round(array)].ravel()[:3]
            raise VolumeError(path, f"label has non-integer values, e.g. {frac.tolist()}")
    if array.dtype.kind not in "ub":
        lo = array.min()
        if lo < 0:
            raise VolumeError(path, f"label has negative values (min {lo})")
        hi = int(array.max())
        dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32
        array = array.astype(dtype)
    return array


def read_volume(
    path: str | os.PathLike[str],
    *,
    spacing: Sequence[float] | None = None,
    is_label: bool = False,
    series_uid: str | None = None,
) -> Volume:
    """Read a 3D volume: NIfTI, MetaImage, NRRD or a DICOM series folder.

    Args:
        path: a .nii / .nii.gz / .mha / .mhd (+ data file) / .nrrd / .nhdr file, or a
            folder holding a DICOM series (read with GDCM).
        spacing: resample to this spacing (z, y, x) in mm (the grid keeps its direction;
            ``loaders.orientation.to_canonical`` puts volumes on one axis order).
        is_label: the file is a label map: nearest-neighbour resampling, integer values
            required (float files with integer values and signed types become the
            smallest unsigned dtype that fits).
        series_uid: for a DICOM folder, the series instance UID to read; by default the
            series with the most files.

    Returns:
        A ``Volume`` with the array in (z, y, x) order and its geometry.

    Raises:
        VolumeNotFoundError: the path does not exist.
        VolumeError: unsupported suffix, corrupt or truncated file, not 3D, not scalar,
            NaN/Inf voxels, an invalid label; the message starts with the path.
    """
    p = Path(path)
    if not p.exists():
        raise VolumeNotFoundError(p, "no such file or folder")
    if p.is_dir():
        image = _read_dicom(p, series_uid)
    else:
        if series_uid is not None:
            raise VolumeError(
                p, f"series_uid={series_uid!r} given but the path is a file, not a DICOM folder"
            )
        image = _read_file(p)
    if image.GetDimension() != 3:
        raise VolumeError(
            p, f"is {image.GetDimension()}D with size {image.GetSize()}; a 3D volume is expected"
        )
    vol = Volume.from_sitk(image, path=p)
    vol = vol.with_array(_check_voxels(vol.array, p, is_label=is_label))
    if spacing is not None:
        vol = resample(vol, spacing, is_label=is_label)
    return vol


def write_volume(volume: Volume, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """Write a volume with SimpleITK (format from the suffix); single files atomically.

    Args:
        volume: what to write (geometry converted back to SimpleITK's (x, y, z)).
        path: destination; any suffix in ``SUPPORTED_SUFFIXES``.
        compress: compress the voxel data where the format allows (``.nii`` never is).

    Returns:
        The path written.
    """
    p = Path(path)
    suffix = volume_suffix(p)
    if suffix not in _IMAGE_IOS:
        raise VolumeError(
            p, f"unsupported file type {suffix!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    image = volume.to_sitk()
    if suffix in (".mhd", ".nhdr"):  # header + data file: written in place
        sitk.WriteImage(image, str(p), useCompression=compress)
        return p
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def write_array(
    array: np.ndarray,
    path: str | os.PathLike[str],
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
    compress: bool = True,
) -> Path:
    """Write a (z, y, x) array with geometry given in (z, y, x) order; see ``write_volume``."""
    vol = Volume(
        np.asarray(array),
        spacing=tuple(spacing),  # type: ignore[arg-type]
        origin=tuple(origin),  # type: ignore[arg-type]
        direction=np.eye(3) if direction is None else direction,
    )
    return write_volume(vol, path, compress=compress)
