"""Bad input for the cache on object storage: each a CacheError naming the URL and the
problem, raised within the retry budget (moto's S3 server and sockets on 127.0.0.1 only)."""

from __future__ import annotations

import json
import os
import socket
import uuid

import boto3
import pytest

from loaders import CacheError, VolumeCache
from loaders.remote_server import LocalS3Server, free_port

FAST_FAIL = {"retries": {"mode": "standard", "total_max_attempts": 2}, "read_timeout": 0.3}


def new_bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def test_unreachable_endpoint(aws_env, loopback_only):
    url = "s3://bucket/cache.zarr"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(CacheError, match="cannot reach the server after retries") as err:
        VolumeCache(url, storage_options={"endpoint_url": closed})
    assert url in str(err.value) and "endpoint_url" in str(err.value)


def test_server_that_never_answers(aws_env, loopback_only):
    # takes connections and never answers: the read timeout ends each try
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(CacheError, match="cannot reach the server after retries") as err:
            VolumeCache(
                "s3://bucket/c.zarr",
                storage_options={"endpoint_url": endpoint, "config_kwargs": FAST_FAIL},
            )
    assert "ReadTimeoutError" in str(err.value) and "s3://bucket/c.zarr" in str(err.value)


def test_bucket_that_does_not_exist(aws_env, loopback_only, s3_server):
    url = "s3://no-such-bucket-here/cache.zarr"
    with pytest.raises(CacheError, match="bucket 'no-such-bucket-here' does not exist") as err:
        VolumeCache(url, storage_options={"endpoint_url": s3_server.endpoint})
    assert url in str(err.value)


def test_path_that_holds_no_cache(aws_env, loopback_only, s3_server):
    bucket = new_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/nothing.zarr"
    cache = VolumeCache(url, storage_options={"endpoint_url": s3_server.endpoint})
    assert cache.cases == () and not cache.complete
    with pytest.raises(CacheError, match="no volume cache here") as err:
        cache.read("case_0")
    assert url in str(err.value)
    # a zarr group that is not a cache, and a prefix holding other data
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    group = {"zarr_format": 3, "node_type": "group", "attributes": {}}
    client.put_object(Bucket=bucket, Key="group.zarr/zarr.json", Body=json.dumps(group))
    with pytest.raises(CacheError, match="not a volume cache") as err:
        VolumeCache(
            f"s3://{bucket}/group.zarr", storage_options={"endpoint_url": s3_server.endpoint}
        )
    assert f"s3://{bucket}/group.zarr/zarr.json" in str(err.value)
    client.put_object(Bucket=bucket, Key="data/notes.txt", Body=b"not a cache")
    with pytest.raises(CacheError, match="not empty and is not a volume cache") as err:
        VolumeCache(
            f"s3://{bucket}/data", storage_options={"endpoint_url": s3_server.endpoint}
        ).build([], progress=False)
    assert "notes.txt" in str(err.value)


def test_incomplete_manifest(aws_env, loopback_only, s3_server, built_cache):
    # a local cache whose build was interrupted, copied to the bucket as it was
    bucket = new_bucket(s3_server.endpoint)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    doc = json.loads((built_cache / "zarr.json").read_text())
    doc["attributes"]["voxaug_cache"]["complete"] = False
    client.put_object(Bucket=bucket, Key="half.zarr/zarr.json", Body=json.dumps(doc))
    url = f"s3://{bucket}/half.zarr"
    with pytest.raises(CacheError, match="manifest says this cache is incomplete") as err:
        VolumeCache(url, storage_options={"endpoint_url": s3_server.endpoint})
    assert f"{url}/zarr.json" in str(err.value)


@pytest.mark.parametrize(
    ("url", "key"),
    [("s3://bucket/c.zarr", "endpoint"), ("https://127.0.0.1:9/c.zarr", "endpoint_url")],
)
def test_storage_option_the_backend_does_not_know(aws_env, loopback_only, url, key):
    with pytest.raises(CacheError, match=rf"storage_options key\(s\) \['{key}'\] are not") as err:
        VolumeCache(url, storage_options={key: "http://127.0.0.1:9"})
    assert url in str(err.value)
    assert "endpoint_url" in str(err.value) or "headers" in str(err.value)  # what it takes


def test_unknown_protocol_and_options_for_a_folder(tmp_path):
    with pytest.raises(CacheError, match="unknown protocol 'nosuchfs'"):
        VolumeCache("nosuchfs://bucket/c.zarr")
    with pytest.raises(ValueError, match="storage_options are for a URL"):
        VolumeCache(tmp_path / "c.zarr", storage_options={"anon": True})


def test_missing_credentials(aws_env, loopback_only, s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    url = "s3://bucket/cache.zarr"
    options = {"endpoint_url": s3_server.endpoint, "skip_instance_cache": True}
    with pytest.raises(CacheError, match="no credentials found") as err:
        VolumeCache(url, storage_options=options)
    assert url in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


@pytest.fixture(scope="module")
def checking_server():
    """A moto server that checks credentials (it knows none, so every key is wrong)."""
    with LocalS3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as server:
        yield server


def test_wrong_credentials(aws_env, loopback_only, checking_server):
    url = "s3://bucket/cache.zarr"
    options = {"endpoint_url": checking_server.endpoint, "key": "AKIAWRONG", "secret": "nope"}
    with pytest.raises(CacheError, match="access denied") as err:
        VolumeCache(url, storage_options=options)
    assert url in str(err.value) and "credentials" in str(err.value)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"  # the test's own, never a real one
