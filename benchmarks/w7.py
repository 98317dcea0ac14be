"""W7 elastic: W1 plus an elastic deformation, one thread.

W1's 128^3 image + label patches from a 200x256x256 source (rotation, isotropic scale,
crop, flips) with a smooth random deformation on top, in the same single pass:
``augment.RandomElastic(points=8, magnitude=(0, 4))`` (control spacing 25.4 output voxels,
largest displacement U(0, 4) voxels).

Against, all on one thread:

- W1 without the deformation, interleaved with it: the goal is an elastic cost of at most
  30 %, read from CPU time per patch (``time.process_time``), which a busy machine
  disturbs less than wall time; wall-time rates are reported too.
- batchgenerators v2 ``SpatialTransform`` with ``p_elastic_deform=1`` (nnU-Net's engine;
  goal: ours >= 8x): the same W1 settings, deformation sigma 0.1 of the patch (12.8
  voxels, about the reach of our B-spline at spacing 25.4), magnitude U(0, 4) voxels.
- MONAI ``Rand3DElasticd`` + ``RandFlipd`` (goal: ours >= 20x): the same rotation, scale
  and crop range, sigma U(12, 13.6) voxels, magnitude U(0, 500) on MONAI's uniform
  [-1, 1] offsets, which its Gaussian smoothing (truncated at 3 sigma) brings to a few
  voxels.

The peers build a dense field (3 floats per voxel) and smooth it; the deformation
statistics are comparable, not identical, and the cost of every way barely depends on the
magnitude. Peers run only where installed (``pip install -e ".[peers]"``).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import augment
from benchmarks.common import Result
from benchmarks.w1 import PATCH, check_output, make_source, w1_pipeline

POINTS = 8
MAGNITUDE = (0.0, 4.0)
COST_GOAL = 30.0  # % of W1's CPU time
BGV2_GOAL = 8.0
MONAI_GOAL = 20.0

Way = tuple[str, Callable[[int], object]]


def w7_pipeline(patch: tuple[int, int, int] = PATCH) -> augment.Compose:
    """W1's pipeline with ``RandomElastic`` listed last (it deforms the patch grid)."""
    elastic = augment.RandomElastic(points=POINTS, magnitude=MAGNITUDE)
    return augment.Compose([*w1_pipeline(patch).transforms, elastic])


def augment_way(img: np.ndarray, lab: np.ndarray, aug: augment.Compose) -> Callable[[int], object]:
    def run(i: int) -> object:
        return aug(image=img, label=lab, rng=augment.sample_rng(0, 0, i))

    return run


def _torch() -> Any:
    import torch

    torch.set_num_threads(1)
    return torch


