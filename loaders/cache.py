"""The volume cache: a dataset converted once into a zarr v3 store for fast patch reads.

Layout of a cache folder (a plain zarr v3 hierarchy; ``zarr.open_group(root)`` reads it)::

    root/zarr.json                 root group; attribute "voxaug_cache" is the manifest:
                                   format, build options, "complete", and per case its
                                   folder, fingerprint, sources, geometry and statistics
    root/<id>@<fingerprint>-<n>/   one complete case, a group with arrays
        image/                     int16 for CT (else the source dtype), sharded
        label/                     uint8, sharded
        foreground/                (n, 3) int32 sampled foreground voxel indices
        foreground_class/          (n,) uint8 their label values
    root/.tmp/                     cases being written (exists during a build only)

Atomicity: a case is written under ``.tmp/`` and renamed to its final folder only when
complete; the manifest, which is the only thing readers look at, is then replaced (write
a temporary file, ``os.replace``). A build killed at any point (SIGKILL included) leaves
at worst an unreferenced folder, removed and redone by the next build; readers never see
a half-written case. A build holds an exclusive ``flock`` on the root folder, so
concurrent builds (e.g. one per DDP rank) run one after the other and the later ones find
nothing to do; build workers hold a shared lock on ``.tmp`` so that a new build waits for
workers orphaned by a killed one before it clears ``.tmp``.

Incremental: a case's fingerprint is the SHA-256 of its source files' contents (reused
from the last build when their size and mtime are unchanged), its declared label values
and the build options. Cases whose fingerprint is unchanged are kept; new or changed ones
are rebuilt; cases no longer listed are dropped. A cache of an older format is rebuilt
whole by ``build`` and refused by readers.

Orientation: every case is stored on its canonical grid (``loaders.orientation``: an
exact permutation/flip of the array, identity direction); its record keeps the
``Reorientation`` (original shape, spacing, origin, direction, permutation and flips), so
``info(case).reorientation.undo`` maps an array on the canonical grid back to the file.

Chunking and codec, measured on a 200x512x512 int16 phantom (``benchmarks/w5.py``,
``benchmarks/w6.py`` and the experiments behind them): random 160^3 regions, warm page
cache, one thread, 2-core VM shared with other jobs, so compared by process CPU time in
interleaved rounds (medians):
- sharded (one shard file per array), 32x32x32 inner chunks (32x64x64 before),
  blosc lz4hc clevel 5 + byte shuffle, decoded here from a memory map: 0.414x the raw bytes.
  With the compiled decode (``loaders.region_decode``, LRU off) a region decodes every
  chunk it touches whole, so smaller chunks waste less at its faces: on W6's image regions
  (about 150^3 for 128^3 patches, chunks no tap reaches left out) 32x32x32 took 0.75x the
  CPU of 32x64x64 (1.47 vs 1.96 ms), 32x32x64 0.92x, 16x32x64 0.87x, 16x32x32 0.77x; on
  random 160^3 regions (W5) 0.92x, 0.93x, 0.90x and 0.95x; label regions (mostly absent
  chunks) 0.91x-1.0x; the bytes stay within 0.414x-0.416x. 32x32x32 is the best for the
  image regions and within 2 % of the best elsewhere. A region touches about 2.8x as many
  chunks as with 32x64x64, which costs a lookup each in the decoded-chunk LRU (Python,
  about a microsecond) and more byte ranges over object storage (adjacent ones are merged:
  ``loaders.remote.merge_ranges``);
- lz4hc instead of lz4 (format 3; the same clevel, shuffle and blocks): 0.415x instead of
  0.436x the raw bytes and less CPU per region read, by process CPU time in interleaved
  rounds on the two caches of the same two phantom cases (32x64x64 chunks): 0.83x for
  random 160^3 image regions (W5), 0.77x for the image and 0.82x for the label regions of
  W2's 128^3 patches (LRU off); the decoder has fewer, longer matches to copy (32.7 vs
  41.7 us per 32x64x64 int16 chunk). Encoding runs at about 150 MB/s instead of 1.6 GB/s:
  the whole build of the two cases took 1.19x the CPU. (An earlier note here had lz4hc "no
  faster to decode, 40 MB/s to encode"; neither held in these measurements.)
- blosc's automatic block size for 32x64x64 chunks was 256 KiB (the whole chunk): decoding
  then ran 2.4x slower (38 vs 12-14 us per hot chunk, 3.8 vs 1.3 ms per region; the L2
  cache is 512 KiB), hence the forced block size (a 32x32x32 int16 chunk is one 64 KiB
  block);
- one file per chunk instead of one shard: 2x slower (an open/read/close per chunk);
- with the earlier per-chunk Python decode, 48x64x64, 64^3 and 32x96x96 were within 10 % of
  32x64x64 for 160^3 regions and 32^3 1.3x slower: the Python bookkeeping per chunk, which
  the compiled decode removed;
- zstd: 0.38x bytes, 5x slower decoding; no shuffle: 0.87x bytes; bit shuffle: 2x slower
  decoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from augment.workers import refuse_while_bootstrapping, spawn_executor
from loaders.cases import Case, LabelMap, canonical_pair, label_map_key, read_case
from loaders.chunkstore import ArrayReader, ChunkLRU, Region, parse_region
from loaders.errors import (
    CacheError,
    CaseError,
    DatasetError,
    DataWarning,
    LoaderError,
    VolumeNotFoundError,
)
from loaders.fingerprint import SourceDigest, digest_source
from loaders.orientation import Reorientation
from loaders.remote import RemoteRoot, is_url
from loaders.remote_build import build_remote

__all__ = ["CACHE_CHUNKS", "BuildReport", "CaseInfo", "VolumeCache", "default_cache_root"]

# 2: cases on their canonical grid, with a "reorientation" record (format 1 stored them as
# the files did, so its arrays would be misread next to reoriented ones)
# 3: image and label chunks in blosc lz4hc instead of lz4 (see the module docstring)
CACHE_FORMAT = 3
CACHE_CHUNKS: tuple[int, int, int] = (32, 32, 32)
"""Inner chunk shape (z, y, x) of the image and label arrays a build writes (see the module
docstring). Readers take each array's chunk shape from its metadata, so caches built with
the former 32x64x64 read as before; the case fingerprint includes it, so a build rewrites
such cases."""
# c-blosc scales a forced block size by the item size with a 64 KiB floor: 64 KiB blocks
# for int16 and uint8 alike (see the module docstring for why not the automatic size).
_BLOSC: dict[str, Any] = {"cname": "lz4hc", "clevel": 5, "shuffle": "shuffle", "blocksize": 32768}
_PERCENTILES = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)
_STATS_SAMPLE = 2_000_000  # voxels used for intensity percentiles (a regular stride)
_MANIFEST_EVERY_S = 1.0  # how often a running build publishes finished cases
ARRAYS = ("image", "label")


@dataclass(frozen=True)
class CaseInfo:
    """What the cache knows about one case (all in (z, y, x) order).

    Attributes:
        id: the case id.
        shape: array shape.
        spacing: voxel spacing in mm.
        origin: position of voxel (0, 0, 0) in mm.
        direction: 3x3 direction cosines (see ``loaders.volume``): the identity, since
            cases are stored on their canonical grid.
        dtype: dtype of the cached image.
        has_label: whether a label array exists.
        fg_bbox: half-open ``((z0, z1), (y0, y1), (x0, x1))`` of label > 0, or None.
        class_voxels: voxel count of every label value > 0 present.
        intensity: image statistics: ``min``, ``max``, ``mean``, ``std`` and
            ``percentiles`` ({p: value} for p in 0.5, 1, 5, 25, 50, 75, 95, 99, 99.5).
        fg_intensity: the same over label > 0 voxels (empty without foreground).
        fg_indices: (n, 3) int32 voxel indices sampled uniformly within each class
            (up to ``n_foreground`` per class), for foreground oversampling.
        fg_classes: (n,) uint8 label value at each of ``fg_indices``.
        pad_value: default padding of image reads (the image minimum).
        source_image: the image file it was built from.
        source_label: the label file, or None.
        fingerprint: hex digest of sources and build options.
        reorientation: how the source files' grid maps onto the stored one (before any
            resampling); ``reorientation.undo`` and ``to_sitk`` take an array on the
            canonical grid of the original spacing back to the file's geometry.
        warnings: the ``DataWarning`` messages the build gave for this case.
    """

    id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    dtype: np.dtype
    has_label: bool
    fg_bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None
    class_voxels: dict[int, int]
    intensity: dict[str, Any]
    fg_intensity: dict[str, Any]
    fg_indices: np.ndarray
    fg_classes: np.ndarray
    pad_value: float
    source_image: str
    source_label: str | None
    fingerprint: str
    reorientation: Reorientation
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildReport:
    """What ``VolumeCache.build`` did.

    Attributes:
        built: ids converted by this build.
        kept: ids whose fingerprint was unchanged.
        removed: ids dropped because they are no longer listed.
        seconds: wall time of the build.
        voxel_bytes: decoded bytes (image + label) written by this build.
    """

    built: tuple[str, ...]
    kept: tuple[str, ...]
    removed: tuple[str, ...]
    seconds: float
    voxel_bytes: int


# --------------------------------------------------------------------------- helpers
@contextmanager
def _flock(path: Path, *, exclusive: bool) -> Iterator[None]:
    """An advisory lock on an existing file or folder (released by the OS if the holder
    dies, SIGKILL included)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Replace the root group's zarr.json, whose "voxaug_cache" attribute is the manifest."""
    meta = {"attributes": {"voxaug_cache": manifest}, "zarr_format": 3, "node_type": "group"}
    _write_json_atomic(root / "zarr.json", meta)


