"""W1's kernel alone, per output voxel: the measurements behind ``benchmarks/W1_BOUND.md``.

``python -m benchmarks.w1_bound [--patches K] [--rounds R] [--callgrind | --pipeline]``

Runs the numba kernel (``augment.kernels.cpu.warp_serial``, one thread) on the pull maps of
K W1 patches (128^3 from the 200x256x256 source of :mod:`benchmarks.w1`), already planned,
so sampling, planning and numba's compilation are left out. Every case runs once per
round, the rounds interleaved (ABC ABC ...), and each figure is the median over the rounds
of CPU time (``time.thread_time``) per output voxel: a machine shared with other work
slows wall time far more than the CPU time of one thread.

The cases separate what the kernel's time is made of:

- ``w1``: trilinear float32 image and nearest uint8 label (what a W1 patch runs);
- ``w1-image-only``: no label (the label's share);
- ``w1-int16``: the image as int16 (the float conversion, and half the source bytes);
- ``l2-resident``: the same rotations on a 40^3 source that stays in the core's L2
  (linear part scaled by 1/4): the same instructions per voxel without cache misses, the
  compute-only time;
- ``w1+window``, ``w1+window+gamma``, ``w1+window+noise``: the fused intensity program;
- ``contrast``: ``contrast_inplace`` over a 128^3 patch, in place as the numpy backend
  runs the patch-mean contrast after the warp (a pass for the sum, min and max, then the
  scaling pass), on the same patch every call (clipped to its range: the same work each
  time).

``--pipeline`` instead times whole W1 samples (``benchmarks.w1``'s pipeline, one numba
thread) without and with the intensity pipeline, the same patches interleaved, and prints
the ratio over all of them and per patch grouped by the intensity ops each drew.

It first prints what the pull maps touch per output voxel (source voxels, the distinct
64-byte lines of the image's eight taps and of the label's nearest tap, the bytes written)
and one thread's ``np.copyto`` rate, whose product is the memory floor: the time W1 would
take if it only moved its bytes.

``--callgrind`` also counts, per output voxel, instructions, data reads and writes, and
read misses of callgrind's simulated L1 and last-level (``LL_CACHE``) caches under ``valgrind
--tool=callgrind --cache-sim=yes`` (independent of the machine's load): each case runs in a
fresh process that warms up on one set of pull maps, then runs one call (or two) on sets it
has not seen; the difference of the two processes' counts is one call's. Valgrind has no
AVX-512, so these processes compile the kernels for ``haswell`` (AVX2, FMA) into their own
numba cache, filled first by a native run; the counts are of that code, not of the host's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

import augment
from augment.kernels import program as pg
from benchmarks.w1 import PATCH, SOURCE, make_source, w1_pipeline

SMALL = (40, 40, 40)
VOXELS = int(np.prod(PATCH))
CASES = (
    "w1",
    "w1-image-only",
    "w1-int16",
    "l2-resident",
    "w1+window",
    "w1+window+gamma",
    "w1+window+noise",
    "contrast",
)
WINDOW = pg.concat(pg.op(pg.CLIP, -200.0, 250.0), pg.op(pg.AFFINE, 1 / 450, 200 / 450))
PROGRAMS = {
    "w1+window": WINDOW,
    "w1+window+gamma": pg.concat(WINDOW, pg.op(pg.GAMMA, 0.8, 0.0, 1.0)),
    "w1+window+noise": pg.concat(WINDOW, pg.op(pg.NOISE, 0.05, 1234.0)),
}
# valgrind 3.19 decodes AVX2 and FMA but not AVX-512
VALGRIND_CPU = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+sse4.2,+popcnt,+bmi,+bmi2,+f16c,+lzcnt,+movbe",
}


def w1_matrices(patches: int) -> list[np.ndarray]:
    """The ``(3, 4)`` pull maps of W1's first ``patches`` interpolated patches."""
    aug = w1_pipeline()
    out: list[np.ndarray] = []
    i = 0
    while len(out) < patches:
        plan = aug.plan(aug.sample(augment.sample_rng(0, 0, i), SOURCE))
        if plan.exact[0] is None:
            out.append(np.ascontiguousarray(plan.matrices[0]))
        i += 1
    return out


