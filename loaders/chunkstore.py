"""Region reads from local zarr v3 arrays, touching only the chunks a region needs.

zarr-python spends tens of microseconds of Python per chunk; for 160^3 patch reads that
dominates (BENCHMARKS.md, W5). ``ArrayReader`` therefore reads the layouts the volume cache
writes itself: it parses the array's ``zarr.json``, memory-maps each shard file once per
process, looks inner chunks up in the shard index and decodes them with numcodecs' blosc
(which releases the GIL), optionally on a thread pool and through a byte-budgeted LRU of
decoded chunks. Supported without zarr: regular grid, default chunk keys, and codecs
``[bytes, blosc]`` or ``[sharding_indexed([bytes, blosc], index [bytes, crc32c?])]``.
Any other valid zarr v3 array is read through ``zarr`` itself (same results, slower).

Where the bytes come from is a ``ByteSource``: ``LocalSource`` memory-maps local shard files
(the fast path); ``loaders.remote`` fetches byte ranges from object storage. The layout,
the shard index (fetched once per array and kept), the checks and the decoding are the same
code for both.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numcodecs import blosc

from loaders import region_decode
from loaders.errors import CacheError

__all__ = ["ArrayReader", "ByteSource", "ChunkLRU", "LocalSource", "Region", "parse_region"]

Region = tuple[slice, slice, slice] | tuple[Sequence[int], Sequence[int]]
"""A box of voxels in (z, y, x): three slices (step 1), or ``(start, stop)`` triples.

Bounds are absolute voxel coordinates: negative starts and stops past the shape mean
"outside the volume" (padded), never Python's wrap-around. ``slice(None)`` is the full
extent of that axis.
"""

_EMPTY = (1 << 64) - 1  # shard-index marker of an absent inner chunk
_UNMAPPED = np.empty(0, np.uint8)  # a present shard whose chunks are fetched, not mapped


def parse_region(
    region: Region, shape: Sequence[int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Normalise a ``Region`` to ``(start, stop)`` integer triples with stop >= start.

    Raises:
        ValueError: not 3 axes, a step other than 1, non-integer bounds, stop < start.
    """
    items: tuple[Any, ...] = tuple(region)
    start: list[Any]
    stop: list[Any]
    if len(items) == 3 and all(isinstance(s, slice) for s in items):
        start, stop = [], []
        for ax, s in enumerate(items):
            if s.step not in (None, 1):
                raise ValueError(f"region slice {s!r} on axis {ax} has step {s.step}; only 1")
            start.append(0 if s.start is None else s.start)
            stop.append(shape[ax] if s.stop is None else s.stop)
    elif len(items) == 2 and all(not isinstance(s, slice) and len(s) == 3 for s in items):
        start, stop = list(items[0]), list(items[1])
    else:
        raise ValueError(
            f"region must be 3 slices or (start, stop) triples in (z, y, x), got {region!r}"
        )
    try:
        a = tuple(int(v) for v in start)
        b = tuple(int(v) for v in stop)
    except (TypeError, ValueError):
        raise ValueError(f"region bounds must be integers, got {region!r}") from None
    if any(int(v) != v for v in (*start, *stop)):
        raise ValueError(f"region bounds must be integers, got {region!r}")
    if any(e < s for s, e in zip(a, b, strict=True)):
        raise ValueError(f"region stop {b} is before start {a}")
    return (a[0], a[1], a[2]), (b[0], b[1], b[2])


@dataclass(slots=True)
class _LRUState:
    budget: int
    entries: OrderedDict[Hashable, np.ndarray] = field(default_factory=OrderedDict)
    nbytes: int = 0
    hits: int = 0
    misses: int = 0