class _OtherFormat(CacheError):
    """A cache of another ``CACHE_FORMAT``: readers refuse it, a build replaces it."""


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest, or None where no cache exists; ``_OtherFormat`` for a cache of another
    format, CacheError for anything else."""
    path = root / "zarr.json"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    return _parse_manifest(text, path)


def _parse_manifest(text: bytes, path: Path | str) -> dict[str, Any]:
    """The manifest in a root ``zarr.json``'s bytes (read from ``path``)."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(path, f"corrupt cache metadata: {exc}") from None
    manifest = meta.get("attributes", {}).get("voxaug_cache") if isinstance(meta, dict) else None
    if not isinstance(manifest, dict):
        raise CacheError(path, "a zarr group but not a volume cache (no 'voxaug_cache' attribute)")
    if manifest.get("format") != CACHE_FORMAT:
        raise _OtherFormat(
            path,
            f"cache format {manifest.get('format')!r}; this version reads "
            f"{CACHE_FORMAT}: rebuild the cache (VolumeCache.build replaces it)",
        )
    manifest.setdefault("cases", {})
    return manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _to_cache_dtype(arr: np.ndarray, requested: str, path: Path | None) -> np.ndarray:
    """int16 for integer-valued images in int16 range (CT), else the source dtype
    (float64 becomes float32); an explicit dtype must hold the values exactly."""
    if requested == "auto":
        if arr.dtype == np.int16:
            return arr
        if arr.dtype.kind in "iub":
            if arr.size and arr.min() >= -32768 and arr.max() <= 32767:
                return arr.astype(np.int16)
            return arr
        if arr.dtype.kind == "f":
            lo, hi = float(arr.min()), float(arr.max())
            if lo >= -32768 and hi <= 32767 and np.array_equal(arr, np.round(arr)):
                return arr.astype(np.int16)
            return arr.astype(np.float32) if arr.dtype == np.float64 else arr
        return arr
    target = np.dtype(requested)
    if target.kind in "iu":
        info = np.iinfo(target)
        lo, hi = arr.min(), arr.max()
        if (
            lo < info.min
            or hi > info.max
            or (arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)))
        ):
            raise CaseError(
                path,
                f"image values {lo}..{hi} cannot be stored exactly as "
                f"{target} (image_dtype={requested!r})",
            )
    return arr.astype(target)


