"""W2 training sample: cache -> sampler -> loader -> batch, end to end.

Two phantom CT cases (int16 zarr cache, 200x512x512; quick mode: 96x192x192 and 64^3
patches) kept under ``data/bench/w2`` so later runs skip the generation. W1 spatial (128^3,
rotation U(-15, 15) degrees per axis, scale U(0.85, 1.25), flips p=0.5) plus window
[-200, 250] -> [0, 1], gamma (0.7, 1.5) p=0.3, noise p=0.1, contrast (0.75, 1.25) p=0.15,
foreground oversampling 1/3, air (-1024 HU) outside the volume. The cache's decoded-chunk
LRU is off, so every region is read and decoded (as with a dataset much larger than it).

Figures, all from this process on this machine:
- ``machine-2proc-efficiency``: how much of 2 cores two busy processes get right now (the
  machines here are shared; no 2-process figure can beat it);
- ``kernels-1proc``: the Compose alone on the regions the sampler reads (already read),
  one numba thread; ``sampler-1proc``: ``PatchSampler.sample`` (region read + Compose);
  ``scipy-1proc``: the same patches by ``scipy.ndimage.affine_transform`` on the same
  regions (BENCHMARKS.md's reference, 8.5 patches/s per core on an idle machine: a ratio
  to it times 8.5 reads as an idle-machine rate);
- ``loader-cpu-2workers``: batches of 2 delivered by ``PatchLoader`` with 2 workers (into
  pinned memory when CUDA is there), and ``sampler-2proc-no-loader``: two processes
  sampling side by side in plain loops, the same work on the same share of the machine
  without IPC, shared memory or batches. The two are measured in alternating windows;
  ``loader-overhead-vs-2proc-no-loader`` = 1 - loader rate / plain rate (medians) is the
  loader's overhead (goal <= 10%);
- CPU milliseconds per patch of each (workers and this process for the loader), and
  ``loader-cpu-bound-2cores`` = 2 / loader CPU per patch, the rate two free cores give;
- ``loader-gpu-mode-...``: GPU feeding mode (workers read regions, this process augments
  them batched with torch): on CUDA the real path, else the torch CPU fallback.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import augment
from augment.workers import single_thread_env, spawn_executor
from benchmarks.common import Result
from benchmarks.w4 import machine_parallelism

DATA = Path(__file__).resolve().parents[1] / "data" / "bench" / "w2"
FULL: dict[str, Any] = {
    "size": (200, 512, 512),
    "patch": (128, 128, 128),
    "n": 8,
    "batches": 8,
    "rounds": 3,
    "warmup": 3,
}
QUICK: dict[str, Any] = {
    "size": (96, 192, 192),
    "patch": (64, 64, 64),
    "n": 4,
    "batches": 6,
    "rounds": 3,
    "warmup": 3,
}
BATCH = 2


@contextmanager
def one_decoding_thread() -> Iterator[None]:
    """Chunks decoded on the calling thread only, as in a loader worker. On the main thread
    of the main process numcodecs' blosc decodes on blosc's own thread pool (2 threads on 2
    cores; about 1.25x the CPU of one thread for the same chunks), which would make a
    one-process figure here unlike the workers it stands for. (The compiled decoder,
    ``loaders.region_decode``, always decodes on the calling thread; this matters where a
    read goes through numcodecs.)"""
    from numcodecs import blosc

    saved = blosc.use_threads
    blosc.use_threads = False
    try:
        yield
    finally:
        blosc.use_threads = saved


def w2_compose(patch: tuple[int, int, int]) -> augment.Compose:
    return augment.Compose(
        [
            augment.RandomCrop(patch, foreground=1 / 3),
            augment.RandomAffine(degrees=15, scale=(0.85, 1.25)),
            augment.RandomFlip(axes=(0, 1, 2), p=0.5),
            augment.Window(-200, 250),
            augment.RandomGamma((0.7, 1.5), p=0.3),
            augment.RandomNoise((0.0, 0.1), p=0.1),
            augment.RandomContrast((0.75, 1.25), p=0.15),
        ],
        cval=-1024,
    )


def phantom_cases(size: tuple[int, int, int]) -> Any:
    """Two phantom cases of ``size`` under data/bench (generated once)."""
    from loaders.phantom import write_msd_dataset

    tag = "x".join(str(s) for s in size)
    return write_msd_dataset(DATA / f"phantom-{tag}", n_train=2, seed=0, size=size, workers=2)


def phantom_cache(size: tuple[int, int, int]) -> Any:
    """Two phantom cases of ``size`` in a cache under data/bench (built once)."""
    from loaders import VolumeCache

    tag = "x".join(str(s) for s in size)
    cases = phantom_cases(size)
    cache = VolumeCache(DATA / f"cache-{tag}.zarr")
    cache.build(cases, workers=2, progress=False)
    return cache


# -- two plain processes, no loader -------------------------------------------------------
_PLAIN: dict[str, Any] = {}


def _plain_init(root: str, patch: tuple[int, int, int], barrier: Any) -> None:
    import numba

    from loaders import VolumeCache
    from loaders.sampler import PatchSampler

    numba.set_num_threads(1)
    _PLAIN["sampler"] = PatchSampler(VolumeCache(root, cache_bytes=0), w2_compose(patch), seed=0)
    _PLAIN["barrier"] = barrier


def _plain_window(indices: list[int], sync: bool) -> tuple[float, float]:
    """Sample ``indices`` in a plain loop; wall and CPU seconds (after a barrier shared with
    the sibling process when ``sync``, so that both run side by side)."""
    if sync:
        _PLAIN["barrier"].wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in indices:
        _PLAIN["sampler"].sample(0, i)
    return time.perf_counter() - t0, time.process_time() - c0


class PlainPair:
    """Two spawned processes (one thread each, as loader workers) that sample in loops."""

    def __init__(self, root: Path, patch: tuple[int, int, int]) -> None:
        from multiprocessing import get_context

        with single_thread_env():
            self.ex = spawn_executor(
                2,
                initializer=_plain_init,
                initargs=(str(root), patch, get_context("spawn").Barrier(2)),
            )
            self.window(4, start=30_000, sync=False)  # start both, warm up (first touches
            # of the cache's shard maps, lazily loaded kernels)
        self.next = 40_000

    def window(self, n: int, *, start: int | None = None, sync: bool = True) -> tuple[float, float]:
        """Patches/s of both together and CPU ms per patch, ``n`` patches each."""
        s = self.next if start is None else start
        jobs = [list(range(s + k, s + 2 * n, 2)) for k in (0, 1)]
        self.next = s + 2 * n
        res = list(self.ex.map(_plain_window, jobs, [sync, sync]))
        return sum(n / w for w, _ in res), 1000 * sum(c for _, c in res) / (2 * n)

    def close(self) -> None:
        self.ex.shutdown()


# -- measurements --------------------------------------------------------------------------
def _rate(fn: Any, items: list[Any], repeats: int) -> tuple[float, float]:
    """Items per second (median wall time over ``repeats`` passes over ``items``) and CPU
    milliseconds per item (median)."""
    walls, cpus = [], []
    for r in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        for it in items:
            fn(it)
        if r:  # the first pass warms up
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return len(items) / statistics.median(walls), 1000 * statistics.median(cpus) / len(items)


def _loader_window(loader: Any, it: Any, batches: int) -> tuple[float, float, float]:
    """Patches/s over ``batches`` batches, the share of the time the consumer waited, and
    CPU ms per patch of the whole pipeline (workers and this process). The batches the ring
    prefetched while nobody asked are taken first, untimed: the window times production."""
    for _ in range(loader.prefetch * loader.num_workers):
        next(it)
    w0, m0 = loader.stats.wait_s, loader.stats.main_cpu_s
    k0 = sum(loader.worker_cpu_totals())
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        _ = batch["image"].sum().item()  # touch the batch, as a training step would
    dt = time.perf_counter() - t0
    n = batches * loader.batch_size
    cpu = sum(loader.worker_cpu_totals()) - k0 + loader.stats.main_cpu_s - m0
    return n / dt, (loader.stats.wait_s - w0) / dt, 1000 * cpu / n


def run(quick: bool = False) -> list[Result]:
    import numba
    import scipy.ndimage as ndi
    import torch

    from loaders import VolumeCache
    from loaders.loader import PatchLoader
    from loaders.sampler import PatchSampler

    cfg = QUICK if quick else FULL
    patch = cfg["patch"]
    # no decoded-chunk LRU: with two cases it would end up holding both volumes, which a
    # real dataset of hundreds of cases does not allow
    cache = VolumeCache(phantom_cache(cfg["size"]).root, cache_bytes=0)
    sampler = PatchSampler(cache, w2_compose(patch), seed=0)
    load = f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    tag = f"{'x'.join(map(str, patch))} from {'x'.join(map(str, cfg['size']))}"
    results: list[Result] = [
        Result(
            "w2",
            "machine-2proc-efficiency",
            round(100 * machine_parallelism(), 1),
            "%",
            note=f"busy loop, 2 processes vs 1: how much of 2 cores this machine gives "
            f"now, the ceiling of the 2-worker speed-up / 2; {load}",
        ),
    ]

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        idx = list(range(10_000, 10_000 + cfg["n"]))
        regions = [sampler.sample_region(0, i) for i in idx]
        compose = sampler.compose

        def kernels(r: dict[str, Any]) -> object:
            return compose(
                image=r["image"],
                label=r["label"],
                params=r["params"],
                offset=r["offset"],
                in_shape=r["in_shape"],
            )

        def scipy_way(r: dict[str, Any]) -> object:
            m = augment.matrices.translation(-r["offset"]) @ compose.matrix(r["params"])[0]
            img = ndi.affine_transform(
                r["image"][0].astype(np.float32),
                m,
                output_shape=patch,
                order=1,
                mode="constant",
                cval=-1024.0,
                prefilter=False,
            )
            lab = ndi.affine_transform(
                r["label"][0], m, output_shape=patch, order=0, mode="constant"
            )
            return np.clip((img + 200.0) / 450.0, 0.0, 1.0), lab

        reps = 1 if quick else 3
        with one_decoding_thread():
            k_rate, k_cpu = _rate(kernels, regions, repeats=reps)
            s_rate, s_cpu = _rate(lambda i: sampler.sample(0, i), idx, repeats=reps)
            sc_rate, _ = _rate(scipy_way, regions[: 1 if quick else 3], repeats=1)
    finally:
        numba.set_num_threads(threads)
    vox = np.mean([np.prod(r["image"].shape) for r in regions]) ** (1 / 3)
    results += [
        Result(
            "w2",
            "kernels-1proc",
            round(k_rate, 2),
            "patches/s",
            baseline="scipy-1proc",
            note=f"{tag}; Compose on pre-read regions (~{vox:.0f}^3), 1 thread; {load}",
        ),
        Result(
            "w2",
            "sampler-1proc",
            round(s_rate, 2),
            "patches/s",
            baseline="scipy-1proc",
            note="region read + Compose, 1 thread",
        ),
        Result(
            "w2",
            "scipy-1proc",
            round(sc_rate, 2),
            "patches/s",
            note="scipy.ndimage.affine_transform on the same regions + window",
        ),
        Result("w2", "kernels-cpu-ms-per-patch", round(k_cpu, 2), "ms"),
        Result(
            "w2",
            "sampler-cpu-ms-per-patch",
            round(s_cpu, 2),
            "ms",
            baseline="kernels-cpu-ms-per-patch",
            note="ratio < 1: the reads' share",
        ),
    ]

    # the loader and two plain processes, in alternating windows of the same size
    loader_runs, plain_runs, waits = [], [], []
    plain = PlainPair(Path(cache.root), patch)
    try:
        with PatchLoader(sampler, batch_size=BATCH, batches_per_epoch=10**6, num_workers=2) as ld:
            ld.start()
            it = iter(ld)
            for _ in range(cfg["warmup"]):
                next(it)
            for _ in range(cfg["rounds"]):
                rate, wait, cpu = _loader_window(ld, it, cfg["batches"])
                loader_runs.append((rate, cpu))
                waits.append(wait)
                # let the workers fill the ring (they go idle then) before the plain pair
                time.sleep(2.0 * ld.prefetch * BATCH * cpu / 1000.0)
                plain_runs.append(plain.window(cfg["batches"] * BATCH // 2))
    finally:
        plain.close()
    l_rate, l_cpu = (statistics.median(v) for v in zip(*loader_runs, strict=True))
    p_rate, p_cpu = (statistics.median(v) for v in zip(*plain_runs, strict=True))
    pinned = "pinned" if torch.cuda.is_available() else "pageable (no CUDA)"
    results += [
        Result(
            "w2",
            "sampler-2proc-no-loader",
            round(p_rate, 2),
            "patches/s",
            baseline="sampler-1proc",
            note="two processes sampling side by side in plain loops",
        ),
        Result(
            "w2",
            "loader-cpu-2workers",
            round(l_rate, 2),
            "patches/s",
            baseline="sampler-2proc-no-loader",
            note=f"batches of {BATCH} into {pinned} memory; data-wait "
            f"{statistics.median(waits):.0%}; windows alternating with the plain "
            f"pair; {load}",
        ),
        Result(
            "w2",
            "loader-cpu-2workers-vs-scipy",
            round(l_rate, 2),
            "patches/s",
            baseline="scipy-1proc",
            note="same value; ratio x 8.5 = idle-machine patches/s",
        ),
        Result(
            "w2",
            "loader-overhead-vs-2proc-no-loader",
            round(100 * (1 - l_rate / p_rate), 1),
            "%",
            note="1 - loader rate / plain 2-process rate (medians); goal <= 10",
        ),
        Result(
            "w2",
            "sampler-2proc-no-loader-cpu-ms-per-patch",
            round(p_cpu, 2),
            "ms",
            baseline="sampler-cpu-ms-per-patch",
            note="ratio < 1: what two processes at once cost each other here",
        ),
        Result(
            "w2",
            "loader-cpu-ms-per-patch",
            round(l_cpu, 2),
            "ms",
            baseline="sampler-2proc-no-loader-cpu-ms-per-patch",
            note="CPU of workers + this process per delivered patch",
        ),
        Result(
            "w2",
            "loader-cpu-overhead-vs-sampler-1proc",
            round(100 * (1 - s_cpu / l_cpu), 1),
            "%",
            note="1 - sampler CPU per patch alone in one process / loader CPU per "
            "patch (includes what two busy processes cost each other)",
        ),
        Result(
            "w2",
            "loader-cpu-overhead-vs-kernels",
            round(100 * (1 - k_cpu / l_cpu), 1),
            "%",
            note="1 - kernels' CPU per patch on pre-read regions / loader CPU per patch: "
            "the region reads count as overhead here",
        ),
        Result(
            "w2",
            "loader-cpu-bound-2cores",
            round(2000.0 / l_cpu, 2),
            "patches/s",
            baseline="scipy-1proc",
            note="2 cores / loader CPU per patch: the rate on 2 free cores (goal >= 40)",
        ),
    ]

    cuda = torch.cuda.is_available()
    gw = 2 if cuda else 1
    torch_threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # this process augments beside a worker on 2 cores
    try:
        with PatchLoader(
            sampler, batch_size=BATCH, batches_per_epoch=10**6, num_workers=gw, mode="gpu"
        ) as ld:
            ld.start()
            it = iter(ld)
            for _ in range(cfg["warmup"]):
                next(it)
            g_rate, g_wait, _ = _loader_window(ld, it, max(2, cfg["batches"] // 2))
    finally:
        torch.set_num_threads(torch_threads)
    name = "loader-gpu-mode-cuda" if cuda else "loader-gpu-mode-torch-cpu-fallback"
    results.append(
        Result(
            "w2",
            name,
            round(g_rate, 2),
            "patches/s",
            baseline="sampler-1proc",
            note=f"{gw} worker(s) reading regions, Compose batched on "
            f"{'cuda' if cuda else 'cpu (torch fallback)'}; data-wait "
            f"{g_wait:.0%}",
        )
    )
    return results
