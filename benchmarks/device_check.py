#!/usr/bin/env python
"""One prepared GPU check of the augmentation engine (issue 3), a few minutes on one GPU.

    python benchmarks/device_check.py                      # every section
    python benchmarks/device_check.py --sections check,w1  # some of them
    python benchmarks/device_check.py --dry-run            # CPU, tiny sizes, torch path only
    python benchmarks/device_check.py --interpret          # dry run, Triton interpreted (slow)

Sections run in order; each is wrapped so that a failure prints its traceback and the
rest still run. Every figure is printed as it is measured and again in a table at the
end; the rows go to ``--json`` (default ``$OUT/device_check.json`` when ``$OUT`` is set).

- ``env``: versions, the GPU.
- ``bandwidth``: device-to-device copy, GB/s (read + write).
- ``check``: the correctness checks, which are the ``gpu``-marked tests of
  ``tests/augment`` (``pytest -m gpu tests/augment`` in a subprocess; one row per test):
  the Triton kernel and the torch path on the device against the numba CPU path, scipy's
  float64 ``affine_transform`` and numpy's index operations, and Compose on the device
  against numpy. They run before anything is timed; without CUDA they skip.
- ``w1``: W1 batched (8 x 128^3 from 200x256x256 float32 + uint8 sources on the device,
  host-drawn W1 parameters): Triton float32 and bfloat16 output, the torch path on the
  device, hand-written ``affine_grid`` + ``grid_sample``; patches/s, ratios, the goals.
- ``elastic``: W7 batched (W1 plus ``RandomElastic``): the Triton kernel and the torch
  path with and without the deformation on the same matrices, the elastic cost, one
  sample against the numba path.
- ``compose``: ``Compose`` end to end on device batches (host sampling included).
- ``peers``: MONAI and Kornia on the GPU where importable.

More sections: decorate ``def section(ctx: Ctx) -> None`` with ``@register("name")``
here (or in a module passed with ``--extra module``) and name it in ``--sections``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REL_GOAL = 1e-5
W1_GOAL = 40_000.0
GRID_RATIO_GOAL = 12.0
BF16_RATIO_GOAL = 1.3

ROWS: list[dict[str, Any]] = []
SECTIONS: dict[str, Callable[[Ctx], None]] = {}


@dataclass
class Ctx:
    """What every section gets: the device, the mode, the clock and shared state."""

    device: torch.device
    dry: bool
    triton: bool
    seed: int
    budget_s: float
    t0: float = field(default_factory=time.perf_counter)
    store: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def register(name: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    """Add a section under ``name`` (runs in registration order unless --sections says)."""

    def deco(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        SECTIONS[name] = fn
        return fn

    return deco


def say(*args: Any) -> None:
    print(*args, flush=True)


def row(
    section: str, name: str, value: Any, unit: str = "", ok: bool | None = None, note: str = ""
) -> None:
    """Record one figure and print it at once."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
    ROWS.append(
        {"section": section, "name": name, "value": value, "unit": unit, "ok": ok, "note": note}
    )
    flag = "" if ok is None else ("  PASS" if ok else "  FAIL")
    say(f"  [{section}] {name}: {fmt(value)} {unit}{flag}{'  (' + note + ')' if note else ''}")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:,.4g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def attempt(section: str, name: str, fn: Callable[[], None]) -> None:
    """Run one sub-check; a failure becomes a FAIL row with the error, and we go on."""
    try:
        fn()
    except Exception as e:  # a device check must keep going
        traceback.print_exc()
        sys.stderr.flush()
        row(section, name, "error", ok=False, note=f"{type(e).__name__}: {e}"[:300])


