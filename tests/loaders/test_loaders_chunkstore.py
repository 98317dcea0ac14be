"""ArrayReader (zarr v3 region reads without zarr) against numpy slicing and zarr itself."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, ZstdCodec

from loaders import CacheError, chunkstore, region_decode
from loaders.chunkstore import ArrayReader, ChunkLRU, parse_region

SHAPE = (13, 17, 19)


def source(dtype) -> np.ndarray:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 200, size=SHAPE).astype(dtype)
    arr[:4, :5, :6] = 0  # a chunk equal to the fill value: absent from the store
    arr[8:, 10:, 12:] = 0  # and a whole shard
    return arr


LAYOUTS = {
    "sharded-blosc": dict(
        chunks=(4, 5, 6),
        shards=(8, 10, 12),
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    ),
    "chunked-blosc": dict(
        chunks=(4, 5, 6), compressors=BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")
    ),
    "zarr-defaults": dict(chunks=(4, 5, 6)),
    "sharded-zstd": dict(chunks=(4, 5, 6), shards=(8, 10, 12), compressors=ZstdCodec()),
}
FAST = {"sharded-blosc": True, "chunked-blosc": True, "zarr-defaults": False, "sharded-zstd": False}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrays")
    out = {}
    for dtype in (np.int16, np.uint8, np.float32):
        arr = source(dtype)
        for name, kw in LAYOUTS.items():
            path = root / f"{name}-{np.dtype(dtype).name}"
            z = zarr.create_array(str(path), shape=SHAPE, dtype=dtype, fill_value=0, **kw)
            z[...] = arr
            out[name, np.dtype(dtype).name] = (path, arr)
    return out


boxes = st.tuples(*[st.tuples(st.integers(0, n - 1), st.integers(1, n)) for n in SHAPE]).map(
    lambda t: ([min(a, b - 1) for a, b in t], [max(a + 1, b) for a, b in t])
)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    box=boxes,
    threads=st.sampled_from([1, 2]),
    budget=st.sampled_from([0, 1 << 20]),
    compiled=st.booleans(),
    margin=st.sampled_from([0, 2]),
)
def test_read_into_matches_numpy(stores, layout, dtype, box, threads, budget, compiled, margin):
    """Every layout, with and without the LRU and the compiled decoder, into a contiguous
    array or (``margin``) a strided view of a larger one, as a padded region reads."""
    path, arr = stores[layout, dtype]
    reader = ArrayReader(path, lru=ChunkLRU(budget), compiled=compiled)
    assert reader.uses_zarr is not FAST[layout]
    assert reader.shape == SHAPE and reader.dtype == arr.dtype
    start, stop = box
    shape = [b - a for a, b in zip(start, stop, strict=True)]
    big = np.full([n + 2 * margin for n in shape], 77, arr.dtype)
    out = big[tuple(slice(margin, margin + n) for n in shape)]
    with ThreadPoolExecutor(2) as pool:
        reader.read_into(start, stop, out, pool=pool, threads=threads)
    expected = arr[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    np.testing.assert_array_equal(out, expected)
    if margin:  # nothing written outside the view
        big[tuple(slice(margin, margin + n) for n in shape)] = 77
        assert (big == 77).all()


def test_compiled_decoder_is_used_for_local_sharded_arrays(stores, monkeypatch):
    """numcodecs' extension exports c-blosc's decoder here, so local sharded reads without an
    LRU never go through numcodecs' Python decode."""
    assert region_decode.AVAILABLE
    path, arr = stores["sharded-blosc", "int16"]
    monkeypatch.setattr(chunkstore.blosc, "decompress", None)  # the per-chunk path would fail
    out = np.empty(SHAPE, np.int16)
    ArrayReader(path).read_into((0, 0, 0), SHAPE, out)
    np.testing.assert_array_equal(out, arr)
    with pytest.raises(TypeError):
        ArrayReader(path, compiled=False).read_into((0, 0, 0), SHAPE, out)


def test_fast_path_reads_what_zarr_reads(stores):
    path, arr = stores["sharded-blosc", "int16"]
    out = np.empty(SHAPE, np.int16)
    ArrayReader(path).read_into((0, 0, 0), SHAPE, out)
    np.testing.assert_array_equal(out, zarr.open_array(str(path), mode="r")[...])
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("threads", [1, 2])
def test_mostly_absent_regions_read_the_fill_value_and_the_chunks_present(
    tmp_path, monkeypatch, threads
):
    """A label-like array: one chunk present, the others absent (fill value 7). The region
    is filled once, and only the chunk present is decoded."""
    arr = np.full((12, 10, 12), 7, np.uint8)
    arr[4:8, 5:10, 6:12] = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    path = tmp_path / "label"
    z = zarr.create_array(
        str(path), shape=arr.shape, dtype=np.uint8, fill_value=7, **LAYOUTS["sharded-blosc"]
    )
    z[...] = arr
    reader = ArrayReader(path, compiled=False)
    out = np.zeros((9, 9, 9), np.uint8)
    ArrayReader(path).read_into((2, 1, 3), (11, 10, 12), out)  # the compiled decoder
    np.testing.assert_array_equal(out, arr[2:11, 1:10, 3:12])
    decoded = []
    real = chunkstore.blosc.decompress
    monkeypatch.setattr(
        chunkstore.blosc, "decompress", lambda src, dest: decoded.append(1) or real(src, dest)
    )
    out = np.zeros((9, 9, 9), np.uint8)
    with ThreadPoolExecutor(2) as pool:
        reader.read_into((2, 1, 3), (11, 10, 12), out, pool=pool, threads=threads)
    np.testing.assert_array_equal(out, arr[2:11, 1:10, 3:12])
    assert len(decoded) == 1  # of the 12 chunks the region meets


