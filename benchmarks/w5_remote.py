"""W5-remote: the random 160^3 region of W5 read from the volume cache on object storage.

The server is moto's S3 server on 127.0.0.1 (``loaders.remote_server``, started and
stopped here), so the figures show the client's costs (requests, bytes, Python and
decoding per region) and loopback latency, not a real network's.

Ways, all reading the same sequence of random regions of one phantom CT volume:
- ``local-folder``: ``VolumeCache(folder)`` (memory-mapped shards), LRU off, 1 thread;
- ``s3-cold``: ``VolumeCache("s3://...")`` with its readers closed before every region, so
  each read fetches the array's metadata and the shard index again, then the chunks;
- ``s3-index-cached``: the same cache kept open: only the chunk byte ranges are fetched;
- ``zarr-python-s3``: ``zarr.open_array`` on zarr's ``FsspecStore`` over the same server
  and array, defaults, sliced (zarr-python fetches the shard index on every read).

Counted server-side (``RecordingProxy`` in front of the server, in a separate pass from the
timed one): requests and body bytes per region, against the compressed bytes the region
needs (the chunks it intersects, from the shard index). Goal: at most 1.5x.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import s3fs
import zarr
from zarr.storage import FsspecStore

from benchmarks.common import Result, median_seconds
from loaders import VolumeCache, pair_cases, write_array
from loaders.cache import CACHE_CHUNKS
from loaders.phantom import generate_case
from loaders.remote import RemoteRoot
from loaders.remote_build import build_remote
from loaders.remote_server import DUMMY_AWS_ENV, LocalS3Server, RecordingProxy

FULL = ((200, 512, 512), (160, 160, 160))
QUICK = ((192, 384, 384), (160, 160, 160))
WORKLOAD = "w5-remote"
GOAL_BYTES = 1.5
"""Bytes fetched per region over the compressed bytes it needs, at most."""


@contextmanager
def local_aws_env() -> Iterator[None]:
    """Dummy credentials for the local server, nothing of the machine's AWS set-up."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(DUMMY_AWS_ENV)
    try:
        yield
    finally:
        for k in DUMMY_AWS_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _needed_bytes(shard: Path, shape: tuple[int, ...], start: tuple[int, ...], size: int) -> int:
    """Compressed bytes of the chunks a region intersects, from the shard's index (zarr v3
    sharding: little-endian (offset, nbytes) uint64 pairs and a crc32c at the end)."""
    per = [-(-n // c) for n, c in zip(shape, CACHE_CHUNKS, strict=True)]
    n = int(np.prod(per))
    index = np.frombuffer(shard.read_bytes()[-(16 * n + 4) : -4], "<u8").reshape(n, 2)
    axes = [
        range(a // c, (a + size - 1) // c + 1) for a, c in zip(start, CACHE_CHUNKS, strict=True)
    ]
    total = 0
    for cz, cy, cx in itertools.product(*axes):
        off, nbytes = index[(cz * per[1] + cy) * per[2] + cx]
        total += 0 if off == 2**64 - 1 else int(nbytes)
    return total


def run(quick: bool = False) -> list[Result]:
    """Run W5-remote; ``quick`` reads from a 192x384x384 volume with fewer repeats."""
    shape, region = QUICK if quick else FULL
    rounds, repeats, counted = (2, 5, 8) if quick else (3, 15, 32)
    size = f"{'x'.join(map(str, shape))} int16 phantom, random {region[0]}^3 regions"
    if quick:
        size += " (quick: a smaller volume than the full run's 200x512x512)"
    results: list[Result] = []

    def add(name: str, value: float, unit: str, baseline: str | None, note: str) -> None:
        results.append(Result(WORKLOAD, name, value, unit, baseline, note=f"{note}; {size}"))

    with (
        tempfile.TemporaryDirectory(prefix="w5r-") as tmp_name,
        local_aws_env(),
        LocalS3Server() as server,
        RecordingProxy(server.endpoint) as proxy,
    ):
        tmp = Path(tmp_name)
        image, label, spacing = generate_case(0, shape=shape)
        nii = write_array(image, tmp / "ct.nii.gz", spacing=spacing)
        seg = write_array(label, tmp / "ct_seg.nii.gz", spacing=spacing)
        cases = pair_cases([(nii, seg)], ids=["ct"])
        local = VolumeCache(tmp / "cache", cache_bytes=0)
        local.build(cases, workers=1, progress=False)
        s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True).mkdir("bench")
        url = "s3://bench/ct.zarr"
        direct = {"endpoint_url": server.endpoint}
        counted_opts = {"endpoint_url": proxy.endpoint}
        build_remote(
            RemoteRoot(url, direct),
            lambda staging: VolumeCache(staging).build(cases, workers=1, progress=False),
            staging=tmp / "staging",
        )
        remote = VolumeCache(url, storage_options=direct, cache_bytes=0)
        folder = next(p.name for p in (tmp / "cache").iterdir() if p.name.startswith("ct@"))
        # a new remote cache: its case folder is the staged one, uploaded
        remote_dir = next(p.name for p in (tmp / "staging").iterdir() if p.name.startswith("ct@"))

        def zarr_array(options: dict[str, Any]) -> Any:
            store = FsspecStore.from_url(
                f"{url}/{remote_dir}/image", storage_options=options, read_only=True
            )
            return zarr.open_array(store=store, mode="r")

        rng = np.random.default_rng(5)
        starts = [
            tuple(int(rng.integers(0, n - r + 1)) for n, r in zip(shape, region, strict=True))
            for _ in range(64)
        ]

        def box(s: tuple[int, ...]) -> tuple[slice, slice, slice]:
            return (
                slice(s[0], s[0] + region[0]),
                slice(s[1], s[1] + region[1]),
                slice(s[2], s[2] + region[2]),
            )

        def cold(cache: VolumeCache) -> Callable[[tuple[int, ...]], Any]:
            def read(s: tuple[int, ...]) -> Any:
                cache.close()  # drops the readers: metadata and shard index fetched again
                return cache.read_region("ct", box(s))

            return read

        za = zarr_array(direct)
        ways: dict[str, Callable[[tuple[int, ...]], Any]] = {
            "local-folder": lambda s: local.read_region("ct", box(s)),
            "s3-cold": cold(remote),
            "s3-index-cached": lambda s: remote.read_region("ct", box(s)),
            "zarr-python-s3": lambda s: za[box(s)],
        }
        for name, fn in ways.items():  # the same answer everywhere before timing anything
            if not np.array_equal(fn(starts[0]), image[box(starts[0])]):
                raise AssertionError(f"w5-remote: {name} read a wrong region")

        def cycling(fn: Callable[[tuple[int, ...]], Any]) -> Callable[[], Any]:
            regions = itertools.cycle(starts)
            return lambda: fn(next(regions))

        per_round: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, fn in ways.items():
                per_round[name].append(median_seconds(cycling(fn), repeats, warmup=1))
        ms = {name: 1e3 * statistics.median(v) for name, v in per_round.items()}

        # the counted pass, through the proxy: requests and bytes per region
        shard = tmp / "cache" / folder / "image" / "c" / "0" / "0" / "0"
        needed = [_needed_bytes(shard, shape, s, region[0]) for s in starts[:counted]]
        counted_cache = VolumeCache(url, storage_options=counted_opts, cache_bytes=0)
        counted_zarr = zarr_array(counted_opts)
        counted_ways: dict[str, Callable[[tuple[int, ...]], Any]] = {
            "s3-cold": cold(counted_cache),
            "s3-index-cached": lambda s: counted_cache.read_region("ct", box(s)),
            "zarr-python-s3": lambda s: counted_zarr[box(s)],
        }
        counts: dict[str, tuple[float, float]] = {}
        for name, fn in counted_ways.items():
            fn(starts[-1])  # opened (and for the index-cached way, the index fetched)
            n_requests: list[int] = []
            ratios: list[float] = []
            for s, need in zip(starts[:counted], needed, strict=True):
                proxy.clear()
                fn(s)
                got = proxy.records
                n_requests.append(len(got))
                ratios.append(sum(r.nbytes for r in got) / need)
            counts[name] = (statistics.mean(n_requests), statistics.mean(ratios))

    chunks = "x".join(map(str, CACHE_CHUNKS))
    note = f"moto S3 on 127.0.0.1, sharded {chunks} chunks, LRU off, 1 thread"
    add(
        "local-folder",
        ms["local-folder"],
        "ms",
        "s3-index-cached",
        f"the same cache in a local folder; ratio = how much faster than over S3; {note}",
    )
    add(
        "s3-cold",
        ms["s3-cold"],
        "ms",
        "zarr-python-s3",
        f"array metadata + shard index + chunks every region; ratio = speed-up over "
        f"zarr-python on the same server; {note}",
    )
    add(
        "s3-index-cached",
        ms["s3-index-cached"],
        "ms",
        "zarr-python-s3",
        f"shard index kept, chunk ranges only; ratio = speed-up over zarr-python; {note}",
    )
    add(
        "zarr-python-s3",
        ms["zarr-python-s3"],
        "ms",
        None,
        "zarr.open_array(store=FsspecStore(s3fs))[box], zarr-python's defaults",
    )
    for name, (per_region, ratio) in counts.items():
        add(f"{name}-requests", per_region, "requests", None, "requests per region (server side)")
        verdict = "meets" if ratio <= GOAL_BYTES else "misses"
        add(
            f"{name}-bytes",
            ratio,
            "x needed",
            None,
            f"body bytes fetched per region over the compressed bytes of the chunks it "
            f"intersects; {verdict} the goal of <= {GOAL_BYTES}x",
        )
    return results
