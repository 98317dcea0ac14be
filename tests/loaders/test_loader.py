"""PatchLoader: the same batches for 0, 1, 2 and 4 workers, GPU feeding mode on the torch CPU
fallback, worker exceptions and deaths surface quickly, shared memory is always released.

Spawned workers take seconds to start (imports, kernel loads), so each test starts few and
every test runs under a watchdog alarm: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import augment
from loaders import VolumeCache
from loaders.loader import PatchLoader, WorkerError
from loaders.phantom import write_msd_dataset
from loaders.sampler import PatchSampler

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
PATCH = (12, 16, 14)
B = 2


def shm_names() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("psm_")} if SHM.is_dir() else set()


def mapped_elsewhere(name: str) -> bool:
    """Whether a process other than this one maps the segment (another job on a shared
    machine; our own leak would be mapped by nobody, or by this process)."""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if maps.parent.name == str(os.getpid()):
            continue
        try:
            if name in maps.read_text():
                return True
        except OSError:
            continue
    return False


def leaked(before: set[str]) -> set[str]:
    """Segments created since ``before`` and still there, other jobs' live ones aside."""
    return {n for n in shm_names() - before if not mapped_elsewhere(n)}


# Every test runs under the shared watchdog (tests/conftest.py): a hang fails the test.
pytestmark = pytest.mark.usefixtures("watchdog")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    cases = write_msd_dataset(root / "ds", n_train=2, seed=5, size=(24, 40, 40))
    VolumeCache(root / "cache.zarr").build(cases, workers=1, progress=False)
    return root / "cache.zarr"


def make_sampler(root: Path, **kw) -> PatchSampler:
    aug = augment.Compose(
        [
            augment.RandomCrop(PATCH, foreground=1 / 3),
            augment.RandomAffine(degrees=20, scale=(0.8, 1.2)),
            augment.RandomFlip(axes=(0, 1, 2), p=0.5),
            augment.Window(-200, 250),
            augment.RandomGamma((0.7, 1.5), p=0.5),
            augment.RandomNoise((0.0, 0.1), p=0.5),
            augment.RandomContrast((0.75, 1.25), p=0.5),
        ],
        cval=-1024,
    )
    return PatchSampler(VolumeCache(root), aug, seed=3, **kw)


def collect(loader: PatchLoader, epoch: int) -> list[dict]:
    return list(loader.epoch(epoch))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
        assert x["case"] == y["case"] and torch.equal(x["index"], y["index"])


def test_batches_identical_for_0_1_2_4_workers(cache_root):
    before = shm_names()
    sampler = make_sampler(cache_root)
    loaders = {
        n: PatchLoader(sampler, batch_size=B, batches_per_epoch=3, num_workers=n)
        for n in (0, 1, 2, 4)
    }
    try:
        sampler.sample(0, 0)  # compile (cold cache) here once; the workers load the result
        for loader in loaders.values():
            loader.start()  # all workers boot at once
        ref = collect(loaders[0], 0)
        b0 = ref[0]
        assert b0["image"].shape == (B, 1, *PATCH) and b0["image"].dtype == torch.float32
        assert b0["label"].shape == (B, 1, *PATCH) and b0["label"].dtype == torch.uint8
        assert b0["index"].tolist() == [0, 1] and b0["epoch"] == 0
        single = sampler.sample(0, 1)
        assert np.array_equal(b0["image"][1].numpy(), single["image"])
        for n in (1, 2, 4):
            assert_same(collect(loaders[n], 0), ref)
        assert_same(list(loaders[2].epoch(0, start_batch=1)), ref[1:])  # resuming
        assert_same(list(loaders[0].epoch(0, start_batch=2)), ref[2:])
        # a newer epoch takes over from an abandoned iterator that is still referenced
        stale = loaders[1].epoch(5)
        next(stale)
        assert_same(collect(loaders[1], 0), ref)
        with pytest.raises(RuntimeError, match="superseded"):
            next(stale)
        # epoch 1 differs from epoch 0 and is again the same for every worker count
        e1 = collect(loaders[4], 1)
        assert not torch.equal(e1[0]["image"], ref[0]["image"])
        assert_same(collect(loaders[1], 1), e1)
        # a for pass runs the next epoch; set_epoch replays one
        loader = loaders[2]
        loader.set_epoch(1)
        assert_same(list(loader), e1)
        assert loader.next_epoch == 2
        assert len(loader) == 3
        assert loader.stats.batches == 8 and loader.stats.wait_s > 0  # 3 + 2 resumed + 3
        assert loader.stats.worker_s > 0
        names = {ld._ring.name for ld in loaders.values() if ld._ring is not None}
        assert len(names) == 3 and names <= shm_names()
    finally:
        for loader in loaders.values():
            loader.close()
    assert not names & shm_names()
    assert not leaked(before)


