"""W5 cache read: a random 160^3 region (a 128^3 patch plus rotation margin) of a
200x512x512 int16 CT volume.

Ways, all reading the same sequence of random regions of the same phantom volume (page
cache warm: every file was just written and read once):
- ``zarr-cache``: ``loaders.VolumeCache.read_region``, decoded-chunk LRU off, one thread;
  ``zarr-cache-2threads`` decodes on two threads; ``zarr-cache-lru`` keeps the default
  256 MiB LRU of decoded chunks (regions of one volume overlap, so most chunks are hits);
- ``zarr-python-sharded``: zarr-python (``zarr.open_array(...)[box]``) reading the very
  sharded array the ``VolumeCache`` wrote: what the custom chunk reader
  (``loaders/chunkstore.py``) buys over zarr-python on the same layout;
- ``npy-memmap``: an uncompressed .npy opened with ``mmap_mode="r"``, region copied out;
- ``zarr-defaults``: ``zarr.create_array`` with its default chunks and codecs, sliced;
- ``nifti-gz-whole``: read the whole .nii.gz with SimpleITK, then crop.

Figures: ms per region (median), bytes on disk of the image, and the cache build
throughput (MB of voxels per second, one worker process, from the .nii.gz sources).

Decision rule for the custom chunk reader: it is kept only while zarr-python reading the
same sharded layout (``zarr-python-sharded``) is more than 1.5x slower than ``zarr-cache``
on the random 160^3 region; within 1.5x, delete ``loaders/chunkstore.py`` and read the
cache with zarr-python. The ``zarr-python-sharded`` row's note states the verdict of its run.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from benchmarks.common import Result, median_seconds
from loaders import VolumeCache, pair_cases, read_volume, region_decode, write_array
from loaders.cache import CACHE_CHUNKS
from loaders.phantom import generate_case

FULL = ((200, 512, 512), (160, 160, 160))
QUICK = ((192, 384, 384), (160, 160, 160))  # 57 MB: still larger than a CPU cache
WORKLOAD = "w5"
KEEP_READER_ABOVE = 1.5
"""zarr-python on the cache's layout must be slower than this many times the custom
reader for ``loaders/chunkstore.py`` to stay (see the module docstring)."""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(quick: bool = False) -> list[Result]:
    """Run W5; ``quick`` reads the same 160^3 regions from a 192x384x384 volume (~12 s)."""
    shape, region = QUICK if quick else FULL
    rounds, repeats, nifti_repeats = (2, 9, 2) if quick else (3, 15, 3)
    size = f"{'x'.join(map(str, shape))} int16 phantom, random {region[0]}^3 regions"
    if quick:
        size += " (quick: a smaller volume than the full run's 200x512x512)"
    results: list[Result] = []

    def add(name: str, value: float, unit: str, baseline: str | None, note: str) -> None:
        results.append(Result(WORKLOAD, name, value, unit, baseline, note=f"{note}; {size}"))

    with tempfile.TemporaryDirectory(prefix="w5-") as tmp_name:
        tmp = Path(tmp_name)
        image, label, spacing = generate_case(0, shape=shape)
        nii = write_array(image, tmp / "ct.nii.gz", spacing=spacing)
        seg = write_array(label, tmp / "ct_seg.nii.gz", spacing=spacing)
        np.save(tmp / "ct.npy", image)
        defaults = zarr.create_array(str(tmp / "defaults.zarr"), shape=shape, dtype=image.dtype)
        defaults[...] = image

        t0 = time.perf_counter()
        report = VolumeCache(tmp / "cache").build(
            pair_cases([(nii, seg)], ids=["ct"]), workers=1, progress=False
        )
        build_s = time.perf_counter() - t0

        caches = {
            "zarr-cache": VolumeCache(tmp / "cache", cache_bytes=0),
            "zarr-cache-2threads": VolumeCache(tmp / "cache", cache_bytes=0, threads=2),
            "zarr-cache-lru": VolumeCache(tmp / "cache"),
        }
        memmap = np.load(tmp / "ct.npy", mmap_mode="r")
        zd = zarr.open_array(str(tmp / "defaults.zarr"), mode="r")
        case_dir = next(p for p in (tmp / "cache").iterdir() if p.name.startswith("ct@"))
        zs = zarr.open_array(str(case_dir / "image"), mode="r")

        def box(s: tuple[int, ...]) -> tuple[slice, slice, slice]:
            return (
                slice(s[0], s[0] + region[0]),
                slice(s[1], s[1] + region[1]),
                slice(s[2], s[2] + region[2]),
            )

        def cache_way(cache: VolumeCache) -> Callable[[tuple[int, ...]], Any]:
            return lambda s: cache.read_region("ct", box(s))

        ways: dict[str, Callable[[tuple[int, ...]], Any]] = {
            **{name: cache_way(c) for name, c in caches.items()},
            "zarr-python-sharded": lambda s: zs[box(s)],
            "npy-memmap": lambda s: np.array(memmap[box(s)]),
            "zarr-defaults": lambda s: zd[box(s)],
            "nifti-gz-whole": lambda s: read_volume(nii).array[box(s)],
        }
        rng = np.random.default_rng(5)
        starts = [
            tuple(int(rng.integers(0, n - r + 1)) for n, r in zip(shape, region, strict=True))
            for _ in range(64)
        ]
        for name, fn in ways.items():  # same answer everywhere before timing anything
            if not np.array_equal(fn(starts[0]), image[box(starts[0])]):
                raise AssertionError(f"w5: {name} read a wrong region")
        # warm: every store read once in full (the page cache, and this process's page
        # tables for the memory-mapped ones)
        for c in caches.values():
            c.read("ct")
        np.array(memmap)
        zd[...]
        zs[...]

        def cycling(fn: Callable[[tuple[int, ...]], Any]) -> Callable[[], Any]:
            regions = itertools.cycle(starts)  # every call reads the next random region
            return lambda: fn(next(regions))

        # Rounds interleave the ways, so that a burst of load on a shared machine does not
        # land on one way only; each figure is the median of its rounds' medians.
        per_round: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, fn in ways.items():
                if name == "nifti-gz-whole" and per_round[name]:
                    continue  # seconds per read: one round is enough
                n = nifti_repeats if name == "nifti-gz-whole" else repeats
                per_round[name].append(median_seconds(cycling(fn), n, warmup=1))
        ms = {name: 1e3 * statistics.median(v) for name, v in per_round.items()}
        # CPU time per region: what a read costs when other jobs share the cores (wall time
        # on a loaded machine favours the memory-bound memmap copy). Process time, all
        # threads: a read that decodes through numcodecs from the main thread (the path
        # without the compiled decoder) uses blosc's own threads, which this thread's clock
        # would not see.
        cpu_ms = {}
        for name in ("zarr-cache", "npy-memmap"):
            cpu = []
            for s0 in starts:
                t0 = time.process_time()
                ways[name](s0)
                cpu.append(time.process_time() - t0)
            cpu_ms[name] = 1e3 * statistics.median(cpu)
        for c in caches.values():
            c.close()

        chunks = "x".join(map(str, CACHE_CHUNKS))
        meta = json.loads((case_dir / "image" / "zarr.json").read_text())
        codec = meta["codecs"][0]["configuration"]["codecs"][1]["configuration"]["cname"]
        cache_note = f"sharded, {chunks} chunks, blosc {codec} + byte shuffle"
        add(
            "zarr-cache",
            ms["zarr-cache"],
            "ms",
            "zarr-defaults",
            f"{cache_note}, LRU off, called from 1 thread ("
            + (
                "chunks decoded on it by loaders.region_decode"
                if region_decode.AVAILABLE
                else "numcodecs decodes on blosc's 2 threads from a main thread"
            )
            + "); ratio = speed-up over zarr defaults (goal >= 5)",
        )
        add(
            "zarr-cache-2threads",
            ms["zarr-cache-2threads"],
            "ms",
            "zarr-cache",
            "chunks decoded on 2 threads, LRU off",
        )
        add(
            "zarr-cache-lru",
            ms["zarr-cache-lru"],
            "ms",
            "zarr-cache",
            "256 MiB LRU of decoded chunks, 64 regions cycling (mostly hits)",
        )
        slower = ms["zarr-python-sharded"] / ms["zarr-cache"]
        verdict = "keep" if slower > KEEP_READER_ABOVE else "delete"
        add(
            "zarr-python-sharded",
            ms["zarr-python-sharded"],
            "ms",
            "zarr-cache",
            f"zarr.open_array(...)[box] on the cache's own array ({cache_note}); it takes "
            f"{slower:.2f}x the custom reader's time, so {verdict} loaders/chunkstore.py "
            f"(rule: delete it if zarr-python is within {KEEP_READER_ABOVE}x)",
        )
        add(
            "npy-memmap",
            ms["npy-memmap"],
            "ms",
            "zarr-cache",
            "uncompressed .npy memmap; ratio = how much faster than the cache (goal <= 5)",
        )
        add(
            "zarr-cache-cpu",
            cpu_ms["zarr-cache"],
            "ms",
            None,
            "process CPU time per region (all threads), LRU off, called from 1 thread",
        )
        add(
            "npy-memmap-cpu",
            cpu_ms["npy-memmap"],
            "ms",
            "zarr-cache-cpu",
            "process CPU time per region; ratio = how much less CPU than the cache",
        )
        add(
            "zarr-defaults",
            ms["zarr-defaults"],
            "ms",
            None,
            f"zarr.create_array defaults: chunks {'x'.join(map(str, zd.chunks))}, "
            f"{type(zd.compressors[0]).__name__ if zd.compressors else 'no codec'}",
        )
        add(
            "nifti-gz-whole",
            ms["nifti-gz-whole"],
            "ms",
            "zarr-cache",
            "SimpleITK reads the whole .nii.gz, then crop",
        )

        sizes = {
            "npy-memmap-bytes": (tmp / "ct.npy").stat().st_size,
            "zarr-cache-bytes": _dir_bytes(case_dir / "image"),
            "zarr-defaults-bytes": _dir_bytes(tmp / "defaults.zarr"),
            "nifti-gz-bytes": nii.stat().st_size,
        }
        raw = sizes["npy-memmap-bytes"]
        for name, nbytes in sizes.items():
            add(
                name,
                float(nbytes),
                "bytes",
                None if name == "npy-memmap-bytes" else "npy-memmap-bytes",
                f"image on disk: {nbytes / raw:.2f}x the raw bytes"
                + (" (goal <= 0.8)" if name == "zarr-cache-bytes" else ""),
            )
        add(
            "cache-build",
            report.voxel_bytes / 1e6 / build_s,
            "MB/s",
            None,
            "VolumeCache.build, 1 worker: read + check the .nii.gz pair, statistics, encode, "
            "write; MB of image + label voxels per second per core",
        )
    return results
