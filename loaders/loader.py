"""``PatchLoader``: batches of augmented patches from worker processes via shared memory.

    sampler = PatchSampler(cache, compose, seed=0)
    with PatchLoader(sampler, batch_size=2, batches_per_epoch=250, num_workers=2) as loader:
        for epoch in range(100):
            for batch in loader:              # each pass is the next epoch
                batch["image"]                # (B, 1, d, h, w) float32
                batch["label"]                # (B, 1, d, h, w) uint8 (.long() for CE losses)
            print(loader.stats.wait_s)        # seconds the loop waited for data

Design:

- Sample ``index`` of an epoch is ``sampler.sample(epoch, index * world_size + rank)``; its
  randomness depends only on (seed, epoch, sample index), so an epoch's batches are
  bit-identical whatever ``num_workers`` is (0 computes them in this process).
- Workers are spawned processes of an ``augment.workers.WorkerPool`` (safe with CUDA and
  threads; the sampler pickles small, its cache as its root). They start with
  OMP/MKL/OpenBLAS/NUMBA thread counts of 1 in their environment and set numba's and
  torch's thread counts to 1, so that N workers use N cores. Workers persist across epochs
  until ``close()``, and die with this process even when it is killed.
- A ring of sample slots lives in one ``multiprocessing.shared_memory`` segment. The main
  process sends a worker ``(generation, epoch, index, slot)`` through the worker's own
  pipe; the worker writes the finished patch into the slot and answers with a few bytes of
  metadata. Arrays never cross a pipe. The number of slots (``prefetch`` batches per
  worker) bounds how far ahead workers run; a batch is copied out of its slots (into
  pinned memory when feeding CUDA) and the slots are reused.
- ``mode="gpu"``: workers send the raw cache regions (int16 image, uint8 label) and the
  parameters; this process moves them to ``device`` and runs the ``Compose`` there in one
  batched call (Triton on CUDA; on CPU the torch fallback, so the mode runs without a GPU).
- Failures: a worker's exception is raised here as ``WorkerError`` carrying the worker's
  traceback as soon as it arrives; a worker that dies (a signal, the OOM killer) is seen
  through its process sentinel within ``poll_s``; either way nothing hangs. ``close()``
  (also ``with``, garbage collection and interpreter exit) stops the workers and unlinks
  the shared memory, so nothing is left in /dev/shm. Workers ignore SIGINT (Ctrl-C reaches
  the whole process group): the main process decides.
"""

from __future__ import annotations

import pickle
import time
import traceback
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

import augment
from augment.workers import Segment, WorkerDied, WorkerFailed, WorkerPool
from loaders.remote import is_url
from loaders.sampler import PatchSampler

__all__ = ["LoaderStats", "PatchLoader", "WorkerError"]

MODES = ("cpu", "gpu")
_ALIGN = 64
_CAPACITY_DRAWS = 256  # parameter draws used to size the GPU-mode region slots