def test_gpu_mode_matches_cpu_mode(cache_root):
    sampler = make_sampler(cache_root)
    cpu = collect(PatchLoader(sampler, batch_size=B, batches_per_epoch=2, num_workers=0), 0)
    with PatchLoader(
        sampler, batch_size=B, batches_per_epoch=2, num_workers=1, mode="gpu", region_capacity=3000
    ) as loader:
        gpu = collect(loader, 0)
        assert loader.stats.oversize > 0  # regions above the slot size still arrive
    inline = collect(
        PatchLoader(sampler, batch_size=B, batches_per_epoch=2, num_workers=0, mode="gpu"), 0
    )
    assert_same(gpu, inline)
    for g, c in zip(gpu, cpu, strict=True):
        assert g["image"].device.type == "cpu"  # no CUDA here: the torch fallback
        torch.testing.assert_close(g["image"], c["image"], rtol=1e-5, atol=1e-5)
        assert torch.equal(g["label"], c["label"])


def test_worker_exception_surfaces_with_traceback(cache_root, tmp_path):
    # a second cache whose one case loses its image data: reading it fails in the worker
    import shutil

    root = tmp_path / "broken.zarr"
    shutil.copytree(cache_root, root)
    sampler = make_sampler(root)
    bad = next(c for c in sampler.cases if c != sampler.draw(0, 0).case)
    first_bad = next(i for i in range(100) if sampler.draw(0, i).case == bad)
    folder = next(p for p in root.iterdir() if p.name.startswith(f"{bad}@"))
    for f in (folder / "image" / "c").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    before = shm_names()
    with PatchLoader(sampler, batch_size=1, batches_per_epoch=50, num_workers=1) as loader:
        it = loader.epoch(0)
        for _ in range(first_bad):
            next(it)
        t0 = time.perf_counter()
        with pytest.raises(WorkerError) as info:
            next(it)
        assert time.perf_counter() - t0 < 10.0
        err = info.value
        assert err.index == first_bad and err.worker == 0
        assert "Traceback" in err.worker_traceback and "read_region" in err.worker_traceback
        assert "worker traceback" in str(err) and bad in str(err)
        # the loader survives a sample's exception: the next epoch starts again
        assert next(loader.epoch(0))["image"].shape == (1, 1, *PATCH)
    assert not leaked(before)


def test_killed_worker_is_detected(cache_root):
    before = shm_names()
    loader = PatchLoader(
        make_sampler(cache_root), batch_size=B, batches_per_epoch=100, num_workers=2, prefetch=1
    )
    it = iter(loader)
    next(it)
    name = loader._ring.name
    os.kill(loader.worker_pids[0], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(WorkerError, match="SIGKILL"):
        for _ in it:
            pass
    assert time.perf_counter() - t0 < 10.0
    assert name not in shm_names() and not leaked(before)  # the loader closed itself
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)


def test_interrupt_then_garbage_collection_release_everything(cache_root):
    before = shm_names()
    loader = PatchLoader(
        make_sampler(cache_root), batch_size=B, batches_per_epoch=20, num_workers=1
    )
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(loader):
            if i == 1:
                raise KeyboardInterrupt  # Ctrl-C inside the training loop
    assert len(next(iter(loader))["case"]) == B  # still usable afterwards
    name, pids = loader._ring.name, loader.worker_pids
    assert name in shm_names()
    del loader
    gc.collect()
    assert name not in shm_names() and not leaked(before)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_interrupt_at_interpreter_exit_releases_shared_memory(cache_root):
    """Ctrl-C escapes the script: interpreter exit still unlinks the segment."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_loader import make_sampler
        from loaders.loader import PatchLoader
        from pathlib import Path
        if __name__ == "__main__":
            loader = PatchLoader(make_sampler(Path({str(cache_root)!r})), batch_size=2,
                                 batches_per_epoch=10, num_workers=1)
            for batch in loader:
                print(loader._ring.name, flush=True)
                raise KeyboardInterrupt
    """)
    before = shm_names()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100, cwd=REPO
    )
    assert "KeyboardInterrupt" in proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    assert name.startswith("psm_")
    assert name not in shm_names() and not leaked(before)


def test_options_are_checked(cache_root):
    sampler = make_sampler(cache_root)
    with pytest.raises(ValueError, match="batch_size"):
        PatchLoader(sampler, batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        PatchLoader(sampler, mode="tpu")
    with pytest.raises(ValueError, match="rank"):
        PatchLoader(sampler, rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pin_memory"):
            assert not PatchLoader(sampler, pin_memory=True).pin_memory


def test_ranks_shard_the_sample_space(cache_root):
    sampler = make_sampler(cache_root)
    shards = [
        collect(
            PatchLoader(
                sampler, batch_size=B, batches_per_epoch=2, num_workers=0, rank=r, world_size=2
            ),
            0,
        )
        for r in (0, 1)
    ]
    assert [b["index"].tolist() for b in shards[0]] == [[0, 2], [4, 6]]
    assert [b["index"].tolist() for b in shards[1]] == [[1, 3], [5, 7]]
    np.testing.assert_array_equal(shards[1][0]["image"][1].numpy(), sampler.sample(0, 3)["image"])
