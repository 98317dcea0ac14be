"""The trainer's data: dataset preparation, the patch loader, and whole volumes for evaluation.

The data path is the project's (DESIGN.md): an MSD-layout dataset (the phantom dataset is
generated when absent) -> ``loaders.VolumeCache`` (resampled, liver label ``>= 1``) ->
``loaders.sampler.PatchSampler`` (reads only the region a patch needs and augments it) ->
``loaders.loader.PatchLoader`` (worker processes and shared memory, or in this process with
``num_workers=0``; ``mode="gpu"`` augments batched on the GPU). Every sample is keyed by
(seed, epoch, sample index), and rank ``r`` of ``W`` takes sample indices ``i * W + r``, so
the union of the ranks' batches is the single-process batch of ``W`` times the size.

Epoch keys: stage ``s`` (1, 2, 3) epoch ``e`` draws its samples with epoch key
``1000 * s + e``, so no two stages see the same patches; the adversary's held-out pairs
use :data:`HELDOUT_EPOCH`, which no training epoch reaches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import augment
import loaders
from loaders.errors import LoaderError

__all__ = [
    "HELDOUT_EPOCH",
    "Dataset",
    "TrainingDataError",
    "Volume",
    "epoch_key",
    "load_volumes",
    "make_compose",
    "make_loader",
    "make_sampler",
    "prepare_dataset",
    "window_image",
]

HELDOUT_EPOCH = 999_999
"""Epoch key of the adversary's held-out pairs (training epochs use ``1000 * stage + e``)."""
MAX_EPOCHS = 1000


class TrainingDataError(ValueError):
    """The dataset cannot be trained on (no labels, empty labels, mismatched files, too few
    cases); the message names the dataset and the problem."""