class WorkerError(RuntimeError):
    """A loader worker failed: it raised (``worker_traceback`` holds its traceback) or died.

    Attributes:
        worker: the worker's number.  pid: its process id.
        index: the sample it was computing, when known.
        worker_traceback: the traceback text from the worker process ('' if it died).
    """

    def __init__(
        self,
        message: str,
        *,
        worker: int,
        pid: int | None,
        index: int | None = None,
        worker_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.pid = pid
        self.index = index
        self.worker_traceback = worker_traceback


@dataclass(slots=True)
class LoaderStats:
    """Where the time went, summed since creation or ``reset()``.

    Attributes:
        wait_s: seconds the consumer was blocked in ``next()`` (waiting for workers, plus
            batch assembly in this process): the data-wait of a training loop.
        assemble_s: the part of ``wait_s`` spent copying slots into batches (and, in GPU
            mode, augmenting).
        worker_s: seconds workers spent reading and augmenting (summed over workers).
        worker_cpu_s: the CPU seconds of that work (less than ``worker_s`` when cores are
            shared with other processes).
        main_cpu_s: CPU seconds of this process (all its threads) while in ``next()``;
            with ``PatchLoader.worker_cpu_totals()`` it gives the CPU per patch of the
            whole pipeline, a figure that a busy machine does not distort as wall times.
        batches, samples: delivered so far.
        oversize: GPU-mode regions larger than a slot, sent through the pipe instead.
    """

    wait_s: float = 0.0
    assemble_s: float = 0.0
    worker_s: float = 0.0
    worker_cpu_s: float = 0.0
    main_cpu_s: float = 0.0
    batches: int = 0
    samples: int = 0
    oversize: int = 0

    def reset(self) -> None:
        self.wait_s = self.assemble_s = self.worker_s = 0.0
        self.worker_cpu_s = self.main_cpu_s = 0.0
        self.batches = self.samples = self.oversize = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class _Layout:
    """Where slot ``s``'s arrays live in the shared segment.

    CPU mode: a finished patch (``image_shape`` float32, ``label_shape`` uint8). GPU mode:
    a raw region of up to ``capacity`` voxels (``image_dtype`` and uint8), any shape.
    """

    mode: str
    n_slots: int
    image_shape: tuple[int, ...]
    label_shape: tuple[int, ...]
    image_dtype: str
    capacity: int

    @property
    def image_bytes(self) -> int:
        n = self.capacity if self.mode == "gpu" else int(np.prod(self.image_shape))
        return _aligned(n * np.dtype(self.image_dtype).itemsize)

    @property
    def label_bytes(self) -> int:
        n = self.capacity if self.mode == "gpu" else int(np.prod(self.label_shape))
        return _aligned(n)

    @property
    def slot_bytes(self) -> int:
        return self.image_bytes + self.label_bytes

    def views(self, buf: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """Flat (GPU mode) or shaped (CPU mode) image and label arrays of every slot."""
        out = []
        for s in range(self.n_slots):
            base = s * self.slot_bytes
            if self.mode == "gpu":
                img = np.ndarray((self.capacity,), self.image_dtype, buf, base)
                lab = np.ndarray((self.capacity,), np.uint8, buf, base + self.image_bytes)
            else:
                img = np.ndarray(self.image_shape, self.image_dtype, buf, base)
                lab = np.ndarray(self.label_shape, np.uint8, buf, base + self.image_bytes)
            out.append((img, lab))
        return out


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ----------------------------------------------------------------------------- worker side
def _worker_main(
    conn: connection.Connection, sampler: PatchSampler, shm_name: str, layout: _Layout
) -> None:
    """Serve ``(generation, epoch, index, slot)`` tasks until None or the pipe closes."""
    shm = SharedMemory(name=shm_name)
    views = layout.views(shm.buf)
    _serve(conn, sampler, layout, views)
    del views
    shm.close()


def _serve(
    conn: connection.Connection,
    sampler: PatchSampler,
    layout: _Layout,
    views: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    """The task loop. Before each task the pipe is drained, so that a stop (None) or a
    ``("cancel", generation)`` is seen after at most one sample, not behind queued tasks.
    From a remote cache, the regions of the next queued task are prefetched before this
    one is computed, so that they travel while it is augmented."""
    queue: deque[Any] = deque()
    cancelled = -1
    remote = is_url(sampler.cache.root)
    ahead: tuple[int, int, int] | None = None  # the task whose regions were prefetched
    while True:
        try:
            if not queue:
                queue.append(conn.recv())
            while conn.poll():
                queue.append(conn.recv())
        except (EOFError, OSError):
            return
        if any(m is None for m in queue):
            return
        for m in [m for m in queue if m[0] == "cancel"]:
            cancelled = max(cancelled, m[1])
            queue.remove(m)
        if not queue:
            continue
        gen, epoch, index, slot = queue.popleft()
        if gen <= cancelled:
            reply: tuple[Any, ...] = ("skip", gen, index, slot)
        else:
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                if remote:
                    if ahead != (gen, epoch, index):
                        _prefetch(sampler, epoch, index)
                    ahead = queue[0][:3] if queue and queue[0][0] > cancelled else None
                    if ahead is not None:
                        _prefetch(sampler, ahead[1], ahead[2])
                meta = _fill_slot(sampler, layout, views[slot], epoch, index)
                c1 = time.process_time()
                meta.update(busy=time.perf_counter() - t0, cpu=c1 - c0, cpu_total=c1)
                reply = ("ok", gen, index, slot, meta)
            except Exception as exc:
                reply = (
                    "error",
                    gen,
                    index,
                    slot,
                    f"{type(exc).__name__}: {exc}",
                    traceback.format_exc(),
                )
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _prefetch(sampler: PatchSampler, epoch: int, index: int) -> None:
    """Start fetching the image and label regions of sample ``index`` from a remote cache,
    in one batch of concurrent requests that the sample's reads then claim. Costs one more
    parameter draw per sample. Errors are left to those reads: they fetch again and raise."""
    try:
        d = sampler.draw(epoch, index)
        box = sampler.region(d.case, d.plan)
        taps = sampler.taps(d.plan)
        sampler.cache.prefetch_region(d.case, box, taps=taps)
        if sampler.cache.has_label(d.case):
            sampler.cache.prefetch_region(d.case, box, array="label", taps=taps)
    except Exception:  # the sample's own read reports it, with its index
        pass


def _fill_slot(
    sampler: PatchSampler,
    layout: _Layout,
    slot: tuple[np.ndarray, np.ndarray],
    epoch: int,
    index: int,
) -> dict[str, Any]:
    """Compute sample ``index`` straight into its slot: the patch (CPU mode) or the raw
    region (GPU mode; a region larger than the slot comes back in the metadata)."""
    img, lab = slot
    if layout.mode == "cpu":
        out = sampler.sample(epoch, index, out_image=img, out_label=lab)
        return {"case": out["case"]}
    reg = sampler.sample_region(epoch, index, out_image=img, out_label=lab)
    meta = {
        "case": reg["case"],
        "shape": reg["image"].shape,
        "offset": reg["offset"],
        "in_shape": reg["in_shape"],
        "params": reg["params"],
    }
    if not np.shares_memory(reg["image"], img):
        meta["data"] = (reg["image"], reg["label"])
    return meta


# --------------------------------------------------------------------------------- loader
class PatchLoader:
    """An iterable of batches of ``sampler``'s patches, computed by worker processes.

    Args:
        sampler: the ``PatchSampler`` (pickled to each worker).
        batch_size: samples per batch.
        batches_per_epoch: ``len(loader)`` (nnU-Net's 250 by default).
        num_workers: worker processes; 0 computes every sample in this process.
        mode: ``"cpu"`` (workers augment, batches hold patches) or ``"gpu"`` (workers read
            regions, this process augments them batched on ``device``).
        device: GPU mode's device (default CUDA when available, else CPU).
        pin_memory: CPU mode: copy batches into page-locked memory for fast, asynchronous
            transfers to CUDA (default: only when CUDA is available; asking for it without
            CUDA warns and is ignored).
        prefetch: batches in flight per worker (the ring holds ``prefetch * num_workers *
            batch_size`` sample slots).
        rank, world_size: this process's shard of the sample space (DDP): local sample i
            is sampler index ``i * world_size + rank``.
        start_epoch: the epoch of the first ``for`` pass.
        timeout: seconds one batch may take before ``TimeoutError`` (None: no limit; a dead
            worker is reported regardless).
        poll_s: how often worker liveness is checked while waiting.
        region_capacity: GPU mode: voxels per region slot (default: the largest of 256
            parameter draws, plus 25%; larger regions still work, through the pipe).

    Batches are dicts: ``image`` (B, C, d, h, w) float32, ``label`` (B, 1, d, h, w) uint8,
    ``case`` (list of B ids), ``index`` (B,) int64 sampler indices (``sampler.sample(epoch,
    index)`` replays one), ``epoch`` (int).
    """

    def __init__(
        self,
        sampler: PatchSampler,
        *,
        batch_size: int = 2,
        batches_per_epoch: int = 250,
        num_workers: int = 2,
        mode: str = "cpu",
        device: Any = None,
        pin_memory: bool | None = None,
        prefetch: int = 2,
        rank: int = 0,
        world_size: int = 1,
        start_epoch: int = 0,
        timeout: float | None = None,
        poll_s: float = 0.1,
        region_capacity: int | None = None,
    ) -> None:
        import torch

        if not isinstance(sampler, PatchSampler):
            raise TypeError(f"sampler must be a PatchSampler, got {type(sampler).__name__}")
        for name, v, lo in (
            ("batch_size", batch_size, 1),
            ("batches_per_epoch", batches_per_epoch, 1),
            ("num_workers", num_workers, 0),
            ("prefetch", prefetch, 1),
            ("world_size", world_size, 1),
            ("start_epoch", start_epoch, 0),
        ):
            if int(v) != v or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be positive, got {poll_s!r}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.num_workers = int(num_workers)
        self.mode = mode
        self.prefetch = int(prefetch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.timeout = timeout
        self.poll_s = float(poll_s)
        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            warnings.warn(
                "pin_memory=True needs CUDA, which is not available; not pinning", stacklevel=2
            )
        self.pin_memory = bool(cuda if pin_memory is None else pin_memory and cuda)
        self.pin_memory = self.pin_memory and mode == "cpu"
        self.device = torch.device(device if device is not None else ("cuda" if cuda else "cpu"))
        self.region_capacity = region_capacity
        self.stats = LoaderStats()
        self._next_epoch = int(start_epoch)
        self._generation = 0
        self._pool = WorkerPool("PatchLoader")
        self._ring: Segment | None = None  # the slots; ``views`` holds each slot's arrays
        self._layout: _Layout | None = None
        self._free: list[int] = []
        self._outstanding: list[dict[tuple[int, int], int]] = []
        self._cpu_totals: list[float] = []
        self._done: dict[int, tuple[int, dict[str, Any]]] = {}
        self._broken: str | None = None
        self._closed = False

    # -- protocol ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The next epoch's batches (each ``for`` pass advances the epoch)."""
        e = self._next_epoch
        self._next_epoch += 1
        return self.epoch(e)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``for`` pass run ``epoch`` (then ``epoch + 1``, ...)."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self._next_epoch = int(epoch)

    @property
    def next_epoch(self) -> int:
        return self._next_epoch

    def epoch(self, epoch: int, *, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` (does not move the ``for``-pass counter). Starting an
        epoch abandons any unfinished one (one epoch at a time per loader).

        Args:
            epoch: the epoch key of the samples.
            start_batch: begin at this batch (resuming mid-epoch without computing the
                batches before it; they would be the same anyway).
        """
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if int(start_batch) != start_batch or not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch!r}"
            )
        self._check_usable()
        self._generation += 1
        if self.num_workers == 0:
            return self._run_inline(int(epoch), int(start_batch))
        return self._run_workers(int(epoch), self._generation, int(start_batch))

    def __enter__(self) -> PatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and release the shared memory (idempotent)."""
        self._closed = True
        self._ring = None
        self._pool.close()

    def __repr__(self) -> str:
        return (
            f"PatchLoader(batch_size={self.batch_size}, batches_per_epoch="
            f"{self.batches_per_epoch}, num_workers={self.num_workers}, mode={self.mode!r})"
        )

    def worker_cpu_totals(self) -> list[float]:
        """Each worker process's CPU seconds since it started, as of its latest sample
        (imports and start-up included)."""
        return list(self._cpu_totals)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first batch)."""
        return self._pool.pids

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this PatchLoader is closed")
        if self._broken is not None:
            raise RuntimeError(
                f"this PatchLoader is unusable since {self._broken}; create a new one"
            )

    def _sampler_index(self, i: int) -> int:
        return i * self.world_size + self.rank

    # -- in-process path ----------------------------------------------------------------------
    def _run_inline(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        B = self.batch_size
        for k in range(start, self.batches_per_epoch):
            t0, c0 = time.perf_counter(), time.process_time()
            idx = [self._sampler_index(i) for i in range(k * B, (k + 1) * B)]
            if self.mode == "cpu":
                outs = [self.sampler.sample(epoch, i) for i in idx]
                t1 = time.perf_counter()
                self.stats.worker_s += t1 - t0
                self.stats.worker_cpu_s += time.process_time() - c0
                batch = self._cpu_batch(
                    [o["image"] for o in outs],
                    [o["label"] for o in outs],
                    [o["case"] for o in outs],
                    idx,
                    epoch,
                )
            else:
                regs = [self.sampler.sample_region(epoch, i) for i in idx]
                t1 = time.perf_counter()
                self.stats.worker_s += t1 - t0
                self.stats.worker_cpu_s += time.process_time() - c0
                batch = self._gpu_batch(regs, idx, epoch)
            t2 = time.perf_counter()
            self.stats.assemble_s += t2 - t1
            self.stats.wait_s += t2 - t0
            self.stats.main_cpu_s += time.process_time() - c0
            self.stats.batches += 1
            self.stats.samples += B
            yield batch

    # -- worker path ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers now (else the first batch does): they import and load their
        kernels while the caller builds its model. No-op with 0 workers or when started."""
        self._check_usable()
        if self._pool.started or self.num_workers == 0:
            return
        try:
            payload = pickle.dumps(self.sampler)
        except Exception as exc:
            raise TypeError(
                f"the sampler must pickle for spawned workers, it does not: {exc} "
                "(use module-level functions, not lambdas, in its transforms)"
            ) from exc
        del payload
        layout = self._make_layout()
        ring = self._pool.segment(layout.n_slots * layout.slot_bytes)
        ring.views.extend(layout.views(ring.buf))
        self._ring = ring
        self._layout = layout
        self._free = list(range(layout.n_slots))
        self._pool.start(_worker_main, [(self.sampler, ring.name, layout)] * self.num_workers)
        self._outstanding = [{} for _ in range(self.num_workers)]
        self._cpu_totals = [0.0] * self.num_workers

    def _make_layout(self) -> _Layout:
        n_slots = self.prefetch * self.num_workers * self.batch_size
        patch = self.sampler.patch_shape
        if self.mode == "cpu":
            return _Layout("cpu", n_slots, (1, *patch), (1, *patch), "float32", 0)
        cache = self.sampler.cache
        dtypes = {np.dtype(cache.info(c).dtype).str for c in self.sampler.cases}
        if len(dtypes) != 1:
            raise ValueError(
                f"GPU mode batches raw regions, so every case needs one image dtype; the "
                f"cache holds {sorted(dtypes)}: rebuild it with one image_dtype"
            )
        dtype = dtypes.pop()
        cap = self.region_capacity or self._estimate_capacity()
        return _Layout("gpu", n_slots, (), (), dtype, int(cap))

    def _estimate_capacity(self) -> int:
        """Voxels of the largest region among a fixed set of parameter draws, plus 25%."""
        s = self.sampler
        biggest = 1
        for i in range(_CAPACITY_DRAWS):
            d = s.draw(2**31 - 1, i)
            start, stop = s.region(d.case, d.params)
            biggest = max(biggest, int(np.prod(np.subtract(stop, start))))
        return int(biggest * 1.25) + 64

    def _run_workers(self, epoch: int, gen: int, start: int) -> Iterator[dict[str, Any]]:
        self.start()
        B = self.batch_size
        n = self.batches_per_epoch * B
        # finished samples live on the loader, so that a newer epoch reclaims the slots of
        # an abandoned iterator even while that iterator object is still referenced
        self._reclaim()
        done = self._done
        nxt = start * B
        try:
            for k in range(start, self.batches_per_epoch):
                t0, c0 = time.perf_counter(), time.process_time()
                want = range(k * B, (k + 1) * B)
                while True:
                    if gen != self._generation:
                        raise RuntimeError(
                            "this epoch's iterator was superseded by a newer "
                            "one (one epoch at a time per loader)"
                        )
                    nxt = self._dispatch(gen, epoch, nxt, n)
                    if all(i in done for i in want):
                        break
                    self._receive(gen, done, t0)
                t1 = time.perf_counter()
                batch = self._assemble([done.pop(i) for i in want], want, epoch)
                nxt = self._dispatch(gen, epoch, nxt, n)
                t2 = time.perf_counter()
                self.stats.assemble_s += t2 - t1
                self.stats.wait_s += t2 - t0
                self.stats.main_cpu_s += time.process_time() - c0
                self.stats.batches += 1
                self.stats.samples += B
                yield batch
        finally:
            if gen == self._generation:
                self._reclaim()
                self._generation += 1  # anything still in flight is now stale
            self._pool.broadcast(("cancel", gen))

    def _reclaim(self) -> None:
        self._free.extend(slot for slot, _ in self._done.values())
        self._done.clear()

    def _dispatch(self, gen: int, epoch: int, nxt: int, n: int) -> int:
        while self._free and nxt < n:
            w = min(range(self.num_workers), key=lambda j: len(self._outstanding[j]))
            slot = self._free.pop()
            try:
                self._pool.send(w, (gen, epoch, self._sampler_index(nxt), slot))
            except WorkerDied as exc:
                self._free.append(slot)
                self._worker_died(exc)
            self._outstanding[w][(gen, nxt)] = slot
            nxt += 1
        return nxt

    def _receive(self, gen: int, done: dict[int, tuple[int, dict[str, Any]]], t0: float) -> None:
        """Wait for at least one message (or a death, or the timeout) and handle it."""
        while True:
            got = False
            try:
                for w, msg in self._pool.receive(self.poll_s):
                    self._handle(w, msg, gen, done)
                    got = True
            except WorkerDied as exc:
                self._worker_died(exc)
            except WorkerFailed as exc:
                self._broken = f"worker {exc.worker} failed"
                self.close()
                raise WorkerError(
                    f"loader worker {exc.worker} (pid {exc.pid}) failed: {exc.summary}; the "
                    f"loader is closed\n\nworker traceback:\n{exc.worker_traceback}",
                    worker=exc.worker,
                    pid=exc.pid,
                    worker_traceback=exc.worker_traceback,
                ) from None
            if got:
                return
            if self.timeout is not None and time.perf_counter() - t0 > self.timeout:
                alive = [p.is_alive() for p in self._pool.processes]
                raise TimeoutError(
                    f"no batch within timeout={self.timeout} s (workers alive: {alive})"
                )

    def _handle(
        self, w: int, msg: tuple[Any, ...], gen: int, done: dict[int, tuple[int, dict[str, Any]]]
    ) -> None:
        kind, mgen, sidx, slot = msg[0], msg[1], msg[2], msg[3]
        local = (sidx - self.rank) // self.world_size
        self._outstanding[w].pop((mgen, local), None)
        if kind == "ok" and mgen == gen:
            meta = msg[4]
            self.stats.worker_s += meta["busy"]
            self.stats.worker_cpu_s += meta["cpu"]
            self._cpu_totals[w] = meta["cpu_total"]
            done[local] = (slot, meta)
            return
        self._free.append(slot)
        if kind == "error" and mgen == gen:
            pid = self._pool.pids[w]
            raise WorkerError(
                f"loader worker {w} (pid {pid}) raised {msg[4]} on sample index {sidx}\n\n"
                f"worker traceback:\n{msg[5]}",
                worker=w,
                pid=pid,
                index=sidx,
                worker_traceback=msg[5],
            )

    def _worker_died(self, exc: WorkerDied) -> None:
        w = exc.worker
        pending = sorted(i for _, i in self._outstanding[w])
        self._broken = f"worker {w} (pid {exc.pid}) {exc.how}"
        self.close()
        if not exc.started:
            message = f"{exc}; the loader is closed"
        else:
            message = (
                f"loader worker {w} (pid {exc.pid}) {exc.how} while computing samples "
                f"{pending[:8]} (out of memory? killed?); the loader is closed"
            )
        raise WorkerError(
            message, worker=w, pid=exc.pid, index=pending[0] if pending else None
        ) from None

    # -- batch assembly -----------------------------------------------------------------------
    def _assemble(
        self, items: list[tuple[int, dict[str, Any]]], want: range, epoch: int
    ) -> dict[str, Any]:
        idx = [self._sampler_index(i) for i in want]
        assert self._layout is not None and self._ring is not None
        views = self._ring.views
        try:
            if self.mode == "cpu":
                return self._cpu_batch(
                    [views[s][0] for s, _ in items],
                    [views[s][1] for s, _ in items],
                    [m["case"] for _, m in items],
                    idx,
                    epoch,
                )
            regs = []
            for s, m in items:
                shape = tuple(m["shape"])
                if "data" in m:
                    self.stats.oversize += 1
                    image, label = m["data"]
                else:
                    size = int(np.prod(shape))
                    image = views[s][0][:size].reshape(shape)
                    label = views[s][1][:size].reshape(shape)
                regs.append(
                    {
                        "image": image,
                        "label": label,
                        "params": m["params"],
                        "offset": m["offset"],
                        "in_shape": m["in_shape"],
                        "case": m["case"],
                    }
                )
            return self._gpu_batch(regs, idx, epoch)
        finally:
            self._free.extend(s for s, _ in items)

    def _cpu_batch(
        self,
        images: list[np.ndarray],
        labels: list[np.ndarray],
        cases: list[str],
        idx: list[int],
        epoch: int,
    ) -> dict[str, Any]:
        import torch

        B = len(images)
        img = torch.empty((B, *images[0].shape), dtype=torch.float32, pin_memory=self.pin_memory)
        lab = torch.empty((B, *labels[0].shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        img_np, lab_np = img.numpy(), lab.numpy()
        for b in range(B):
            np.copyto(img_np[b], images[b])
            np.copyto(lab_np[b], labels[b], casting="unsafe")
        return {
            "image": img,
            "label": lab,
            "case": cases,
            "index": torch.tensor(idx, dtype=torch.int64),
            "epoch": epoch,
        }

    def _gpu_batch(self, regs: list[dict[str, Any]], idx: list[int], epoch: int) -> dict[str, Any]:
        import torch

        dev = self.device
        images, labels = [], []
        for r in regs:
            ti, tl = torch.from_numpy(r["image"]), torch.from_numpy(r["label"])
            if dev.type == "cuda":
                # page-locked staging copies, so that the transfers run asynchronously
                ti = ti.pin_memory().to(dev, non_blocking=True)
                tl = tl.pin_memory().to(dev, non_blocking=True)
            images.append(ti)
            labels.append(tl)
        out = self.sampler.compose(
            image=images,
            label=labels,
            params=augment.stack_params([r["params"] for r in regs]),
            offset=np.stack([r["offset"] for r in regs]),
            in_shape=np.stack([r["in_shape"] for r in regs]),
        )
        return {
            "image": out["image"],
            "label": out["label"],
            "case": [r["case"] for r in regs],
            "index": torch.tensor(idx, dtype=torch.int64),
            "epoch": epoch,
        }
