"""A cache read over HTTP from ``RangeServer`` (a local folder served on 127.0.0.1), and the
remote read path's merging and prefetching, counted in the server.

References are independent of the remote code: the bytes of the served files sliced in
Python, the local cache (its reader is checked against numpy in test_loaders_cache), and
the shard index parsed here with numpy from the local shard file (zarr v3 sharding: n
little-endian (offset, nbytes) uint64 pairs, then a crc32c).
"""

from __future__ import annotations

import http.client
import itertools
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import augment
import loaders.remote
from loaders import PatchLoader, PatchSampler, VolumeCache
from loaders.cache import CACHE_CHUNKS
from loaders.chunkstore import ArrayReader
from loaders.remote import MAX_GAP, PREFETCH_BATCHES, RemoteRoot, merge_ranges
from loaders.remote_server import LocalHTTPServer, RangeServer, RecordingProxy
from loaders.sampler import clip_box, footprint

_ABSENT = 2**64 - 1


@pytest.fixture(scope="module")
def web(built_cache: Path):
    """The folder holding the session's built cache, served over HTTP."""
    with RangeServer(built_cache.parent) as server:
        yield server


def case_folder(root: Path, case: str) -> str:
    return next(p.name for p in root.iterdir() if p.name.startswith(f"{case}@"))


