"""Volume I/O, dataset layouts, the zarr volume cache and the phantom dataset.

Arrays are (z, y, x) as ``SimpleITK.GetArrayFromImage`` returns them; spacing, origin and
direction are stored in the same order (see ``loaders.volume``).

    >>> import loaders
    >>> cases = loaders.phantom.write_msd_dataset("data/phantom", n_train=8, seed=0)
    >>> cache = loaders.VolumeCache("data/phantom.zarr")
    >>> cache.build(cases, label_map=loaders.liver_label)
    >>> patch = cache.read_region(cases[0].id, ((0, 0, 0), (64, 128, 128)))

``PatchDataset``, ``ShardSampler`` and ``worker_init_fn`` (``loaders.dataset``, the torch
``Dataset`` face of the sampler) are imported on first use: ``import loaders`` does not
import torch.
"""

# ruff: noqa: E402 (the io extra is checked before the modules that need it are imported)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from augment.extras import require_extra

_IO_MODULES = ("SimpleITK", "zarr", "numcodecs", "tqdm")
"""What ``loaders`` imports beyond the core, all from the ``io`` extra."""


require_extra("loaders", _IO_MODULES, "io", note="; 'voxaug[train]' includes it")

from loaders import phantom
from loaders.cache import BuildReport, CaseInfo, VolumeCache, default_cache_root
from loaders.cases import (
    Case,
    LabelMap,
    apply_label_map,
    canonical_pair,
    label_values,
    liver_label,
    read_case,
)
from loaders.chunkstore import Region
from loaders.errors import (
    CacheError,
    CaseError,
    DatasetError,
    DataWarning,
    LoaderError,
    VolumeError,
    VolumeNotFoundError,
)
from loaders.layouts import (
    case_id_from_path,
    declared_labels,
    lits_cases,
    load_dataset_json,
    msd_cases,
    pair_cases,
    sliver_cases,
)
from loaders.loader import LoaderStats, PatchLoader, WorkerError
from loaders.orientation import ORIENTATION_TOL, Geometry, Reorientation, to_canonical
from loaders.sampler import PatchSampler, footprint
from loaders.volume import (
    SUPPORTED_SUFFIXES,
    Volume,
    detached_data_names,
    dicom_series,
    read_volume,
    resample,
    write_array,
    write_volume,
)

if TYPE_CHECKING:
    from loaders.dataset import PatchDataset as PatchDataset
    from loaders.dataset import ShardSampler as ShardSampler
    from loaders.dataset import worker_init_fn as worker_init_fn

_TORCH_FACE = ("PatchDataset", "ShardSampler", "worker_init_fn")
"""Names of ``loaders.dataset``, which imports torch (the ``torch`` extra) when first used;
left out of ``__all__``, so that ``from loaders import *`` does not import torch."""


def __getattr__(name: str) -> object:
    if name not in _TORCH_FACE:
        raise AttributeError(f"module 'loaders' has no attribute {name!r}")
    require_extra(f"loaders.{name}", ("torch",), "torch")
    module = importlib.import_module("loaders.dataset")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_TORCH_FACE})


__all__ = [
    "LoaderStats",
    "PatchLoader",
    "PatchSampler",
    "WorkerError",
    "footprint",
    "SUPPORTED_SUFFIXES",
    "BuildReport",
    "CacheError",
    "Case",
    "CaseError",
    "CaseInfo",
    "DataWarning",
    "DatasetError",
    "Geometry",
    "LabelMap",
    "LoaderError",
    "ORIENTATION_TOL",
    "Region",
    "Reorientation",
    "Volume",
    "VolumeCache",
    "VolumeError",
    "VolumeNotFoundError",
    "apply_label_map",
    "canonical_pair",
    "case_id_from_path",
    "detached_data_names",
    "default_cache_root",
    "declared_labels",
    "dicom_series",
    "label_values",
    "liver_label",
    "lits_cases",
    "load_dataset_json",
    "msd_cases",
    "pair_cases",
    "phantom",
    "read_case",
    "read_volume",
    "resample",
    "sliver_cases",
    "to_canonical",
    "write_array",
    "write_volume",
]