class ChunkLRU:
    """A thread-safe least-recently-used store of decoded chunks within a byte budget.

    Args:
        budget_bytes: the most bytes of decoded chunks kept; 0 disables caching.
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self._s = _LRUState(int(budget_bytes))
        self._lock = threading.Lock()

    @property
    def budget(self) -> int:
        return self._s.budget

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            arr = self._s.entries.get(key)
            if arr is None:
                self._s.misses += 1
                return None
            self._s.entries.move_to_end(key)
            self._s.hits += 1
            return arr

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        """Keep ``arr`` (made read-only) unless it alone exceeds the budget."""
        if arr.nbytes > self._s.budget:
            return
        arr.setflags(write=False)
        with self._lock:
            s = self._s
            old = s.entries.pop(key, None)
            if old is not None:
                s.nbytes -= old.nbytes
            s.entries[key] = arr
            s.nbytes += arr.nbytes
            while s.nbytes > s.budget:
                _, dropped = s.entries.popitem(last=False)
                s.nbytes -= dropped.nbytes

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is kept (counts neither a hit nor a miss)."""
        return key in self._s.entries

    def clear(self) -> None:
        with self._lock:
            self._s.entries.clear()
            self._s.nbytes = 0

    def stats(self) -> dict[str, int]:
        """``{"entries", "nbytes", "budget", "hits", "misses"}``."""
        s = self._s
        return {
            "entries": len(s.entries),
            "nbytes": s.nbytes,
            "budget": s.budget,
            "hits": s.hits,
            "misses": s.misses,
        }


def _bytes_codec_ok(codec: dict, itemsize: int) -> bool:
    if codec.get("name") != "bytes":
        return False
    endian = (codec.get("configuration") or {}).get("endian", "little")
    return endian == "little" or itemsize == 1


@dataclass(frozen=True)
class _Layout:
    chunk_shape: tuple[int, ...]  # the decoded unit (inner chunk when sharded)
    shard_shape: tuple[int, ...] | None  # None: one file per chunk
    index_at_end: bool = True
    index_crc: bool = True


def _fast_layout(meta: dict, dtype: np.dtype) -> _Layout | None:
    """The layout if the array can be read without zarr, else None."""
    try:
        if meta.get("storage_transformers"):
            return None
        grid = meta["chunk_grid"]
        key = meta["chunk_key_encoding"]
        if grid["name"] != "regular" or key["name"] != "default":
            return None
        if (key.get("configuration") or {}).get("separator", "/") != "/":
            return None
        outer = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            inner_codecs = conf["codecs"]
            index_codecs = conf.get("index_codecs", [{"name": "bytes"}, {"name": "crc32c"}])
            names = [c["name"] for c in index_codecs]
            if names not in (["bytes", "crc32c"], ["bytes"]):
                return None
            if not _bytes_codec_ok(index_codecs[0], 8):
                return None
            inner = tuple(int(n) for n in conf["chunk_shape"])
            if len(inner) != 3 or any(o % i for o, i in zip(outer, inner, strict=True)):
                return None
            layout = _Layout(
                inner, outer, conf.get("index_location", "end") == "end", names[-1] == "crc32c"
            )
        else:
            inner_codecs = codecs
            layout = _Layout(outer, None)
        if len(layout.chunk_shape) != 3 or len(inner_codecs) != 2:
            return None
        if not _bytes_codec_ok(inner_codecs[0], dtype.itemsize):
            return None
        if inner_codecs[1]["name"] != "blosc":
            return None
        return layout
    except (KeyError, TypeError, ValueError):
        return None


class ByteSource(Protocol):
    """Where the bytes of one zarr v3 array come from. Keys are relative to the array
    (``"zarr.json"``, ``"c/0/1/2"``)."""

    @property
    def location(self) -> str:
        """The array's folder or URL, for messages."""
        ...

    @property
    def mapped(self) -> bool:
        """True when ``read_index`` hands out the whole shard (memory-mapped), so chunk bytes
        are sliced from it; False when chunks are fetched with ``read_ranges``."""
        ...

    def describe(self, key: str) -> str:
        """The file or URL of ``key``, for messages."""
        ...

    def read(self, key: str) -> bytes | None:
        """A whole object, or None where it does not exist."""
        ...

    def read_index(self, key: str, nbytes: int, at_end: bool) -> tuple[Any, bytes] | None:
        """The last (``at_end``) or first ``nbytes`` of a shard, and the whole shard when
        ``mapped`` (else None in its place); None where the shard does not exist.

        Raises:
            CacheError: the shard is empty or shorter than ``nbytes``.
        """
        ...

    def read_ranges(self, requests: Sequence[tuple[str, int, int | None]]) -> list[Any]:
        """Bytes ``[start, stop)`` of each ``(key, start, stop)`` (``stop`` None: to the
        end); None where the key does not exist."""
        ...

    def prefetch(self, requests: Sequence[tuple[str, int, int | None]]) -> None:
        """Start fetching these ranges for a ``read_ranges`` soon after (unmapped sources; a
        mapped one does nothing). Returns at once, raises nothing."""
        ...

    def open_zarr(self) -> Any:
        """The array opened read-only with zarr-python (layouts read without the fast path)."""
        ...


