"""``PatchDataset``: the ``torch.utils.data.Dataset`` face of a ``PatchSampler``.

``dataset[i]`` is ``sampler.sample(epoch, i)`` as tensors, for the epoch set with
``set_epoch`` (as ``DistributedSampler.set_epoch``), or ``dataset[(epoch, i)]`` for an
explicit one. Its randomness depends only on (seed, epoch, index), so any ``DataLoader``
over it gives the patches of ``PatchLoader`` whatever its number of workers, provided the
indices are arranged as PatchLoader arranges them: local sample ``i`` of rank ``r`` of
``W`` is index ``i * W + r``, which is what ``DistributedSampler(dataset, num_replicas=W,
rank=r, shuffle=False)`` yields when ``len(dataset)`` is a multiple of ``W``. Then batch
``k`` of ``DataLoader(dataset, batch_size=B, sampler=...)`` holds the patches of batch
``k`` of ``PatchLoader(sampler, batch_size=B, batches_per_epoch=len(dataset) // (B * W),
rank=r, world_size=W)``::

    dataset = PatchDataset(sampler, length=250 * 2 * world_size)
    shards = dataset.sampler()                 # rank and world size from torch.distributed
    loader = DataLoader(dataset, batch_size=2, sampler=shards, num_workers=4,
                        worker_init_fn=worker_init_fn, multiprocessing_context="spawn",
                        persistent_workers=True)
    for epoch in range(100):
        shards.set_epoch(epoch)                # the epoch travels with every index
        for batch in loader: ...

``PatchDataset.sampler`` gives a ``ShardSampler``: a ``DistributedSampler`` (so Lightning
keeps it, and calls its ``set_epoch``) that yields ``(epoch, index)`` keys. The epoch then
reaches persistent workers, whose copies of the dataset never see a later ``set_epoch``
(with a plain ``DistributedSampler`` call ``dataset.set_epoch`` before each epoch and keep
the workers non-persistent).

Workers: ``worker_init_fn`` gives each DataLoader worker one numba and one torch thread, so
that N workers use N cores (the dataset does the same on its first item in a worker, for
loaders built with another ``worker_init_fn``, such as MONAI's default). Use the ``spawn``
(or ``forkserver``) start method: numba's kernels run on GNU OpenMP where no TBB is
installed, and GNU OpenMP does not survive ``fork`` once this process has used it (the
child is killed at its first kernel); a forked worker finds that out first and raises an
error that says so.
"""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Iterator
from typing import Any

import numba
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from loaders.sampler import PatchSampler

__all__ = ["PatchDataset", "ShardSampler", "worker_init_fn"]

_prepared_pid: int | None = None
"""The worker process that :func:`_prepare_worker` last ran in (it runs once per process)."""


def _fork_unsafe_openmp() -> bool:
    """Whether this process inherited, through fork, a running GNU OpenMP thread pool of
    numba's: its next parallel kernel would kill it."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return False  # no pool started here, nor in a parent that forked this process
    if numba.threading_layer() != "omp":
        return False  # TBB and the workqueue survive fork
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _prepare_worker() -> None:
    """One numba and one torch thread in this DataLoader worker; a clear error where the
    worker was forked from a process that had started numba's GNU OpenMP pool."""
    global _prepared_pid
    if _prepared_pid == os.getpid():
        return
    if _fork_unsafe_openmp():
        raise RuntimeError(
            "this DataLoader worker was forked from a process that had already run numba's "
            "parallel kernels on GNU OpenMP, which does not survive fork (the worker would be "
            "killed at its first patch): pass multiprocessing_context='spawn' (or "
            "'forkserver') to the DataLoader, with persistent_workers=True and "
            "PatchDataset.sampler() so that workers start once"
        )
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    _prepared_pid = os.getpid()


