"""Building a volume cache on object storage: stage locally, upload, publish the manifest last.

``VolumeCache("s3://bucket/liver.zarr").build(cases)`` runs ``build_remote``:

1. The local builder (``loaders.cache``) converts the cases into a staging folder (default
   ``$XDG_CACHE_HOME/voxaug/staging/<hash of the URL>``, i.e. under ``~/.cache``, kept so that
   the next build from this machine is incremental; removing it costs a full conversion, no
   more, since only changed cases are uploaded).
2. The case folders whose fingerprint the remote manifest does not already hold are uploaded.
   Folder names carry the fingerprint and a random suffix, so two builders never write the
   same object.
3. The manifest (the root ``zarr.json``) is written last, as a conditional PUT: ``If-Match``
   the ETag of the manifest read in step 2, or ``If-None-Match: *`` for a new cache. A builder
   that lost the race to another reads the winner's manifest, reuses its cases of equal
   fingerprint, uploads what is still missing and tries again. A reader thus only ever sees a
   manifest whose every folder was uploaded before it.
   A manifest byte-identical to the remote one (nothing changed) is not written again.
4. Folders referenced only by the manifest that was replaced, and own uploads that went
   unused, are deleted. A build that failed or was killed publishes nothing (the remote cache
   stays as it was); a killed one can leave unreferenced folders behind, which readers never
   look at.

Servers without conditional writes (HTTP 501 to ``If-Match``) get an unconditional PUT, a
warning, and no deletions: concurrent builders may then drop each other's cases from the
manifest but never publish a folder that is missing.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loaders.errors import CacheError
from loaders.remote import RemoteRoot

if TYPE_CHECKING:
    from loaders.cache import BuildReport

__all__ = ["MAX_UPLOADS", "PUBLISH_TRIES", "build_remote", "default_staging", "manifest_bytes"]

MAX_UPLOADS = 8
"""Files uploaded concurrently."""
PUBLISH_TRIES = 20
"""Conditional manifest writes tried before giving up (each loss means another builder won)."""
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NO_CONDITIONS = {"NotImplemented", "501"}


def default_staging(url: str) -> Path:
    """The local staging folder of the cache at ``url`` (see the module docstring)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "voxaug" / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


