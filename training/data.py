"""The trainer's data: dataset preparation, the patch loader, and whole volumes for evaluation.

The data path is the project's (DESIGN.md): a dataset folder in any layout
``loaders.layouts.dataset_folder`` reads (the phantom dataset is generated when absent) ->
``loaders.VolumeCache`` (resampled; the label files' own values) -> ``loaders.sampler.
PatchSampler`` (reads only the region a patch needs and augments it, the intensity
normalisation of ``training.normalize`` included) -> ``loaders.loader.PatchLoader`` (worker
processes and shared memory, or in this process with ``num_workers=0``; ``mode="gpu"``
augments batched on the GPU). The label values become class indices with
``Dataset.classes.lut()`` as batches reach the trainer. Every sample is keyed by (seed, epoch,
sample index), and rank ``r`` of ``W`` takes sample indices ``i * W + r``, so the union of
the ranks' batches is the single-process batch of ``W`` times the size.

Epoch keys: stage ``s`` (1, 2, 3) epoch ``e`` draws its samples with epoch key
``1000 * s + e``, so no two stages see the same patches; the adversary's held-out pairs
use :data:`HELDOUT_EPOCH`, which no training epoch reaches.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import augment
import loaders
from loaders.cases import Case
from loaders.errors import DataWarning, LoaderError
from loaders.layouts import LAYOUTS, DatasetFolder, dataset_folder, detect_layout
from loaders.orientation import Geometry, Reorientation
from training.classes import Classes, ClassesError, resolve_classes
from training.normalize import CaseCompose, Normalization, resolve_normalize, zscore_stats

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
    """A prepared dataset: its cache, the training / validation split (case ids), and what
    the data decided (classes, normalisation).

    Attributes:
        root: the dataset folder.
        cache: its volume cache.
        train: training case ids.
        val: validation case ids (the last ``val_cases`` by id).
        layout: the folder's layout (one of ``loaders.layouts.LAYOUTS``).
        cases: the source files of each case, by id.
        classes: the output classes.
        normalization: the intensity normalisation.
        modality: the declared modality (``""`` unknown).
        stats: per case ``(mean, std)`` of its cached image for the z-score (empty for CT).
    """

    root: Path
    cache: loaders.VolumeCache
    train: tuple[str, ...]
    val: tuple[str, ...]
    layout: str
    cases: Mapping[str, Case]
    classes: Classes
    normalization: Normalization
    modality: str = ""
    stats: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def resolved(self, cfg: Any) -> Any:
        """``cfg`` (a ``DataConfig``) with what the data decided filled in: the layout,
        the class values and names, the normalisation and the modality, so that the run's
        saved configuration carries them (``training.predict`` reads them there)."""
        return dataclasses.replace(
            cfg,
            layout=self.layout,
            class_values=self.classes.values,
            class_names=self.classes.names,
            normalize=self.normalization.mode,
            modality=self.modality,
        )


def _layout(cfg: Any, root: Path) -> str:
    """``cfg.layout``, detected when ``"auto"``; the detection's error says how to force one."""
    if cfg.layout != "auto":
        return str(cfg.layout)
    try:
        return detect_layout(root)
    except loaders.DatasetError as exc:
        raise TrainingDataError(
            f"cannot train on the dataset at {root}: {exc}. Force a layout with "
            f"--set data.layout={'|'.join(LAYOUTS)}"
        ) from exc


def _present_values(cache: loaders.VolumeCache, ids: Sequence[str]) -> dict[int, int]:
    """Voxels of each label value > 0 over the cases (from the cache's statistics)."""
    total: dict[int, int] = {}
    for cid in ids:
        for value, n in cache.info(cid).class_voxels.items():
            total[value] = total.get(value, 0) + n
    return total


