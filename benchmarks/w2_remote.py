"""W2-remote: W2's training patches delivered by ``PatchLoader`` from a remote cache.

The cache of W2's two phantom CT cases (200x512x512, 128^3 patches; quick: 96x192x192,
64^3) is read from two servers on 127.0.0.1, each in its own process, started and stopped
here (``loaders.remote_server``): ``s3``, the cache uploaded to moto's S3 server, and
``http``, the local cache folder served by ``LocalHTTPServer`` (HTTP/1.1 byte ranges, the
asked bytes sent from the file). The same ``PatchSampler`` (W2's Compose, seed 0,
decoded-chunk LRU off) runs over the local folder and over each URL; the patches are checked
equal first.

Figures (ratios against the local cache, in this run), for each remote ``<way>``:
- ``loader-local-2workers`` / ``loader-<way>-2workers``: patches/s of ``PatchLoader`` with 2
  workers, batches of 2, measured in alternating windows (the idle loaders' workers only
  fill their ring); goal: the remote cache at least 0.8x the local one on loopback;
- CPU ms per delivered patch of each (workers and this process), and the server's own CPU
  per patch during its windows. The servers run on the same cores here, which a real object
  store would not. moto reads the whole object for every ranged GET (its
  ``FakeKey.value``), so its cost grows with the shard (a case's whole volume), not with the
  bytes asked for: with 200x512x512 cases it, not the client, bounds the S3 loader here;
  the HTTP server's cost grows with the bytes asked for, as an object store's does;
- ``sampler-local-1proc`` / ``sampler-<way>-1proc``: ``PatchSampler.sample`` in this
  process, one numba thread, and ``sampler-<way>-wait-ms-per-patch``: its wall minus CPU
  time, the time a synchronous sample waits for the server (what the loader's workers
  overlap);
- ``<way>-requests-per-patch`` / ``<way>-kib-per-patch``: requests and KiB fetched per
  patch, counted on the server side (``RecordingProxy`` in front, in a separate, untimed
  pass).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import urllib.parse
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import s3fs

from benchmarks.common import Result
from benchmarks.w2 import BATCH, FULL, QUICK, phantom_cache, phantom_cases, w2_compose
from benchmarks.w5_remote import local_aws_env
from loaders import PatchLoader, PatchSampler, VolumeCache
from loaders.remote import RemoteRoot
from loaders.remote_build import build_remote
from loaders.remote_server import LocalHTTPServer, LocalS3Server, RecordingProxy

WORKLOAD = "w2-remote"
GOAL = 0.8
"""Loader patches/s from a remote cache over those from the local cache, at least
(loopback)."""
REMOTES = ("s3", "http")
"""The remote caches measured (see the module docstring)."""
SERVER_NOTES = {
    "s3": "moto S3 on 127.0.0.1 (a whole shard read for every ranged GET)",
    "http": "LocalHTTPServer on 127.0.0.1 (the asked bytes sent from the file)",
}


@dataclass(frozen=True)
class Remote:
    """One remote cache of the run.

    Attributes:
        url: the cache's URL.
        options: its ``storage_options``.
        pid: the server's process (its CPU time is read from /proc).
        proxy: a ``RecordingProxy`` in front of the server, for the counted pass.
        counted_url: the same cache through a ``RecordingProxy``.
        counted_options: the ``storage_options`` for ``counted_url``.
    """

    url: str
    options: dict[str, Any]
    pid: int | None
    proxy: RecordingProxy
    counted_url: str
    counted_options: dict[str, Any]


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from /proc; NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_window(loader: PatchLoader, it: Any, batches: int) -> tuple[float, float]:
    """Patches/s over ``batches`` batches and CPU ms per patch of the whole pipeline
    (workers and this process). The batches the ring prefetched while nobody asked are
    taken first, untimed: the window times production."""
    for _ in range(loader.prefetch * loader.num_workers):
        next(it)
    m0, k0 = loader.stats.main_cpu_s, sum(loader.worker_cpu_totals())
    t0 = time.perf_counter()
    for _ in range(batches):
        _ = next(it)["image"].sum().item()  # touch the batch, as a training step would
    dt = time.perf_counter() - t0
    n = batches * loader.batch_size
    cpu = sum(loader.worker_cpu_totals()) - k0 + loader.stats.main_cpu_s - m0
    return n / dt, 1000 * cpu / n


def sampler_rate(sampler: PatchSampler, indices: list[int]) -> tuple[float, float, float]:
    """Patches/s, CPU ms and wall ms per patch of ``sampler.sample`` in this process."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in indices:
        sampler.sample(0, i)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(indices) / wall, 1000 * cpu / len(indices), 1000 * wall / len(indices)