def _intensity(values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        return {}
    step = max(1, values.size // _STATS_SAMPLE)
    sample = values.ravel()[::step].astype(np.float64)
    pct = np.percentile(sample, _PERCENTILES)
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(sample.mean()),
        "std": float(sample.std()),
        "percentiles": {str(p): float(v) for p, v in zip(_PERCENTILES, pct, strict=True)},
    }


def _case_stats(
    image: np.ndarray,
    label: np.ndarray | None,
    *,
    rng: np.random.Generator,
    n_foreground: int,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Statistics for the manifest, and the sampled foreground indices and classes."""
    stats: dict[str, Any] = {
        "intensity": _intensity(image),
        "fg_intensity": {},
        "fg_bbox": None,
        "class_voxels": {},
    }
    fg_idx = np.zeros((0, 3), np.int32)
    fg_cls = np.zeros((0,), np.uint8)
    if label is None:
        return stats, fg_idx, fg_cls
    flat = label.ravel()
    nz = np.flatnonzero(flat)
    if nz.size == 0:
        return stats, fg_idx, fg_cls
    bbox = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(label.any(axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1])
    stats["fg_bbox"] = bbox
    classes = flat[nz]
    stats["fg_intensity"] = _intensity(image.ravel()[nz])
    counts = np.bincount(classes, minlength=2)
    stats["class_voxels"] = {str(c): int(n) for c, n in enumerate(counts) if c > 0 and n > 0}
    picks = []
    for c in np.flatnonzero(counts[1:]) + 1:
        members = nz[classes == c]
        k = min(n_foreground, members.size)
        picks.append(np.sort(members[rng.choice(members.size, size=k, replace=False)]))
    chosen = np.concatenate(picks)
    fg_idx = np.stack(np.unravel_index(chosen, label.shape), axis=1).astype(np.int32)
    fg_cls = flat[chosen].astype(np.uint8)
    return stats, fg_idx, fg_cls


def _check_pad(pad_value: float, dtype: np.dtype) -> None:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not (float(pad_value).is_integer() and info.min <= pad_value <= info.max):
            raise ValueError(f"pad_value {pad_value!r} cannot be stored exactly as {dtype}")
    elif dtype.kind == "b" and pad_value not in (0, 1):
        raise ValueError(f"pad_value {pad_value!r} cannot be stored as bool")


@dataclass(frozen=True)
class _Job:
    case: Case
    root: str
    dir_name: str
    fingerprint: str
    sources: dict[str, SourceDigest | None]
    options: dict[str, Any]
    label_map: LabelMap | None


def _build_case(job: _Job) -> dict[str, Any]:
    """Convert one case into ``root/<dir_name>`` (via ``root/.tmp``); return its record.

    Runs in a worker process (or in the builder's process with ``workers=1``).
    """
    import zarr
    from zarr.codecs import BloscCodec

    root = Path(job.root)
    opts = job.options
    with _flock(root / ".tmp", exclusive=False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            image, label = read_case(
                job.case, label_map=job.label_map, allow_empty_label=opts["allow_empty_label"]
            )
        for w in caught:  # DataWarnings go to the builder's process; others show here
            if not issubclass(w.category, DataWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        image, label, reorientation = canonical_pair(image, label, spacing=opts["spacing"])
        # one copy of a flipped/permuted view here instead of one per ravel() below
        img = np.ascontiguousarray(
            _to_cache_dtype(image.array, opts["image_dtype"], job.case.image)
        )
        lab = None if label is None else np.ascontiguousarray(label.array)
        seed = np.random.SeedSequence([opts["seed"], zlib.crc32(job.case.id.encode())])
        stats, fg_idx, fg_cls = _case_stats(
            img, lab, rng=np.random.default_rng(seed), n_foreground=opts["n_foreground"]
        )
        record: dict[str, Any] = {
            "dir": job.dir_name,
            "fingerprint": job.fingerprint,
            "sources": job.sources,
            "shape": list(img.shape),
            "dtype": img.dtype.str,
            "spacing": list(image.spacing),
            "origin": list(image.origin),
            "direction": image.direction.tolist(),
            "reorientation": reorientation.to_record(),
            "has_label": lab is not None,
            "pad_value": float(img.min()),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, DataWarning)],
            **stats,
        }
        tmp = root / ".tmp" / f"{job.dir_name}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        group = zarr.create_group(str(tmp), zarr_format=3, attributes={"voxaug_case": record})
        shards = tuple(c * math.ceil(n / c) for n, c in zip(img.shape, CACHE_CHUNKS, strict=True))
        for name, data in (("image", img), ("label", lab)):
            if data is None:
                continue
            group.create_array(
                name,
                data=np.ascontiguousarray(data),
                chunks=CACHE_CHUNKS,
                shards=shards,
                compressors=BloscCodec(**_BLOSC),
                fill_value=0,
                dimension_names=("z", "y", "x"),
            )
        group.create_array(
            "foreground",
            data=fg_idx,
            chunks=(max(1, len(fg_idx)), 3),
            dimension_names=("sample", "axis"),
        )
        group.create_array(
            "foreground_class",
            data=fg_cls,
            chunks=(max(1, len(fg_cls)),),
            dimension_names=("sample",),
        )
        final = root / job.dir_name
        if final.exists():  # an orphan from an interrupted build; never referenced
            shutil.rmtree(final)
        os.rename(tmp, final)
    record["voxel_bytes"] = int(img.nbytes + (0 if lab is None else lab.nbytes))
    return record


def _fingerprint(
    options: dict[str, Any], sources: dict[str, SourceDigest | None], case: Case
) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "chunks": CACHE_CHUNKS,
        "codec": _BLOSC,
        "options": options,
        "labels": None if case.labels is None else list(case.labels),
        "image": sources["image"]["sha256"] if sources["image"] else None,
        "label": sources["label"]["sha256"] if sources["label"] else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_root(dataset_root: str | os.PathLike[str]) -> Path:
    """The cache folder of a dataset folder when none is given: its name plus ``.zarr``,
    beside it (``data/ds_v1.2`` -> ``data/ds_v1.2.zarr``; ``with_suffix`` would give two
    versions of a dataset one ``ds_v1.zarr``)."""
    root = Path(dataset_root)
    if root.name in ("", ".."):  # "." or "..": name the folder they stand for
        root = Path(os.path.abspath(root))
    return root.parent / (root.name + ".zarr")


# ------------------------------------------------------------------------------ cache
class VolumeCache:
    """A chunked, compressed, atomic and incremental zarr v3 cache of a dataset.

    Build once with ``build(cases)``; then any number of processes (spawned or forked
    ``DataLoader`` workers included) open it with ``VolumeCache(root)`` and read regions.
    The object pickles as its root and options (no open maps, pools or cached chunks).

    Args:
        root: the cache folder (created by ``build``), or the URL of a cache on object
            storage (``s3://bucket/path``; ``http(s)://`` read-only; see ``loaders.remote``).
        storage_options: for a URL, the options of its fsspec filesystem (s3fs:
            ``endpoint_url``, ``key``, ``secret``, ``anon``, ``config_kwargs``, ...).
        cache_bytes: byte budget of this process's LRU of decoded chunks (0 disables it).
        threads: chunk-decoding threads per ``read_region`` call (1: the calling thread;
            keep 1 inside multi-process loaders).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        cache_bytes: int = 256 << 20,
        threads: int = 1,
    ):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        # a folder, or the URL (a str) of a remote cache
        self.root: Path | str = str(root).rstrip("/") if is_url(root) else Path(root)
        self.storage_options = dict(storage_options or {})
        if self.storage_options and not isinstance(self.root, str):
            raise ValueError(f"storage_options are for a URL, not the folder {self.root}")
        self.cache_bytes = int(cache_bytes)
        self.threads = int(threads)
        self._init_state()

    def _init_state(self) -> None:
        self._remote = (
            RemoteRoot(self.root, self.storage_options) if isinstance(self.root, str) else None
        )
        self._lru = ChunkLRU(self.cache_bytes)
        self._readers: dict[tuple[str, str], ArrayReader] = {}
        self._infos: dict[str, CaseInfo] = {}
        self._pool: Executor | None = None
        self._pool_pid = -1
        self._manifest: dict[str, Any] | None = None
        self.refresh()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "storage_options": self.storage_options,
            "cache_bytes": self.cache_bytes,
            "threads": self.threads,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    def close(self) -> None:
        """Release this process's memory maps, decoded chunks and decoding threads (the
        cache stays usable: they come back on the next read)."""
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._lru.clear()
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None

    def __enter__(self) -> VolumeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._other_format is not None:
            return f"VolumeCache({str(self.root)!r}, {self._other_format.problem})"
        return f"VolumeCache({str(self.root)!r}, cases={len(self.cases)}, complete={self.complete})"

    # ------------------------------------------------------------------ manifest / info
    def refresh(self) -> None:
        """Re-read the manifest (to see a build that finished since this was opened)."""
        self._other_format: CacheError | None = None
        try:
            if self._remote is None:
                self._manifest = _read_manifest(Path(self.root))
            else:
                text = self._remote.read_root()
                where = self._remote.describe("zarr.json")
                self._manifest = None if text is None else _parse_manifest(text, where)
        except _OtherFormat as exc:  # refused by every read, replaced by build()
            self._manifest, self._other_format = None, exc
        if self._remote is not None and self._manifest is not None:
            if not self._manifest.get("complete"):
                raise CacheError(
                    where,
                    "the manifest says this cache is incomplete (a local build that was "
                    "interrupted or failed, copied as it was): copy a complete cache there, "
                    "or remove this zarr.json and build with VolumeCache(url).build(...), "
                    "which publishes complete caches only",
                )
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._infos.clear()
        self._lru.clear()

    def _entries(self) -> dict[str, Any]:
        if self._other_format is not None:
            raise CacheError(self._other_format.path, self._other_format.problem)
        return {} if self._manifest is None else self._manifest["cases"]

    def _entry(self, case: str) -> dict[str, Any]:
        entries = self._entries()
        if case not in entries:
            if self._manifest is None:
                raise CacheError(
                    self.root, "no volume cache here (no zarr.json); run VolumeCache.build first"
                )
            some = ", ".join(sorted(entries)[:5])
            raise KeyError(
                f"case {case!r} is not in the cache at {self.root} "
                f"({len(entries)} cases: {some}{', ...' if len(entries) > 5 else ''})"
            )
        return entries[case]

    @property
    def cases(self) -> tuple[str, ...]:
        """Ids of the cases readers can use, sorted."""
        return tuple(sorted(self._entries()))

    @property
    def dataset(self) -> dict[str, Any] | None:
        """What the last build was told the dataset declares (``build(dataset=...)``), or
        None."""
        return None if self._manifest is None else self._manifest.get("dataset")

    @property
    def complete(self) -> bool:
        """False while a build runs or after one was interrupted or failed."""
        return bool(self._manifest and self._manifest.get("complete"))

    def __contains__(self, case: object) -> bool:
        return case in self._entries()

    def __len__(self) -> int:
        return len(self._entries())

    def shape(self, case: str) -> tuple[int, int, int]:
        """Array shape (z, y, x) of a case."""
        return tuple(self._entry(case)["shape"])

    def spacing(self, case: str) -> tuple[float, float, float]:
        """Voxel spacing (z, y, x) in mm of a case."""
        return tuple(self._entry(case)["spacing"])

    def has_label(self, case: str) -> bool:
        return bool(self._entry(case)["has_label"])

    def info(self, case: str) -> CaseInfo:
        """Geometry, statistics and sampled foreground indices of a case (cached)."""
        got = self._infos.get(case)
        if got is not None:
            return got
        e = self._entry(case)
        fg_idx = self._small_array(e, "foreground", np.int32, (0, 3))
        fg_cls = self._small_array(e, "foreground_class", np.uint8, (0,))
        bbox = e["fg_bbox"]
        info = CaseInfo(
            id=case,
            shape=tuple(e["shape"]),
            spacing=tuple(e["spacing"]),
            origin=tuple(e["origin"]),
            direction=np.array(e["direction"], dtype=np.float64),
            dtype=np.dtype(e["dtype"]),
            has_label=bool(e["has_label"]),
            fg_bbox=None if bbox is None else tuple(tuple(b) for b in bbox),  # type: ignore[arg-type]
            class_voxels={int(k): int(v) for k, v in e["class_voxels"].items()},
            intensity=e["intensity"],
            fg_intensity=e["fg_intensity"],
            fg_indices=fg_idx,
            fg_classes=fg_cls,
            pad_value=float(e["pad_value"]),
            source_image=e["sources"]["image"]["path"],
            source_label=(e["sources"]["label"] or {}).get("path"),
            fingerprint=e["fingerprint"],
            reorientation=Reorientation.from_record(e["reorientation"]),
            warnings=tuple(e.get("warnings", ())),
        )
        info.direction.setflags(write=False)
        self._infos[case] = info
        return info

    def _small_array(self, e: dict[str, Any], name: str, dtype: type, empty: tuple[int, ...]):
        import zarr

        if self._remote is not None:
            got: np.ndarray = np.asarray(self._remote.small_array(e["dir"], name), dtype=dtype)
            got.setflags(write=False)
            return got if got.size else np.zeros(empty, dtype)
        path = Path(self.root) / e["dir"] / name
        try:
            arr: np.ndarray = np.asarray(zarr.open_array(str(path), mode="r")[...], dtype=dtype)
        except FileNotFoundError:
            raise CacheError(path, "missing (cache rebuilt or removed?); call refresh()") from None
        arr.setflags(write=False)
        return arr if arr.size else np.zeros(empty, dtype)

    # --------------------------------------------------------------------------- reads
    def _reader(self, case: str, array: str) -> ArrayReader:
        key = (case, array)
        reader = self._readers.get(key)
        if reader is None:
            if array not in ARRAYS:
                raise ValueError(f"array must be one of {ARRAYS}, got {array!r}")
            e = self._entry(case)
            if array == "label" and not e["has_label"]:
                raise CacheError(f"{self.root}/{e['dir']}", f"case {case!r} has no label")
            source = (
                Path(self.root) / e["dir"] / array
                if self._remote is None
                else self._remote.array_source(e["dir"], array)
            )
            reader = ArrayReader(source, lru=self._lru, key=(e["dir"], array))
            self._readers[key] = reader
        return reader

    def _executor(self) -> Executor | None:
        if self.threads <= 1:
            return None
        if self._pool is None or self._pool_pid != os.getpid():  # none yet, or forked
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="volcache")
            self._pool_pid = os.getpid()
        return self._pool

    def read_region(
        self,
        case: str,
        region: Region,
        *,
        array: str = "image",
        pad_value: float | None = None,
        out: np.ndarray | None = None,
        taps: tuple[np.ndarray, Sequence[int], float] | None = None,
    ) -> np.ndarray:
        """Read a box of voxels, padding where it extends past the volume.

        Only the chunks that intersect the box are read and decoded.

        Args:
            case: case id.
            region: three slices (step 1) or ``(start, stop)`` triples, in (z, y, x);
                bounds are absolute (negative or past-the-end means padding, see
                ``Region``).
            array: ``"image"`` or ``"label"``.
            pad_value: value outside the volume; default the image minimum
                (``info(case).pad_value``) for images and 0 for labels.
            out: optional destination of the region's shape and the array's dtype.
            taps: ``(matrix, out_shape, margin)`` of the patch the region is read for (pull
                map from patch index to volume index, (3, 4)); voxels that no tap of that
                patch reads may then be left at the array's fill value instead of decoded
                (``ArrayReader.read_into``). None: every voxel is read.

        Returns:
            An array of exactly the region's shape (``out`` if given).
        """
        for attempt in (0, 1):
            try:
                return self._read_region(case, region, array, pad_value, out, taps)
            except CacheError as exc:
                if attempt or "removed while open" not in exc.problem:
                    raise
                self.refresh()  # the case was rebuilt since we opened it: follow it
        raise AssertionError("unreachable")

    def _read_region(self, case, region, array, pad_value, out, taps) -> np.ndarray:
        reader = self._reader(case, array)
        start, stop = parse_region(region, reader.shape)
        shape = tuple(b - a for a, b in zip(start, stop, strict=True))
        if out is None:
            out = np.empty(shape, reader.dtype)
        elif out.shape != shape or out.dtype != reader.dtype:
            raise ValueError(
                f"out has shape {out.shape} and dtype {out.dtype}; the region "
                f"needs {shape} and {reader.dtype}"
            )
        lo = [max(a, 0) for a in start]
        hi = [min(b, n) for b, n in zip(stop, reader.shape, strict=True)]
        inside = all(h > lo_ for lo_, h in zip(lo, hi, strict=True))
        if not inside or lo != list(start) or hi != list(stop):
            if pad_value is None:
                pad_value = self._entry(case)["pad_value"] if array == "image" else 0
            _check_pad(pad_value, out.dtype)
            out.fill(pad_value)
        if inside:
            sub = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
            reader.read_into(
                lo, hi, out[sub], pool=self._executor(), threads=self.threads, taps=taps
            )
        return out

    def prefetch_region(
        self,
        case: str,
        region: Region,
        *,
        array: str = "image",
        taps: tuple[np.ndarray, Sequence[int], float] | None = None,
    ) -> None:
        """Start fetching the chunks ``read_region(case, region, array=array)`` will need
        and return without waiting (a remote cache; a local one does nothing). Image and
        label regions prefetched one after the other travel in one batch of requests.

        Args:
            case, region, array, taps: as for ``read_region``.
        """
        if self._remote is None:
            return
        reader = self._reader(case, array)
        start, stop = parse_region(region, reader.shape)
        lo = [max(a, 0) for a in start]
        hi = [min(b, n) for b, n in zip(stop, reader.shape, strict=True)]
        if all(h > a for a, h in zip(lo, hi, strict=True)):
            reader.prefetch(lo, hi, taps=taps)

    def read(self, case: str, *, array: str = "image") -> np.ndarray:
        """A whole array of a case."""
        return self.read_region(case, (slice(None),) * 3, array=array)

    def cache_stats(self) -> dict[str, int]:
        """This process's decoded-chunk LRU: entries, nbytes, budget, hits, misses."""
        return self._lru.stats()

    # --------------------------------------------------------------------------- build
    def _check_root(self) -> None:
        """Create the cache folder, or check that an existing one is a cache."""
        root = Path(self.root)
        root.mkdir(parents=True, exist_ok=True)
        if (root / "zarr.json").exists():
            try:
                _read_manifest(root)  # raises unless it is a volume cache
            except _OtherFormat:
                pass  # replaced by the build
        elif any(p.name != ".tmp" for p in root.iterdir()):
            raise CacheError(
                root, "exists, is not empty and is not a volume cache; refusing to write into it"
            )

    def build(
        self,
        cases: Iterable[Case],
        *,
        workers: int | None = None,
        label_map: LabelMap | None = None,
        spacing: Sequence[float] | None = None,
        image_dtype: str = "auto",
        allow_empty_label: bool = False,
        n_foreground: int = 10_000,
        seed: int = 0,
        progress: bool = True,
        force: bool = False,
        dataset: dict[str, Any] | None = None,
    ) -> BuildReport:
        """Convert cases into the cache (incrementally and atomically, see the module doc).

        A cache at an ``s3://`` URL is built in a local staging folder and uploaded, its
        manifest published last (``loaders.remote_build``); a failed build publishes nothing.

        Args:
            cases: the dataset (e.g. ``msd_cases(root)``); ids must be unique. After the
                build the cache holds exactly these cases.
            workers: processes converting cases (spawn start method); None: one per
                core (at most one per case); 1: in this process. Each worker holds one
                case's volumes in memory.
            label_map: applied to labels before storing (e.g. ``liver_label``); a
                module-level function or a dict, so that workers can unpickle it.
            spacing: resample to this spacing (z, y, x) in mm (after the reorientation
                onto the canonical grid, which every case gets).
            image_dtype: ``"auto"`` (int16 for integer-valued images in range, as CT;
                else the source dtype, float64 as float32) or an explicit dtype.
            allow_empty_label: accept labels with no foreground.
            n_foreground: foreground voxel indices sampled per class for ``info()``.
            seed: seed of that sampling (per case: ``SeedSequence([seed, crc32(id)])``).
            progress: show a tqdm progress bar.
            force: rebuild every case even if unchanged.
            dataset: what the dataset declares beyond its files (JSON-able, e.g. the label
                names and the modality of dataset.json), kept in the manifest as
                :attr:`dataset`, so that a process without the dataset folder (another
                node) can read it from the cache.

        Returns:
            A ``BuildReport``.

        Raises:
            DatasetError: duplicate case ids.
            VolumeError, CaseError: a case failed, e.g. an oblique volume or undeclared
                label values (the first failure is raised after the other cases
                finished; they stay in the cache).
            CacheError: several cases failed, or the root is not a cache folder.
        """
        if self._remote is not None:  # built in a local staging folder, then published
            report = build_remote(
                self._remote,
                lambda staging: VolumeCache(staging).build(
                    cases,
                    workers=workers,
                    label_map=label_map,
                    spacing=spacing,
                    image_dtype=image_dtype,
                    allow_empty_label=allow_empty_label,
                    n_foreground=n_foreground,
                    seed=seed,
                    progress=progress,
                    force=force,
                    dataset=dataset,
                ),
            )
            self.refresh()
            return report
        t0 = time.perf_counter()
        cases = list(cases)
        seen: dict[str, Case] = {}
        for c in cases:
            if c.id in seen:
                raise DatasetError(c.image, f"duplicate case id {c.id!r} (also {seen[c.id].image})")
            seen[c.id] = c
        options = {
            "spacing": None if spacing is None else [float(s) for s in spacing],
            "label_map": label_map_key(label_map),
            "image_dtype": str(image_dtype),
            "allow_empty_label": bool(allow_empty_label),
            "n_foreground": int(n_foreground),
            "seed": int(seed),
        }
        refuse_while_bootstrapping("VolumeCache.build")  # it would wait for the parent's lock
        self._check_root()
        root = Path(self.root)
        with _flock(root, exclusive=True):
            tmp = root / ".tmp"
            if tmp.exists():
                # Workers orphaned by a killed build hold .tmp shared until their case is
                # written: let them finish before clearing it.
                with _flock(tmp, exclusive=True):
                    shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                fresh = _read_manifest(root) is None
            except _OtherFormat:
                fresh = True  # its cases are rebuilt, its folders removed at the end
            if fresh:
                _write_manifest(root, {"format": CACHE_FORMAT, "complete": False, "cases": {}})
            self.refresh()
            old = dict(self._entries())

            def digests(case: Case) -> dict[str, SourceDigest | None]:
                prev = old.get(case.id, {}).get("sources", {})
                return {
                    "image": digest_source(case.image, prev.get("image")),
                    "label": None
                    if case.label is None
                    else digest_source(case.label, prev.get("label")),
                }

            for c in cases:
                for p in (c.image, c.label):
                    if p is not None and not p.exists():
                        raise VolumeNotFoundError(p, f"no such file (case {c.id!r})")
            with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
                sources = dict(zip(seen, ex.map(digests, cases), strict=True))
            jobs, kept = [], []
            for c in cases:
                fp = _fingerprint(options, sources[c.id], c)
                prev = old.get(c.id)
                if (
                    not force
                    and prev is not None
                    and prev["fingerprint"] == fp
                    and (root / prev["dir"]).is_dir()
                ):
                    kept.append(c.id)
                    old[c.id] = {**prev, "sources": sources[c.id]}  # fresh stat signatures
                    continue
                name = f"{c.id}@{fp[:12]}-{uuid.uuid4().hex[:6]}"
                jobs.append(_Job(c, str(root), name, fp, sources[c.id], options, label_map))
            manifest: dict[str, Any] = {
                "format": CACHE_FORMAT,
                "complete": False,
                "options": options,
                "dataset": dataset,
                "cases": old,
            }
            _write_manifest(root, manifest)
            built, errors, voxel_bytes = [], [], 0
            last_write = time.perf_counter()
            bar = tqdm(
                total=len(jobs),
                desc=f"caching {root.name}",
                unit="case",
                disable=not progress or not jobs,
            )
            try:
                for job, result in self._run_jobs(jobs, workers):
                    if isinstance(result, BaseException):
                        errors.append((job.case.id, result))
                    else:
                        voxel_bytes += result.pop("voxel_bytes")
                        for message in result["warnings"]:
                            warnings.warn(message, DataWarning, stacklevel=2)
                        manifest["cases"][job.case.id] = result
                        built.append(job.case.id)
                        if time.perf_counter() - last_write >= _MANIFEST_EVERY_S:
                            _write_manifest(root, manifest)
                            last_write = time.perf_counter()
                    bar.update()
            except BaseException:
                _write_manifest(root, manifest)  # publish the cases that did finish
                raise
            finally:
                bar.close()
            removed = sorted(set(old) - set(seen))
            manifest["cases"] = {
                cid: manifest["cases"][cid] for cid in seen if cid in manifest["cases"]
            }
            manifest["complete"] = not errors
            _write_manifest(root, manifest)
            referenced = {e["dir"] for e in manifest["cases"].values()}
            for d in root.iterdir():
                if d.is_dir() and "@" in d.name and d.name not in referenced:
                    shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(root / ".tmp", ignore_errors=True)
            self.refresh()
        if errors:
            if len(errors) == 1:
                raise errors[0][1]
            lines = "; ".join(str(e) for _, e in errors[:5])
            raise CacheError(root, f"{len(errors)} cases failed: {lines}") from errors[0][1]
        return BuildReport(
            tuple(built), tuple(kept), tuple(removed), time.perf_counter() - t0, voxel_bytes
        )

    @staticmethod
    def _run_jobs(jobs: list[_Job], workers: int | None):
        """Yield ``(job, record or exception)`` as cases finish."""
        n = min(len(jobs), workers if workers is not None else (os.cpu_count() or 1))
        if n <= 1:
            for job in jobs:
                try:
                    yield job, _build_case(job)
                except LoaderError as exc:
                    yield job, exc
            return
        from concurrent.futures import as_completed

        with spawn_executor(n) as ex:
            futures = {ex.submit(_build_case, job): job for job in jobs}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    yield job, fut.result()
                except LoaderError as exc:
                    yield job, exc
                except BrokenProcessPool:
                    raise CacheError(
                        job.case.image,
                        f"a build worker process died while converting case {job.case.id!r} "
                        "(killed or out of memory; or it could not start: with the spawn "
                        "start method the main module must be importable, so guard the "
                        "script with `if __name__ == '__main__':`)",
                    ) from None