def prepare_dataset(cfg: Any, *, build: bool = True, progress: bool = True) -> Dataset:
    """Generate the phantom dataset if asked, read the folder in its layout, build the cache,
    decide the classes and the normalisation, split the cases.

    With ``cfg.phantom``, phantoms are generated at ``cfg.root`` when nothing is there, and
    regenerated when a phantom dataset of another configuration is (a dataset that was not
    generated by ``loaders.phantom`` is never touched). The cache keeps the label files'
    values (no label map): the classes are decided from them and dataset.json
    (``training.classes.resolve_classes``) and applied as batches are made.

    Call with ``build=True`` on one process (rank 0) first; the others then open the built
    cache with ``build=False`` (and decide the same classes and normalisation from it).

    Args:
        cfg: the ``DataConfig``.
        build: generate and build (else only open).
        progress: show the cache build's progress bar.

    Returns:
        The dataset; the last ``cfg.val_cases`` cases (sorted by id) are the validation set.

    Raises:
        TrainingDataError: no layout matches the folder, the dataset has no labelled cases,
            a label is empty or does not match its image, no class to segment, a gate class
            beyond the classes, or too few cases for the split.

    Warns:
        DataWarning: a class without any voxel in the training cases.
    """
    root = Path(cfg.root)
    try:
        if build and cfg.phantom and _phantom_or_absent(root):
            # returns at once when the phantoms there match; regenerates when they do not
            loaders.phantom.write_msd_dataset(
                root,
                n_train=cfg.phantom_cases,
                seed=cfg.phantom_seed,
                size=cfg.phantom_size,
                workers=cfg.build_workers,
                overwrite=True,
            )
        cache = loaders.VolumeCache(cfg.cache_root)
        if build or root.is_dir():
            folder = dataset_folder(root, layout=_layout(cfg, root))
            missing = [c.id for c in folder.cases if c.label is None]
            if missing:
                raise TrainingDataError(f"{root}: cases without a label: {missing[:5]}")
        else:
            folder = _declared_by_cache(root, cache)
        if build:
            cache.build(
                folder.cases,
                workers=cfg.build_workers,
                spacing=tuple(cfg.spacing) if cfg.spacing else None,
                progress=progress,
                dataset={
                    "layout": folder.layout,
                    "label_names": folder.label_names,
                    "modality": folder.modality,
                },
            )
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
    train, val = ids[: -cfg.val_cases], ids[-cfg.val_cases :]
    try:
        classes = resolve_classes(
            mode=cfg.classes,
            regions=cfg.regions,
            declared=folder.label_names,
            present=sorted(_present_values(cache, ids)),
            values=cfg.class_values,
            names=cfg.class_names,
            phantom=cfg.phantom,
        )
    except ClassesError as exc:
        raise TrainingDataError(f"{root}: {exc}") from None
    if not cfg.gate_class < classes.count:
        raise TrainingDataError(
            f"data.gate_class = {cfg.gate_class}: the classes are 0..{classes.count - 1} "
            f"({', '.join(classes.names)}); choose a foreground class"
        )
    lut = classes.lut()
    seen = np.zeros(classes.count, np.int64)
    for value, n in _present_values(cache, train).items():
        seen[lut[value]] += n
    for k in classes.foreground:
        if not seen[k]:
            warnings.warn(
                f"{root}: class {classes.describe(k)} has no voxel in the {len(train)} "
                "training cases; the segnet cannot learn it",
                DataWarning,
                stacklevel=2,
            )
    modality = folder.modality or ""
    normalization = Normalization(
        resolve_normalize(cfg.normalize, folder.modality), tuple(cfg.window)
    )
    stats = (
        {cid: zscore_stats(cache.read(cid)) for cid in ids}
        if normalization.mode == "zscore"
        else {}
    )
    return Dataset(
        root=root,
        cache=cache,
        train=train,
        val=val,
        layout=folder.layout,
        cases={c.id: c for c in folder.cases},
        classes=classes,
        normalization=normalization,
        modality=modality,
        stats=stats,
    )