def l2_matrices(matrices: list[np.ndarray]) -> list[np.ndarray]:
    """The same rotations, scaled by 1/4 about the patch centre onto the centre of a
    ``SMALL`` source: every tap inside it."""
    centre_out = (np.asarray(PATCH) - 1) / 2
    centre_in = (np.asarray(SMALL) - 1) / 2
    out = []
    for m in matrices:
        s = m.copy()
        s[:, :3] *= 0.25
        s[:, 3] = centre_in - s[:, :3] @ centre_out
        out.append(s)
    return out


def footprint(
    matrices: list[np.ndarray], source: tuple[int, int, int] = SOURCE
) -> dict[str, float]:
    """What the ``(3, 4)`` pull maps of ``PATCH``-shaped outputs touch in a ``source``-shaped
    float32 image and uint8 label, per output voxel (means over the maps).

    Returns:
        ``src_voxels``: source voxels per output voxel (``|det|`` of the linear part);
        ``img_lines``, ``lab_lines``: distinct 64-byte cache lines of the float32 image
        (eight trilinear taps) and of the uint8 label (the nearest tap) per output voxel,
        i.e. the bytes a patch must bring from memory at least once, divided by 64.
    """
    src = np.asarray(source)
    sy, sz = int(src[2]), int(src[1] * src[2])
    grid = np.indices(PATCH, dtype=np.float64).reshape(3, -1)
    taps = np.array([dz * sz + dy * sy + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)])
    img_seen = np.zeros(int(np.prod(src)) * 4 // 64 + 1, bool)
    lab_seen = np.zeros(int(np.prod(src)) // 64 + 1, bool)
    dets, img_lines, lab_lines = [], [], []
    for m in matrices:
        c = m[:, :3] @ grid + m[:, 3:]
        base = np.floor(c).astype(np.int64)
        near = np.floor(c + 0.5).astype(np.int64)
        img_seen[:] = False
        lab_seen[:] = False
        ok = np.all((base >= 0) & (base < src[:, None] - 1), axis=0)
        p = base[0, ok] * sz + base[1, ok] * sy + base[2, ok]
        for t in taps:
            img_seen[(p + t) * 4 // 64] = True
        ok = np.all((near >= 0) & (near < src[:, None]), axis=0)
        lab_seen[(near[0, ok] * sz + near[1, ok] * sy + near[2, ok]) // 64] = True
        dets.append(abs(np.linalg.det(m[:, :3])))
        img_lines.append(img_seen.sum() / VOXELS)
        lab_lines.append(lab_seen.sum() / VOXELS)
    return {
        "src_voxels": float(np.mean(dets)),
        "img_lines": float(np.mean(img_lines)),
        "lab_lines": float(np.mean(lab_lines)),
    }


def copy_ns_per_byte(mib: int = 256, rounds: int = 3) -> float:
    """One thread's CPU ns per byte moved by a ``mib`` MiB ``np.copyto`` (far larger than
    the caches; each byte copied is one byte read and one written, so two moved): the
    memory system's rate as one core sees it, median of ``rounds``."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = []
    for _ in range(rounds):
        t0 = time.thread_time()
        np.copyto(dst, src)
        t.append((time.thread_time() - t0) / (2 * src.nbytes) * 1e9)
    return statistics.median(t)


def kernel_cases(patches: int, sets: int = 1) -> dict[str, Callable[[int], None]]:
    """One callable per case of ``CASES``: ``fn(k)`` runs the kernel over set ``k`` of
    ``sets`` sets of ``patches`` W1 pull maps each (the first ``patches * sets`` maps)."""
    from augment.kernels import cpu

    img, lab = make_source()
    src = img.shape
    flat_img, flat_lab = img.reshape(-1), lab.reshape(-1)
    img16 = np.round(img).astype(np.int16).reshape(-1)
    small_img = np.random.default_rng(1).normal(size=SMALL).astype(np.float32).reshape(-1)
    small_lab = (small_img > 0).astype(np.uint8)
    out_img = np.empty(VOXELS, np.float32)
    out_lab = np.empty(VOXELS, np.uint8)
    no_lab = np.zeros(0, np.uint8)
    none = pg.empty()
    every = w1_matrices(patches * sets)
    ms = [every[k * patches : (k + 1) * patches] for k in range(sets)]
    small_ms = [l2_matrices(maps) for maps in ms]
    patch_value = np.random.default_rng(2).normal(0.4, 0.2, VOXELS).astype(np.float32)

    def warp(
        image: np.ndarray,
        label: np.ndarray,
        shape: tuple[int, ...],
        maps: list[np.ndarray],
        prog: np.ndarray,
    ) -> None:
        nl = 1 if label.size else 0
        olab = out_lab if nl else no_lab
        for m in maps:
            cpu.warp_serial(image, label, m, out_img, olab, 1, nl, shape, PATCH, 0.0, 0, prog, True)

    def contrast(k: int) -> None:
        for _ in ms[k]:
            cpu.contrast_inplace(patch_value, 1.1, 0.0, True, True)

    def fused(prog: np.ndarray) -> Callable[[int], None]:
        return lambda k: warp(flat_img, flat_lab, src, ms[k], prog)

    cases: dict[str, Callable[[int], None]] = {
        "w1": lambda k: warp(flat_img, flat_lab, src, ms[k], none),
        "w1-image-only": lambda k: warp(flat_img, no_lab, src, ms[k], none),
        "w1-int16": lambda k: warp(img16, flat_lab, src, ms[k], none),
        "l2-resident": lambda k: warp(small_img, small_lab, SMALL, small_ms[k], none),
        "contrast": contrast,
    }
    for name, prog in PROGRAMS.items():
        cases[name] = fused(prog)
    return {name: cases[name] for name in CASES}


def cpu_ns_per_voxel(patches: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each case's CPU ns per output voxel."""
    cases = kernel_cases(patches)
    for fn in cases.values():
        fn(0)  # compile or load from the cache, warm the source
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.thread_time()
            fn(0)
            times[name].append((time.thread_time() - t0) / (patches * VOXELS) * 1e9)
    return {name: statistics.median(t) for name, t in times.items()}


EVENTS = ("Ir", "Dr", "Dw", "D1mr", "DLmr")
# the VM's 32 MiB, 16-way L3 (lscpu): valgrind's own reading of its cpuid is a 256 MiB LL,
# which would hold the whole source
LL_CACHE = "33554432,16,64"
CALL_SETS = 3  # warm-up, first call, second call: both callgrind children sample all three


def _events(case: str, calls: int, env: dict[str, str]) -> dict[str, int]:
    """Callgrind's counts (``EVENTS``: instructions, data reads and writes, L1 and
    last-level data read misses of its simulated caches) for a process that warms
    ``case`` up, then runs it ``calls`` times."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--cache-sim=yes",
        f"--LL={LL_CACHE}",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.w1_bound",
        "--run-case",
        case,
        "--calls",
        str(calls),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    names = re.search(r"Events\s*:\s*([\w ]+)\n", done.stderr)
    counts = re.search(r"Collected\s*:\s*([\d ]+)\n", done.stderr)
    if names is None or counts is None:
        raise RuntimeError(f"no event counts in callgrind's output:\n{done.stderr[-2000:]}")
    got = dict(zip(names.group(1).split(), (int(c) for c in counts.group(1).split()), strict=True))
    missing = [e for e in EVENTS if e not in got]
    if missing:
        raise RuntimeError(f"callgrind did not count {missing}:\n{done.stderr[-2000:]}")
    return {e: got[e] for e in EVENTS}


def callgrind_per_voxel(cases: tuple[str, ...], patches: int) -> dict[str, dict[str, float]]:
    """``EVENTS`` per output voxel of each case: (counts with two kernel calls - counts
    with one, after the same warm-up) / (patches * voxels), code compiled for
    ``VALGRIND_CPU``."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {
            **os.environ,
            **VALGRIND_CPU,
            "NUMBA_CACHE_DIR": cache,
            "W1_BOUND_PATCHES": str(patches),
        }
        for case in cases:
            # fill the numba cache natively: compiling under valgrind would take minutes
            subprocess.run(
                [sys.executable, "-m", "benchmarks.w1_bound", "--run-case", case, "--calls", "0"],
                env=env,
                check=True,
            )
            one = _events(case, 1, env)
            two = _events(case, 2, env)
            out[case] = {e: (two[e] - one[e]) / (patches * VOXELS) for e in EVENTS}
    return out


def run_case(case: str, calls: int) -> None:
    """The callgrind child: warm ``case`` up on the first of ``CALL_SETS`` sets of pull
    maps, then run it on the next ``calls`` sets (each call on maps it has not seen, as W1
    runs: its source lines come from the last level or from memory, not from the L1)."""
    if not 0 <= calls < CALL_SETS:
        raise ValueError(f"--calls {calls}: at most {CALL_SETS - 1}")
    fn = kernel_cases(int(os.environ.get("W1_BOUND_PATCHES", "2")), CALL_SETS)[case]
    fn(0)
    for k in range(calls):
        fn(k + 1)


def pipeline_ratios(patches: int, rounds: int) -> None:
    """Print the CPU time of W1 samples with the intensity pipeline over without (one
    numba thread, the same ``patches`` interleaved, medians over ``rounds``): over all
    patches, and per patch grouped by the intensity ops drawn."""
    import numba

    numba.set_num_threads(1)
    img, lab = make_source()
    plain, full = w1_pipeline(), w1_pipeline(intensity=True)
    names = ("window", "gamma", "noise", "contrast")
    drawn = []
    for i in range(patches):
        out = full(image=img, label=lab, rng=augment.sample_rng(0, 0, i))
        active = [bool(p.active[0]) for p in out["params"].intensity]
        drawn.append("+".join(n for n, a in zip(names, active, strict=True) if a))
    plain(image=img, label=lab, rng=augment.sample_rng(0, 0, 0))
    per: dict[str, list[list[float]]] = {"plain": [[] for _ in range(patches)]}
    per["full"] = [[] for _ in range(patches)]
    for _ in range(rounds):
        for i in range(patches):
            for name, aug in (("plain", plain), ("full", full)):
                t0 = time.thread_time()
                aug(image=img, label=lab, rng=augment.sample_rng(0, 0, i))
                per[name][i].append(time.thread_time() - t0)
    sums = {n: [sum(t[r] for t in per[n]) for r in range(rounds)] for n in per}
    ratio = statistics.median(f / p for p, f in zip(sums["plain"], sums["full"], strict=True))
    ms_plain = statistics.median(sums["plain"]) / patches * 1e3
    print(f"W1 with / without the intensity pipeline, {patches} patches x {rounds} rounds,")
    print(f"one thread: {ratio:.4f} (+{100 * (ratio - 1):.1f} %); W1 {ms_plain:.2f} ms a patch")
    groups: dict[str, list[float]] = {}
    for i in range(patches):
        r = statistics.median(per["full"][i]) / statistics.median(per["plain"][i])
        groups.setdefault(drawn[i], []).append(r)
    for g, rs in sorted(groups.items()):
        print(f"  {g:30s} {len(rs):4d} patches  +{100 * (statistics.median(rs) - 1):5.1f} %")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=8, help="W1 patches per case and round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument(
        "--callgrind", action="store_true", help="count instructions and simulated cache misses"
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="W1 samples with / without intensity, per patch"
    )
    parser.add_argument("--run-case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_case:
        run_case(args.run_case, args.calls)
        return
    if args.pipeline:
        pipeline_ratios(args.patches, args.rounds)
        return
    ns = cpu_ns_per_voxel(args.patches, args.rounds)
    cg = callgrind_per_voxel(("w1", "w1-image-only", "l2-resident"), 2) if args.callgrind else {}
    fp = footprint(w1_matrices(args.patches))
    copy = copy_ns_per_byte()
    img_b, lab_b = 64 * fp["img_lines"], 64 * fp["lab_lines"]
    print(f"W1 pull maps ({args.patches} patches), per output voxel:")
    print(f"  source voxels (|det|)            {fp['src_voxels']:8.3f}")
    print(f"  taps                             {8:8d} image (trilinear) + 1 label (nearest)")
    print(f"  image lines touched x 64 B       {img_b:8.2f} B (float32 source)")
    print(f"  label lines touched x 64 B       {lab_b:8.2f} B (uint8 source)")
    print(f"  written                          {5:8d} B (float32 image + uint8 label)")
    print(f"  copy, one thread, CPU ns/B moved {copy:8.3f} (np.copyto of 256 MiB)")
    print(f"  => memory floor, ns/voxel        {(img_b + lab_b + 5) * copy:8.2f}")
    print(f"W1 kernel, one thread, {args.patches} patches x {args.rounds} interleaved rounds")
    head = "".join(f"{e + '/vox':>9s}" for e in EVENTS) if cg else ""
    print(f"{'case':18s} {'CPU ns/vox':>10s}{head}")
    for name in CASES:
        extra = "".join(f"{cg[name][e]:9.2f}" for e in EVENTS) if name in cg else ""
        print(f"{name:18s} {ns[name]:10.2f}{extra}")
    if cg:
        print(
            "callgrind: code for haswell (AVX2), its simulated caches; Dr/Dw data reads and"
            " writes, D1mr/DLmr L1 and last-level read misses"
        )


if __name__ == "__main__":
    main()
