"""W1 spatial: 128^3 patches of image + label from a 200x256x256 source.

Rotation U(-15, 15) degrees about each axis, isotropic scale U(0.85, 1.25), crop centre
uniform over the valid range, flip p=0.5 per axis; linear image, nearest label. Every way
runs the same parameter stream and is checked for the same kind of output before timing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import augment
from benchmarks.common import Result

SOURCE = (200, 256, 256)
PATCH = (128, 128, 128)


def make_source(
    shape: tuple[int, int, int] = SOURCE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'organ' in noise: float32 image (HU-like) and uint8 label."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = np.asarray(shape) / 2.0
    r = np.asarray(shape) / 3.5
    inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
    img = rng.normal(0.0, 20.0, shape).astype(np.float32)
    img[inside] += 60.0
    return img, inside.astype(np.uint8)


def w1_pipeline(patch: tuple[int, int, int] = PATCH, intensity: bool = False) -> augment.Compose:
    ts: list[Any] = [
        augment.RandomCrop(patch),
        augment.RandomAffine(degrees=15, scale=(0.85, 1.25)),
        augment.RandomFlip(axes=(0, 1, 2), p=0.5),
    ]
    if intensity:
        ts += [
            augment.Window(-200, 250),
            augment.RandomGamma((0.7, 1.5), p=0.3),
            augment.RandomNoise((0.0, 0.1), p=0.1),
            augment.RandomContrast((0.75, 1.25), p=0.15),
        ]
    return augment.Compose(ts)


def _interleaved_rates(
    ways: list[tuple[str, Callable[[int], object], int, int]], repeats: int
) -> dict[str, float | Exception]:
    """Patches per second of each way: the median over ``repeats`` rounds, where every round
    times one batch of each way in turn (ABCD ABCD ...), so the ratios between ways compare
    the same stretch of time on a machine whose speed drifts. Each way gets a warm-up batch
    and its output is checked first.

    Args:
        ways: ``(name, fn, numba threads, patches per batch)``; ``fn(i)`` makes patch ``i``.
    """
    import numba

    all_threads = numba.get_num_threads()
    counters = {name: iter(range(10**9)) for name, *_ in ways}
    times: dict[str, list[float]] = {}
    out: dict[str, float | Exception] = {}

    def batch(name: str, fn: Callable[[int], object], threads: int, n: int) -> float:
        numba.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                fn(next(counters[name]))
            return time.perf_counter() - t0
        finally:
            numba.set_num_threads(all_threads)

    for name, fn, threads, n in ways:
        try:
            check_output(fn(10**6))
            batch(name, fn, threads, n)  # warm-up
            times[name] = []
        except Exception as exc:  # a peer that breaks is reported, not fatal
            out[name] = exc
    for _ in range(repeats):
        for name, fn, threads, n in ways:
            if name in times:
                times[name].append(batch(name, fn, threads, n))
    for name, _, _, n in ways:
        if name in times:
            out[name] = n / statistics.median(times[name])
    return out


def augment_way(
    img: np.ndarray, lab: np.ndarray, intensity: bool = False
) -> Callable[[int], object]:
    aug = w1_pipeline(intensity=intensity)

    def run(i: int) -> object:
        return aug(image=img, label=lab, rng=augment.sample_rng(0, 0, i))

    return run


def scipy_way(img: np.ndarray, lab: np.ndarray) -> Callable[[int], object]:
    """Hand-written scipy.ndimage pipeline: the same matrices, order 1 image, 0 label."""
    import scipy.ndimage as ndi

    aug = w1_pipeline()
    img64 = img  # scipy works in float64 internally either way

    def run(i: int) -> object:
        params = aug.sample(augment.sample_rng(0, 0, i), img.shape)
        m = aug.matrix(params)[0]
        a = ndi.affine_transform(
            img64, m, output_shape=PATCH, order=1, mode="constant", prefilter=False
        )
        b = ndi.affine_transform(lab, m, output_shape=PATCH, order=0, mode="constant")
        return a, b

    return run


def check_output(out: object) -> None:
    """Every way must give a 128^3 float image and a {0, 1} label."""
    if isinstance(out, dict):
        image, label = out["image"], out["label"]
    else:
        image, label = out  # type: ignore[misc]
    image, label = np.asarray(image), np.asarray(label)
    if image.shape[-3:] != PATCH or label.shape[-3:] != PATCH:
        raise AssertionError(f"wrong output shapes {image.shape} {label.shape}")
    if not np.issubdtype(image.dtype, np.floating) or not set(np.unique(label)) <= {0, 1}:
        raise AssertionError(f"wrong output kinds {image.dtype} {np.unique(label)}")


def compile_seconds(repeats: int = 3) -> tuple[float, float, float, float]:
    """CPU seconds of a fresh process's ``import augment`` and first call with an empty
    numba cache, then of a second process with that cache: medians over ``repeats`` empty
    caches, and the wall seconds of the same (CPU time, because on a machine shared with
    other jobs the wall time measures them too; compilation runs on one thread).

    Returns:
        ``(cold CPU, warm CPU, cold wall, warm wall)`` medians.
    """
    code = (
        "import time, numpy as np; c, t = time.process_time(), time.perf_counter(); "
        "import augment; "
        "augment.Compose([augment.RandomAffine(10), augment.Window(0, 1)])("
        "image=np.zeros((8, 8, 8), np.float32), label=np.zeros((8, 8, 8), np.uint8), "
        "rng=np.random.default_rng(0)); print(time.process_time() - c, time.perf_counter() - t)"
    )
    runs: list[list[float]] = [[], [], [], []]
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            for k in (0, 1):
                out = subprocess.run(
                    [sys.executable, "-c", code],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                cpu, wall = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
                runs[k].append(cpu)
                runs[2 + k].append(wall)
    cold, warm, cold_wall, warm_wall = (statistics.median(r) for r in runs)
    return cold, warm, cold_wall, warm_wall


def run(quick: bool = False) -> list[Result]:
    import numba

    from benchmarks import peers

    n, repeats = (3, 3) if quick else (8, 7)
    img, lab = make_source()
    results: list[Result] = []
    all_threads = numba.get_num_threads()
    ways: list[tuple[str, Callable[[int], object], int]] = [
        ("augment-cpu-1thread", augment_way(img, lab), 1),
        ("augment-cpu-1thread+intensity", augment_way(img, lab, intensity=True), 1),
        (f"augment-cpu-{all_threads}threads", augment_way(img, lab), all_threads),
        ("scipy-1thread", scipy_way(img, lab), 1),
    ]
    for name, fn in peers.w1_ways(img, lab, w1_pipeline(), PATCH):
        ways.append((name, fn, 1))
    rates = _interleaved_rates(
        [
            (name, fn, threads, 1 if name.startswith(("scipy", "peer")) and quick else n)
            for name, fn, threads in ways
        ],
        repeats,
    )
    for name, _, threads in ways:
        rate = rates[name]
        if isinstance(rate, Exception):
            results.append(Result("w1", name, float("nan"), "patches/s", note=f"failed: {rate}"))
            continue
        base = "scipy-1thread" if name != "scipy-1thread" else None
        if name.endswith("+intensity"):
            base = "augment-cpu-1thread"
        elif name.endswith("threads") and name != "augment-cpu-1thread":
            base = "augment-cpu-1thread"
        results.append(
            Result(
                "w1",
                name,
                round(rate, 2),
                "patches/s",
                baseline=base,
                note=f"{threads} thread(s); median of {repeats} interleaved rounds",
            )
        )
    ours = next((r for r in results if r.name == "augment-cpu-1thread"), None)
    for peer in [r for r in results if r.name.startswith("peer-") and r.value == r.value]:
        if ours is not None:
            results.append(
                Result(
                    "w1",
                    f"augment-cpu-1thread-vs-{peer.name}",
                    ours.value,
                    "patches/s",
                    baseline=peer.name,
                    note="same value as above",
                )
            )
    reps = 1 if quick else 3
    cold, warm, cold_wall, warm_wall = compile_seconds(reps)
    how = f"CPU time of import augment + the first call, median of {reps}"
    results.append(
        Result(
            "w1",
            "numba-first-call-cold-cache",
            round(cold, 2),
            "s",
            note=f"fresh process, empty NUMBA_CACHE_DIR; {how} (wall {cold_wall:.2f} s)",
        )
    )
    results.append(
        Result(
            "w1",
            "numba-first-call-warm-cache",
            round(warm, 2),
            "s",
            baseline="numba-first-call-cold-cache",
            note=f"second process, cache=True kernels loaded from disk; {how} "
            f"(wall {warm_wall:.2f} s)",
        )
    )
    return results