def test_lru_keeps_to_its_budget_and_hits(stores):
    path, arr = stores["sharded-blosc", "int16"]
    chunk_bytes = 4 * 5 * 6 * 2
    lru = ChunkLRU(3 * chunk_bytes)
    reader = ArrayReader(path, lru=lru)
    out = np.empty(SHAPE, np.int16)
    reader.read_into((0, 0, 0), SHAPE, out)
    stats = lru.stats()
    assert stats["nbytes"] <= 3 * chunk_bytes and stats["entries"] == 3
    small = np.empty((2, 2, 2), np.int16)
    reader.read_into((9, 11, 7), (11, 13, 9), small)  # one chunk, decoded once ...
    before = lru.stats()["hits"]
    reader.read_into((9, 11, 7), (11, 13, 9), small)  # ... then served from the LRU
    assert lru.stats()["hits"] == before + 1
    np.testing.assert_array_equal(small, arr[9:11, 11:13, 7:9])
    cached = lru.get((str(path), (2, 2, 1)))
    assert cached is not None and not cached.flags.writeable


def test_lru_evicts_least_recently_used():
    lru = ChunkLRU(300)
    a, b, c = (np.zeros(100, np.uint8) for _ in range(3))
    lru.put("a", a)
    lru.put("b", b)
    lru.put("c", c)
    assert lru.get("a") is a  # a is now the most recent
    lru.put("d", np.zeros(100, np.uint8))
    assert lru.get("b") is None and lru.get("a") is a and lru.get("c") is c
    lru.put("huge", np.zeros(1000, np.uint8))  # larger than the budget: not kept
    assert lru.get("huge") is None and lru.stats()["nbytes"] == 300
    with pytest.raises(ValueError):
        ChunkLRU(-1)


def test_parse_region():
    shape = (10, 20, 30)
    assert parse_region((slice(2, 5), slice(None), slice(-3, 40)), shape) == (
        (2, 0, -3),
        (5, 20, 40),
    )
    assert parse_region(((1, 2, 3), (4, 5, 6)), shape) == ((1, 2, 3), (4, 5, 6))
    assert parse_region((np.array([1, 2, 3]), [4, 5, 6]), shape) == ((1, 2, 3), (4, 5, 6))
    with pytest.raises(ValueError, match="step 2"):
        parse_region((slice(0, 4, 2), slice(None), slice(None)), shape)
    with pytest.raises(ValueError, match="3 slices or"):
        parse_region((slice(0, 4), slice(None)), shape)
    with pytest.raises(ValueError, match="before start"):
        parse_region(((5, 0, 0), (4, 1, 1)), shape)
    with pytest.raises(ValueError, match="integers"):
        parse_region(((0.5, 0, 0), (4, 1, 1)), shape)


