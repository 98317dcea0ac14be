"""W3 DSB2017 crop: target-centred 128^3 crops with scale, in-plane rotation, swap, flips.

``augment.TargetCrop`` folds crop, zoom, rotation, swap and flips into one matrix and one
pass. The baseline is the DSB2017 detector's own sequence, written out here as that code
does it (crop and pad, ``scipy.ndimage.zoom``, ``scipy.ndimage.rotate`` of the patch and of
the coordinate channel, transpose, flip): three interpolations and several copies.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.ndimage as ndi

import augment
from benchmarks.common import Result, median_seconds

CROP = 128
BOUND = 12
STRIDE = 4
PAD = 170.0


def make_volume(
    shape: tuple[int, int, int] = (200, 256, 256), seed: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A lung-like volume with a few spherical 'nodules' and their (z, y, x, d) targets."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60.0, 10.0, shape).astype(np.float32)
    targets = []
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for _ in range(4):
        d = float(rng.uniform(6, 30))
        c = rng.uniform(d + BOUND, np.asarray(shape) - d - BOUND)
        img[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= (d / 2) ** 2] = 200.0
        targets.append(np.array([*c, d]))
    return img, targets


def dsb2017_reference(
    img: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DSB2017 detector's Crop(isScale=True) then augment(flip, rotate, swap)."""
    imgs = img[None]
    crop_size = np.array([CROP] * 3)
    radius_lim, scale_lim = (8.0, 120.0), (0.75, 1.25)
    scale_range = [
        min(max(radius_lim[0] / target[3], scale_lim[0]), 1),
        max(min(radius_lim[1] / target[3], scale_lim[1]), 1),
    ]
    scale = rng.random() * (scale_range[1] - scale_range[0]) + scale_range[0]
    crop = (crop_size.astype(float) / scale).astype(int)
    target = target.copy()
    start = []
    for i in range(3):
        r = target[3] / 2
        s = np.floor(target[i] - r) + 1 - BOUND
        e = np.ceil(target[i] + r) + 1 + BOUND - crop[i]
        start.append(
            int(rng.integers(e, s))
            if s > e
            else int(target[i]) - crop[i] // 2 + int(rng.integers(-BOUND // 2, BOUND // 2))
        )
    shape = np.array(imgs.shape[1:])
    normstart = np.array(start, np.float32) / shape - 0.5
    normsize = crop.astype(np.float32) / shape
    grids = [
        np.linspace(normstart[i], normstart[i] + normsize[i], CROP // STRIDE) for i in range(3)
    ]
    coord = np.stack(np.meshgrid(*grids, indexing="ij")).astype(np.float32)
    pad = [[0, 0]] + [[max(0, -start[i]), max(0, start[i] + crop[i] - shape[i])] for i in range(3)]
    sl = tuple(slice(max(start[i], 0), min(start[i] + crop[i], shape[i])) for i in range(3))
    patch = np.pad(imgs[(slice(None),) + sl], pad, "constant", constant_values=PAD)
    target[:3] -= start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = ndi.zoom(patch, [1, scale, scale, scale], order=1)
    newpad = CROP - patch.shape[1]
    if newpad < 0:
        patch = patch[:, :-newpad, :-newpad, :-newpad]
    elif newpad > 0:
        patch = np.pad(patch, [[0, 0]] + [[0, newpad]] * 3, "constant", constant_values=PAD)
    target *= scale
    for _ in range(3):  # rotation with validity retry
        angle = rng.random() * 180
        size = np.array(patch.shape[2:4], float)
        rot = np.array(
            [
                [np.cos(np.radians(angle)), -np.sin(np.radians(angle))],
                [np.sin(np.radians(angle)), np.cos(np.radians(angle))],
            ]
        )
        new = target.copy()
        new[1:3] = rot @ (target[1:3] - size / 2) + size / 2
        if np.all(new[:3] > target[3]) and np.all(new[:3] < np.array(patch.shape[1:4]) - new[3]):
            target = new
            patch = ndi.rotate(patch, angle, axes=(2, 3), reshape=False, order=1, cval=PAD)
            coord = ndi.rotate(coord, angle, axes=(2, 3), reshape=False, order=1)
            break
    order = rng.permutation(3)
    patch = np.transpose(patch, [0, *(order + 1)])
    coord = np.transpose(coord, [0, *(order + 1)])
    target[:3] = target[:3][order]
    flip = [1, int(rng.integers(2)) * 2 - 1, int(rng.integers(2)) * 2 - 1]
    patch = np.ascontiguousarray(patch[:, :: flip[0], :: flip[1], :: flip[2]])
    coord = np.ascontiguousarray(coord[:, :: flip[0], :: flip[1], :: flip[2]])
    return patch, coord, target


def run(quick: bool = False) -> list[Result]:
    img, targets = make_volume((120, 160, 160) if quick else (200, 256, 256))
    aug = augment.Compose(
        [
            augment.TargetCrop(
                CROP, bound_size=BOUND, scale=(0.75, 1.25), pad_value=PAD, coord_stride=STRIDE
            )
        ]
    )
    counter = iter(range(10**9))

    def ours() -> dict[str, Any]:
        i = next(counter)
        return aug(image=img, rng=augment.sample_rng(0, 0, i), target=targets[i % len(targets)])

    def reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = next(counter)
        return dsb2017_reference(img, targets[i % len(targets)], np.random.default_rng(i))

    out = ours()
    if out["image"].shape != (CROP,) * 3 or out["coord"].shape != (3,) + (CROP // STRIDE,) * 3:
        raise AssertionError(f"TargetCrop gave {out['image'].shape} / {out['coord'].shape}")
    ref = reference()
    if ref[0].shape != (1,) + (CROP,) * 3:
        raise AssertionError(f"reference gave {ref[0].shape}")
    n, repeats = (2, 3) if quick else (5, 5)
    results = []
    ways: list[tuple[str, Callable[[], object], int]] = [
        ("augment-TargetCrop", ours, n),
        ("dsb2017-scipy-sequence", reference, max(1, n // 2)),
    ]
    for name, fn, k in ways:

        def batch(fn: Callable[[], object] = fn, k: int = k) -> None:
            for _ in range(k):
                fn()

        rate = k / median_seconds(batch, repeats=repeats)
        results.append(
            Result(
                "w3",
                name,
                round(rate, 2),
                "patches/s",
                baseline=None if name.startswith("dsb") else "dsb2017-scipy-sequence",
                note="all threads" if name.startswith("augment") else "scipy",
            )
        )
    return results
