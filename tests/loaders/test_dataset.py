"""PatchDataset under torch's DataLoader gives PatchLoader's batches for any number of workers
and any world size; the epoch reaches persistent workers through ShardSampler; workers run on
one thread; a fork that GNU OpenMP would not survive is reported; import stays torch-free.

The reference is ``PatchLoader`` with its workers off (its own worker-count invariance is
tested in test_loader.py), compared batch by batch, bit for bit. DataLoader workers are
spawned (seconds each here), so the tests start few of them; every test runs under a
watchdog alarm.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import augment
from loaders import PatchDataset, ShardSampler, VolumeCache, worker_init_fn
from loaders.loader import PatchLoader
from loaders.sampler import PatchSampler

REPO = Path(__file__).resolve().parents[2]
PATCH = (12, 16, 14)
B = 2
BATCHES = 3


# Every test runs under the shared watchdog (tests/conftest.py): a hang fails the test.
pytestmark = pytest.mark.usefixtures("watchdog")
WATCHDOG_S = 240


@pytest.fixture(scope="module")
def sampler(built_cache: Path) -> PatchSampler:
    aug = augment.Compose(
        [
            augment.RandomCrop(PATCH, foreground=1 / 3),
            augment.RandomAffine(degrees=20, scale=(0.8, 1.2)),
            augment.RandomFlip(axes=(0, 1, 2), p=0.5),
            augment.Window(-200, 250),
            augment.RandomGamma((0.7, 1.5), p=0.5),
            augment.RandomNoise((0.0, 0.1), p=0.5),
        ],
        cval=-1024,
    )
    s = PatchSampler(VolumeCache(built_cache), aug, seed=11)
    s.sample(0, 0)  # compile here once (cold numba cache); spawned workers load the result
    return s


def reference(sampler: PatchSampler, epoch: int, rank: int, world: int) -> list[dict[str, Any]]:
    loader = PatchLoader(
        sampler,
        batch_size=B,
        batches_per_epoch=BATCHES,
        num_workers=0,
        rank=rank,
        world_size=world,
    )
    with loader:
        return list(loader.epoch(epoch))


def assert_same_batches(got: list[dict[str, Any]], want: list[dict[str, Any]], epoch: int) -> None:
    assert len(got) == len(want) == BATCHES
    for g, w in zip(got, want, strict=True):
        assert g["image"].dtype == torch.float32 and g["label"].dtype == torch.uint8
        assert g["image"].shape == w["image"].shape == (B, 1, *PATCH)
        assert torch.equal(g["image"], w["image"])
        assert torch.equal(g["label"], w["label"])
        assert list(g["case"]) == w["case"]
        assert torch.equal(g["index"], w["index"])
        assert g["epoch"].tolist() == [epoch] * B == [w["epoch"]] * B


def spawn_options(workers: int) -> dict[str, Any]:
    if not workers:
        return {}
    return {"multiprocessing_context": "spawn", "worker_init_fn": worker_init_fn}


def test_items_are_the_samples_of_the_epoch(sampler):
    ds = PatchDataset(sampler, length=8)
    assert len(ds) == 8 and ds.epoch == 0
    item = ds[3]
    want = sampler.sample(0, 3)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, *PATCH)
    assert item["label"].dtype == torch.uint8
    assert np.array_equal(item["image"].numpy(), want["image"])
    assert np.array_equal(item["label"].numpy(), want["label"])
    assert (item["case"], item["index"], item["epoch"]) == (want["case"], 3, 0)
    ds.set_epoch(4)
    assert np.array_equal(ds[3]["image"].numpy(), sampler.sample(4, 3)["image"])
    assert not np.array_equal(ds[3]["image"].numpy(), want["image"])
    keyed = ds[(0, 3)]  # an explicit epoch wins over set_epoch
    assert np.array_equal(keyed["image"].numpy(), want["image"]) and keyed["epoch"] == 0
    assert ds[np.int64(5)]["index"] == 5
    for bad in (8, -1):
        with pytest.raises(IndexError, match=f"index {bad} out of range"):
            ds[bad]
    assert [it["index"] for it in ds] == list(range(8))  # iteration ends at len
    with pytest.raises(ValueError, match="length must be"):
        PatchDataset(sampler, length=0)
    with pytest.raises(ValueError, match="epoch must be"):
        ds.set_epoch(-1)
    with pytest.raises(ValueError, match="epoch must be"):
        ds[(-2, 1)]
    with pytest.raises(TypeError, match="PatchSampler"):
        PatchDataset(object(), length=4)  # type: ignore[arg-type]


def test_pickles_small_and_whole(sampler):
    ds = PatchDataset(sampler, length=12, epoch=2)
    blob = pickle.dumps(ds)
    assert len(blob) < 16_384, len(blob)  # the cache travels as its root, no arrays
    clone = pickle.loads(blob)
    assert (len(clone), clone.epoch) == (12, 2)
    assert np.array_equal(clone[5]["image"].numpy(), ds[5]["image"].numpy())


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_distributed_sampler_gives_patchloader_batches(sampler, workers, world):
    """DistributedSampler(shuffle=False) over len = batches x B x world, dataset.set_epoch."""
    epoch = 3
    ds = PatchDataset(sampler, length=BATCHES * B * world)
    ds.set_epoch(epoch)
    for rank in range(world):
        shards = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(
            ds, batch_size=B, sampler=shards, num_workers=workers, **spawn_options(workers)
        )
        assert len(loader) == BATCHES
        assert_same_batches(list(loader), reference(sampler, epoch, rank, world), epoch)


class ThreadProbe(PatchDataset):
    """Items that also carry the numba and torch thread counts and the process id."""

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = super().__getitem__(key)
        item["threads"] = torch.tensor([numba.get_num_threads(), torch.get_num_threads()])
        item["pid"] = torch.multiprocessing.current_process().pid
        return item


def test_shard_sampler_carries_the_epoch_to_persistent_workers(sampler):
    world = 2
    ds = ThreadProbe(sampler, length=BATCHES * B * world)
    for rank in range(world):
        shards = ds.sampler(rank=rank, world_size=world)
        assert isinstance(shards, DistributedSampler) and len(shards) == BATCHES * B
        loader = DataLoader(
            ds,
            batch_size=B,
            sampler=shards,
            num_workers=2,
            persistent_workers=True,
            **spawn_options(2),
        )
        pids = set()
        for epoch in (0, 7):  # the dataset's own epoch stays 0: the keys carry it
            shards.set_epoch(epoch)
            got = list(loader)
            assert_same_batches(got, reference(sampler, epoch, rank, world), epoch)
            assert all(b["threads"].eq(1).all() for b in got)  # one numba, one torch thread
            pids |= {int(p) for b in got for p in b["pid"]}
        assert len(pids) == 2  # the same two workers served both epochs
        del loader
    # the world size can come from torch.distributed, and must divide the length
    single = ds.sampler()
    assert (single.rank, single.num_replicas) == (0, 1)
    assert list(single) == [(0, i) for i in range(len(ds))]
    with pytest.raises(ValueError, match="not a multiple of world_size 5"):
        ShardSampler(ds, rank=0, world_size=5)
    with pytest.raises(ValueError, match="rank must be in"):
        ds.sampler(rank=2, world_size=2)


def test_a_fork_after_numba_used_gnu_openmp_is_reported(sampler):
    sampler.sample(1, 1)  # numba's thread pool runs in this process now
    ds = PatchDataset(sampler, length=4)
    loader = DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="fork")
    gnu_omp = numba.threading_layer() == "omp"
    if gnu_omp:
        from numba.np.ufunc import omppool

        gnu_omp = omppool.openmp_vendor == "GNU"
    if gnu_omp:  # the child would be killed at its first kernel: a clear error instead
        with pytest.raises(RuntimeError, match="multiprocessing_context='spawn'"):
            next(iter(loader))
    else:  # TBB, workqueue or Intel OpenMP survive fork: the batches are right
        got, want = list(loader), list(DataLoader(ds, batch_size=2))
        assert len(got) == len(want) == 2
        assert all(torch.equal(g["image"], w["image"]) for g, w in zip(got, want, strict=True))


def test_monai_dataloader_gives_patchloader_batches_and_trains(sampler):
    """The README's MONAI example: monai.data.DataLoader keeps its own worker_init_fn (the
    dataset makes its workers single-threaded itself), a MONAI network and loss take the
    batches as they come."""
    monai = pytest.importorskip("monai")
    world, epoch = 2, 5
    ds = PatchDataset(sampler, length=BATCHES * B * world)
    for rank, workers in ((0, 0), (1, 2)):
        shards = ds.sampler(rank=rank, world_size=world)
        shards.set_epoch(epoch)
        options = (
            {"multiprocessing_context": "spawn", "persistent_workers": True} if workers else {}
        )
        loader = monai.data.DataLoader(
            ds, batch_size=B, sampler=shards, num_workers=workers, **options
        )
        got = list(loader)
        assert_same_batches(got, reference(sampler, epoch, rank, world), epoch)
    net = monai.networks.nets.UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,)
    )
    loss = monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)(
        net(got[0]["image"]), got[0]["label"]
    )
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())


def run_python(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    hook = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {set(blocked)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Refuse())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", hook + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_import_loaders_imports_no_torch_until_the_dataset_is_used():
    res = run_python(
        """
        import sys
        import loaders
        from loaders import *
        before = "torch" in sys.modules
        dataset = loaders.PatchDataset
        print(before, "torch" in sys.modules, dataset.__module__, "PatchDataset" in dir(loaders))
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["False", "True", "loaders.dataset", "True"]


def test_without_torch_the_dataset_names_the_torch_extra():
    res = run_python(
        """
        import loaders
        cache = loaders.VolumeCache  # the rest of loaders works
        try:
            loaders.PatchDataset
        except ModuleNotFoundError as exc:
            print(exc.name, "|", exc)
        """,
        blocked=("torch",),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    name, message = res.stdout.strip().split(" | ")
    assert name == "torch"
    assert "loaders.PatchDataset needs torch" in message and "'voxaug[torch]'" in message