def rel_err(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref| over the whole output (padding included)."""
    g = got.detach().float().cpu().numpy() if isinstance(got, torch.Tensor) else got
    r = ref.detach().float().cpu().numpy() if isinstance(ref, torch.Tensor) else ref
    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
    return float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30))


def agree(got: Any, ref: Any) -> float:
    g = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
    r = ref.cpu().numpy() if isinstance(ref, torch.Tensor) else ref
    return float((np.asarray(g) == np.asarray(r)).mean())


# -- sections ---------------------------------------------------------------------------------
@register("env")
def section_env(ctx: Ctx) -> None:
    row("env", "python", platform.python_version())
    row("env", "torch", torch.__version__, note=f"cuda {torch.version.cuda}")
    for mod in ("triton", "numpy", "numba", "scipy", "monai", "kornia"):
        try:
            row("env", mod, importlib.import_module(mod).__version__)
        except Exception as e:
            row("env", mod, "not installed", note=type(e).__name__)
    row("env", "cpu cores", os.cpu_count() or 0)
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        row(
            "env",
            "gpu",
            p.name,
            note=f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.1f} GiB",
        )
    row(
        "env",
        "triton kernel",
        "used" if ctx.triton else "not used",
        note="dry run" if ctx.dry else ("" if ctx.triton else "triton not importable"),
    )


@register("bandwidth")
def section_bandwidth(ctx: Ctx) -> None:
    n = (1 << 18) if ctx.dry else (1 << 28)  # 1 GiB of float32 on the device
    src = torch.empty(n, dtype=torch.float32, device=ctx.device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for i in range(11):
        ctx.sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        ctx.sync()
        if i:
            times.append(time.perf_counter() - t0)
    gbs = 2 * n * 4 / statistics.median(times) / 1e9
    row("bandwidth", "device copy (read + write)", gbs, "GB/s")
    ctx.store["copy_gbs"] = gbs
    del src, dst


@register("check")
def section_check(ctx: Ctx) -> None:
    """``pytest -m gpu tests/augment`` in a subprocess; a row per test from its JUnit XML."""
    import subprocess
    import tempfile
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gpu-tests.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            str(ROOT / "tests" / "augment"),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(ROOT), env=env, timeout=max(ctx.left(), 60.0))
        took = time.perf_counter() - t0
        if not report.exists():
            row("check", "pytest -m gpu", f"exit {proc.returncode}", ok=False, note="no report")
            return
        cases = ET.parse(report).getroot().iter("testcase")
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for case in cases:
            name = case.get("name", "?").removeprefix("test_cuda_")
            outcome = "passed"
            note = ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, note = "failed", (child.get("message") or "")[:200]
                elif child.tag == "skipped":
                    outcome, note = "skipped", (child.get("message") or "")[:200]
            counts[outcome] += 1
            ok = None if outcome == "skipped" else outcome == "passed"
            row("check", name, outcome, ok=ok, note=note)
    all_ok = counts["failed"] == 0 and proc.returncode in (0, 5) and counts["passed"] > 0
    row(
        "check",
        "gpu tests passed / failed / skipped",
        f"{counts['passed']} / {counts['failed']} / {counts['skipped']}",
        ok=None if ctx.dry else all_ok,
        note=f"pytest exit {proc.returncode}, {took:.0f} s",
    )


@register("w1")
def section_w1(ctx: Ctx) -> None:
    from augment.kernels import torch_fallback as tk
    from benchmarks import w1_gpu as w

    dev = ctx.device
    if ctx.dry:
        batch, src_shape, patch, n_b, reps = 2, (40, 48, 48), (24, 24, 24), 2, 2
    else:
        batch, src_shape, patch, n_b, reps = w.BATCH, w.SOURCE, w.PATCH, 12, 7
    img, lab = w.make_sources(batch, src_shape, dev, ctx.seed)
    compose = w.w1_compose(patch)
    t0 = time.perf_counter()
    mats = w.draw_matrices(compose, n_b, batch, src_shape, ctx.seed)
    row("w1", "host parameter draw", (time.perf_counter() - t0) / (n_b * batch) * 1e6, "us/sample")
    rate: dict[str, float] = {}
    outs: dict[str, Any] = {}

    def measure(name: str, run: Callable[[int], Any], n: int, repeats: int) -> None:
        t1 = time.perf_counter()
        outs[name] = run(0)
        ctx.sync()
        first = time.perf_counter() - t1
        times, host = w.time_batches(run, n, repeats, dev)
        rate[name] = n * batch / statistics.median(times)
        row(
            "w1",
            name,
            rate[name],
            "patches/s",
            note=f"median of {repeats}, {n} batches of {batch}; first call {first:.2f} s; "
            f"host {host * 1e6:.0f} us/call; spread {min(times) / max(times):.2f}",
        )

    if ctx.triton:
        from augment.kernels import triton_warp as trw

        for name, dt in (("triton-f32", torch.float32), ("triton-bf16", torch.bfloat16)):

            def api(name: str = name, dt: torch.dtype = dt) -> None:
                measure(
                    name,
                    lambda k: trw.warp_batch(img, lab, mats[k], patch, out_dtype=dt),
                    n_b,
                    reps,
                )

            attempt("w1", name, api)

            def kernel_only(name: str = name, dt: torch.dtype = dt) -> None:
                ready = [trw.prepare(img, lab, mats[k], patch, out_dtype=dt) for k in range(n_b)]
                measure(f"{name} kernel", lambda k: ready[k](), n_b, reps)

            attempt("w1", f"{name} kernel", kernel_only)
        for key, cfg, ms in trw.TUNE_LOG:
            out_dt = key[3].replace("torch.", "")
            row(
                "w1",
                f"tune {out_dt} TY,TX,warps,VEC={cfg}",
                batch * 1000.0 / ms,
                "patches/s",
                note="one launch, best of 3",
            )
        for key, cfg in trw.tuned_configs().items():
            row("w1", f"chosen config ({key[3].replace('torch.', '')})", str(cfg))
    else:
        row("w1", "triton", "skipped", note="dry run" if ctx.dry else "triton not importable")
    attempt(
        "w1",
        "torch-path",
        lambda: measure(
            "torch-path",
            lambda k: tk.warp_batch(img, lab, mats[k], patch),
            min(n_b, 2),
            max(2, reps // 3),
        ),
    )
    lab_f = lab.float()  # converted once, outside the timing (a fair hand-written pipeline)
    attempt(
        "w1",
        "grid_sample",
        lambda: measure(
            "grid_sample",
            lambda k: w.grid_sample_warp(img, lab_f, mats[k], patch),
            min(n_b, 4),
            max(3, reps // 2),
        ),
    )

    def agreement() -> None:
        ref = outs.get("triton-f32") or outs.get("torch-path")
        gs = outs.get("grid_sample")
        if ref is None or gs is None:
            return
        e = rel_err(ref[0], gs[0])
        a = agree(ref[1], gs[1])
        row(
            "w1",
            "engine vs grid_sample (same matrices) rel err",
            e,
            ok=e < 1e-3,
            note="float32 normalised grid; a check of the matrix conversion",
        )
        row(
            "w1",
            "engine vs grid_sample labels equal",
            a,
            ok=a > 0.999,
            note="grid_sample rounds half to even",
        )
        if "triton-f32" in outs and "torch-path" in outs:
            e = rel_err(outs["triton-f32"][0], outs["torch-path"][0])
            row("w1", "triton vs torch path rel err", e, ok=e < REL_GOAL)

    attempt("w1", "agreement", agreement)
    ctx.store["w1_rate"] = rate

    def goals() -> None:
        f32, bf = rate.get("triton-f32"), rate.get("triton-bf16")
        gs, tp = rate.get("grid_sample"), rate.get("torch-path")
        f32k, bfk = rate.get("triton-f32 kernel"), rate.get("triton-bf16 kernel")
        if f32k:
            row(
                "w1",
                "goal: triton-f32 kernel >= 40,000 patches/s (H100)",
                f32k,
                "patches/s",
                ok=f32k >= W1_GOAL if not ctx.dry else None,
                note="pre-built launches",
            )
        if f32k and bfk:
            row(
                "w1",
                "ratio triton-bf16 / triton-f32 (kernel)",
                bfk / f32k,
                "x",
                ok=bfk / f32k >= BF16_RATIO_GOAL if not ctx.dry else None,
            )
        if f32:
            row(
                "w1",
                "goal: triton-f32 >= 40,000 patches/s (H100)",
                f32,
                "patches/s",
                ok=f32 >= W1_GOAL if not ctx.dry else None,
                note="API call per batch",
            )
        if f32 and gs:
            row(
                "w1",
                "ratio triton-f32 / grid_sample",
                f32 / gs,
                "x",
                ok=f32 / gs >= GRID_RATIO_GOAL if not ctx.dry else None,
            )
        if f32 and bf:
            row(
                "w1",
                "ratio triton-bf16 / triton-f32 (API)",
                bf / f32,
                "x",
                ok=bf / f32 >= BF16_RATIO_GOAL if not ctx.dry else None,
            )
        if tp and gs:
            row("w1", "ratio torch-path / grid_sample", tp / gs, "x")
        gbs = ctx.store.get("copy_gbs")
        if f32 and gbs:
            moved = f32 * float(np.prod(patch)) * 5.0 / 1e9
            row(
                "w1",
                "triton-f32 output write rate",
                moved,
                "GB/s",
                note=f"{moved / gbs:.0%} of the device copy rate",
            )

    attempt("w1", "goals", goals)


@register("elastic")
def section_elastic(ctx: Ctx) -> None:
    """W7 batched: W1 plus ``RandomElastic`` (``benchmarks.w7``) against W1 alone on the
    same matrices, through the Triton kernel (API call and pre-built launch) and the torch
    path; one sample checked against the numba path first."""
    from augment.backends.numpy import warp_numpy
    from augment.kernels import torch_fallback as tk
    from augment.plan import stack_params
    from augment.rng import batch_rngs
    from benchmarks import w1_gpu as w
    from benchmarks import w7

    dev = ctx.device
    if ctx.dry:
        batch, src_shape, patch, n_b, reps = 2, (40, 48, 48), (24, 24, 24), 2, 2
    else:
        batch, src_shape, patch, n_b, reps = w.BATCH, w.SOURCE, w.PATCH, 12, 7
    img, lab = w.make_sources(batch, src_shape, dev, ctx.seed)
    compose = w7.w7_pipeline(patch)
    mats, fields = [], []
    for k in range(n_b):
        params = stack_params(
            [compose.sample(g, src_shape) for g in batch_rngs(ctx.seed, k, range(batch))]
        )
        mats.append(compose.matrix(params))
        field = compose.field(params)
        if field is None:
            raise RuntimeError("W7's draws should displace every batch")
        fields.append(field)
    rate: dict[str, float] = {}

    def measure(name: str, run: Callable[[int], Any], n: int, repeats: int) -> None:
        run(0)
        ctx.sync()
        times, host = w.time_batches(run, n, repeats, dev)
        rate[name] = n * batch / statistics.median(times)
        row(
            "elastic",
            name,
            rate[name],
            "patches/s",
            note=f"median of {repeats}, {n} batches of {batch}; host {host * 1e6:.0f} us/call",
        )

    def agreement() -> None:
        if ctx.triton:
            from augment.kernels import triton_warp as trw

            got, got_lab = trw.warp_batch(img, lab, mats[0], patch, field=fields[0])
            name = "triton"
        else:
            got, got_lab = tk.warp_batch(img, lab, mats[0], patch, field=fields[0])
            name = "torch path"
        assert got is not None and got_lab is not None
        host_img, host_lab = img[0].cpu().numpy(), lab[0].cpu().numpy()
        ref, ref_lab = warp_numpy(host_img, host_lab, mats[0][0], patch, field=fields[0][0])
        e = rel_err(got[0], ref)
        row("elastic", f"{name} vs numba rel err", e, ok=e < REL_GOAL)
        a = agree(got_lab[0], ref_lab)
        row("elastic", f"{name} vs numba labels equal", a, ok=a >= 0.999)

    attempt("elastic", "agreement", agreement)
    if ctx.triton:
        from augment.kernels import triton_warp as trw

        for name, with_field in (("triton W1", False), ("triton W7", True)):

            def api(name: str = name, with_field: bool = with_field) -> None:
                measure(
                    name,
                    lambda k: trw.warp_batch(
                        img, lab, mats[k], patch, field=fields[k] if with_field else None
                    ),
                    n_b,
                    reps,
                )

            attempt("elastic", name, api)

            def kernel_only(name: str = name, with_field: bool = with_field) -> None:
                ready = [
                    trw.prepare(img, lab, mats[k], patch, field=fields[k] if with_field else None)
                    for k in range(n_b)
                ]
                measure(f"{name} kernel", lambda k: ready[k](), n_b, reps)

            attempt("elastic", f"{name} kernel", kernel_only)
    else:
        row("elastic", "triton", "skipped", note="dry run" if ctx.dry else "triton not importable")
    for name, with_field in (("torch-path W1", False), ("torch-path W7", True)):

        def fallback(name: str = name, with_field: bool = with_field) -> None:
            measure(
                name,
                lambda k: tk.warp_batch(
                    img, lab, mats[k], patch, field=fields[k] if with_field else None
                ),
                min(n_b, 2),
                max(2, reps // 3),
            )

        attempt("elastic", name, fallback)
    for prefix in ("triton", "triton kernel", "torch-path"):
        plain, deformed = rate.get(f"{prefix} W1"), rate.get(f"{prefix} W7")
        if prefix == "triton kernel":
            plain, deformed = rate.get("triton W1 kernel"), rate.get("triton W7 kernel")
        if plain and deformed:
            row(
                "elastic",
                f"{prefix}: elastic cost",
                100.0 * (plain / deformed - 1.0),
                "%",
                note="time of W7 over W1, minus 1 (the CPU goal is <= 30 %)",
            )


@register("compose")
def section_compose(ctx: Ctx) -> None:
    from augment.rng import batch_rngs
    from benchmarks import w1_gpu as w

    dev = ctx.device
    if ctx.dry:
        batch, src_shape, patch, n_b = 2, (40, 48, 48), (24, 24, 24), 2
    else:
        batch, src_shape, patch, n_b = w.BATCH, w.SOURCE, w.PATCH, 6
    img, lab = w.make_sources(batch, src_shape, dev, ctx.seed)
    backend = "triton" if ctx.triton else "torch"
    for name, intensity, dt in (
        ("Compose W1", False, torch.float32),
        ("Compose W2 intensity", True, torch.float32),
        ("Compose W1 bf16", False, torch.bfloat16),
    ):
        aug = w.w1_compose(patch, intensity=intensity)

        def run(k: int, aug: Any = aug, dt: torch.dtype = dt) -> Any:
            return aug(
                image=img,
                label=lab,
                rng=batch_rngs(ctx.seed, k, range(batch)),
                backend=backend,
                out_dtype=dt,
            )

        def once(name: str = name, run: Callable[[int], Any] = run) -> None:
            times, host = w.time_batches(run, n_b, 3, dev)
            row(
                "compose",
                name,
                n_b * batch / statistics.median(times),
                "patches/s",
                note=f"host sampling included; host {host * 1e3:.1f} ms/batch",
            )

        attempt("compose", name, once)


@register("peers")
def section_peers(ctx: Ctx) -> None:
    from benchmarks import w1_gpu as w

    dev = ctx.device
    if ctx.dry:
        batch, src_shape, patch, n = 2, (40, 48, 48), (24, 24, 24), 2
    else:
        batch, src_shape, patch, n = w.BATCH, w.SOURCE, w.PATCH, 8

    def monai() -> None:
        try:
            import monai.transforms as mt
        except ImportError:
            row("peers", "monai", "not installed")
            return
        img, lab = w.make_sources(1, src_shape, dev, ctx.seed)
        t = mt.Compose(
            [
                mt.RandAffined(
                    keys=["image", "label"],
                    mode=("bilinear", "nearest"),
                    prob=1.0,
                    rotate_range=(np.pi / 12,) * 3,
                    scale_range=(0.2, 0.2, 0.2),
                    spatial_size=patch,
                    padding_mode="zeros",
                    device=dev,
                ),
                mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
                mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            ]
        )
        t.set_random_state(seed=ctx.seed)
        sample = {"image": img[0], "label": lab[0]}
        out = t(dict(sample))
        if tuple(out["image"].shape[1:]) != tuple(patch):
            raise RuntimeError(f"monai gave {tuple(out['image'].shape)}")
        times, _ = w.time_batches(lambda k: t(dict(sample)), n, 2, dev)
        row(
            "peers",
            "monai RandAffined+RandFlipd per sample",
            n / statistics.median(times),
            "patches/s",
            note=f"monai {importlib.import_module('monai').__version__}",
        )

    attempt("peers", "monai", monai)

    def kornia() -> None:
        try:
            import kornia.augmentation as ka
        except ImportError:
            row("peers", "kornia", "not installed")
            return
        img, _ = w.make_sources(batch, src_shape, dev, ctx.seed)
        t = torch.nn.Sequential(
            ka.RandomCrop3D(patch),
            ka.RandomAffine3D(degrees=15, scale=(0.85, 1.25), p=1.0),
            ka.RandomHorizontalFlip3D(),
            ka.RandomVerticalFlip3D(),
            ka.RandomDepthicalFlip3D(),
        )
        times, _ = w.time_batches(lambda k: t(img), 2, 2, dev)
        row(
            "peers",
            "kornia crop+affine+flips, image only",
            2 * batch / statistics.median(times),
            "patches/s",
        )

    attempt("peers", "kornia", kornia)


# -- driver ------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def table() -> str:
    lines = [f"{'section':<10} {'name':<52} {'value':>14} {'unit':<10} {'ok':<5} note"]
    for r in ROWS:
        ok = "" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
        lines.append(
            f"{r['section']:<10} {r['name'][:52]:<52} {fmt(r['value']):>14} "
            f"{r['unit']:<10} {ok:<5} {r['note'][:90]}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sections: " + ", ".join(SECTIONS),
    )
    ap.add_argument(
        "--sections",
        default="all",
        help="comma-separated sections to run, in this order (default: all)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, tiny sizes, torch path only: checks that the script runs",
    )
    ap.add_argument(
        "--json",
        default=None,
        help="where to write the rows (default: $OUT/device_check.json if $OUT)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds; sections that would start after this are skipped",
    )
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="import this module first (it may @register more sections)",
    )
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="with --dry-run: the Triton kernel under TRITON_INTERPRET=1 on the CPU "
        "(slow; tests this script's Triton paths without a GPU)",
    )
    args = ap.parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules:
            ap.error("--interpret must be set before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        args.dry_run = True
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    for mod in args.extra:
        importlib.import_module(mod)
    names = (
        list(SECTIONS)
        if args.sections == "all"
        else [s.strip() for s in args.sections.split(",") if s.strip()]
    )
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")

    cuda = torch.cuda.is_available()
    dry = args.dry_run or not cuda
    if not cuda and not args.dry_run:
        say("no CUDA device: running the dry run (CPU, tiny sizes, torch path)")
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    use_triton = False
    if not dry or args.interpret:
        from augment.backends.torch import triton_available

        use_triton = triton_available()
        if not use_triton:
            try:
                import augment.kernels.triton_warp  # noqa: F401
            except Exception:
                traceback.print_exc()
    ctx = Ctx(device=device, dry=dry, triton=use_triton, seed=args.seed, budget_s=args.budget)
    say(f"device_check: device={device} dry={dry} triton={use_triton} sections={names}")
    for name in names:
        if ctx.left() <= 0:
            row(name, "section", "skipped", ok=None, note=f"over the {args.budget:.0f} s budget")
            continue
        say(f"== {name} (t={ctx.elapsed():.1f} s)")
        t0 = time.perf_counter()
        attempt(name, "section", functools.partial(SECTIONS[name], ctx))
        say(f"== {name} done in {time.perf_counter() - t0:.1f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    say("\n" + table())
    fails = sum(1 for r in ROWS if r["ok"] is False)
    say(f"\n{len(ROWS)} rows, {fails} FAIL, {ctx.elapsed():.1f} s")
    path = args.json or (
        os.path.join(os.environ["OUT"], "device_check.json") if os.environ.get("OUT") else None
    )
    if path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(
                    {
                        "machine": machine(),
                        "args": vars(args),
                        "rows": ROWS,
                        "elapsed_s": ctx.elapsed(),
                    },
                    f,
                    indent=1,
                    default=str,
                )
            say(f"wrote {path}")
        except Exception:
            traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