class LocalSource:
    """A local array folder; shard files are memory-mapped (by ``read_index``).

    Args:
        path: the array's folder (holding its ``zarr.json``).
    """

    mapped = True

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @property
    def location(self) -> str:
        return str(self.path)

    def describe(self, key: str) -> str:
        return str(self.path.joinpath(*key.split("/")))

    def read(self, key: str) -> bytes | None:
        try:
            with open(self.path.joinpath(*key.split("/")), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read_index(self, key: str, nbytes: int, at_end: bool) -> tuple[Any, bytes] | None:
        fpath = self.path.joinpath(*key.split("/"))
        try:
            fd = os.open(fpath, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            raise CacheError(fpath, "shard file is empty (truncated?)") from None
        finally:
            os.close(fd)
        if len(m) < nbytes:
            raise CacheError(
                fpath,
                f"shard file is {len(m)} bytes, shorter than its {nbytes}-byte index (truncated?)",
            )
        off = len(m) - nbytes if at_end else 0
        return m, m[off : off + nbytes]

    def read_ranges(self, requests: Sequence[tuple[str, int, int | None]]) -> list[Any]:
        out: list[Any] = []
        for key, start, stop in requests:
            try:
                with open(self.path.joinpath(*key.split("/")), "rb") as fh:
                    fh.seek(start)
                    out.append(fh.read() if stop is None else fh.read(stop - start))
            except FileNotFoundError:
                out.append(None)
        return out

    def prefetch(self, requests: Sequence[tuple[str, int, int | None]]) -> None:
        """Nothing: chunks are sliced from the memory map."""

    def open_zarr(self) -> Any:
        import zarr

        return zarr.open_array(str(self.path), mode="r")


class ArrayReader:
    """Region reads from one zarr v3 array (3D, numeric).

    Args:
        path: the array's local folder (holding its ``zarr.json``), or a ``ByteSource``
            (``loaders.remote`` gives one for arrays on object storage).
        lru: a shared ``ChunkLRU`` for decoded chunks, or None.
        key: a hashable naming this array in the LRU (default: its location).
        compiled: decode local sharded regions read without an LRU in one compiled loop
            (``loaders.region_decode``); False decodes chunk by chunk through numcodecs.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | ByteSource,
        *,
        lru: ChunkLRU | None = None,
        key: Hashable | None = None,
        compiled: bool = True,
    ):
        self.source: ByteSource = (
            LocalSource(path) if isinstance(path, (str, os.PathLike)) else path
        )
        self.location = self.source.location
        meta_path = self.source.describe("zarr.json")
        raw = self.source.read("zarr.json")
        if raw is None:
            raise CacheError(meta_path, "array metadata missing (cache rebuilt or removed?)")
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(meta_path, f"corrupt array metadata: {exc}") from None
        if (
            not isinstance(meta, dict)
            or meta.get("zarr_format") != 3
            or meta.get("node_type") != "array"
        ):
            raise CacheError(meta_path, "not a zarr v3 array")
        dt = meta.get("data_type")
        try:
            self.dtype = np.dtype(dt) if isinstance(dt, str) else None
        except TypeError:
            self.dtype = None
        shape = tuple(int(n) for n in meta.get("shape", ()))
        if self.dtype is None or self.dtype.kind not in "biuf" or len(shape) != 3:
            raise CacheError(
                meta_path, f"expected a 3D numeric array, got data_type {dt!r} and shape {shape}"
            )
        self.shape: tuple[int, int, int] = shape
        self.fill_value = np.array(meta.get("fill_value", 0) or 0).astype(self.dtype)
        self._disk_dtype = self.dtype.newbyteorder("<")  # what the bytes codec stores
        self._layout = _fast_layout(meta, self._disk_dtype)
        # inner chunks per shard along each axis (sharded layouts)
        lay = self._layout
        self._per_shard = (
            tuple(s // c for s, c in zip(lay.shard_shape, lay.chunk_shape, strict=True))
            if lay is not None and lay.shard_shape is not None
            else (1, 1, 1)
        )
        self.dtype = self.dtype.newbyteorder("=")
        self._lru = lru if lru is not None and lru.budget > 0 else None
        self._key = key if key is not None else self.location
        self.compiled = compiled and region_decode.AVAILABLE
        # per shard: (the whole shard when the source maps it, else None; its index)
        self._shards: dict[tuple[int, ...], tuple[Any, list[list[int]] | None]] = {}
        # per mapped shard: (its bytes as a uint8 array or None when absent, its index array)
        self._shard_arrays: dict[tuple[int, ...], tuple[np.ndarray | None, np.ndarray]] = {}
        self._shard_lock = threading.Lock()
        self._zarr = None

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """The decoded unit: the inner chunk shape when sharded."""
        if self._layout is None:
            return tuple(self._zarr_array().chunks)
        return self._layout.chunk_shape

    @property
    def uses_zarr(self) -> bool:
        """True when this array's layout is read through zarr-python (the slow path)."""
        return self._layout is None

    def _zarr_array(self):
        if self._zarr is None:
            self._zarr = self.source.open_zarr()
        return self._zarr

    def close(self) -> None:
        """Unmap the shard files and forget the shard indexes (read again when needed)."""
        with self._shard_lock:
            self._shard_arrays.clear()  # drop the arrays that export the maps first
            for whole, _ in self._shards.values():
                if isinstance(whole, mmap.mmap):
                    try:
                        whole.close()
                    except BufferError:  # a read in another thread still uses it: GC later
                        pass
            self._shards.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter teardown: nothing left to release
            pass

    # -- the fast path ------------------------------------------------------------------
    def _gone(self) -> CacheError:
        return CacheError(self.location, "array removed while open (cache rebuilt?); reopen it")

    def _shard(self, sidx: tuple[int, ...]) -> tuple[Any, list[list[int]] | None]:
        got = self._shards.get(sidx)
        if got is not None:
            return got
        with self._shard_lock:
            got = self._shards.get(sidx)
            if got is not None:
                return got
            layout = self._layout
            assert layout is not None and layout.shard_shape is not None
            key = "c/" + "/".join(map(str, sidx))
            n = int(np.prod(self._per_shard))
            size = n * 16 + (4 if layout.index_crc else 0)
            found = self.source.read_index(key, size, layout.index_at_end)
            if found is None:
                if self.source.read("zarr.json") is None:
                    raise self._gone()
                got = (None, None)  # an absent shard: all fill value
            else:
                whole, raw = found
                if len(raw) != size:
                    raise CacheError(
                        self.source.describe(key),
                        f"shard is shorter than its {size}-byte index (truncated?)",
                    )
                if layout.index_crc:
                    self._check_crc(self.source.describe(key), raw[: n * 16], raw[n * 16 :])
                index = np.frombuffer(raw, dtype="<u8", count=2 * n).reshape(n, 2).tolist()
                got = (whole, index)
            self._shards[sidx] = got
            return got

    @staticmethod
    def _check_crc(where: str, raw: bytes, crc: bytes) -> None:
        try:
            import google_crc32c
        except ImportError:  # zarr's own dependency; without it, skip the check
            return
        if google_crc32c.value(bytes(raw)) != int.from_bytes(crc, "little"):
            raise CacheError(where, "shard index checksum mismatch (corrupt or partly written)")

    def _locate(self, cidx: tuple[int, int, int]) -> tuple[tuple[int, ...], Any, int, int] | None:
        """``(shard index, whole shard or None, offset, nbytes)`` of a sharded chunk, or None
        where it is absent (fill value)."""
        pz, py, px = self._per_shard
        cz, cy, cx = cidx
        sidx = (cz // pz, cy // py, cx // px)
        whole, index = self._shard(sidx)
        if index is None:
            return None
        offset, nbytes = index[((cz % pz) * py + cy % py) * px + cx % px]
        if offset == _EMPTY:
            return None
        return sidx, whole, offset, nbytes

    def _chunk_bytes(self, cidx: tuple[int, int, int]):
        layout = self._layout
        assert layout is not None
        if layout.shard_shape is None:
            buf = self.source.read("c/" + "/".join(map(str, cidx)))
            if buf is None and self.source.read("zarr.json") is None:
                raise self._gone()
            return buf
        # _locate inlined: this is the per-chunk path of local reads
        pz, py, px = self._per_shard
        cz, cy, cx = cidx
        sidx = (cz // pz, cy // py, cx // px)
        whole, index = self._shard(sidx)
        if index is None:
            return None
        offset, nbytes = index[((cz % pz) * py + cy % py) * px + cx % px]
        if offset == _EMPTY:
            return None
        if whole is not None:
            return memoryview(whole)[offset : offset + nbytes]
        buf = self.source.read_ranges([("c/" + "/".join(map(str, sidx)), offset, offset + nbytes)])[
            0
        ]
        if buf is None:
            raise self._gone()
        return buf

    def _mapped_shard(self, sidx: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray]:
        """A shard as arrays: its bytes (None where absent, ``_UNMAPPED`` from a source
        that fetches chunks) and its index, uint64 ``(chunks per shard, 2)``."""
        got = self._shard_arrays.get(sidx)
        if got is None:
            whole, index = self._shard(sidx)
            n = int(np.prod(self._per_shard))
            if index is None:
                got = (None, np.full((n, 2), region_decode.EMPTY, np.uint64))
            elif whole is None:  # an unmapped source: chunks are fetched
                got = (_UNMAPPED, np.array(index, np.uint64))
            else:
                got = (np.frombuffer(whole, np.uint8), np.array(index, np.uint64))
            self._shard_arrays[sidx] = got
        return got

    def _needed(
        self,
        start: Sequence[int] | np.ndarray,
        stop: Sequence[int] | np.ndarray,
        taps: tuple[np.ndarray, Sequence[int], float] | None,
    ) -> np.ndarray:
        """uint8, one per chunk the region touches: 0 where no tap of ``taps`` reads it."""
        assert self._layout is not None
        chunk = np.array(self._layout.chunk_shape, np.int64)
        st, sp = np.array(start, np.int64), np.array(stop, np.int64)
        if taps is None:
            n = (sp - 1) // chunk - st // chunk + 1
            return np.ones((int(n[0]), int(n[1]), int(n[2])), np.uint8)
        matrix, out_shape, margin = taps
        return region_decode.chunks_needed(
            np.ascontiguousarray(np.asarray(matrix, np.float64)[:3]),
            np.asarray(out_shape, np.int64),
            float(margin),
            st,
            sp,
            chunk,
        )

    def _split_tasks(self, tasks, start, stop, taps):
        """``(tasks a tap of taps reads, the others)``; all of them when ``taps`` is None."""
        if taps is None:
            return tasks, []
        assert self._layout is not None
        needed = self._needed(start, stop, taps)
        c0 = [a // c for a, c in zip(start, self._layout.chunk_shape, strict=True)]
        keep, skip = [], []
        for t in tasks:
            z, y, x = t[0]
            (keep if needed[z - c0[0], y - c0[1], x - c0[2]] else skip).append(t)
        return keep, skip

    def _read_compiled(
        self,
        start: Sequence[int],
        stop: Sequence[int],
        out: np.ndarray,
        pool: Executor | None,
        threads: int,
        taps: tuple[np.ndarray, Sequence[int], float] | None,
    ) -> bool:
        """``read_into`` through ``region_decode`` (a local sharded array, rows of ``out``
        contiguous); False where that path does not apply and nothing was done. Chunks in
        the LRU are copied from it; the others are decoded, into new buffers that go to the
        LRU when there is one."""
        layout = self._layout
        if (
            not self.compiled
            or layout is None
            or layout.shard_shape is None
            or out.dtype != self._disk_dtype
            or out.ndim != 3
            or out.size == 0
            or out.strides[2] != out.itemsize
            or min(out.strides) < 0
        ):
            return False
        chunk = np.array(layout.chunk_shape, np.int64)
        per = np.array(self._per_shard, np.int64)
        st, sp = np.array(start, np.int64), np.array(stop, np.int64)
        s0, s1 = st // chunk // per, (sp - 1) // chunk // per
        grid = s1 - s0 + 1
        k_all = int(np.prod(grid))
        views: list[np.ndarray] = []  # keep the maps' arrays alive through the call
        bases = np.zeros(k_all, np.uint64)
        lengths = np.zeros(k_all, np.uint64)
        index = np.empty((k_all, int(np.prod(per)), 2), np.uint64)
        ranges = (range(int(a), int(b) + 1) for a, b in zip(s0, s1, strict=True))
        for k, sidx in enumerate(itertools.product(*ranges)):
            view, index[k] = self._mapped_shard(sidx)
            if view is _UNMAPPED:
                lengths[k] = region_decode.EMPTY  # present; its chunks come from a fetch
            elif view is not None and view.size:
                views.append(view)
                bases[k], lengths[k] = view.ctypes.data, view.size
        needed = self._needed(st, sp, taps)
        where = np.zeros(needed.shape, np.uint64)
        held: list[np.ndarray] = []  # LRU hits, alive through the call
        kept: list[tuple[Hashable, np.ndarray]] = []  # decoded here, for the LRU
        lru = self._lru
        if lru is not None:
            c0 = [int(v) for v in st // chunk]
            for i, j, k in zip(*np.nonzero(needed), strict=True):
                cidx = (c0[0] + int(i), c0[1] + int(j), c0[2] + int(k))
                key = (self._key, cidx)
                arr = lru.get(key)
                if arr is not None:
                    needed[i, j, k] = region_decode.CACHED
                    held.append(arr)
                elif not self._absent(cidx):
                    arr = np.empty(layout.chunk_shape, self._disk_dtype)
                    needed[i, j, k] = region_decode.KEEP
                    kept.append((key, arr))
                else:
                    continue
                where[i, j, k] = arr.ctypes.data
        src_at = np.zeros(needed.shape, np.uint64)
        src_len = np.zeros(needed.shape, np.uint64)
        if not self.source.mapped:  # fetch what is to be decoded, in one batch
            c0 = [int(v) for v in st // chunk]
            todo = (needed == region_decode.DECODE) | (needed == region_decode.KEEP)
            requests: list[tuple[str, int, int | None]] = []
            grid_at: list[tuple[int, int, int]] = []
            for i, j, k in zip(*np.nonzero(todo), strict=True):
                found = self._locate((c0[0] + int(i), c0[1] + int(j), c0[2] + int(k)))
                if found is not None:
                    sidx, _, offset, nbytes = found
                    requests.append(("c/" + "/".join(map(str, sidx)), offset, offset + nbytes))
                    grid_at.append((int(i), int(j), int(k)))
            for g, buf in zip(grid_at, self.source.read_ranges(requests), strict=True):
                if buf is None:
                    raise self._gone()  # the shard vanished since its index was read
                arr = np.frombuffer(buf, np.uint8)
                views.append(arr)
                src_at[g], src_len[g] = arr.ctypes.data, max(arr.size, 1)
        fill = self.fill_value
        args = (chunk, per, s0, grid, bases, lengths, index, needed, where, src_at, src_len)
        absent, total = region_decode.count_absent(
            st, sp, chunk, per, s0, grid, lengths, index, needed
        )
        filled = bool(absent) and 4 * absent >= total  # as in read_into
        if filled:
            out.fill(fill)
        parts = threads if pool is not None and threads > 1 and total >= 2 * threads else 1
        errs = np.zeros((parts, 4), np.int64)

        def work(part: int) -> int:
            scratch = np.empty(layout.chunk_shape, self._disk_dtype)
            return int(
                region_decode.decode_region(
                    out, st, *args, scratch, fill, filled, part, parts, errs[part]
                )
            )

        if parts == 1:
            codes = [work(0)]
        else:
            assert pool is not None
            codes = [f.result() for f in [pool.submit(work, p) for p in range(parts)]]
        del views, held
        for p, code in enumerate(codes):
            if code:
                raise CacheError(self.location, region_decode.describe_error(errs[p]))
        if lru is not None:
            for done_key, done in kept:
                lru.put(done_key, done)
        return True

    def _requests(self, tasks, got: dict[tuple[int, int, int], Any]):
        """The byte ranges of the chunks ``tasks`` need (LRU hits left out) and their chunk
        indices; absent chunks go to ``got`` as None instead."""
        layout = self._layout
        assert layout is not None
        lru = self._lru
        requests: list[tuple[str, int, int | None]] = []
        order = []
        for cidx, _, _ in tasks:
            if lru is not None and (self._key, cidx) in lru:
                continue
            if layout.shard_shape is None:
                requests.append(("c/" + "/".join(map(str, cidx)), 0, None))
                order.append(cidx)
                continue
            found = self._locate(cidx)
            if found is None:
                got[cidx] = None
            else:
                sidx, _, offset, nbytes = found
                requests.append(("c/" + "/".join(map(str, sidx)), offset, offset + nbytes))
                order.append(cidx)
        return requests, order

    def _fetch(self, tasks) -> dict[tuple[int, int, int], Any]:
        """The bytes of every chunk ``tasks`` need (LRU hits left out), from an unmapped
        source in one batch of requests; None for absent chunks."""
        layout = self._layout
        assert layout is not None
        got: dict[tuple[int, int, int], Any] = {}
        requests, order = self._requests(tasks, got)
        missing = False
        for cidx, buf in zip(order, self.source.read_ranges(requests), strict=True):
            got[cidx] = buf
            missing |= buf is None
        if missing and (layout.shard_shape is not None or self.source.read("zarr.json") is None):
            raise self._gone()  # an indexed shard or the array vanished since it was opened
        return got

    def _decode(self, buf, cidx: tuple[int, int, int], scratch: np.ndarray | None) -> np.ndarray:
        dest = scratch if scratch is not None else np.empty(self.chunk_shape, self._disk_dtype)
        # blosc1 header: bytes 4-8 hold the decoded size (a short one would leave stale
        # data), 12-16 the compressed size (a larger one would read past the chunk)
        if len(buf) < 16 or int.from_bytes(buf[4:8], "little") != dest.nbytes:
            raise CacheError(self.location, f"chunk {cidx} is corrupt (bad blosc header)")
        if int.from_bytes(buf[12:16], "little") > len(buf):
            raise CacheError(
                self.location, f"chunk {cidx} is truncated (shorter than its header says)"
            )
        try:
            blosc.decompress(buf, dest)
        except (RuntimeError, ValueError) as exc:
            raise CacheError(self.location, f"cannot decode chunk {cidx}: {exc}") from None
        return dest

    def _absent(self, cidx: tuple[int, int, int]) -> bool:
        """Whether the shard index says the chunk is absent (all fill value); False when
        that is not known without reading the chunk (one file per chunk)."""
        layout = self._layout
        if layout is None or layout.shard_shape is None:
            return False
        return self._locate(cidx) is None

    def _copy_chunks(self, tasks, out: np.ndarray, fetched, filled: bool = False) -> None:
        """Decode ``tasks`` into ``out`` (bytes from ``fetched`` where given); absent chunks
        are filled unless ``filled`` (the caller filled ``out`` already)."""
        lru = self._lru
        if lru is None:  # decode every chunk into one reused buffer
            scratch = np.empty(self.chunk_shape, self._disk_dtype)
            for cidx, src, dst in tasks:
                buf = self._chunk_bytes(cidx) if fetched is None else fetched[cidx]
                if buf is not None:
                    out[dst] = self._decode(buf, cidx, scratch)[src]
                elif not filled:
                    out[dst] = self.fill_value
            return
        for cidx, src, dst in tasks:
            key = (self._key, cidx)
            arr = lru.get(key)
            if arr is None:
                # a chunk _fetch left out as a hit can have been evicted since: fetch it alone
                buf = (
                    fetched[cidx]
                    if fetched is not None and cidx in fetched
                    else self._chunk_bytes(cidx)
                )
                if buf is None:
                    out[dst] = self.fill_value
                    continue
                arr = self._decode(buf, cidx, None)
                lru.put(key, arr)
            out[dst] = arr[src]

    def _tasks(self, start: Sequence[int], stop: Sequence[int]):
        """``(chunk index, slice of the chunk, slice of the region)`` of each chunk the
        region ``[start, stop)`` intersects."""
        assert self._layout is not None
        per_axis = []
        for a, b, c in zip(start, stop, self._layout.chunk_shape, strict=True):
            parts = []
            for n in range(a // c, (b - 1) // c + 1):
                lo, hi = max(a, n * c), min(b, (n + 1) * c)
                parts.append((n, slice(lo - n * c, hi - n * c), slice(lo - a, hi - a)))
            per_axis.append(parts)
        return [
            ((pz[0], py[0], px[0]), (pz[1], py[1], px[1]), (pz[2], py[2], px[2]))
            for pz, py, px in itertools.product(*per_axis)
        ]

    # -- public -------------------------------------------------------------------------
    def prefetch(
        self,
        start: Sequence[int],
        stop: Sequence[int],
        taps: tuple[np.ndarray, Sequence[int], float] | None = None,
    ) -> None:
        """Start fetching the chunks of voxels ``[start, stop)`` (inside the array) that a
        ``read_into`` of the same box will need, and return: from an unmapped source
        (object storage) their byte ranges are requested in the background; for a local
        array, or a layout read through zarr-python, nothing happens. The shard index is
        fetched first where it is not known yet (a request this call waits for). ``taps``
        as for ``read_into``: chunks no tap reaches are not fetched.
        """
        if self.source.mapped or self._layout is None:
            return
        tasks, _ = self._split_tasks(self._tasks(start, stop), start, stop, taps)
        requests, _ = self._requests(tasks, {})
        if requests:
            self.source.prefetch(requests)

    def read_into(
        self,
        start: Sequence[int],
        stop: Sequence[int],
        out: np.ndarray,
        *,
        pool: Executor | None = None,
        threads: int = 1,
        taps: tuple[np.ndarray, Sequence[int], float] | None = None,
    ) -> None:
        """Write voxels ``[start, stop)`` (inside the array) into ``out`` (that shape).

        From an unmapped source (object storage), the chunks the region needs are fetched
        first, in one batch of concurrent range requests, then decoded as from a local one.

        Args:
            start: first voxel (z, y, x), >= 0.
            stop: end (exclusive), <= shape.
            out: destination array of shape ``stop - start``.
            pool: an executor to decode chunks on (with ``threads`` > 1).
            threads: how many groups of chunks to decode concurrently on ``pool``.
            taps: ``(matrix, out_shape, margin)``: the region is read for a patch of
                ``out_shape`` pulled through ``matrix`` (output index -> array index, (3, 4))
                with ``margin`` voxels of extra reach; chunks no tap of it reaches may then
                be left at the fill value instead of decoded (``region_decode
                .chunks_needed``). None: every voxel is read.
        """
        if self._layout is None:
            out[...] = self._zarr_array()[
                tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
            ]
            return
        if self._read_compiled(start, stop, out, pool, threads, taps):
            return
        tasks = self._tasks(start, stop)
        filled = False
        tasks, skipped = self._split_tasks(tasks, start, stop, taps)
        if skipped:  # chunks no tap reads: filled, never fetched or decoded
            if 4 * len(skipped) >= len(tasks) + len(skipped):
                out.fill(self.fill_value)
                filled = True
            else:
                for _, _, dst in skipped:
                    out[dst] = self.fill_value
        fetched = None if self.source.mapped else self._fetch(tasks)
        if self._lru is None:
            absent = sum(self._absent(cidx) for cidx, _, _ in tasks)
            # Label regions are mostly background, whose chunks are absent: one fill of the
            # whole region, then only the chunks present, took 0.70-0.72x the CPU of a strided
            # fill per absent chunk (W2's label regions, 27 of 64 chunks present).
            if absent and 4 * absent >= len(tasks) and not filled:
                out.fill(self.fill_value)
                filled = True
        if pool is None or threads <= 1 or len(tasks) < 2 * threads:
            self._copy_chunks(tasks, out, fetched, filled)
            return
        # One job per thread (not per chunk): an executor round trip costs about as
        # much as decoding a small chunk.
        futures = [
            pool.submit(self._copy_chunks, tasks[t::threads], out, fetched, filled)
            for t in range(threads)
        ]
        for f in futures:
            f.result()