@contextmanager
def _staging_lock(folder: Path) -> Iterator[None]:
    """One build at a time per staging folder, from staging to publishing (a lock file
    beside it, released by the OS if the holder dies): the local builder deletes staged
    folders that another build may still be uploading."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (or an s3fs error caused by one)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code"))
        seen = seen.__cause__
    return None


def manifest_bytes(doc: dict[str, Any]) -> bytes:
    """The root document as it is published."""
    return json.dumps(doc, indent=1).encode()


def _cache_of(doc: Any) -> dict[str, Any] | None:
    got = doc.get("attributes", {}).get("voxaug_cache") if isinstance(doc, dict) else None
    return got if isinstance(got, dict) else None


class _Publisher:
    """Uploads and the conditional manifest write of one ``build_remote`` call."""

    def __init__(self, remote: RemoteRoot, staging: Path):
        self.remote = remote
        self.staging = staging
        self.fs = remote.store.fs
        self.root = remote.url.split("://", 1)[1]
        self.bucket, _, prefix = self.root.partition("/")
        self.manifest_key = f"{prefix}/zarr.json" if prefix else "zarr.json"

    def run(self, coro: Any) -> Any:
        return self.remote.run(coro)

    async def read_manifest(self) -> tuple[dict[str, Any] | None, str | None, bytes | None]:
        """The remote root document, its ETag and its bytes, from one GET; (None, None,
        None) if absent."""
        try:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.manifest_key)
        except FileNotFoundError:
            return None, None, None
        try:
            body = await resp["Body"].read()
        finally:
            resp["Body"].close()
        where = self.remote.describe("zarr.json")
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(where, f"corrupt cache metadata: {exc}") from None
        if _cache_of(doc) is None:
            raise CacheError(
                where, "a zarr group but not a volume cache (no 'voxaug_cache' attribute)"
            )
        return doc, resp["ETag"], body

    async def check_foreign(self) -> None:
        """Refuse a prefix that holds something other than case folders."""
        try:
            names = await self.fs._ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return
        foreign = sorted(n.rsplit("/", 1)[-1] for n in names if "@" not in n.rsplit("/", 1)[-1])
        if foreign:
            raise CacheError(
                self.remote.url,
                f"exists, is not empty and is not a volume cache (holds {foreign[:5]}); "
                "refusing to write into it",
            )

    async def upload(self, folders: set[str]) -> None:
        files = [
            (p, f"{self.root}/{d}/{p.relative_to(self.staging / d).as_posix()}")
            for d in sorted(folders)
            for p in sorted((self.staging / d).rglob("*"))
            if p.is_file()
        ]
        gate = asyncio.Semaphore(MAX_UPLOADS)

        async def put(local: Path, remote: str) -> None:
            async with gate:
                await self.fs._put_file(str(local), remote)

        await asyncio.gather(*(put(a, b) for a, b in files))

    async def delete(self, folders: set[str]) -> None:
        for d in sorted(folders):
            try:
                await self.fs._rm(f"{self.root}/{d}", recursive=True)
            except FileNotFoundError:
                pass

    async def put_manifest(self, doc: dict[str, Any], etag: str | None) -> bool | None:
        """Write the root document if the remote one is still ``etag`` (absent for None):
        True when written, False when another builder got there first, None when the server
        takes no conditional writes (then written unconditionally)."""
        body = manifest_bytes(doc)
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        kw = {"Bucket": self.bucket, "Key": self.manifest_key, "Body": body}
        try:
            await self.fs._call_s3("put_object", **kw, **condition)
        except (OSError, ValueError) as exc:
            code = _s3_code(exc)
            if isinstance(exc, FileExistsError) or code in _LOST_RACE:
                return False
            if code not in _NO_CONDITIONS:
                raise
            await self.fs._call_s3("put_object", **kw)
            return None
        finally:
            self.fs.invalidate_cache(f"{self.root}/zarr.json")
        return True


def build_remote(
    remote: RemoteRoot,
    build_local: Callable[[Path], BuildReport],
    *,
    staging: str | os.PathLike[str] | None = None,
) -> BuildReport:
    """Build the cache at ``remote`` (see the module docstring).

    Args:
        remote: the cache root; ``s3://`` only.
        build_local: builds the cases into the local folder it is given, returns the report.
        staging: the local staging folder (default ``default_staging(remote.url)``).

    Returns:
        The staging build's report (``built``: cases converted by this build).

    Raises:
        CacheError: not an ``s3://`` URL, the prefix holds something else, the server cannot
            be written, or other builders kept winning the race to the manifest.
    """
    if not remote.is_s3:
        raise CacheError(
            remote.url,
            "read-only: caches are built to s3:// URLs (an http(s):// URL can serve a cache "
            "built there or copied to a web server)",
        )
    folder = Path(staging) if staging is not None else default_staging(remote.url)
    folder.mkdir(parents=True, exist_ok=True)
    pub = _Publisher(remote, folder)
    first, _, _ = pub.run(pub.read_manifest())  # fail early: credentials, bucket, foreign data
    if first is None:
        if not remote.bucket_exists():
            raise CacheError(remote.url, f"bucket {pub.bucket!r} does not exist: create it first")
        pub.run(pub.check_foreign())
    with _staging_lock(folder):
        report = build_local(folder)
        _publish(pub, json.loads((folder / "zarr.json").read_bytes()))
    return report


def _publish(pub: _Publisher, local_doc: dict[str, Any]) -> None:
    """Upload what the remote cache lacks, write the manifest, delete what it dropped."""
    local = _cache_of(local_doc)
    assert local is not None and local.get("complete"), "the staging build raises on failure"
    uploaded: set[str] = set()
    for _ in range(PUBLISH_TRIES):
        doc, etag, body = pub.run(pub.read_manifest())
        theirs = _cache_of(doc) or {}
        if theirs.get("format") != local["format"]:
            theirs = {}  # another format: replaced whole
        remote_cases: dict[str, Any] = theirs.get("cases", {})
        cases: dict[str, Any] = {}
        for cid, entry in local["cases"].items():
            other = remote_cases.get(cid)
            same = other is not None and other.get("fingerprint") == entry["fingerprint"]
            cases[cid] = other if other is not None and same else entry
        published = {e["dir"] for e in remote_cases.values()}
        missing = {e["dir"] for e in cases.values()} - published - uploaded
        pub.run(pub.upload(missing))
        uploaded |= missing
        new_doc = copy.deepcopy(local_doc)
        new_doc["attributes"]["voxaug_cache"]["cases"] = cases
        written: bool | None = True  # already published as it is: no write
        if manifest_bytes(new_doc) != body:
            written = pub.run(pub.put_manifest(new_doc, etag))
        if written is False:
            continue
        referenced = {e["dir"] for e in cases.values()}
        if written:
            pub.run(pub.delete((published | uploaded) - referenced))
        else:
            warnings.warn(
                f"{pub.remote.url}: the server does not support conditional writes; the "
                "manifest was written unconditionally and no stale folders were deleted",
                stacklevel=3,
            )
        return
    raise CacheError(
        pub.remote.url,
        f"the manifest was replaced by other builders {PUBLISH_TRIES} times in a row; "
        "try again when they are done",
    )
