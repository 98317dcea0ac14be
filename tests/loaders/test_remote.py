"""The volume cache on object storage, against moto's S3 server on 127.0.0.1.

References are independent of the remote code: the local cache built from the same cases
(its own reader is checked against numpy in test_loaders_cache), and the shard index parsed
here from the local shard file with numpy, following the zarr v3 sharding specification.
"""

from __future__ import annotations

import json
import pickle
import threading
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config as BotoConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders import VolumeCache
from loaders.cache import CACHE_CHUNKS
from loaders.remote import RemoteRoot
from loaders.remote_build import _Publisher, build_remote
from loaders.remote_server import LocalS3Server, RecordingProxy
from training.config import Config, apply_overrides
from training.data import TrainingDataError, prepare_dataset


def new_bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def objects(endpoint: str, bucket: str) -> list[str]:
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2")
    return [o["Key"] for page in pages.paginate(Bucket=bucket) for o in page.get("Contents", [])]


def case_folders(endpoint: str, bucket: str) -> set[str]:
    """The case folders under ``<bucket>/phantom.zarr/``."""
    keys = objects(endpoint, bucket)
    return {k.split("/")[1] for k in keys if k.startswith("phantom.zarr/") and k.count("/") > 1}


def published_folders(endpoint: str, bucket: str) -> set[str]:
    """The folders the manifest at ``<bucket>/phantom.zarr/zarr.json`` references."""
    body = boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket=bucket, Key="phantom.zarr/zarr.json"
    )["Body"]
    manifest = json.loads(body.read())["attributes"]["voxaug_cache"]
    assert manifest["complete"]
    return {e["dir"] for e in manifest["cases"].values()}


def assert_same_cache(local: VolumeCache, remote: VolumeCache) -> None:
    assert remote.cases == local.cases and remote.complete
    for case in local.cases:
        for array in ("image", "label"):
            a, b = local.read(case, array=array), remote.read(case, array=array)
            assert a.dtype == b.dtype and np.array_equal(a, b), (case, array)
        li, ri = local.info(case), remote.info(case)
        assert (li.shape, li.spacing, li.origin, li.fingerprint) == (
            ri.shape,
            ri.spacing,
            ri.origin,
            ri.fingerprint,
        )
        assert np.array_equal(li.fg_indices, ri.fg_indices)
        assert np.array_equal(li.fg_classes, ri.fg_classes)


@pytest.fixture
def proxy(s3_server):
    with RecordingProxy(s3_server.endpoint) as p:
        yield p


