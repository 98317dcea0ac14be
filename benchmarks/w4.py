"""W4 slice-parallel vs 3D: whole-volume warps of a 200x512x512 float32 volume.

In-plane: a rotation about z (12.5 degrees, about the centre) with flips of y and x, the
original notes' case. Each z-slice is a 2D warp: ``augment.slices`` in a ``SlicePool`` of 1
and 2 processes with the numba 2D kernel and with scikit-image's ``transform.warp``, the
volume already in the pool's shared memory (plus one run with the copies in and out of
shared memory) -- against one 3D pass of ``augment.affine_warp`` (numba, 1 thread and all
threads) and, where present, torch on CUDA (the CPU torch fallback in full mode).
3D: rotations about all three axes; the slab path cuts the output along z, each process
runs the 3D kernel on the shared input.

Figures: volumes/s (ratios against the 3D numba pass on all threads); scaling efficiency
= rate with 2 / (2 x rate with 1) for processes and for numba threads. Every way is checked
against the 3D pass before it is timed. Quick mode: 48x256x256. A PNG plot goes to
``benchmarks/results/w4-<date>.png``.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import augment
from augment import matrices as mx
from augment.workers import spawn_executor
from benchmarks.common import Result, median_seconds

SHAPE = (200, 512, 512)
QUICK_SHAPE = (48, 256, 256)
RESULTS = Path(__file__).resolve().parent / "results"


def make_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like float32 volume: an ellipsoidal body of soft tissue in air, with noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = (np.asarray(shape) - 1) / 2.0
    body = ((yy - c[1]) / (0.42 * shape[1])) ** 2 + ((xx - c[2]) / (0.36 * shape[2])) ** 2 < 1
    vol = rng.standard_normal(shape, dtype=np.float32) * np.float32(15.0)
    vol += np.where(body, np.float32(40.0), np.float32(-1000.0))
    return vol


def _spin(n: int) -> float:
    """A pure-Python busy loop (no memory traffic, no GIL sharing): its wall seconds."""
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - t0


def machine_parallelism(seconds: float = 0.4, repeats: int = 3) -> float:
    """How much of 2 cores two processes get right now: time of one busy loop in one
    process / time of two in two processes (1.0 on 2 free cores). On a machine shared with
    other jobs no 2-process figure can beat it."""
    n = int(200_000 * seconds / max(_spin(200_000), 1e-6))
    ratios = []
    with spawn_executor(2) as ex:
        list(ex.map(_spin, [1000, 1000]))
        for _ in range(repeats):
            t0 = time.perf_counter()
            ex.submit(_spin, n).result()
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            list(ex.map(_spin, [n, n]))
            ratios.append(one / (time.perf_counter() - t0))
    return statistics.median(ratios)


def matrices(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    c = mx.centre(shape)
    plane = mx.about(mx.rotation(np.radians([12.5, 0.0, 0.0])), c, c) @ mx.flip([0, 1, 1], shape)
    full = mx.about(mx.rotation(np.radians([10.0, 7.0, 5.0])), c, c)
    return {"in-plane": plane, "3d": full}


def _check(got: Any, ref: np.ndarray, name: str, atol: float) -> None:
    g = got.detach().cpu().numpy()[0] if hasattr(got, "detach") else np.asarray(got)
    err = float(np.abs(g.astype(np.float64) - ref).max())
    if err > atol:
        raise AssertionError(f"{name}: max error {err:.3g} against the 3D pass (> {atol})")


def run(quick: bool = False) -> list[Result]:
    import numba

    from augment.slices import SlicePool

    shape = QUICK_SHAPE if quick else SHAPE
    repeats = 3
    vol = make_volume(shape)
    load = f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    threads = numba.get_num_threads()
    tag = "x".join(map(str, shape))
    results: list[Result] = []
    rates: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}
    par = machine_parallelism(0.2 if quick else 0.5)
    results.append(
        Result(
            "w4",
            "machine-2proc-efficiency",
            round(100 * par, 1),
            "%",
            note=f"busy loop, 2 processes vs 1: the ceiling of any scaling "
            f"figure on this machine now; {load}",
        )
    )
    pools = {1: SlicePool(1), 2: SlicePool(2)}

    def pooled(pool: SlicePool, p: int, m: np.ndarray, be: str, name: str) -> Callable[[], Any]:
        def call() -> Any:
            out = pool.warp(shared[p], m, shape, backend=be, copy=False)
            cpu.setdefault(name, []).append(sum(pool.last_cpu_seconds))
            return out

        return call

    try:
        shared = {}
        for p, pool in pools.items():
            shared[p] = pool.shared(shape, np.float32)
            shared[p][...] = vol
        for kind, m in matrices(shape).items():
            prefix = "" if kind == "in-plane" else "3d-rotation/"
            ref = augment.affine_warp(vol, m, shape)

            def one_pass(m: np.ndarray = m) -> Any:
                return augment.affine_warp(vol, m, shape)

            def with_copies(m: np.ndarray = m) -> Any:
                return pools[2].warp(vol, m, shape)

            ways: list[tuple[str, Callable[[], Any], int]] = [
                (f"{prefix}3d-numba-{threads}threads", one_pass, threads),
                (f"{prefix}3d-numba-1thread", one_pass, 1),
            ]
            backends = ("numba", "skimage") if kind == "in-plane" else ("numba",)
            what = "slices" if kind == "in-plane" else "slabs"
            for be in backends:
                for p, pool in pools.items():
                    name = f"{prefix}{what}-{be}-{p}proc"
                    ways.append((name, pooled(pool, p, m, be, name), threads))
            ways.append((f"{prefix}{what}-numba-2proc+copies", with_copies, threads))
            ways += _torch_ways(vol, m, shape, prefix)
            for name, fn, nthreads in ways:
                numba.set_num_threads(nthreads)
                try:
                    _check(fn(), ref, name, atol=0.05 if "skimage" in name else 1e-3)
                    seconds = median_seconds(fn, repeats=repeats, warmup=0)
                except Exception as exc:  # a way that fails is reported, not fatal
                    results.append(
                        Result("w4", name, float("nan"), "volumes/s", note=f"failed: {exc}")
                    )
                    continue
                finally:
                    numba.set_num_threads(threads)
                rates[name] = 1.0 / seconds
                base = f"{prefix}3d-numba-{threads}threads"
                results.append(
                    Result(
                        "w4",
                        name,
                        round(rates[name], 3),
                        "volumes/s",
                        baseline=None if name == base else base,
                        note=f"{tag} float32; {load}",
                    )
                )
            pairs = [(f"{what}-{be}", "-1proc", "-2proc", 2) for be in backends]
            pairs.append(("3d-numba", "-1thread", f"-{threads}threads", threads))
            for way, lo, hi, k in pairs:
                one, many = rates.get(f"{prefix}{way}{lo}"), rates.get(f"{prefix}{way}{hi}")
                if one and many and k > 1:
                    results.append(
                        Result(
                            "w4",
                            f"{prefix}{way}-scaling-efficiency-{k}",
                            round(100 * many / (k * one), 1),
                            "%",
                            note=f"rate({k}) / ({k} x rate(1)); goal >= 85",
                        )
                    )
                c1, c2 = cpu.get(f"{prefix}{way}-1proc"), cpu.get(f"{prefix}{way}-2proc")
                if c1 and c2:
                    results.append(
                        Result(
                            "w4",
                            f"{prefix}{way}-cpu-efficiency-2",
                            round(100 * statistics.median(c1) / statistics.median(c2), 1),
                            "%",
                            note="CPU of 1 process / CPU of 2 for the same volume: the work the "
                            "split adds (100 = none), whatever else the machine runs",
                        )
                    )
    finally:
        for pool in pools.values():
            pool.close()
    try:
        write_plot(results, RESULTS / f"w4-{dt.datetime.now():%Y%m%d-%H%M%S}.png", tag)
    except ImportError:
        pass
    return results


def _torch_ways(
    vol: np.ndarray, m: np.ndarray, shape: tuple[int, int, int], prefix: str
) -> list[tuple[str, Callable[[], Any], int]]:
    """The GPU way (torch tensors on CUDA, one batched launch), where CUDA is present. The
    torch CPU fallback is left out: it is the GPU path's stand-in, a minute per volume."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    src = torch.from_numpy(vol)[None].cuda()

    def cuda() -> Any:
        out = augment.affine_warp(src, m, shape)
        torch.cuda.synchronize()  # the clock stops when the GPU is done
        return out

    return [(f"{prefix}torch-cuda", cuda, 1)]