def _declared_by_cache(root: Path, cache: loaders.VolumeCache) -> DatasetFolder:
    """What the dataset declares, as the cache's build recorded it, for a process that opens
    a built cache without the dataset folder (another node of a multi-node run): the label
    names and modality decide the classes and the normalisation exactly as on the builder.
    Without source files its cases are not listed, so native-resolution validation is left
    to a process that has them."""
    meta = cache.dataset
    if meta is None:
        raise TrainingDataError(
            f"{root}: no such dataset folder, and the cache at {cache.root} does not record "
            "what the dataset declares (built by an older version?): make data.root readable "
            "here or rebuild the cache"
        )
    names = meta.get("label_names")
    return DatasetFolder(
        root,
        str(meta.get("layout") or "msd"),
        (),
        None if names is None else {int(k): str(v) for k, v in names.items()},
        meta.get("modality"),
    )


def _phantom_or_absent(root: Path) -> bool:
    """No dataset at ``root`` yet, or one this project generated (never overwrite others)."""
    path = root / "dataset.json"
    if not path.exists():
        return True
    try:
        return "phantom" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def make_compose(cfg: Any, dataset: Dataset) -> augment.Compose:
    """The training augmentation: crop (``cfg.foreground`` of the patches centred on a
    foreground voxel, class-balanced), rotation/scaling, optional x flips, the dataset's
    intensity normalisation (the HU window onto [0, 1], or the case's z-score), gamma and
    noise; outside the volume reads ``Normalization.cval`` (air for CT)."""
    norm = dataset.normalization
    transforms: list[Any] = [augment.RandomCrop(tuple(cfg.patch_size), foreground=cfg.foreground)]
    if cfg.degrees > 0 or tuple(cfg.scale) != (1.0, 1.0):
        transforms.append(augment.RandomAffine(degrees=cfg.degrees, scale=tuple(cfg.scale)))
    if cfg.flip > 0:
        transforms.append(augment.RandomFlip(axes=(2,), p=cfg.flip))
    transforms.append(norm.transform(dataset.stats))
    if cfg.gamma_p > 0:
        transforms.append(augment.RandomGamma((0.7, 1.5), p=cfg.gamma_p))
    if cfg.noise_p > 0:
        transforms.append(augment.RandomNoise((0.0, 0.05), p=cfg.noise_p))
    return CaseCompose(transforms, cval=norm.cval)


def make_sampler(
    dataset: Dataset, cfg: Any, *, seed: int, cases: Sequence[str] | None = None
) -> loaders.PatchSampler:
    """A ``PatchSampler`` over the training cases (or ``cases``); the crop of
    :func:`make_compose` owns the foreground oversampling."""
    return loaders.PatchSampler(
        dataset.cache,
        make_compose(cfg, dataset),
        cases=tuple(dataset.train if cases is None else cases),
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


@dataclasses.dataclass(frozen=True)
class Volume:
    """A whole case for evaluation.

    Attributes:
        id: the case id.
        image: the normalised image ``(1, D, H, W)`` float32 on the cache grid.
        label: the class indices ``(D, H, W)`` uint8 on the cache grid.
        spacing: the cache grid's spacing (z, y, x) in mm.
        grid: the cache grid (canonical axis order, identity direction).
        reorientation: how the case's files map onto the canonical grid.
        label_file: the case's label file (for native-resolution validation).
    """

    id: str
    image: torch.Tensor
    label: np.ndarray
    spacing: tuple[float, float, float]
    grid: Geometry | None = None
    reorientation: Reorientation | None = None
    label_file: Path | None = None


def load_volumes(dataset: Dataset, ids: Sequence[str]) -> list[Volume]:
    """Read whole cases from the cache for sliding-window evaluation: normalised images,
    labels as class indices."""
    lut = dataset.classes.lut()
    out = []
    for cid in ids:
        info = dataset.cache.info(cid)
        image = dataset.normalization.apply(dataset.cache.read(cid), dataset.stats.get(cid))
        label = lut[dataset.cache.read(cid, array="label")]
        case = dataset.cases.get(cid)
        out.append(
            Volume(
                cid,
                torch.from_numpy(image)[None],
                label,
                info.spacing,
                grid=Geometry(info.shape, info.spacing, info.origin, info.direction),
                reorientation=info.reorientation,
                label_file=None if case is None else case.label,
            )
        )
    return out