def test_build_to_s3_and_read_every_case_bit_identical(
    aws_env, loopback_only, s3_server, proxy, phantom_cases, built_cache
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    options = {"endpoint_url": proxy.endpoint}
    cache = VolumeCache(url, storage_options=options)
    assert cache.cases == () and not cache.complete
    report = cache.build(phantom_cases, workers=1, progress=False)
    assert sorted(report.built) == sorted(c.id for c in phantom_cases)
    assert_same_cache(VolumeCache(built_cache), VolumeCache(url, storage_options=options))
    folders = case_folders(s3_server.endpoint, bucket)
    assert folders == published_folders(s3_server.endpoint, bucket)
    assert len(folders) == len(phantom_cases)
    # everything went through the proxy on 127.0.0.1 (and the guard saw nothing else)
    assert {r.method for r in proxy.records} >= {"GET", "PUT"}
    assert all(r.path.split("/")[1] == bucket for r in proxy.records)

    # a second build with nothing changed uploads nothing and keeps the manifest's folders
    proxy.clear()
    again = VolumeCache(url, storage_options=options).build(phantom_cases, progress=False)
    assert sorted(again.kept) == sorted(c.id for c in phantom_cases) and not again.built
    assert [r for r in proxy.records if r.method == "PUT" and "@" in r.path] == []


def test_a_rebuild_writes_the_manifest_only_when_it_changed(
    aws_env, loopback_only, s3_server, proxy, phantom_cases, tmp_path
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    options = {"endpoint_url": proxy.endpoint}

    def build(staging: str, seed: int = 0) -> list[str]:
        """Build from the staging folder; the writes and deletes sent, as ``METHOD key?query``
        (a bulk delete is a POST to the bucket itself: an empty key)."""
        proxy.clear()
        build_remote(
            RemoteRoot(url, options),
            lambda folder: VolumeCache(folder).build(
                phantom_cases, workers=1, progress=False, seed=seed
            ),
            staging=tmp_path / staging,
        )
        return [
            f"{r.method} {r.path.removeprefix(f'/{bucket}').lstrip('/')}"
            + (f"?{r.query}" if r.query else "")
            for r in proxy.records
            if r.method in ("PUT", "POST", "DELETE")
        ]

    first = build("a")
    assert "PUT phantom.zarr/zarr.json" in first and len(first) > len(phantom_cases)
    manifest = published_folders(s3_server.endpoint, bucket)
    # nothing changed, from the same staging folder or a fresh one (another machine): the
    # manifest would be written byte for byte as it is, so nothing is written
    assert build("a") == []
    assert build("b") == []
    assert published_folders(s3_server.endpoint, bucket) == manifest
    # changed cases (another sampling seed): uploaded, the manifest written once
    changed = build("a", seed=1)
    assert changed.count("PUT phantom.zarr/zarr.json") == 1
    now = published_folders(s3_server.endpoint, bucket)
    assert len(now) == len(phantom_cases) and now.isdisjoint(manifest)
    assert any(w.startswith(("DELETE", "POST ?delete")) for w in changed)
    assert case_folders(s3_server.endpoint, bucket) == now  # the replaced folders deleted


# hypothesis draws regions over a cache built once for the module
boxes = st.tuples(*[st.tuples(st.integers(-20, 110), st.integers(1, 60)) for _ in range(3)])


@pytest.fixture(scope="module")
def remote_pair(aws_module_env, s3_server, phantom_cases, built_cache):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    options = {"endpoint_url": s3_server.endpoint}
    VolumeCache(url, storage_options=options).build(phantom_cases, workers=1, progress=False)
    return (
        VolumeCache(built_cache, cache_bytes=0),
        VolumeCache(url, storage_options=options, cache_bytes=0),
        VolumeCache(url, storage_options=options, threads=2),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box=boxes, which=st.integers(0, 2), array=st.sampled_from(["image", "label"]))
def test_random_regions_equal_the_local_cache(remote_pair, box, which, array):
    local, remote, threaded = remote_pair
    case = local.cases[which]
    start = [a for a, _ in box]
    stop = [a + n for a, n in box]
    want = local.read_region(case, (start, stop), array=array)
    assert np.array_equal(remote.read_region(case, (start, stop), array=array), want)
    assert np.array_equal(threaded.read_region(case, (start, stop), array=array), want)


def shard_index(shard: Path, n: int) -> np.ndarray:
    """(offset, nbytes) per inner chunk, from the end of a local shard file (zarr v3
    sharding: n little-endian uint64 pairs, then a crc32c)."""
    tail = shard.read_bytes()[-(16 * n + 4) :]
    return np.frombuffer(tail[: 16 * n], "<u8").reshape(n, 2)


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {b for a, z in ranges for b in range(a, z)}


def test_region_read_fetches_only_the_chunks_it_needs(
    aws_env, loopback_only, s3_server, proxy, phantom_cases, built_cache
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    options = {"endpoint_url": proxy.endpoint}
    VolumeCache(url, storage_options=options).build(phantom_cases, workers=1, progress=False)
    cache = VolumeCache(url, storage_options=options, cache_bytes=0)
    case = cache.cases[1]
    folder = built_cache / next(p.name for p in built_cache.iterdir() if p.name.startswith(case))
    shape = cache.shape(case)
    per = [-(-s // c) for s, c in zip(shape, CACHE_CHUNKS, strict=True)]  # one shard
    index = shard_index(folder / "image" / "c" / "0" / "0" / "0", int(np.prod(per)))

    def expected(start, stop) -> list[tuple[int, int]]:
        ranges = []
        kz, ky, kx = CACHE_CHUNKS
        for cz in range(start[0] // kz, (stop[0] - 1) // kz + 1):
            for cy in range(start[1] // ky, (stop[1] - 1) // ky + 1):
                for cx in range(start[2] // kx, (stop[2] - 1) // kx + 1):
                    off, n = index[(cz * per[1] + cy) * per[2] + cx]
                    if off != 2**64 - 1:
                        ranges.append((int(off), int(off + n)))
        return ranges

    def fetched(records) -> list[tuple[int, int]]:
        out = []
        for r in records:
            assert r.range is not None and r.range.startswith("bytes="), r
            a, z = r.range[6:].split("-")
            out.append((int(a), int(z) + 1))
        return out

    proxy.clear()
    # inside one chunk: the array's zarr.json, the shard index (a suffix request), one chunk
    region = ((3, 4, 36), (30, 30, 62))
    got = cache.read_region(case, region)
    assert np.array_equal(got, VolumeCache(built_cache).read_region(case, region))
    gets = proxy.gets()
    assert [g.path.rsplit("/", 1)[-1] for g in gets] == ["zarr.json", "0", "0"]
    assert gets[1].range == f"bytes=-{16 * int(np.prod(per)) + 4}"
    assert fetched(gets[2:]) == expected(*region)
    assert len(proxy.records) == 3  # nothing else: no HEAD, no listing

    # across chunks, index kept: only chunk bytes, exactly those the region needs (it spans
    # whole rows and planes of chunks, so no chunk lies between two it needs)
    proxy.clear()
    region = ((20, 5, 10), (40, 90, 70))
    got = cache.read_region(case, region)
    assert np.array_equal(got, VolumeCache(built_cache).read_region(case, region))
    gets = proxy.gets()
    assert all(g.path.endswith("/image/c/0/0/0") for g in gets)
    want = expected(*region)
    assert len(want) == 18
    ranges = fetched(gets)
    assert sum(z - a for a, z in ranges) == sum(z - a for a, z in want)
    assert covered(ranges) == covered(want)
    assert len(gets) <= len(want)  # adjacent chunks merged into one request


def test_survives_a_server_that_fails_every_third_request(
    aws_env, loopback_only, s3_server, phantom_cases, built_cache
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    with RecordingProxy(s3_server.endpoint, fail_every=3) as flaky:
        options = {"endpoint_url": flaky.endpoint}
        VolumeCache(url, storage_options=options).build(phantom_cases, workers=1, progress=False)
        assert_same_cache(VolumeCache(built_cache), VolumeCache(url, storage_options=options))
        statuses = [r.status for r in flaky.records]
    assert statuses.count(503) >= 3 and statuses.count(0) >= 3  # both kinds happened
    assert len(statuses) >= 30


def test_http_serves_a_cache_read_only(
    aws_env, loopback_only, s3_server, phantom_cases, built_cache
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    VolumeCache(url, storage_options={"endpoint_url": s3_server.endpoint}).build(
        phantom_cases, workers=1, progress=False
    )
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for key in objects(s3_server.endpoint, bucket):  # served publicly, as a web server would
        client.put_object_acl(Bucket=bucket, Key=key, ACL="public-read")
    with RecordingProxy(s3_server.endpoint, fail_every=3) as flaky:
        web = f"{flaky.endpoint}/{bucket}/phantom.zarr"
        assert_same_cache(VolumeCache(built_cache), VolumeCache(web))
        assert any(r.status == 503 for r in flaky.records)
        assert all("Authorization" not in r.path for r in flaky.records)
        with pytest.raises(Exception, match=r"read-only: caches are built to s3://") as err:
            VolumeCache(web).build(phantom_cases, progress=False)
        assert web in str(err.value)


def test_concurrent_builders_leave_one_complete_cache(
    aws_env, loopback_only, s3_server, phantom_cases, built_cache, tmp_path
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    options = {"endpoint_url": s3_server.endpoint}
    errors: list[BaseException] = []

    def build(seed: int) -> None:
        try:
            # a staging folder each, as on two machines; the seeds differ, so do the
            # fingerprints: each builder must replace the other's cases, not mix them
            build_remote(
                RemoteRoot(url, options),
                lambda staging: VolumeCache(staging).build(
                    phantom_cases, workers=1, progress=False, seed=seed
                ),
                staging=tmp_path / f"staging-{seed}",
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    remote = VolumeCache(url, storage_options=options)
    # every case from the builder that published last, none from the other
    got = {c: remote.info(c).fingerprint for c in remote.cases}
    staged = [
        {c: VolumeCache(tmp_path / f"staging-{seed}").info(c).fingerprint for c in got}
        for seed in (1, 2)
    ]
    assert got in staged and staged[0] != staged[1]
    # one builder's cases, all of them, and no orphan folder of the other
    assert case_folders(s3_server.endpoint, bucket) == published_folders(s3_server.endpoint, bucket)
    local = VolumeCache(built_cache)
    for case in local.cases:
        assert np.array_equal(local.read(case), remote.read(case))
        assert np.array_equal(local.read(case, array="label"), remote.read(case, array="label"))


def test_a_builder_that_loses_the_race_merges_and_retries(
    aws_env, loopback_only, s3_server, phantom_cases, built_cache, monkeypatch
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    options = {"endpoint_url": s3_server.endpoint}
    # what another builder of two of the cases publishes: built elsewhere, copied in below
    VolumeCache(f"s3://{bucket}/other.zarr", storage_options=options).build(
        phantom_cases[:2], workers=1, progress=False
    )
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    upload = _Publisher.upload
    raced = []

    async def upload_then_race(self, folders):
        await upload(self, folders)
        if not raced:  # the other builder publishes between our manifest read and write
            raced.append(True)
            keys = sorted(
                objects(s3_server.endpoint, bucket),
                key=lambda k: k.endswith("/zarr.json") and k.count("/") == 1,
            )
            for key in keys:
                if key.startswith("other.zarr/"):
                    client.copy_object(
                        Bucket=bucket,
                        Key="phantom.zarr/" + key.split("/", 1)[1],
                        CopySource={"Bucket": bucket, "Key": key},
                    )

    monkeypatch.setattr(_Publisher, "upload", upload_then_race)
    VolumeCache(url, storage_options=options).build(phantom_cases, workers=1, progress=False)
    assert raced
    remote = VolumeCache(url, storage_options=options)
    assert remote.cases == VolumeCache(built_cache).cases  # our publish, all cases
    other = VolumeCache(f"s3://{bucket}/other.zarr", storage_options=options)
    for case in other.cases:  # the winner's folders reused: equal fingerprints
        assert remote.info(case).fingerprint == other.info(case).fingerprint
    folders = published_folders(s3_server.endpoint, bucket)
    assert {f.split("@")[0] for f in folders} == set(remote.cases)
    assert case_folders(s3_server.endpoint, bucket) == folders  # our unused uploads deleted
    assert_same_cache(VolumeCache(built_cache), remote)


def _read_remote(job):
    cache, case, region = job
    return cache.read_region(case, region)


def test_pickles_with_its_options_and_reads_in_spawned_processes(
    aws_env, s3_server, phantom_cases, built_cache
):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/phantom.zarr"
    cache = VolumeCache(url, storage_options={"endpoint_url": s3_server.endpoint})
    cache.build(phantom_cases, workers=1, progress=False)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.root == url and clone.storage_options == cache.storage_options
    region = ((-4, 10, 20), (40, 80, 100))
    local = VolumeCache(built_cache)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
        got = ex.submit(_read_remote, (cache, local.cases[0], region)).result()
    assert np.array_equal(got, local.read_region(local.cases[0], region))


def test_cases_argument_is_consumed_once(aws_env, s3_server, phantom_cases):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/x.zarr"
    cache = VolumeCache(url, storage_options={"endpoint_url": s3_server.endpoint})
    report = cache.build(iter(phantom_cases[:1]), workers=1, progress=False)
    assert report.built == (phantom_cases[0].id,) and cache.cases == (phantom_cases[0].id,)


def test_local_server_stops(tmp_path):
    server = LocalS3Server().start()
    endpoint = server.endpoint
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="a", aws_secret_access_key="b"
    ).list_buckets()
    server.stop()
    with pytest.raises(Exception, match="Could not connect"):
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="a",
            aws_secret_access_key="b",
            region_name="us-east-1",
            config=BotoConfig(retries={"max_attempts": 0}),
        ).list_buckets()


def test_training_takes_the_cache_url_from_set(aws_env, s3_server, phantom_cases, monkeypatch):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/liver.zarr"
    # the endpoint as a user of a real S3-compatible store would give it to a CLI run
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    cfg = apply_overrides(Config(), [f"data.cache={url}", "data.val_cases=1"])
    assert cfg.data.cache_root == url
    # a process without the dataset folder (another node) cannot open a cache that does not
    # record what the dataset declares, and says so
    VolumeCache(url).build(phantom_cases, workers=1, progress=False)
    with pytest.raises(TrainingDataError, match="does not record what the dataset declares"):
        prepare_dataset(cfg.data, build=False)
    # built as a training run builds it, it carries the label names and the modality
    declared = {"layout": "msd", "label_names": {"0": "background", "1": "liver"}}
    VolumeCache(url).build(
        phantom_cases, workers=1, progress=False, dataset={**declared, "modality": "CT"}
    )
    dataset = prepare_dataset(cfg.data, build=False)
    assert dataset.cache.root == url and dataset.modality == "CT"
    assert len(dataset.train) + len(dataset.val) == len(phantom_cases)


def test_a_changed_endpoint_in_the_environment_is_used(
    aws_env, s3_server, phantom_cases, monkeypatch
):
    # a cache read through AWS_ENDPOINT_URL, then another server's: not the first's client
    first = new_bucket(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    VolumeCache(f"s3://{first}/a.zarr").build(phantom_cases[:1], workers=1, progress=False)
    with LocalS3Server() as other:
        second = new_bucket(other.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", other.endpoint)
        cache = VolumeCache(f"s3://{second}/b.zarr")
        cache.build(phantom_cases[1:2], workers=1, progress=False)
        assert cache.cases == (phantom_cases[1].id,)
        assert objects(other.endpoint, second)
        assert all(k.startswith("b.zarr/") for k in objects(other.endpoint, second))
    assert all(k.startswith("a.zarr/") for k in objects(s3_server.endpoint, first))
