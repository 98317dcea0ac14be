"""augment: fused 3D spatial and intensity augmentation for volumetric segmentation.

One matrix per sample, one resampling pass: numba on the CPU, batched torch/Triton on CUDA.
Axis order (z, y, x); matrices map an output voxel index to the input index it samples.

    import augment
    aug = augment.Compose([
        augment.RandomCrop((128, 128, 128)),
        augment.RandomAffine(degrees=15, scale=(0.85, 1.25)),
        augment.RandomFlip(axes=(0, 1, 2), p=0.5),
        augment.Window(-200, 250), augment.RandomGamma((0.7, 1.5), p=0.3),
    ])
    out = aug(image=img, label=lab, rng=np.random.default_rng(0))

A call samples parameters (``Compose.sample``), plans the batch (``Compose.plan`` ->
``Plan``: matrices, fused intensity programs, exact-copy flags, extras) and hands the plan
to a backend (``augment.backends.numpy`` or ``augment.backends.torch``).

Nothing from ``loaders`` or ``training`` is imported here; torch and Triton load lazily.
"""

import importlib
from typing import TYPE_CHECKING, Any

from augment import matrices
from augment.base import IntensityTransform, Params, SpatialTransform
from augment.bias_field import RandomBiasField
from augment.compose import Compose
from augment.elastic import RandomElastic
from augment.filters import RandomGaussianBlur, RandomLowResolution
from augment.intensity import (
    Normalize,
    RandomBrightness,
    RandomContrast,
    RandomGamma,
    RandomNoise,
    Window,
)
from augment.plan import ComposeParams, Plan, stack_params
from augment.rng import batch_rngs, sample_rng
from augment.spatial import RandomAffine, RandomCrop, RandomFlip, RandomRot90, RandomSwapAxes
from augment.target_crop import TargetCrop
from augment.warp import affine_warp

if TYPE_CHECKING:
    from augment import slices

__all__ = [
    "Compose",
    "ComposeParams",
    "IntensityTransform",
    "Normalize",
    "Params",
    "Plan",
    "RandomAffine",
    "RandomBiasField",
    "RandomBrightness",
    "RandomContrast",
    "RandomCrop",
    "RandomElastic",
    "RandomFlip",
    "RandomGamma",
    "RandomGaussianBlur",
    "RandomLowResolution",
    "RandomNoise",
    "RandomRot90",
    "RandomSwapAxes",
    "SpatialTransform",
    "TargetCrop",
    "Window",
    "affine_warp",
    "batch_rngs",
    "matrices",
    "sample_rng",
    "slices",
    "stack_params",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``augment.slices`` loads on first use: its worker pool pulls in multiprocessing's
    shared memory, which a plain ``import augment`` does not need (about 35 ms of import)."""
    if name == "slices":
        return importlib.import_module("augment.slices")
    raise AttributeError(f"module 'augment' has no attribute {name!r}")
