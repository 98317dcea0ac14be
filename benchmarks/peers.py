"""Peer libraries on the benchmark workloads, each through its own best API.

Only what is importable runs (``pip install -e ".[peers]"``). Each way returns its output
in a form ``check_output`` of the workload can inspect, so a peer that silently does
something else is caught before it is timed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Way = tuple[str, Callable[[int], object]]


def _torch() -> Any:
    import torch

    torch.set_num_threads(1)
    return torch


def w1_ways(
    img: np.ndarray, lab: np.ndarray, pipeline: Any, patch: tuple[int, int, int]
) -> Iterator[Way]:
    """W1 for each installed peer: rotation U(-15, 15) deg per axis, isotropic scale
    U(0.85, 1.25), crop centre uniform over the valid range, flips p=0.5 per axis."""
    for make in (_batchgeneratorsv2, _monai, _monai_lazy, _torchio):
        try:
            way = make(img, lab, patch)
        except ImportError:
            continue
        if way is not None:
            yield way


def _batchgeneratorsv2(img: np.ndarray, lab: np.ndarray, patch: tuple[int, int, int]) -> Way:
    torch = _torch()
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    # bgv2 scales the sampling grid: our magnification s is its 1 / s
    spatial = SpatialTransform(
        patch,
        patch_center_dist_from_border=[p // 2 for p in patch],
        random_crop=True,
        p_rotation=1.0,
        rotation=(-math.radians(15), math.radians(15)),
        p_rot_per_axis=1.0,
        p_scaling=1.0,
        scaling=(1 / 1.25, 1 / 0.85),
        p_synchronize_scaling_across_axes=1.0,
        mode_seg="nearest",
    )
    pipe = ComposeTransforms([spatial, MirrorTransform(allowed_axes=(0, 1, 2))])
    image = torch.from_numpy(img)[None]
    seg = torch.from_numpy(lab.astype(np.int16))[None]

    def run(i: int) -> object:
        torch.manual_seed(i)  # bgv2 draws from the global RNGs; seeded per sample here
        np.random.seed(i % 2**32)  # noqa: NPY002 (bgv2 itself draws from the global RNGs)
        out = pipe(image=image, segmentation=seg)
        return out["image"].numpy(), out["segmentation"].numpy()

    return "peer-batchgeneratorsv2", run


def _monai_pipeline(img: np.ndarray, patch: tuple[int, int, int], lazy: bool) -> Any:
    from monai.transforms import Compose, RandAffined, RandFlipd

    keys = ("image", "label")
    translate = [((n - p) / 2.0) for n, p in zip(img.shape, patch, strict=True)]
    # MONAI's scale_range is added to 1 and scales the grid: 1 / U(0.85, 1.25) - 1
    return Compose(
        [
            RandAffined(
                keys,
                spatial_size=patch,
                prob=1.0,
                rotate_range=[math.radians(15)] * 3,
                translate_range=translate,
                scale_range=[(1 / 1.25 - 1, 1 / 0.85 - 1)] * 3,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                lazy=lazy,
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=0, lazy=lazy),
            RandFlipd(keys, prob=0.5, spatial_axis=1, lazy=lazy),
            RandFlipd(keys, prob=0.5, spatial_axis=2, lazy=lazy),
        ],
        lazy=lazy,
        overrides={
            "image": {"mode": "bilinear", "padding_mode": "zeros"},
            "label": {"mode": "nearest", "padding_mode": "zeros"},
        },
    )


def _monai_way(img: np.ndarray, lab: np.ndarray, patch: tuple[int, int, int], lazy: bool) -> Way:
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = _monai_pipeline(img, patch, lazy)
    image = torch.from_numpy(img)[None]
    label = torch.from_numpy(lab)[None]

    def run(i: int) -> object:
        pipe.set_random_state(seed=i % 2**32)
        out = pipe({"image": image, "label": label})
        return np.asarray(out["image"]), np.asarray(out["label"])

    return ("peer-monai-lazy" if lazy else "peer-monai"), run


def _monai(img: np.ndarray, lab: np.ndarray, patch: tuple[int, int, int]) -> Way:
    return _monai_way(img, lab, patch, lazy=False)


def _monai_lazy(img: np.ndarray, lab: np.ndarray, patch: tuple[int, int, int]) -> Way:
    return _monai_way(img, lab, patch, lazy=True)


def _torchio(img: np.ndarray, lab: np.ndarray, patch: tuple[int, int, int]) -> Way:
    torch = _torch()
    import torchio as tio

    subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(img)[None]),
        label=tio.LabelMap(tensor=torch.from_numpy(lab)[None]),
    )
    transform = tio.Compose(
        [
            tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
            tio.RandomAffine(scales=(0.85, 1.25), degrees=15, isotropic=True),
        ]
    )
    sampler = tio.UniformSampler(patch)

    def run(i: int) -> object:
        torch.manual_seed(i)
        out = transform(subject)
        one: Any = next(iter(sampler(out, num_patches=1)))
        return one["image"].data.numpy(), one["label"].data.numpy()

    return "peer-torchio", run