def epoch_key(stage: int, epoch: int) -> int:
    """The sampler epoch of ``epoch`` in stage ``stage`` (1-based): ``1000 * stage + epoch``."""
    if not 0 <= epoch < MAX_EPOCHS:
        raise ValueError(f"epoch must be in [0, {MAX_EPOCHS}), got {epoch!r}")
    return MAX_EPOCHS * int(stage) + int(epoch)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: its cache and the training / validation split (case ids)."""

    root: Path
    cache: loaders.VolumeCache
    train: tuple[str, ...]
    val: tuple[str, ...]


def prepare_dataset(
    cfg: Any, *, build: bool = True, progress: bool = True
) -> Dataset:
    """Generate the phantom dataset if asked and absent, build the cache, split the cases.

    Call with ``build=True`` on one process (rank 0) first; the others then open the built
    cache with ``build=False``.

    Args:
        cfg: the ``DataConfig``.
        build: generate and build (else only open).
        progress: show the cache build's progress bar.

    Returns:
        The dataset; the last ``cfg.val_cases`` cases (sorted by id) are the validation set.

    Raises:
        TrainingDataError: the dataset has no labelled cases, a label is empty or does not
            match its image, or there are too few cases for the split.
    """
    root = Path(cfg.root)
    try:
        if build:
            if cfg.phantom and not (root / "dataset.json").exists():
                loaders.phantom.write_msd_dataset(
                    root,
                    n_train=cfg.phantom_cases,
                    seed=cfg.phantom_seed,
                    size=cfg.phantom_size,
                    workers=cfg.build_workers,
                )
            cases = loaders.msd_cases(root)
            missing = [c.id for c in cases if c.label is None]
            if missing:
                raise TrainingDataError(f"{root}: cases without a label: {missing[:5]}")
            cache = loaders.VolumeCache(cfg.cache_root)
            cache.build(
                cases,
                workers=cfg.build_workers,
                label_map=loaders.liver_label,
                spacing=tuple(cfg.spacing) if cfg.spacing else None,
                progress=progress,
            )
        else:
            cache = loaders.VolumeCache(cfg.cache_root)
    except LoaderError as exc:
        raise TrainingDataError(f"cannot train on the dataset at {root}: {exc}") from exc
    ids = tuple(sorted(cache.cases))
    unlabelled = [c for c in ids if not cache.has_label(c)]
    if unlabelled:
        raise TrainingDataError(f"{root}: cases without a label: {unlabelled[:5]}")
    empty = [c for c in ids if not cache.info(c).class_voxels]
    if empty:
        raise TrainingDataError(f"{root}: labels without foreground: {empty[:5]}")
    if len(ids) <= cfg.val_cases:
        raise TrainingDataError(
            f"{root}: {len(ids)} labelled cases, but data.val_cases = {cfg.val_cases} "
            "leaves none for training"
        )
    return Dataset(root, cache, ids[: -cfg.val_cases], ids[-cfg.val_cases :])


def make_compose(cfg: Any) -> augment.Compose:
    """The training augmentation: crop, rotation/scaling, optional x flips, HU window to
    [0, 1], gamma and noise; outside the volume reads air (the window's low end)."""
    lo, hi = cfg.window
    transforms: list[Any] = [augment.RandomCrop(tuple(cfg.patch_size))]
    if cfg.degrees > 0 or tuple(cfg.scale) != (1.0, 1.0):
        transforms.append(augment.RandomAffine(degrees=cfg.degrees, scale=tuple(cfg.scale)))
    if cfg.flip > 0:
        transforms.append(augment.RandomFlip(axes=(2,), p=cfg.flip))
    transforms.append(augment.Window(lo, hi))
    if cfg.gamma_p > 0:
        transforms.append(augment.RandomGamma((0.7, 1.5), p=cfg.gamma_p))
    if cfg.noise_p > 0:
        transforms.append(augment.RandomNoise((0.0, 0.05), p=cfg.noise_p))
    return augment.Compose(transforms, cval=lo)


def make_sampler(
    dataset: Dataset, cfg: Any, *, seed: int, cases: Sequence[str] | None = None
) -> loaders.PatchSampler:
    """A ``PatchSampler`` over the training cases (or ``cases``)."""
    return loaders.PatchSampler(
        dataset.cache,
        make_compose(cfg),
        cases=tuple(dataset.train if cases is None else cases),
        foreground=cfg.foreground,
        seed=seed,
    )


def make_loader(
    sampler: loaders.PatchSampler,
    cfg: Any,
    *,
    batches_per_epoch: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> loaders.PatchLoader:
    """The ``PatchLoader`` for this rank: GPU augmentation on CUDA if ``cfg.gpu_augment``."""
    gpu = device.type == "cuda" and cfg.gpu_augment
    return loaders.PatchLoader(
        sampler,
        batch_size=cfg.batch_size,
        batches_per_epoch=batches_per_epoch,
        num_workers=cfg.num_workers,
        mode="gpu" if gpu else "cpu",
        device=device if gpu else None,
        rank=rank,
        world_size=world_size,
    )


def window_image(image: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """The training intensity mapping without randomness: the HU window onto [0, 1]."""
    w = augment.Window(*window)
    return np.asarray(w.apply(image.astype(np.float32), w.sample(np.random.default_rng(0))))


@dataclasses.dataclass(frozen=True)
class Volume:
    """A whole case for evaluation: windowed image ``(1, D, H, W)`` float32, boolean
    label ``(D, H, W)``, spacing (z, y, x) in mm."""

    id: str
    image: torch.Tensor
    label: np.ndarray
    spacing: tuple[float, float, float]


def load_volumes(dataset: Dataset, ids: Sequence[str], window: Sequence[float]) -> list[Volume]:
    """Read whole cases from the cache for sliding-window evaluation."""
    out = []
    for cid in ids:
        image = window_image(dataset.cache.read(cid), window)
        label = dataset.cache.read(cid, array="label") > 0
        out.append(Volume(cid, torch.from_numpy(image)[None], label, dataset.cache.spacing(cid)))
    return out