def worker_init_fn(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)`` for a :class:`PatchDataset`: one numba and one
    torch thread per worker, so that N workers use N cores.

    The sampler draws nothing from global generators, so no seeding is needed: a patch
    depends only on (seed, epoch, index).

    Args:
        worker_id: the worker's number (unused).

    Raises:
        RuntimeError: the worker was forked after this process ran numba's GNU OpenMP
            kernels (use ``multiprocessing_context="spawn"``).
    """
    _prepare_worker()


class PatchDataset(Dataset[dict[str, Any]]):
    """A ``PatchSampler`` as a map-style dataset: item ``i`` is sample ``i`` of the epoch.

    Args:
        sampler: the ``PatchSampler`` (cache and Compose; pickles small, as this dataset).
        length: samples per epoch over all ranks (``len(dataset)``), e.g. batches per epoch
            x batch size x world size; a multiple of the world size, so that every rank
            gets the same number of samples.
        epoch: the epoch of integer indices until :meth:`set_epoch`.

    Items are dicts: ``image`` (C, d, h, w) float32 tensor, ``label`` (1, d, h, w) uint8
    tensor, ``case`` (id), ``index`` (the sampler index) and ``epoch``; the default collate
    makes them ``PatchLoader``'s batch (``index`` and ``epoch`` as int64 tensors). The
    index is either an integer (the epoch of :meth:`set_epoch`) or an ``(epoch, index)``
    pair, as :class:`ShardSampler` yields.
    """

    def __init__(self, sampler: PatchSampler, *, length: int, epoch: int = 0) -> None:
        if not isinstance(sampler, PatchSampler):
            raise TypeError(f"sampler must be a loaders.PatchSampler, got {type(sampler).__name__}")
        if isinstance(length, bool) or int(length) != length or length < 1:
            raise ValueError(f"length must be an integer >= 1 (samples per epoch), got {length!r}")
        self.patch_sampler = sampler
        self.length = int(length)
        self.epoch = 0
        self.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """The epoch of integer indices (call it before each epoch, as with
        ``DistributedSampler``; DataLoader workers copy the dataset when they start, so
        persistent workers keep the epoch they started with: use :meth:`sampler` there).

        Args:
            epoch: an integer >= 0, the sampler's epoch key.
        """
        self.epoch = _non_negative("epoch", epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key`` (an index of the current epoch, or an ``(epoch, index)`` pair).

        Raises:
            IndexError: the index is outside ``[0, len(self))`` (so iteration ends).
        """
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"a PatchDataset key is an index or (epoch, index), got {key!r}")
            epoch, index = _non_negative("epoch", key[0]), operator.index(key[1])
        else:
            epoch, index = self.epoch, operator.index(key)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a PatchDataset of {self.length}")
        if get_worker_info() is not None:
            _prepare_worker()
        out = self.patch_sampler.sample(epoch, index)
        return {
            "image": torch.from_numpy(out["image"]),
            "label": torch.from_numpy(out["label"]),
            "case": out["case"],
            "index": index,
            "epoch": epoch,
        }

    def sampler(self, *, rank: int | None = None, world_size: int | None = None) -> ShardSampler:
        """This rank's share of the indices, as ``(epoch, index)`` keys (PatchLoader's
        arrangement: local sample ``i`` is index ``i * world_size + rank``).

        Args:
            rank, world_size: default: from ``torch.distributed`` when it is initialised,
                else 0 and 1.

        Returns:
            A :class:`ShardSampler`; call its ``set_epoch`` before each epoch.
        """
        return ShardSampler(self, rank=rank, world_size=world_size)

    def __repr__(self) -> str:
        return f"PatchDataset({self.patch_sampler!r}, length={self.length}, epoch={self.epoch})"


class ShardSampler(DistributedSampler[tuple[int, int]]):
    """A rank's indices of a :class:`PatchDataset` with the epoch in each key.

    Yields ``(epoch, rank)``, ``(epoch, rank + world_size)``, ... below ``len(dataset)``:
    ``DistributedSampler(shuffle=False)``'s indices, each paired with the epoch of
    :meth:`set_epoch`, so that DataLoader workers, persistent or not, sample the epoch the
    main process is in. Shuffling would change nothing but the order: every index is
    already a fresh random draw.

    Args:
        dataset: the dataset; its length must be a multiple of ``world_size``.
        rank, world_size: default: from ``torch.distributed`` when it is initialised, else
            0 and 1.

    Raises:
        ValueError: a rank outside ``[0, world_size)``, or a length that is not a multiple
            of the world size (``DistributedSampler`` would repeat samples to even it out).
    """

    def __init__(
        self, dataset: PatchDataset, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        world_size = _non_negative("world_size", world_size)
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if len(dataset) % world_size:
            raise ValueError(
                f"the dataset's length {len(dataset)} is not a multiple of world_size "
                f"{world_size}: every rank takes the same number of samples; use "
                f"PatchDataset(length=batches_per_epoch * batch_size * world_size)"
            )
        super().__init__(dataset, num_replicas=world_size, rank=int(rank), shuffle=False)
        self.length = len(dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in range(self.rank, self.length, self.num_replicas))


def _non_negative(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)