def write_plot(results: list[Result], path: Path, tag: str) -> None:
    """Volumes/s of every way (in-plane and 3D), and speed-up against 1 process/thread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r for r in results if r.unit == "volumes/s" and r.value == r.value]
    if not rates:
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 0.35 * len(rates) + 2.0))
    colours = ["tab:orange" if r.name.startswith("3d-rotation/") else "tab:blue" for r in rates]
    ax0.barh([r.name for r in rates], [r.value for r in rates], color=colours)
    ax0.invert_yaxis()
    ax0.set_xlabel("volumes/s")
    ax0.set_title(f"W4 {tag}: in-plane (blue), 3D rotation (orange)")
    ax0.tick_params(axis="y", labelsize=8)
    by = {r.name: r.value for r in rates}
    for key in sorted({n.rsplit("-", 1)[0] for n in by if n.endswith(("-1proc", "-1thread"))}):
        one = by.get(f"{key}-1proc", by.get(f"{key}-1thread"))
        two = by.get(f"{key}-2proc", by.get(f"{key}-2threads"))
        if one and two:
            ax1.plot([1, 2], [1.0, two / one], marker="o", label=key)
    ax1.plot([1, 2], [1, 2], "k--", label="ideal")
    ax1.set_xticks([1, 2])
    ax1.set_xlabel("processes (slices, slabs) or numba threads (3d)")
    ax1.set_ylabel("speed-up over 1")
    ax1.legend(fontsize=7)
    ax1.set_title("scaling")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