def bgv2_way(img: np.ndarray, lab: np.ndarray) -> Way:
    """batchgenerators v2's SpatialTransform with elastic deformation, plus mirroring."""
    torch = _torch()
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    spatial = SpatialTransform(
        PATCH,
        patch_center_dist_from_border=[p // 2 for p in PATCH],
        random_crop=True,
        p_elastic_deform=1.0,
        elastic_deform_scale=(0.1, 0.1),
        elastic_deform_magnitude=(0.0, 4.0),
        p_synchronize_def_scale_across_axes=1.0,
        p_rotation=1.0,
        rotation=(-math.radians(15), math.radians(15)),
        p_rot_per_axis=1.0,
        p_scaling=1.0,
        scaling=(1 / 1.25, 1 / 0.85),  # bgv2 scales the grid: our s is its 1 / s
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

    return "peer-batchgeneratorsv2-elastic", run


def monai_way(img: np.ndarray, lab: np.ndarray) -> Way:
    """MONAI's Rand3DElasticd (deformation, rotation, scale, crop by translation) + flips."""
    torch = _torch()
    from monai.transforms import Compose, Rand3DElasticd, RandFlipd

    keys = ("image", "label")
    translate = [(n - p) / 2.0 for n, p in zip(img.shape, PATCH, strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Compose(
            [
                Rand3DElasticd(
                    keys,
                    sigma_range=(12.0, 13.6),
                    magnitude_range=(0.0, 500.0),
                    prob=1.0,
                    rotate_range=[math.radians(15)] * 3,
                    translate_range=translate,
                    scale_range=[(1 / 1.25 - 1, 1 / 0.85 - 1)] * 3,
                    spatial_size=PATCH,
                    mode=("bilinear", "nearest"),
                    padding_mode="zeros",
                ),
                RandFlipd(keys, prob=0.5, spatial_axis=0),
                RandFlipd(keys, prob=0.5, spatial_axis=1),
                RandFlipd(keys, prob=0.5, spatial_axis=2),
            ]
        )
    image = torch.from_numpy(img)[None]
    label = torch.from_numpy(lab)[None]

    def run(i: int) -> object:
        pipe.set_random_state(seed=i % 2**32)
        out = pipe({"image": image, "label": label})
        return np.asarray(out["image"]), np.asarray(out["label"])

    return "peer-monai-elastic", run


def peer_ways(img: np.ndarray, lab: np.ndarray) -> list[Way]:
    ways = []
    for make in (bgv2_way, monai_way):
        try:
            ways.append(make(img, lab))
        except ImportError:
            continue
    return ways


def interleaved(
    ways: list[tuple[str, Callable[[int], object], int]], repeats: int
) -> dict[str, tuple[float, float] | Exception]:
    """Per way, (patches/s by wall time, CPU ms per patch): medians over ``repeats``
    rounds, each timing one batch of every way in turn on one numba thread, after a
    checked first call. A way that fails is reported, not fatal.

    Args:
        ways: ``(name, fn, patches per batch)``; ``fn(i)`` makes patch ``i``.
    """
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    counter = {name: iter(range(10**9)) for name, _, _ in ways}
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    out: dict[str, tuple[float, float] | Exception] = {}
    try:
        for name, fn, _ in ways:
            try:
                check_output(fn(10**6))  # also the warm-up (numba compiles or loads here)
                wall[name], cpu[name] = [], []
            except Exception as exc:  # a peer that breaks is reported, not fatal
                out[name] = exc
        for _ in range(repeats):
            for name, fn, n in ways:
                if name not in wall:
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    fn(next(counter[name]))
                wall[name].append((time.perf_counter() - t0) / n)
                cpu[name].append((time.process_time() - c0) / n)
    finally:
        numba.set_num_threads(threads)
    for name in wall:
        out[name] = (1.0 / statistics.median(wall[name]), 1e3 * statistics.median(cpu[name]))
    return out


def run(quick: bool = False) -> list[Result]:
    n, repeats = (2, 2) if quick else (8, 7)
    img, lab = make_source()
    ours: list[tuple[str, Callable[[int], object], int]] = [
        ("augment-cpu-1thread", augment_way(img, lab, w1_pipeline()), n),
        ("augment-elastic-1thread", augment_way(img, lab, w7_pipeline()), n),
    ]
    peers = [(name, fn, 1 if quick else 2) for name, fn in peer_ways(img, lab)]
    measured = interleaved(ours + peers, repeats)
    note = f"1 thread; median of {repeats} interleaved rounds"
    results: list[Result] = []
    for name, _, _ in ours + peers:
        got = measured[name]
        if isinstance(got, Exception):
            results.append(Result("w7", name, float("nan"), "patches/s", note=f"failed: {got}"))
            continue
        base = "augment-cpu-1thread" if name == "augment-elastic-1thread" else None
        results.append(Result("w7", name, round(got[0], 2), "patches/s", baseline=base, note=note))
    w1, el = measured["augment-cpu-1thread"], measured["augment-elastic-1thread"]
    if not isinstance(w1, Exception) and not isinstance(el, Exception):
        results += [
            Result("w7", "augment-cpu-ms-per-patch", round(w1[1], 2), "ms", note="CPU time"),
            Result(
                "w7",
                "augment-elastic-cpu-ms-per-patch",
                round(el[1], 2),
                "ms",
                baseline="augment-cpu-ms-per-patch",
                note="CPU time",
            ),
            Result(
                "w7",
                "elastic-cost",
                round(100.0 * (el[1] / w1[1] - 1.0), 1),
                "%",
                note=f"CPU time of W1 + elastic over W1, minus 1; goal <= {COST_GOAL:.0f} %",
            ),
        ]
        for peer, goal in (
            ("peer-batchgeneratorsv2-elastic", BGV2_GOAL),
            ("peer-monai-elastic", MONAI_GOAL),
        ):
            theirs = measured.get(peer)
            if theirs is None or isinstance(theirs, Exception):
                continue
            results.append(
                Result(
                    "w7",
                    f"augment-elastic-vs-{peer}",
                    round(el[0], 2),
                    "patches/s",
                    baseline=peer,
                    note=f"same value as augment-elastic-1thread; goal >= {goal:.0f}x",
                )
            )
    return results