def test_corrupt_or_truncated_shard_is_reported(stores, tmp_path):
    path, _ = stores["sharded-blosc", "int16"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    shard = copy / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index
    shard.write_bytes(bytes(data))
    out = np.empty((2, 2, 2), np.int16)
    with pytest.raises(CacheError, match="checksum mismatch") as err:
        ArrayReader(copy).read_into((0, 0, 0), (2, 2, 2), out)
    assert str(shard) in str(err.value)
    shard.write_bytes(bytes(data[:20]))
    with pytest.raises(CacheError, match="truncated"):
        ArrayReader(copy).read_into((0, 0, 0), (2, 2, 2), out)
    shard.write_bytes(b"")
    with pytest.raises(CacheError, match="empty"):
        ArrayReader(copy).read_into((0, 0, 0), (2, 2, 2), out)


def test_corrupt_chunk_bytes_are_reported(stores, tmp_path):
    path, _ = stores["chunked-blosc", "int16"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    chunk = copy / "c" / "1" / "1" / "1"
    data = bytearray(chunk.read_bytes())
    data[4] ^= 0x01  # the decoded size in the blosc header
    chunk.write_bytes(bytes(data))
    out = np.empty((2, 2, 2), np.int16)
    with pytest.raises(CacheError, match=r"chunk \(1, 1, 1\) is corrupt") as err:
        ArrayReader(copy).read_into((4, 5, 6), (6, 7, 8), out)
    assert str(copy) in str(err.value)
    data[4] ^= 0x01
    chunk.write_bytes(bytes(data[:40]))  # header intact, payload cut short
    with pytest.raises(CacheError, match=r"chunk \(1, 1, 1\) is truncated"):
        ArrayReader(copy).read_into((4, 5, 6), (6, 7, 8), out)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("field", [4, 12])
def test_corrupt_chunk_in_a_shard_is_reported(stores, tmp_path, compiled, field):
    """A chunk whose blosc header gives the wrong decoded size (bytes 4-8) or more compressed
    bytes than the shard index holds for it (12-16) is reported, never decoded."""
    path, _ = stores["sharded-blosc", "int16"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    shard = copy / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    n = 2 * 2 * 2  # chunks per shard
    index = np.frombuffer(bytes(data[-(16 * n + 4) : -4]), "<u8").reshape(n, 2)
    j = next(i for i in range(n) if index[i, 0] != (1 << 64) - 1)  # a chunk present
    offset = int(index[j, 0])
    data[offset + field + 1] ^= 0x40
    shard.write_bytes(bytes(data))
    cidx = np.unravel_index(j, (2, 2, 2))
    box_start = [int(c) * s for c, s in zip(cidx, (4, 5, 6), strict=True)]
    box_stop = [a + 2 for a in box_start]
    out = np.empty((2, 2, 2), np.int16)
    reader = ArrayReader(copy, compiled=compiled)
    with pytest.raises(CacheError, match=r"chunk \(\d, \d, \d\)") as err:
        reader.read_into(box_start, box_stop, out)
    assert str(copy) in str(err.value)


def test_array_removed_under_a_reader(stores, tmp_path):
    path, _ = stores["sharded-blosc", "int16"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    reader = ArrayReader(copy)
    shutil.rmtree(copy)
    with pytest.raises(CacheError, match="removed while open"):
        reader.read_into((0, 0, 0), (2, 2, 2), np.empty((2, 2, 2), np.int16))
    with pytest.raises(CacheError, match="array metadata missing"):
        ArrayReader(copy)


def test_rejects_non_3d_arrays(tmp_path):
    zarr.create_array(str(tmp_path / "a2"), shape=(4, 4), dtype="int16")
    with pytest.raises(CacheError, match="3D numeric array"):
        ArrayReader(tmp_path / "a2")


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.mark.parametrize(("compiled", "budget"), [(True, 0), (False, 0), (False, 1 << 20)])
@pytest.mark.parametrize("margin", [0, 2])
def test_taps_leave_out_only_chunks_no_tap_reads(tmp_path, margin, compiled, budget):
    """With ``taps``, every voxel a trilinear or nearest tap of the patch reads (and every
    voxel within ``margin`` of one) holds the array's value, and chunks in the box's
    corners are left out for rotated patches (compiled or chunk by chunk, with an LRU)."""
    rng = np.random.default_rng(5)
    arr = rng.integers(1, 1000, size=(40, 44, 48)).astype(np.int16)
    path = tmp_path / "a"
    z = zarr.create_array(
        str(path), shape=arr.shape, dtype=np.int16, fill_value=0, **LAYOUTS["sharded-blosc"]
    )
    z[...] = arr
    reader = ArrayReader(path, compiled=compiled, lru=ChunkLRU(budget))
    out_shape = np.array([9, 11, 10])
    skipped = 0
    for _ in range(12):
        lin = _rotation(rng) * rng.uniform(0.7, 1.3)
        centre = np.array(arr.shape) / 2 + rng.uniform(-4, 4, 3)
        m = np.hstack([lin, (centre - lin @ ((out_shape - 1) / 2))[:, None]])
        o = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1)
        c = o.reshape(-1, 3) @ lin.T + m[:, 3]
        start = np.maximum(np.floor(c.min(0)).astype(int) - margin, 0)
        stop = np.minimum(np.floor(c.max(0)).astype(int) + 2 + margin, arr.shape)
        out = np.full(stop - start, -1, np.int16)
        reader.read_into(start, stop, out, taps=(m, out_shape, margin))
        tapped = np.zeros(arr.shape, bool)
        base = np.floor(c).astype(int)
        for corner in np.ndindex(2, 2, 2):
            t = np.clip(base + corner, 0, np.array(arr.shape) - 1)
            tapped[tuple(t.T)] = True
        near = np.clip(np.rint(c).astype(int), 0, np.array(arr.shape) - 1)
        tapped[tuple(near.T)] = True
        if margin:  # grow by the margin: what a filter of that reach reads
            from scipy.ndimage import binary_dilation

            tapped = binary_dilation(tapped, np.ones((3, 3, 3), bool), iterations=margin)
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        t = tapped[box]
        np.testing.assert_array_equal(out[t], arr[box][t])
        skipped += int((out == 0).sum())  # the fill value: left out
        chunk = np.array((4, 5, 6))
        needed = region_decode.chunks_needed(m, out_shape, float(margin), start, stop, chunk)
        assert needed.shape == tuple((stop - 1) // chunk - start // chunk + 1)
    assert skipped > 0  # rotated patches leave some corner chunks out
