"""W6 host cost in GPU mode: what one host core spends per 128^3 patch when the GPU augments.

In ``PatchLoader(mode="gpu")`` the host only samples parameters, reads each sample's cache
region and stages it for the device; the Compose runs on the device. This workload
measures that host side in one process, with the device step left out, so it runs without
a GPU. The same cache, pipeline and patches as W2 (two phantom CT cases, int16 zarr cache
of 200x512x512, 128^3 patches; quick mode: 96x192x192 and 64^3), decoded-chunk LRU off
(every region decoded, as with a dataset much larger than the LRU), chunks decoded on the
calling thread as in a loader worker (``benchmarks.w2.one_decoding_thread``).

Per patch, as the loader does it:
- ``sampler.sample_region(epoch, index, out_image=..., out_label=...)``, into flat buffers
  like a worker's shared-memory slot: the parameters (case, crop, affine, flips, intensity;
  their plan on the whole volume and the region's box) and the region read;
- the host part of the batched device call: ``augment.stack_params`` and ``Compose.plan``
  of a batch of 2 (matrices, fused intensity programs), per patch;
- on a machine with CUDA, the staging copy of the region into page-locked memory.

Figures (process CPU time, all threads; the median over interleaved rounds, every way
timed on the same patches in each round):
- ``host-cpu-ms-per-patch``: the sum; its ratio: how many times less host CPU per patch
  than CPU mode (``cpu-mode-cpu-ms-per-patch``: ``sampler.sample``, region read plus the
  Compose on one numba thread); goal <= 3 ms;
- ``patches-per-host-core`` = 1000 / that: the patches/s one host core can feed (goal >= 333;
  BENCHMARKS.md: a 3D U-Net step consumed about 18 patches/s on an H100);
- the parts: ``sampling-cpu-ms-per-patch`` (``sampler.draw`` and the region's box),
  ``region-read-cpu-ms-per-patch`` (the rest of ``sample_region``),
  ``batch-plan-cpu-ms-per-patch``, ``pinned-staging-cpu-ms-per-patch`` (CUDA only).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import augment
from benchmarks.common import Result
from benchmarks.w2 import FULL, QUICK, one_decoding_thread, phantom_cache, w2_compose

WORKLOAD = "w6"
BATCH = 2
GOAL_MS = 3.0


def _cpu_per_item(fn: Callable[[Any], object], items: list[Any]) -> float:
    """Process CPU seconds per item of one pass of ``fn`` over ``items``."""
    c0 = time.process_time()
    for it in items:
        fn(it)
    return (time.process_time() - c0) / len(items)


def run(quick: bool = False) -> list[Result]:
    """Run W6 (``quick``: the small W2 cache and 64^3 patches, about 10 s)."""
    import numba
    import torch

    from loaders import VolumeCache
    from loaders.sampler import PatchSampler

    cfg = QUICK if quick else FULL
    patch = cfg["patch"]
    rounds, per_round = (3, 8) if quick else (5, 16)
    cache = VolumeCache(phantom_cache(cfg["size"]).root, cache_bytes=0)
    sampler = PatchSampler(cache, w2_compose(patch), seed=0)
    compose = sampler.compose
    cuda = torch.cuda.is_available()
    dtype = np.dtype(cache.info(sampler.cases[0]).dtype)
    # a worker's slot: flat buffers the region is read into (larger than any region here)
    capacity = 8 * int(np.prod(patch))
    slot_image, slot_label = np.empty(capacity, dtype), np.empty(capacity, np.uint8)

    def draw(i: int) -> object:
        d = sampler.draw(0, i)
        return sampler.region(d.case, d.plan)

    def sample_region(i: int) -> dict[str, Any]:
        return sampler.sample_region(0, i, out_image=slot_image, out_label=slot_label)

    def cpu_mode(i: int) -> object:
        return sampler.sample(0, i)

    def batch_plan(regions: list[dict[str, Any]]) -> object:
        return compose.plan(
            augment.stack_params([r["params"] for r in regions]),
            np.stack([r["in_shape"] for r in regions]),
            np.stack([r["offset"] for r in regions]),
        )

    def staging(r: dict[str, Any]) -> object:
        return (
            torch.from_numpy(np.ascontiguousarray(r["image"])).pin_memory(),
            torch.from_numpy(np.ascontiguousarray(r["label"])).pin_memory(),
        )

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    parts: dict[str, list[float]] = {
        k: [] for k in ("draw", "sample_region", "plan", "staging", "cpu_mode")
    }
    try:
        with one_decoding_thread():  # as in a loader worker
            for i in range(3):  # warm-up: kernels loaded, shard maps open
                cpu_mode(10**6 + i)
                sample_region(10**6 + i)
            for r in range(rounds):
                idx = list(range(20_000 + r * per_round, 20_000 + (r + 1) * per_round))
                parts["draw"].append(_cpu_per_item(draw, idx))
                parts["sample_region"].append(_cpu_per_item(sample_region, idx))
                # regions copied out of the slot, as the loader's batch assembly sees them
                regions = [
                    {
                        k: (v.copy() if isinstance(v, np.ndarray) else v)
                        for k, v in sample_region(i).items()
                    }
                    for i in idx
                ]
                batches = [regions[k : k + BATCH] for k in range(0, len(regions), BATCH)]
                parts["plan"].append(_cpu_per_item(batch_plan, batches) / BATCH)
                if cuda:
                    parts["staging"].append(_cpu_per_item(staging, regions))
                parts["cpu_mode"].append(_cpu_per_item(cpu_mode, idx))
    finally:
        numba.set_num_threads(threads)
    ms = {k: 1e3 * statistics.median(v) for k, v in parts.items() if v}
    host = round(ms["sample_region"] + ms["plan"] + ms.get("staging", 0.0), 3)
    tag = f"{'x'.join(map(str, patch))} from {'x'.join(map(str, cfg['size']))}"
    how = f"process CPU time, median of {rounds} interleaved rounds of {per_round} patches"
    load = f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    staged = "staging into pinned memory" if cuda else "no CUDA: no pinned staging"
    results = [
        Result(
            WORKLOAD,
            "host-cpu-ms-per-patch",
            host,
            "ms",
            baseline="cpu-mode-cpu-ms-per-patch",
            note=f"GPU mode host side per patch ({tag}): parameters + region read (LRU off) "
            f"+ batch planning, {staged}; device step left out; ratio = times less host "
            f"CPU than CPU mode; goal <= {GOAL_MS:g}; {how}; {load}",
        ),
        Result(
            WORKLOAD,
            "patches-per-host-core",
            round(1000.0 / host, 1),
            "patches/s",
            baseline="cpu-mode-patches-per-core",
            note="1000 / host-cpu-ms-per-patch: what one host core feeds a GPU in GPU mode "
            f"(goal >= {1000.0 / GOAL_MS:.0f}, i.e. <= {GOAL_MS:g} ms; a 3D U-Net step took "
            "about 18 patches/s on an H100)",
        ),
        Result(
            WORKLOAD,
            "cpu-mode-cpu-ms-per-patch",
            round(ms["cpu_mode"], 3),
            "ms",
            note="CPU mode per patch: sampler.sample (region read + Compose, 1 numba thread)",
        ),
        Result(
            WORKLOAD,
            "cpu-mode-patches-per-core",
            round(1000.0 / ms["cpu_mode"], 1),
            "patches/s",
            note="1000 / cpu-mode-cpu-ms-per-patch",
        ),
        Result(
            WORKLOAD,
            "sampling-cpu-ms-per-patch",
            round(ms["draw"], 3),
            "ms",
            note="sampler.draw (case, Compose.sample, plan on the whole volume) + region box",
        ),
        Result(
            WORKLOAD,
            "region-read-cpu-ms-per-patch",
            round(ms["sample_region"] - ms["draw"], 3),
            "ms",
            note="sample_region minus sampling: image + label region decoded into a slot",
        ),
        Result(
            WORKLOAD,
            "batch-plan-cpu-ms-per-patch",
            round(ms["plan"], 3),
            "ms",
            note=f"stack_params + Compose.plan of batches of {BATCH}, per patch",
        ),
    ]
    if cuda:
        results.append(
            Result(
                WORKLOAD,
                "pinned-staging-cpu-ms-per-patch",
                round(ms["staging"], 3),
                "ms",
                note="image and label region copied into page-locked memory",
            )
        )
    return results
