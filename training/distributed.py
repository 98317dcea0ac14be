"""Helpers for running under ``torchrun`` with DistributedDataParallel.

Launch with torch's own launcher, e.g. ``torchrun --nproc_per_node=4 -m training.run``; it
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which
:func:`init_distributed` reads. Without them the process runs alone and every helper here
degrades to the single-process answer, so the same training loop serves both.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "rank_seed",
    "wrap_ddp",
]


@dataclasses.dataclass(frozen=True, slots=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: timedelta | None = None,
) -> DistInfo:
    """Join the process group described by torchrun's environment, if there is one.

    Args:
        backend: process-group backend; None means ``"nccl"`` on CUDA, else ``"gloo"``.
        device: this rank's device; None means ``cuda:LOCAL_RANK`` when CUDA is available,
            else the CPU. A CUDA device is made current.
        timeout: collective timeout (torch's default when None).

    Returns:
        The rank, world size, local rank, device and backend (None when not distributed).
    """
    env = os.environ
    distributed = "RANK" in env and "WORLD_SIZE" in env
    rank = int(env.get("RANK", 0))
    world_size = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", rank if distributed else 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not distributed:
        return DistInfo(0, 1, 0, device, None)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout
        )
    return DistInfo(rank, world_size, local_rank, device, dist.get_backend())


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the process that logs and saves."""
    return get_rank() == 0


def rank_seed(base: int, rank: int | None = None) -> int:
    """Seed for this rank: ``base + rank``, so ranks draw different samples reproducibly.

    Args:
        base: the run's seed.
        rank: the rank; None means this process's.

    Returns:
        The seed.
    """
    return int(base) + (get_rank() if rank is None else int(rank))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: Tensor | float, op: dist.ReduceOp.RedOpType, mean: bool) -> Tensor | float:
    if not is_distributed():
        return value
    if isinstance(value, Tensor):
        t = value.detach().to(_collective_device(), copy=True)
    else:
        t = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=op)
    if mean:
        t = t / dist.get_world_size()
    if isinstance(value, Tensor):
        return t.to(value.device)
    return float(t.item())  # host-device sync


def all_reduce_sum(value: Tensor | float) -> Tensor | float:
    """Sum over ranks (a float or a tensor; returns the same kind, on the same device).

    Args:
        value: this rank's value.

    Returns:
        The sum over all ranks; ``value`` itself when not distributed.
    """
    return _all_reduce(value, dist.ReduceOp.SUM, mean=False)


def all_reduce_mean(value: Tensor | float) -> Tensor | float:
    """Mean over ranks (a float or a tensor; returns the same kind, on the same device).

    For a mean over items that ranks hold unequal numbers of (validation cases), reduce the
    sum and the count with :func:`all_reduce_sum` instead.

    Args:
        value: this rank's value.

    Returns:
        The mean over all ranks; ``value`` itself when not distributed.
    """
    return _all_reduce(value, dist.ReduceOp.SUM, mean=True)


def wrap_ddp(model: nn.Module, info: DistInfo, **kwargs: object) -> nn.Module:
    """Wrap ``model`` (already on ``info.device``) in DistributedDataParallel when distributed.

    Args:
        model: the network.
        info: from :func:`init_distributed`.
        kwargs: passed to ``DistributedDataParallel``.

    Returns:
        The DDP wrapper, or ``model`` itself in a single process.
    """
    if info.backend is None:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)  # type: ignore[arg-type]


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave and destroy the process group, if one is initialised."""
    if is_distributed():
        dist.destroy_process_group()
