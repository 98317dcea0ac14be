"""The volume cache on object storage, read through zarr v3's fsspec store.

``VolumeCache("s3://bucket/liver.zarr", storage_options={...})`` opens a cache whose root is
a URL. This module is its reading side (``loaders.remote_build`` publishes builds):

- ``RemoteRoot``: the cache root's ``zarr.storage.FsspecStore`` (one per process, made again
  after a fork), its request limits and the translation of the backend's exceptions into
  ``CacheError``s that name the URL, the problem and the fix.
- ``RemoteSource``: a ``loaders.chunkstore.ByteSource`` over one array of it, so the chunk
  reader (shard index parsing, checks, blosc decoding) is the one local caches use; only the
  byte source differs: byte-range GETs instead of a memory map. A region read fetches the
  shard index once per array (kept by the reader), then the byte ranges of the chunks the
  region needs, ranges of one object less than ``max_gap`` bytes apart merged into one
  request, at most ``max_requests`` at a time.

Prefetching: ``RemoteRoot.prefetch(requests)`` starts fetching byte ranges and returns at
once; a later ``read_ranges`` that asks for the same ranges takes them from there (waiting
for them if they are still on their way) instead of asking the server again. The loader's
workers use it (``VolumeCache.prefetch_region``) to fetch a sample's image and label
regions in one batch of concurrent requests, and the next sample's while this one is
augmented.

URL forms: ``s3://bucket/prefix`` (s3fs; read and build), ``http://`` / ``https://`` (read
only, e.g. a bucket served publicly), and any other protocol zarr's ``FsspecStore`` opens
(read only).

Retries: for ``s3://`` the backend's own settings, no loop here: botocore's "standard" retry
mode (exponential back-off with jitter on 5xx, throttling, connection errors and timeouts,
``config_kwargs={"retries": ...}``) under s3fs, whose own loop (``S3FileSystem.retries``)
also retries a response body cut short. fsspec's HTTP filesystem has no retry setting, so
for ``http(s)://`` the store is wrapped (``_retrying_store``) to retry its reads with
exponential back-off.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import re
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from loaders.errors import CacheError

__all__ = [
    "HTTP_ATTEMPTS",
    "MAX_GAP",
    "MAX_REQUESTS",
    "PREFETCH_BATCHES",
    "MergedRange",
    "RemoteRoot",
    "RemoteSource",
    "Request",
    "is_url",
    "merge_ranges",
    "storage_options_for",
]

T = TypeVar("T")

MAX_REQUESTS = 16
"""Concurrent range requests per region read (and connections in s3fs's pool)."""
MAX_GAP = 256 << 10
"""Ranges of one object at most this many bytes apart are fetched in one request (the gap
read and dropped). Over loopback a request cost the client about as much CPU as 230 KiB of
body through fsspec's HTTP filesystem (0.25 ms and 1.1 ms per MiB) and as 2 MiB through
s3fs (2-2.5 ms); W2's full-size patches took 12 requests instead of 21 with this gap, for
1.13x the bytes (1 MiB: 5 requests, 1.64x)."""
PREFETCH_BATCHES = 8
"""Prefetched batches with unclaimed ranges kept at most (a batch counts as new again when
a prefetch asks for one of its ranges); the oldest are dropped."""
HTTP_ATTEMPTS = 5
"""Tries of one ``http(s)://`` request on a transient error (5xx, 429, reset, timeout)."""
S3FS_RETRIES = 2
"""s3fs's own tries around botocore's (which retries each request itself). s3fs nests its
loop (around the call and around the call plus the body read), so a server that takes
connections and never answers fails after ``S3FS_RETRIES**2 * total_max_attempts *
read_timeout`` = 2 minutes with the defaults; an endpoint that refuses connections, in about
a second."""
S3_CONFIG: dict[str, Any] = {
    "retries": {"mode": "standard", "total_max_attempts": 3},
    "connect_timeout": 5,
    "read_timeout": 10,
    "max_pool_connections": MAX_REQUESTS,
}
"""botocore ``Config`` defaults for ``s3://`` (``storage_options["config_kwargs"]`` entries
replace them one by one)."""
HTTP_TIMEOUT = {"sock_connect": 5.0, "sock_read": 20.0}
"""aiohttp timeouts (seconds) for ``http(s)://`` unless ``client_kwargs["timeout"]`` is given."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_TRANSIENT_HTTP = {429, 500, 502, 503, 504}
_UNREACHABLE = {  # botocore's and aiohttp's names for a server that cannot be reached
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
}


def is_url(root: object) -> bool:
    """Whether ``root`` names a remote cache (``scheme://...``) rather than a local folder."""
    return isinstance(root, str) and bool(_URL.match(root)) and not root.startswith("file://")


def _known_options(protocol: str) -> set[str]:
    """The ``storage_options`` keys the fsspec filesystem of ``protocol`` takes."""
    import fsspec
    from fsspec.dircache import DirCache

    cls = fsspec.get_filesystem_class(protocol)
    names: set[str] = set()
    for fn in [*(c.__dict__.get("__init__") for c in cls.__mro__), DirCache.__init__]:
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    if protocol in ("http", "https"):  # the rest are passed on to every aiohttp request
        import aiohttp

        request = inspect.signature(aiohttp.ClientSession._request).parameters
        names |= {n for n, p in request.items() if p.kind is p.KEYWORD_ONLY}
    names.add("skip_instance_cache")  # taken by fsspec for every filesystem
    names.discard("asynchronous")  # zarr's store sets it
    names.discard("loop")
    return names


def storage_options_for(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` checked against what the backend of ``url`` takes, with this
    module's timeouts and retry settings filled in where not given.

    Raises:
        CacheError: an unknown protocol, a backend that is not installed, or a key the
            backend does not take (fsspec would pass it on or drop it silently).
    """
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    given = dict(storage_options or {})
    try:
        known = _known_options(protocol)
    except ValueError:
        raise CacheError(
            url, f"unknown protocol {protocol!r}: use s3://bucket/path or http(s)://"
        ) from None
    except ImportError as exc:
        extra = "s3" if protocol in ("s3", "s3a") else "remote"
        raise CacheError(
            url,
            f"reading {protocol}:// needs {exc.name or exc}, not installed here: "
            f"python -m pip install 'voxaug[{extra}]'",
        ) from None
    unknown = sorted(set(given) - known)
    if unknown:
        cls = fsspec.get_filesystem_class(protocol)
        raise CacheError(
            url,
            f"storage_options key(s) {unknown} are not options of {cls.__name__} "
            f"({protocol}://); it takes: {', '.join(sorted(known))}",
        )
    if protocol in ("s3", "s3a"):
        given["config_kwargs"] = {**S3_CONFIG, **given.get("config_kwargs", {})}
        # the endpoint botocore would take from the environment, made an option: fsspec's
        # instance cache is keyed by the options alone, so a process whose AWS_ENDPOINT_URL
        # changed was handed the filesystem of the earlier endpoint
        env = os.environ
        if "endpoint_url" not in given and env.get(
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", ""
        ).lower() not in ("true", "1"):
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
            if endpoint:
                given["endpoint_url"] = endpoint
    elif protocol in ("http", "https"):
        import aiohttp

        client = dict(given.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, **HTTP_TIMEOUT))
        given["client_kwargs"] = client
    return given


async def _with_retries(fn: Callable[[], Awaitable[T]], attempts: int) -> T:
    """``await fn()``, tried ``attempts`` times on a transient HTTP error, with exponential
    back-off and full jitter (0.1 s doubling, at most 5 s)."""
    import aiohttp

    for attempt in range(attempts):
        try:
            return await fn()
        except aiohttp.ClientResponseError as exc:
            if exc.status not in _TRANSIENT_HTTP or attempt == attempts - 1:
                raise
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError):
            if attempt == attempts - 1:
                raise
        await asyncio.sleep(random.uniform(0, min(5.0, 0.1 * 2**attempt)))
    raise AssertionError("unreachable")


def _explain(url: str, exc: BaseException) -> CacheError:
    """A ``CacheError`` naming ``url``, what went wrong and what to do about it."""
    name = type(exc).__name__
    text = str(exc) or name
    if name == "NoCredentialsError":
        problem = (
            "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE), or pass storage_options={'key': ..., 'secret': ...}; "
            "storage_options={'anon': True} reads a public bucket"
        )
    elif isinstance(exc, PermissionError) or any(
        code in text
        for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")
    ):
        problem = (
            f"access denied ({text}): check the credentials (storage_options 'key' and "
            "'secret', or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and that they may read "
            "this bucket"
        )
    elif name in _UNREACHABLE or isinstance(
        exc, (ConnectionError, asyncio.TimeoutError, TimeoutError)
    ):
        problem = (
            f"cannot reach the server after retries ({name}: {text}): check the endpoint "
            "(storage_options endpoint_url, or AWS_ENDPOINT_URL) and the network"
        )
    else:
        problem = f"request failed after retries ({name}: {text})"
    return CacheError(url, problem)


def _retrying_store(store: Any) -> Any:
    """``store`` with its reads retried by ``_with_retries`` (zarr-python's reads of the
    small arrays included)."""
    from zarr.storage import WrapperStore

    class RetryingStore(WrapperStore):
        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            return await _with_retries(
                lambda: self._store.get(key, prototype, byte_range), HTTP_ATTEMPTS
            )

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            key_ranges = list(key_ranges)
            return await _with_retries(
                lambda: self._store.get_partial_values(prototype, key_ranges), HTTP_ATTEMPTS
            )

        async def exists(self, key: str) -> bool:
            return await _with_retries(lambda: self._store.exists(key), HTTP_ATTEMPTS)

    return RetryingStore(store)


Request = tuple[str, int, int | None]
"""``(key, start, stop)``: bytes ``[start, stop)`` of an object (``stop`` None: to its end)."""


@dataclass(frozen=True, slots=True)
class MergedRange:
    """One GET: bytes ``[start, stop)`` of ``key``, holding the ranges ``members`` (indices
    into the requests it was merged from)."""

    key: str
    start: int
    stop: int | None
    members: tuple[int, ...]


def merge_ranges(requests: Sequence[Request], max_gap: int) -> list[MergedRange]:
    """The GETs that fetch ``requests``: the ranges of one key sorted, and each merged into
    the one before it when it starts at most ``max_gap`` bytes after that one's end (an
    open-ended range is never merged)."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i][0], requests[i][1]))
    merged: list[MergedRange] = []
    for i in order:
        key, start, stop = requests[i]
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.key == key
            and last.stop is not None
            and stop is not None
            and start - last.stop <= max_gap
        ):
            merged[-1] = MergedRange(key, last.start, max(last.stop, stop), (*last.members, i))
        else:
            merged.append(MergedRange(key, start, stop, (i,)))
    return merged


def _cut(body: Any, at: int, request: Request) -> Any:
    """The bytes of ``request`` from the body of a GET that started at byte ``at``."""
    _, start, stop = request
    return body[start - at :] if stop is None else body[start - at : stop - at]


@dataclass(slots=True)
class _Batch:
    """A prefetched batch: its future (the bodies of ``merged``) and the ranges of it that
    reads have not claimed yet."""

    future: Future[list[Any]]
    merged: list[MergedRange]
    unclaimed: set[Request]


@dataclass(slots=True)
class _Pending:
    """A prefetched range: its batch, the index of its GET there, and how many prefetches
    asked for it (the reads it waits for: two samples can share a chunk)."""

    batch: _Batch
    pos: int
    wanted: int = 1


@dataclass(slots=True)
class _Prefetches:
    """This process's prefetched ranges (made again after a fork)."""

    pid: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[Request, _Pending] = field(default_factory=dict)
    batches: deque[_Batch] = field(default_factory=deque)
    executor: ThreadPoolExecutor | None = None


class RemoteRoot:
    """A cache root on object storage: its zarr store and its requests.

    Args:
        url: ``s3://bucket/prefix``, ``https://host/path``, ...
        storage_options: options of the fsspec filesystem (s3fs: ``endpoint_url``,
            ``key``, ``secret``, ``anon``, ``config_kwargs``, ...), checked by
            ``storage_options_for``.
        max_requests: concurrent range requests per batch.
        max_gap: ranges of one object at most this many bytes apart are fetched in one
            request.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        max_requests: int = MAX_REQUESTS,
        max_gap: int = MAX_GAP,
    ):
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower()
        self.storage_options = dict(storage_options or {})
        self.max_requests = int(max_requests)
        if int(max_gap) < 0:
            raise ValueError(f"max_gap must be >= 0 bytes, got {max_gap!r}")
        self.max_gap = int(max_gap)
        self._options = storage_options_for(self.url, self.storage_options)
        self._store: Any = None
        self._pid = -1
        self._prefetches = _Prefetches(os.getpid())

    @property
    def is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    @property
    def store(self) -> Any:
        """The ``zarr.storage.FsspecStore`` at the root (a new one in a forked child)."""
        if self._store is None or self._pid != os.getpid():
            from zarr.storage import FsspecStore

            store = FsspecStore.from_url(self.url, storage_options=self._options, read_only=True)
            if self.is_s3:
                store.fs.retries = S3FS_RETRIES
            else:
                store = _retrying_store(store)
            self._store, self._pid = store, os.getpid()
        return self._store

    def describe(self, key: str) -> str:
        return f"{self.url}/{key}"

    def run(self, coro: Awaitable[T], key: str = "") -> T:
        """Run a coroutine on zarr's event loop; backend errors become ``CacheError``s."""
        from zarr.core.sync import sync

        try:
            return sync(coro)  # type: ignore[arg-type]
        except CacheError:
            raise
        except Exception as exc:
            raise _explain(self.describe(key) if key else self.url, exc) from exc

    async def _get(self, key: str, start: int | None, stop: int | None, suffix: bool) -> Any:
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype

        byte_range: Any
        if suffix:
            byte_range = SuffixByteRequest(int(stop or 0))
        elif stop is None:
            # a whole object as "bytes=0-": without a range, s3fs asks for its size first
            # (a HEAD per object) to decide on a multi-part download
            byte_range = OffsetByteRequest(start or 0)
        else:
            byte_range = RangeByteRequest(start or 0, stop)

        # retried by botocore and s3fs, or by _retrying_store (module docstring)
        buf = await self.store.get(key, default_buffer_prototype(), byte_range)
        return None if buf is None else memoryview(buf.as_numpy_array())

    def read(self, key: str) -> bytes | None:
        """A whole object, or None where it does not exist."""
        got = self.run(self._get(key, None, None, False), key)
        return None if got is None else got.tobytes()

    def read_suffix(self, key: str, nbytes: int) -> Any:
        """The last ``nbytes`` of an object (all of it if shorter), or None."""
        return self.run(self._get(key, None, nbytes, True), key)

    def _fetch(self, merged: list[MergedRange]) -> list[Any]:
        """The bodies of ``merged`` (None where the key does not exist), at most
        ``max_requests`` requests in flight.

        Raises:
            CacheError: the server failed, or sent a body of another length than asked.
        """

        async def fetch_all() -> list[Any]:
            gate = asyncio.Semaphore(self.max_requests)

            async def one(key: str, start: int, stop: int | None) -> Any:
                async with gate:
                    return await self._get(key, start, stop, False)

            return await asyncio.gather(*(one(m.key, m.start, m.stop) for m in merged))

        bodies = self.run(fetch_all(), merged[0].key)
        for m, body in zip(merged, bodies, strict=True):
            if body is not None and m.stop is not None and len(body) != m.stop - m.start:
                raise CacheError(
                    self.describe(m.key),
                    f"asked for bytes {m.start}-{m.stop - 1}, got {len(body)} bytes (the "
                    "object changed, or the server ignores Range requests)",
                )
        return bodies

    def _local_prefetches(self) -> _Prefetches:
        if self._prefetches.pid != os.getpid():  # forked: the parent's are not ours
            self._prefetches = _Prefetches(os.getpid())
        return self._prefetches

    def prefetch(self, requests: Sequence[Request]) -> None:
        """Start fetching ``(key, start, stop)`` byte ranges in the background and return at
        once. A later ``read_ranges`` that asks for one of these exact ranges takes it from
        here, once per ``prefetch`` that asked for it. Ranges already on their way (two
        samples can share chunks) are not asked for again; the others are merged as
        ``read_ranges`` merges them, so a known range less than ``max_gap`` long between two
        new ones is fetched again as their gap. At most ``PREFETCH_BATCHES`` batches are
        kept unclaimed (the oldest dropped). Errors are not raised here: the read that
        claims the range fetches it again and raises."""
        state = self._local_prefetches()
        with state.lock:
            fresh: list[Request] = []
            for r in dict.fromkeys(requests):
                got = state.pending.get(r)
                if got is None:
                    fresh.append(r)
                    continue
                got.wanted += 1
                if got.batch is not state.batches[-1]:  # kept as long as a new one
                    state.batches.remove(got.batch)
                    state.batches.append(got.batch)
            if not fresh:
                return
            merged = merge_ranges(fresh, self.max_gap)
            if state.executor is None:
                # threads that only wait on the event loop (zarr's sync): the requests of
                # two batches are in flight together
                state.executor = ThreadPoolExecutor(2, thread_name_prefix="remote-prefetch")
            batch = _Batch(state.executor.submit(self._fetch, merged), merged, set(fresh))
            for pos, m in enumerate(merged):
                for i in m.members:
                    state.pending[fresh[i]] = _Pending(batch, pos)
            state.batches.append(batch)
            while len(state.batches) > PREFETCH_BATCHES:
                old = state.batches.popleft()
                old.future.cancel()
                for r in old.unclaimed:
                    del state.pending[r]

    def _claim(self, requests: Sequence[Request]) -> dict[int, _Pending]:
        """Take the prefetched ranges among ``requests`` (once each)."""
        state = self._local_prefetches()
        claimed: dict[int, _Pending] = {}
        if not state.pending:
            return claimed
        with state.lock:
            for i, r in enumerate(requests):
                got = state.pending.get(r)
                if got is None:
                    continue
                claimed[i] = got
                got.wanted -= 1
                if got.wanted:
                    continue
                del state.pending[r]
                got.batch.unclaimed.discard(r)
                if not got.batch.unclaimed:  # all of it claimed: no longer kept here
                    try:
                        state.batches.remove(got.batch)
                    except ValueError:
                        pass
        return claimed

    def read_ranges(self, requests: Sequence[Request]) -> list[Any]:
        """Bytes ``[start, stop)`` of each ``(key, start, stop)`` (``stop`` None: to the end;
        None where the key does not exist): the prefetched ones taken from their batch, the
        others fetched now, ranges of one key at most ``max_gap`` bytes apart merged into one
        request, at most ``max_requests`` requests in flight."""
        if not requests:
            return []
        out: list[Any] = [None] * len(requests)
        claimed = self._claim(requests)
        rest = [i for i in range(len(requests)) if i not in claimed]
        self._place(requests, rest, out)
        failed = []
        for i, got in claimed.items():
            try:
                body = got.batch.future.result()[got.pos]
            except Exception:  # a failed or dropped prefetch: asked again below, errors raised
                failed.append(i)
                continue
            if body is not None:
                out[i] = _cut(body, got.batch.merged[got.pos].start, requests[i])
        self._place(requests, failed, out)
        return out

    def _place(self, requests: Sequence[Request], which: list[int], out: list[Any]) -> None:
        """Fetch ``requests[i]`` for each ``i`` in ``which`` into ``out[i]``."""
        if not which:
            return
        picked = [requests[i] for i in which]
        merged = merge_ranges(picked, self.max_gap)
        for m, body in zip(merged, self._fetch(merged), strict=True):
            if body is None:
                continue
            for j in m.members:
                out[which[j]] = _cut(body, m.start, picked[j])

    def bucket_exists(self) -> bool:
        """Whether the bucket of an ``s3://`` URL exists (True for other protocols)."""
        if not self.is_s3:
            return True
        bucket = self.url.split("://", 1)[1].split("/", 1)[0]
        return bool(self.run(self.store.fs._exists(bucket)))

    def read_root(self, key: str = "zarr.json") -> bytes | None:
        """The root's ``zarr.json`` (or ``key``), None where there is none.

        Raises:
            CacheError: the bucket does not exist, or the server cannot be read.
        """
        got = self.read(key)
        if got is None and not self.bucket_exists():
            bucket = self.url.split("://", 1)[1].split("/", 1)[0]
            raise CacheError(
                self.url,
                f"bucket {bucket!r} does not exist (or these credentials cannot see it): "
                "check the URL, or create the bucket",
            )
        return got

    def array_source(self, folder: str, array: str) -> RemoteSource:
        """A ``ByteSource`` for the array ``<root>/<folder>/<array>``."""
        return RemoteSource(self, f"{folder}/{array}")

    def small_array(self, folder: str, name: str) -> np.ndarray:
        """A whole (small) array ``<root>/<folder>/<name>``, read with zarr-python."""
        import zarr

        path = f"{folder}/{name}"
        try:
            arr = zarr.open_array(store=self.store, path=path, mode="r", zarr_format=3)
        except FileNotFoundError:
            raise CacheError(
                self.describe(path), "missing (cache rebuilt or removed?); call refresh()"
            ) from None
        except CacheError:
            raise
        except Exception as exc:
            raise _explain(self.describe(path), exc) from exc
        try:
            return np.asarray(arr[...])
        except Exception as exc:
            raise _explain(self.describe(path), exc) from exc


class RemoteSource:
    """The bytes of one array of a ``RemoteRoot`` (a ``ByteSource``): ranged GETs.

    Args:
        root: the cache root.
        prefix: the array's path below the root (``"<case folder>/image"``).
    """

    mapped = False

    def __init__(self, root: RemoteRoot, prefix: str):
        self.root = root
        self.prefix = prefix.strip("/")

    @property
    def location(self) -> str:
        return self.root.describe(self.prefix)

    def describe(self, key: str) -> str:
        return self.root.describe(f"{self.prefix}/{key}")

    def read(self, key: str) -> bytes | None:
        return self.root.read(f"{self.prefix}/{key}")

    def read_index(self, key: str, nbytes: int, at_end: bool) -> tuple[Any, bytes] | None:
        path = f"{self.prefix}/{key}"
        if at_end:
            raw = self.root.read_suffix(path, nbytes)
        else:
            raw = self.root.read_ranges([(path, 0, nbytes)])[0]
        if raw is None:
            return None
        if len(raw) == 0:
            raise CacheError(self.describe(key), "shard object is empty (truncated?)")
        return None, bytes(raw)

    def read_ranges(self, requests: Sequence[Request]) -> list[Any]:
        return self.root.read_ranges([(f"{self.prefix}/{k}", a, b) for k, a, b in requests])

    def prefetch(self, requests: Sequence[Request]) -> None:
        self.root.prefetch([(f"{self.prefix}/{k}", a, b) for k, a, b in requests])

    def open_zarr(self) -> Any:
        import zarr

        return zarr.open_array(store=self.root.store, path=self.prefix, mode="r", zarr_format=3)