def shard_index(root: Path, case: str, array: str, shape: tuple[int, ...]) -> np.ndarray:
    """(offset, nbytes) of every inner chunk of a case array's one shard, read with numpy."""
    per = [-(-s // c) for s, c in zip(shape, CACHE_CHUNKS, strict=True)]
    n = int(np.prod(per))
    tail = (root / case_folder(root, case) / array / "c" / "0" / "0" / "0").read_bytes()
    return np.frombuffer(tail[-(16 * n + 4) : -4], "<u8").reshape(n, 2)


def needed_ranges(index: np.ndarray, shape, start, stop) -> list[tuple[int, int]]:
    """The byte ranges of the chunks a region intersects (absent ones have none)."""
    per = [-(-s // c) for s, c in zip(shape, CACHE_CHUNKS, strict=True)]
    axes = [
        range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, CACHE_CHUNKS, strict=True)
    ]
    out = []
    for cz, cy, cx in itertools.product(*axes):
        off, n = index[(cz * per[1] + cy) * per[2] + cx]
        if off != _ABSENT:
            out.append((int(off), int(off + n)))
    return sorted(out)


def unmerged_reader(web, built_cache: Path):
    """The local cache, its first case, that case's shape and image shard index, and a
    reader of the case's image over HTTP that merges no ranges (metadata and shard index
    read already)."""
    local = VolumeCache(built_cache)
    case = local.cases[0]
    shape = local.shape(case)
    index = shard_index(built_cache, case, "image", shape)
    root = RemoteRoot(web.url(built_cache.name), max_gap=0)
    reader = ArrayReader(root.array_source(case_folder(built_cache, case), "image"))
    reader.read_into((0, 0, 0), (1, 1, 1), np.empty((1, 1, 1), reader.dtype))
    return local, case, shape, index, reader


def ranges_of(records) -> list[tuple[int, int]]:
    """``[start, stop)`` of each ``bytes=a-b`` Range header."""
    out = []
    for r in records:
        assert r.range is not None and r.range.startswith("bytes="), r
        a, z = r.range[6:].split("-")
        out.append((int(a), int(z) + 1))
    return sorted(out)


def covered(ranges) -> set[int]:
    return {b for a, z in ranges for b in range(a, z)}


def assert_merged_by_the_rule(fetched, needed, max_gap: int) -> None:
    """``fetched`` is ``needed`` merged across gaps of at most ``max_gap`` bytes, and nothing
    else: every needed byte is fetched; each request starts at the start of a needed range
    and ends at the end of one; the stretches inside a request that no needed range covers
    are each at most ``max_gap`` long; and two requests are more than ``max_gap`` apart."""
    want = covered(needed)
    assert want <= covered(fetched)
    starts, stops = {a for a, _ in needed}, {z for _, z in needed}
    for a, z in fetched:
        assert a in starts and z in stops, (a, z)
        hole = 0
        for b in range(a, z):
            hole = 0 if b in want else hole + 1
            assert hole <= max_gap
    for (_, z0), (a1, _) in itertools.pairwise(fetched):
        assert a1 - z0 > max_gap


# --------------------------------------------------------------------- the range server
def test_range_server_serves_exact_byte_ranges(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a@b.bin").write_bytes(data)
    (tmp_path / "secret").write_bytes(b"outside the served folder")
    served = tmp_path / "sub"
    # (Range header, status, first byte, body) by RFC 9110's rules, worked out by hand
    cases = [
        ("bytes=0-0", 206, 0, data[:1]),
        ("bytes=10-19", 206, 10, data[10:20]),
        ("bytes=4990-", 206, 4990, data[4990:]),
        ("bytes=4990-99999", 206, 4990, data[4990:]),
        ("bytes=-7", 206, 4993, data[4993:]),
        ("bytes=-99999", 206, 0, data),
        (None, 200, 0, data),
        ("bytes=0-1,5-6", 200, 0, data),  # several ranges: ignored, the whole file
        ("items=0-3", 200, 0, data),  # another unit: ignored
        ("bytes=9-3", 200, 0, data),  # invalid: ignored
        ("bytes=5000-", 416, 0, b""),
        ("bytes=-0", 416, 0, b""),
    ]
    with RangeServer(served) as server:
        port = int(server.endpoint.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        sock = None
        for rng, status, first, body in cases:
            conn.request("GET", "/a%40b.bin", headers={"Range": rng} if rng else {})
            resp = conn.getresponse()
            got = resp.read()
            assert (resp.status, got) == (status, body), rng
            assert int(resp.getheader("Content-Length")) == len(body)
            if status == 206:
                want = f"bytes {first}-{first + len(body) - 1}/{len(data)}"
                assert resp.getheader("Content-Range") == want
            elif status == 416:
                assert resp.getheader("Content-Range") == f"bytes */{len(data)}"
            sock = sock or conn.sock
            assert conn.sock is sock  # one connection, kept open
        conn.request("HEAD", "/a@b.bin")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        assert resp.getheader("Content-Length") == str(len(data))
        for path in ("/missing", "/", "/../secret", "/%2e%2e/secret"):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 404 and resp.read() == b"", path
        conn.request("PUT", "/a@b.bin", body=b"x")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "GET, HEAD"
        resp.read()
        conn.close()
        records = list(server.records)
    assert [(r.range, r.status, r.nbytes) for r in records[: len(cases)]] == [
        (rng, status, len(body)) for rng, status, _, body in cases
    ]
    assert [r.method for r in records[len(cases) :]] == ["HEAD"] + ["GET"] * 4 + ["PUT"]
    assert (tmp_path / "sub" / "a@b.bin").read_bytes() == data  # read-only


def test_local_http_server_runs_in_a_child_process_and_stops(tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    server = LocalHTTPServer(tmp_path).start()
    try:
        pid = server.pid
        assert pid is not None and pid != os.getpid()
        port = server.port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/f", headers={"Range": "bytes=2-4"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (206, b"234")
        conn.close()
    finally:
        server.stop()
    assert server.pid is None
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(pid, 0)
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/f")


# --------------------------------------------------------------------- merging ranges
@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 40)), min_size=1, max_size=12),
    max_gap=st.sampled_from([0, 1, 10, 50]),
)
def test_merge_ranges_follows_the_rule(spans, max_gap):
    # disjoint ranges, as chunks of a shard are
    needed, at = [], 0
    for gap, n in spans:
        at += gap
        needed.append((at, at + n))
        at += n
    order = np.random.default_rng(len(needed)).permutation(len(needed))
    requests = [("k", *needed[i]) for i in order]
    merged = merge_ranges(requests, max_gap)
    assert sorted(i for m in merged for i in m.members) == list(range(len(requests)))
    for m in merged:
        assert all(m.start <= requests[i][1] and requests[i][2] <= m.stop for i in m.members)
    assert_merged_by_the_rule([(m.start, m.stop) for m in merged], needed, max_gap)


def test_merge_ranges_keeps_objects_and_open_ends_apart():
    merged = merge_ranges([("a", 0, 10), ("b", 10, 20), ("a", 10, 20), ("a", 20, None)], 100)
    assert [(m.key, m.start, m.stop, sorted(m.members)) for m in merged] == [
        ("a", 0, 20, [0, 2]),
        ("a", 20, None, [3]),
        ("b", 10, 20, [1]),
    ]


# --------------------------------------------------------------------- reading a cache
def test_a_cache_over_http_is_bit_identical_to_the_local_one(web, built_cache, loopback_only):
    web.clear()
    local = VolumeCache(built_cache)
    remote = VolumeCache(web.url(built_cache.name), cache_bytes=0)
    assert remote.cases == local.cases and remote.complete
    rng = np.random.default_rng(7)
    for case in local.cases:
        shape = local.shape(case)
        for array in ("image", "label"):
            a, b = local.read(case, array=array), remote.read(case, array=array)
            assert a.dtype == b.dtype and np.array_equal(a, b), (case, array)
            for _ in range(4):  # regions, some reaching past the volume (padded)
                start = [int(rng.integers(-8, n)) for n in shape]
                stop = [s + int(rng.integers(1, 60)) for s in start]
                want = local.read_region(case, (start, stop), array=array)
                assert np.array_equal(remote.read_region(case, (start, stop), array=array), want)
        li, ri = local.info(case), remote.info(case)
        assert (li.shape, li.spacing, li.fingerprint) == (ri.shape, ri.spacing, ri.fingerprint)
        assert np.array_equal(li.fg_indices, ri.fg_indices)
    assert {r.method for r in web.records} <= {"GET", "HEAD"}


@pytest.mark.parametrize("max_gap", [0, 4096, MAX_GAP])
def test_a_region_read_fetches_only_the_ranges_it_needs(web, built_cache, max_gap):
    local = VolumeCache(built_cache)
    case = local.cases[1]
    shape = local.shape(case)
    root = RemoteRoot(web.url(built_cache.name), max_gap=max_gap)
    reader = ArrayReader(root.array_source(case_folder(built_cache, case), "image"))
    index = shard_index(built_cache, case, "image", shape)
    regions = [
        ((3, 10, 70), (30, 60, 90)),  # inside one chunk
        ((20, 50, 5), (40, 90, 70)),  # across 8 chunks
        ((0, 0, 0), shape),  # all of it
        ((40, 0, 70), (48, 96, 80)),  # chunks apart in the shard
    ]
    web.clear()
    first = np.empty((1, 1, 1), reader.dtype)
    reader.read_into((0, 0, 0), (1, 1, 1), first)  # metadata and the shard index
    assert f"bytes=-{16 * index.shape[0] + 4}" in [r.range for r in web.gets()]
    for start, stop in regions:
        web.clear()
        out = np.empty([b - a for a, b in zip(start, stop, strict=True)], reader.dtype)
        reader.read_into(start, stop, out)
        want = local.read_region(case, (start, stop))
        assert np.array_equal(out, want)
        gets = web.gets()
        assert len(gets) == len(web.records)  # nothing else: no HEAD, no metadata again
        needed = needed_ranges(index, shape, start, stop)
        fetched = ranges_of(gets)
        assert_merged_by_the_rule(fetched, needed, max_gap)
        if max_gap == 0:
            assert sum(z - a for a, z in fetched) == sum(z - a for a, z in needed)


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_patch_read_over_http_fetches_only_the_chunks_its_taps_reach(web, built_cache, prefetch):
    """A patch rotated 45 degrees in (y, x) whose box meets chunks its taps stay out of
    (the one from (0, 64, 64) on among them): those are neither prefetched nor fetched,
    every chunk a tap reads is, and every voxel a tap reads equals the local cache's."""
    local, case, shape, index, reader = unmerged_reader(web, built_cache)
    c = np.cos(np.pi / 4)
    lin = np.array([[1.0, 0.0, 0.0], [0.0, c, -c], [0.0, c, c]])
    out_shape = np.array([10, 40, 40])
    centre = np.array([16.0, 46.0, 46.0])  # the diamond stays 8 voxels off (64, 64)
    m = np.hstack([lin, (centre - lin @ ((out_shape - 1) / 2))[:, None]])
    start, stop = clip_box(footprint(m, out_shape), shape)
    per = [-(-n // k) for n, k in zip(shape, CACHE_CHUNKS, strict=True)]
    cy, cx = 64 // CACHE_CHUNKS[1], 64 // CACHE_CHUNKS[2]  # the chunk from (0, 64, 64) on:
    corner = index[(0 * per[1] + cy) * per[2] + cx]  # in the box, reached by no tap
    assert corner[0] != _ABSENT and stop[1] > 64 and stop[2] > 64
    web.clear()
    out = np.empty([b - a for a, b in zip(start, stop, strict=True)], reader.dtype)
    if prefetch:
        reader.prefetch(start, stop, taps=(m, out_shape, 0.0))
    reader.read_into(start, stop, out, taps=(m, out_shape, 0.0))
    fetched = ranges_of(web.gets())
    skipped = (int(corner[0]), int(corner[0] + corner[1]))
    box = set(needed_ranges(index, shape, start, stop))
    want = local.read_region(case, (start, stop))
    o = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1)
    src = o.reshape(-1, 3) @ lin.T + m[:, 3] - np.asarray(start)
    tapped: set[tuple[int, int]] = set()  # the chunks holding a tap, by brute force
    for corner_offset in itertools.product((0, 1), repeat=3):  # every trilinear tap
        t = np.clip(np.floor(src).astype(int) + corner_offset, 0, np.array(out.shape) - 1)
        assert np.array_equal(out[tuple(t.T)], want[tuple(t.T)])
        for cz, cy, cx in {tuple(c) for c in ((t + start) // CACHE_CHUNKS).tolist()}:
            off, n = index[(cz * per[1] + cy) * per[2] + cx]
            if off != _ABSENT:
                tapped.add((int(off), int(off + n)))
    # each chunk a tap reads fetched once, nothing outside the box, not the corner
    assert skipped in box and skipped not in tapped
    assert len(set(fetched)) == len(fetched)
    assert tapped <= set(fetched) <= box - {skipped}


def test_prefetched_image_and_label_regions_are_not_fetched_again(web, built_cache):
    local = VolumeCache(built_cache)
    remote = VolumeCache(web.url(built_cache.name), cache_bytes=0)
    case = remote.cases[2]
    region = ((5, 20, 30), (45, 90, 80))
    for array in ("image", "label"):  # metadata and shard indexes
        remote.read_region(case, ((0, 0, 0), (1, 1, 1)), array=array)
    web.clear()
    plain = [remote.read_region(case, region, array=a) for a in ("image", "label")]
    asked = ranges_of(web.gets())
    web.clear()
    remote.prefetch_region(case, region)
    remote.prefetch_region(case, region, array="label")
    got = [remote.read_region(case, region, array=a) for a in ("image", "label")]
    # the same requests as reading without prefetching, none of them twice
    assert ranges_of(web.gets()) == asked
    assert len(web.records) == len(asked)
    for a, b, array in zip(plain, got, ("image", "label"), strict=True):
        assert np.array_equal(b, local.read_region(case, region, array=array))
        assert np.array_equal(a, b)
    # a local cache: nothing to prefetch, and nothing changes
    local.prefetch_region(case, region)
    assert np.array_equal(local.read_region(case, region), got[0])


def test_chunks_two_prefetched_regions_share_are_fetched_once(web, built_cache):
    local, case, shape, index, reader = unmerged_reader(web, built_cache)
    a = ((0, 0, 0), (40, 70, 70))
    b = ((20, 40, 40), shape)  # shares the chunk at (0, 0, 0)...(1, 1, 1) with a
    web.clear()
    reader.prefetch(*a)
    reader.prefetch(*b)
    for start, stop in (a, b):
        out = np.empty([z - s for s, z in zip(start, stop, strict=True)], reader.dtype)
        reader.read_into(start, stop, out)
        assert np.array_equal(out, local.read_region(case, (start, stop)))
    fetched = ranges_of(web.gets())
    union = sorted(set(needed_ranges(index, shape, *a)) | set(needed_ranges(index, shape, *b)))
    shared = set(needed_ranges(index, shape, *a)) & set(needed_ranges(index, shape, *b))
    assert shared  # the test means something
    assert sorted(covered(fetched)) == sorted(covered(union))
    assert sum(z - s for s, z in fetched) == sum(z - s for s, z in union)  # once each


def test_a_failed_prefetch_is_fetched_again_by_the_read(web, built_cache, monkeypatch):
    monkeypatch.setattr(loaders.remote, "HTTP_ATTEMPTS", 1)  # fail at once
    local = VolumeCache(built_cache)
    case = local.cases[1]
    region = ((0, 0, 0), (30, 50, 50))
    with RecordingProxy(web.endpoint) as proxy:
        remote = VolumeCache(f"{proxy.endpoint}/{built_cache.name}", cache_bytes=0)
        remote.read_region(case, ((0, 0, 0), (1, 1, 1)))
        proxy.fail_every = 1  # every request fails (503 or a reset)
        proxy.clear()
        remote.prefetch_region(case, region)
        deadline = time.monotonic() + 60
        while not proxy.records and time.monotonic() < deadline:  # the prefetch was refused
            time.sleep(0.01)
        proxy.fail_every = 0
        got = remote.read_region(case, region)
        assert np.array_equal(got, local.read_region(case, region))
        statuses = [r.status for r in proxy.records]
    assert statuses[0] in (0, 503) and statuses[-1] == 206


def test_unclaimed_prefetches_are_dropped_beyond_the_limit(web, built_cache):
    case = VolumeCache(built_cache).cases[0]
    key = f"{case_folder(built_cache, case)}/image/c/0/0/0"
    data = (built_cache / key).read_bytes()
    root = RemoteRoot(web.url(built_cache.name), max_gap=0)
    ranges = [(key, 1000 * i, 1000 * i + 10) for i in range(PREFETCH_BATCHES + 2)]
    web.clear()
    for r in ranges:  # a batch each, none claimed
        root.prefetch([r])
    # the kept ones are taken as they are (waiting for those still on their way)...
    kept = [bytes(b) for b in root.read_ranges(ranges[2:])]
    assert kept == [data[a:z] for _, a, z in ranges[2:]]
    fetched = ranges_of(web.gets())
    assert all(fetched.count((a, z)) == 1 for _, a, z in ranges[2:])
    # ...the two oldest were dropped (cancelled, or fetched and forgotten): asked again
    web.clear()
    dropped = [bytes(b) for b in root.read_ranges(ranges[:2])]
    assert dropped == [data[a:z] for _, a, z in ranges[:2]]
    assert ranges_of(web.gets()) == [(0, 10), (1000, 1010)]


# --------------------------------------------------------------------- the loader
def test_loader_workers_over_http_deliver_the_local_batches(web, built_cache):
    compose = augment.Compose(
        [
            augment.RandomCrop((24, 32, 32), foreground=1 / 3),
            augment.RandomAffine(degrees=15, scale=(0.85, 1.2)),
            augment.RandomFlip(axes=(0, 1, 2), p=0.5),
        ],
        cval=-1024,
    )
    ways = {
        "local": PatchSampler(VolumeCache(built_cache, cache_bytes=0), compose, seed=4),
        "http": PatchSampler(
            VolumeCache(web.url(built_cache.name), cache_bytes=0), compose, seed=4
        ),
    }
    batches = {}
    for way, sampler in ways.items():
        with PatchLoader(sampler, batch_size=2, batches_per_epoch=4, num_workers=2) as loader:
            batches[way] = list(loader.epoch(1))
    for a, b in zip(batches["local"], batches["http"], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["case"] == b["case"]