def run(quick: bool = False, remotes: tuple[str, ...] = REMOTES) -> list[Result]:
    """Run W2-remote.

    Args:
        quick: W2's quick volumes and patches and fewer windows.
        remotes: which of ``REMOTES`` to measure (each against the local cache).

    Returns:
        The figures (module docstring).
    """
    unknown = [w for w in remotes if w not in REMOTES]
    if unknown or not remotes:
        raise ValueError(f"w2-remote: remotes must be some of {REMOTES}, got {remotes!r}")
    cfg = QUICK if quick else FULL
    patch, shape = cfg["patch"], cfg["size"]
    batches, rounds = (4, 2) if quick else (cfg["batches"], cfg["rounds"])
    n_single, n_counted = (4, 8) if quick else (8, 32)
    tag = f"{'x'.join(map(str, patch))} from {'x'.join(map(str, shape))}"
    local = VolumeCache(phantom_cache(shape).root, cache_bytes=0)
    cases = phantom_cases(shape)
    results: list[Result] = []

    def add(name: str, value: float, unit: str, baseline: str | None, note: str) -> None:
        results.append(Result(WORKLOAD, name, round(value, 2), unit, baseline, note=note))

    with tempfile.TemporaryDirectory(prefix="w2r-") as tmp, ExitStack() as stack:
        ways: dict[str, Remote] = {}
        if "s3" in remotes:
            stack.enter_context(local_aws_env())
            s3_server = stack.enter_context(LocalS3Server())
            endpoint = s3_server.endpoint
            s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("bench")
            url = "s3://bench/w2.zarr"
            build_remote(
                RemoteRoot(url, {"endpoint_url": endpoint}),
                lambda staging: VolumeCache(staging).build(cases, workers=2, progress=False),
                staging=Path(tmp) / "staging",
            )
            proxy = stack.enter_context(RecordingProxy(endpoint))
            ways["s3"] = Remote(
                url,
                {"endpoint_url": endpoint},
                s3_server.pid,
                proxy,
                url,
                {"endpoint_url": proxy.endpoint},
            )
        if "http" in remotes:
            folder = Path(local.root)
            http_server = stack.enter_context(LocalHTTPServer(folder.parent))
            proxy = stack.enter_context(RecordingProxy(http_server.endpoint))
            ways["http"] = Remote(
                http_server.url(folder.name),
                {},
                http_server.pid,
                proxy,
                f"{proxy.endpoint}/{urllib.parse.quote(folder.name)}",
                {},
            )
        samplers = {"local": PatchSampler(local, w2_compose(patch), seed=0)}
        for way, remote in ways.items():
            cache = VolumeCache(remote.url, storage_options=remote.options, cache_bytes=0)
            samplers[way] = PatchSampler(cache, w2_compose(patch), seed=0)
        for i in (10_000, 10_001, 10_002):  # the same patches every way before timing
            want = samplers["local"].sample(0, i)
            for way in ways:
                got = samplers[way].sample(0, i)
                if not (
                    np.array_equal(want["image"], got["image"]) and want["case"] == got["case"]
                ):
                    raise AssertionError(f"w2-remote: sample {i} differs between local and {way}")

        # one process, one numba thread: the latency a synchronous sample sees
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            single = {
                way: sampler_rate(s, list(range(20_000, 20_000 + n_single)))
                for way, s in samplers.items()
            }
        finally:
            numba.set_num_threads(threads)

        # the loaders in alternating windows
        runs: dict[str, list[tuple[float, float]]] = {way: [] for way in samplers}
        server_cpu: dict[str, list[float]] = {way: [] for way in ways}
        loaders = {
            way: PatchLoader(s, batch_size=BATCH, batches_per_epoch=10**6, num_workers=2)
            for way, s in samplers.items()
        }
        try:
            its = {}
            for way, ld in loaders.items():
                ld.start()
                its[way] = iter(ld)
                for _ in range(2):  # warm up: workers up, metadata and shard indexes read
                    next(its[way])
            for _ in range(rounds):
                for way, ld in loaders.items():
                    pid = ways[way].pid if way in ways else None
                    c0 = process_cpu_s(pid)
                    runs[way].append(loader_window(ld, its[way], batches))
                    if way in ways:
                        spent = process_cpu_s(pid) - c0
                        server_cpu[way].append(1000 * spent / (batches * BATCH))
        finally:
            for ld in loaders.values():
                ld.close()

        # the counted passes, through the proxies, in this process
        records = {}
        for way, remote in ways.items():
            counted = PatchSampler(
                VolumeCache(
                    remote.counted_url, storage_options=remote.counted_options, cache_bytes=0
                ),
                w2_compose(patch),
                seed=0,
            )
            for i in range(30_000, 30_008):  # every case's metadata and shard index fetched
                counted.sample(0, i)
            remote.proxy.clear()
            for i in range(40_000, 40_000 + n_counted):
                counted.sample(0, i)
            records[way] = list(remote.proxy.records)

    rate = {way: statistics.median(r for r, _ in v) for way, v in runs.items()}
    cpu = {way: statistics.median(c for _, c in v) for way, v in runs.items()}
    load = f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    add(
        "loader-local-2workers",
        rate["local"],
        "patches/s",
        None,
        f"PatchLoader, 2 workers, batches of {BATCH}, the cache in a local folder; {tag}, "
        f"LRU off; {load}",
    )
    add(
        "loader-local-cpu-ms-per-patch",
        cpu["local"],
        "ms",
        None,
        "CPU of workers + this process per delivered patch",
    )
    add(
        "sampler-local-1proc",
        single["local"][0],
        "patches/s",
        None,
        "PatchSampler.sample in this process, 1 numba thread",
    )
    for way in ways:
        verdict = "meets" if rate[way] >= GOAL * rate["local"] else "misses"
        add(
            f"loader-{way}-2workers",
            rate[way],
            "patches/s",
            "loader-local-2workers",
            f"the same from {SERVER_NOTES[way]} (windows alternating with the other loaders); "
            f"{verdict} the goal of >= {GOAL}x; the server shares the cores here",
        )
        add(
            f"loader-{way}-cpu-ms-per-patch",
            cpu[way],
            "ms",
            "loader-local-cpu-ms-per-patch",
            f"the same from {way}; ratio < 1: the remote reads' extra CPU (requests, event loop)",
        )
        add(
            f"{way}-server-cpu-ms-per-patch",
            statistics.median(server_cpu[way]),
            "ms",
            None,
            f"the server's CPU per patch during the {way} windows, on the same cores as the "
            "workers",
        )
        add(
            f"sampler-{way}-1proc",
            single[way][0],
            "patches/s",
            "sampler-local-1proc",
            f"the same from {way}",
        )
        add(
            f"sampler-{way}-wait-ms-per-patch",
            single[way][2] - single[way][1],
            "ms",
            None,
            f"wall minus CPU per patch of the one-process {way} sampler: waiting for the server",
        )
        add(
            f"{way}-requests-per-patch",
            len(records[way]) / n_counted,
            "requests",
            None,
            "requests per patch, counted on the server side (metadata and shard indexes "
            "already fetched)",
        )
        add(
            f"{way}-kib-per-patch",
            sum(r.nbytes for r in records[way]) / 1024 / n_counted,
            "KiB",
            None,
            "body bytes fetched per patch (compressed chunks)",
        )
    return results
