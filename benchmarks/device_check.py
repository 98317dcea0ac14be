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
- ``w1``: W1 batched (8 x 128^3 from 200x256x256 float32 + uint8 sources on the device,
  host-drawn W1 parameters): Triton float32 and bfloat16 output, the torch path on the
  device, hand-written ``affine_grid`` + ``grid_sample``; patches/s, ratios, the goals.
  It runs before ``check`` so that numba compiles in a background process meanwhile.
- ``check``: the Triton kernel (and the torch path on the device) against the numba CPU
  path on fresh random inputs: float32 relative error (max |diff| / max |ref|) < 1e-5,
  labels >= 99.99% equal, programs with noise, bfloat16 output, float16 / bfloat16 / int16
  sources, a list of differently sized sources, nearest image, one-hot labels, an exact
  flip, scipy's float64 ``affine_transform``, and Compose on the device vs numpy.
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
LABEL_GOAL = 0.9999
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


def random_matrix(
    rng: np.random.Generator,
    out_shape: tuple[int, int, int],
    in_shape: tuple[int, int, int],
    *,
    border: bool = False,
) -> np.ndarray:
    """Rotation (30 degrees), anisotropic scale, shear and an off-grid shift; ``border``
    pushes the patch over an edge of the source."""
    from augment import matrices as mx

    lin = (
        mx.rotation(np.deg2rad(rng.uniform(-30, 30, 3)))
        @ mx.scaling(rng.uniform(0.75, 1.3, 3))
        @ mx.shear(rng.uniform(-0.1, 0.1, 6))
    )
    shift = rng.uniform(-3.0, 3.0, 3)
    if border:
        shift += rng.choice([-1, 1], 3) * np.asarray(in_shape) * rng.uniform(0.25, 0.5, 3)
    return mx.to_3x4(mx.about(lin, mx.centre(out_shape), mx.centre(in_shape) + shift))


def _cpu_torch_reference(
    image: Any,
    label: Any,
    matrix: Any,
    out_shape: Any,
    *,
    image_order: int = 1,
    cval: float = 0.0,
    label_cval: int = 0,
    program: Any = None,
) -> tuple[Any, Any]:
    """``warp_numpy``'s signature over the CPU torch path (used if numba fails here)."""
    from augment.kernels import torch_warp as tk

    i, lab = tk.warp_batch(
        None if image is None else torch.from_numpy(image)[None],
        None if label is None else torch.from_numpy(label)[None],
        np.asarray(matrix)[None],
        tuple(out_shape),
        image_order=image_order,
        cval=cval,
        label_cval=label_cval,
        programs=None if program is None else np.asarray(program)[None],
    )
    return (None if i is None else i[0].numpy(), None if lab is None else lab[0].numpy())


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


@register("w1")
def section_w1(ctx: Ctx) -> None:
    from augment.kernels import torch_warp as tk
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


@register("check")
def section_check(ctx: Ctx) -> None:
    import scipy.ndimage as ndi

    from augment import matrices as mx
    from augment.compose import onehot_linear_numpy
    from augment.kernels import program as pg
    from augment.torch_warp import warp_torch as _warp_torch
    from augment.warp import warp_numpy as _warp_numpy

    # Any: the checks index outputs that are only None when their input was None
    warp_torch: Any = _warp_torch
    warp_numpy: Any = _warp_numpy
    dev = ctx.device
    rng = np.random.default_rng(ctx.seed + 1)
    if ctx.dry:
        in_shape, out_shape, b = (20, 24, 28), (12, 14, 16), 3
    else:
        in_shape, out_shape, b = (64, 80, 96), (48, 56, 64), 4
    backend = "triton" if ctx.triton else "torch"
    kernel = "triton" if ctx.triton else "torch(dry)"
    img = (rng.normal(size=(b, 1, *in_shape)) * 100.0 + 20.0).astype(np.float32)
    lab = rng.integers(0, 5, (b, 1, *in_shape)).astype(np.uint8)
    m = np.stack([random_matrix(rng, out_shape, in_shape, border=i % 2 == 1) for i in range(b)])
    progs = np.stack(
        [
            pg.concat(
                pg.op(pg.CLIP, -150.0, 250.0),
                pg.op(pg.AFFINE, 1 / 400, 0.375),
                pg.op(pg.GAMMA, 0.8 + 0.2 * i, 0.0, 1.0),
                pg.op(pg.NOISE, 0.05, 1000 + 2**31 * i),
            )
            for i in range(b)
        ]
    )
    cval = -3.5
    t0 = time.perf_counter()
    try:
        refs = [
            warp_numpy(img[i], lab[i], m[i], out_shape, cval=cval, program=progs[i])
            for i in range(b)
        ]
        plain = np.stack(
            [warp_numpy(img[i], None, m[i], out_shape, cval=cval)[0] for i in range(b)]
        )
        row("check", "numba reference (incl. compile)", time.perf_counter() - t0, "s")
    except Exception as e:  # keep checking against the CPU torch path (CI-tested vs numba)
        traceback.print_exc()
        row("check", "numba reference", "error", ok=False, note=f"{type(e).__name__}: {e}"[:200])
        warp_numpy = _cpu_torch_reference
        refs = [
            warp_numpy(img[i], lab[i], m[i], out_shape, cval=cval, program=progs[i])
            for i in range(b)
        ]
        plain = np.stack(
            [warp_numpy(img[i], None, m[i], out_shape, cval=cval)[0] for i in range(b)]
        )
        row("check", "reference", "CPU torch path", note="numba failed: compared with it")
    ref_img = np.stack([r[0] for r in refs])
    ref_lab = np.stack([r[1] for r in refs])
    img_t = torch.from_numpy(img).to(dev)
    lab_t = torch.from_numpy(lab).to(dev)

    def main() -> None:
        t1 = time.perf_counter()
        out, out_lab = warp_torch(
            img_t, lab_t, m, out_shape, cval=cval, programs=progs, backend=backend
        )
        ctx.sync()
        row("check", f"{kernel} first call (compile)", time.perf_counter() - t1, "s")
        e = rel_err(out, ref_img)
        row("check", f"{kernel} f32 + program rel err", e, ok=e < REL_GOAL)
        a = agree(out_lab, ref_lab)
        row("check", f"{kernel} labels equal", a, ok=a >= LABEL_GOAL)
        out, _ = warp_torch(img_t, None, m, out_shape, cval=cval, backend=backend)
        e = rel_err(out, plain)
        row("check", f"{kernel} f32 no program rel err", e, ok=e < REL_GOAL)
        ctx.store["check_plain"] = out

    attempt("check", f"{kernel} f32", main)

    def bf16() -> None:
        out, _ = warp_torch(
            img_t,
            None,
            m,
            out_shape,
            cval=cval,
            programs=progs,
            out_dtype=torch.bfloat16,
            backend=backend,
        )
        e = rel_err(out, ref_img)
        row(
            "check",
            f"{kernel} bf16 output rel err",
            e,
            ok=e < 2.0**-8,
            note="bfloat16 keeps 8 bits",
        )

    attempt("check", "bf16 output", bf16)

    def dtypes() -> None:
        for dt in (torch.float16, torch.bfloat16, torch.int16):
            src = img_t.to(dt)
            ref_src = src.float().cpu().numpy()
            ref = np.stack(
                [
                    warp_numpy(ref_src[i], None, m[i], out_shape, cval=cval, program=progs[i])[0]
                    for i in range(b)
                ]
            )
            out, _ = warp_torch(src, None, m, out_shape, cval=cval, programs=progs, backend=backend)
            e = rel_err(out, ref)
            row("check", f"{kernel} {str(dt)[6:]} source rel err", e, ok=e < REL_GOAL)

    attempt("check", "source dtypes", dtypes)

    def ragged() -> None:
        shapes = [
            (in_shape[0] - 6, in_shape[1], in_shape[2] + 5),
            in_shape,
            (in_shape[0] + 3, in_shape[1] - 9, in_shape[2] - 4),
        ]
        imgs = [(rng.normal(size=(1, *s)) * 50).astype(np.float32) for s in shapes]
        labs = [rng.integers(0, 4, (1, *s)).astype(np.uint8) for s in shapes]
        mm = np.stack(
            [random_matrix(rng, out_shape, s, border=i == 2) for i, s in enumerate(shapes)]
        )
        out, out_lab = warp_torch(
            [torch.from_numpy(x).to(dev) for x in imgs],
            [torch.from_numpy(x).to(dev) for x in labs],
            mm,
            out_shape,
            cval=cval,
            programs=progs[:3],
            backend=backend,
        )
        es, ls = [], []
        for i in range(3):
            r_img, r_lab = warp_numpy(
                imgs[i], labs[i], mm[i], out_shape, cval=cval, program=progs[i]
            )
            es.append(rel_err(out[i], r_img))
            ls.append(agree(out_lab[i], r_lab))
        row("check", f"{kernel} list of 3 sizes rel err", max(es), ok=max(es) < REL_GOAL)
        row("check", f"{kernel} list of 3 sizes labels", min(ls), ok=min(ls) >= LABEL_GOAL)

    attempt("check", "list of sizes", ragged)

    def nearest() -> None:
        out, out_lab = warp_torch(
            img_t, lab_t, m, out_shape, image_order=0, cval=cval, label_cval=7, backend=backend
        )
        refs0 = [
            warp_numpy(img[i], lab[i], m[i], out_shape, image_order=0, cval=cval, label_cval=7)
            for i in range(b)
        ]
        a = min(agree(out[i], refs0[i][0]) for i in range(b))
        row("check", f"{kernel} nearest image equal", a, ok=a >= LABEL_GOAL)
        a = min(agree(out_lab[i], refs0[i][1]) for i in range(b))
        row("check", f"{kernel} labels (cval 7) equal", a, ok=a >= LABEL_GOAL)

    attempt("check", "nearest", nearest)

    def onehot() -> None:
        _, out_lab = warp_torch(
            None, lab_t[:2], m[:2], out_shape, label_mode="linear_onehot", backend=backend
        )
        a = min(
            agree(out_lab[i], onehot_linear_numpy(lab[i], m[i], out_shape, 0)) for i in range(2)
        )
        row(
            "check",
            f"{kernel} one-hot linear labels equal",
            a,
            ok=a >= 0.999,
            note="ties may round either way",
        )

    attempt("check", "one-hot labels", onehot)

    def exact() -> None:
        flip = mx.to_3x4(mx.flip([True, False, True], in_shape))
        mixed = np.stack([m[0], flip])
        out, out_lab = warp_torch(img_t[:2], lab_t[:2], mixed, in_shape, backend=backend)
        ok = np.array_equal(out[1].cpu().numpy(), np.flip(img[1], (1, 3))) and np.array_equal(
            out_lab[1].cpu().numpy(), np.flip(lab[1], (1, 3))
        )
        row("check", f"{kernel} exact flip in a mixed batch bit-identical", ok, ok=ok)

    attempt("check", "exact flip", exact)

    def scipy_ref() -> None:
        out = ctx.store.get("check_plain")
        if out is None:
            raise RuntimeError("no kernel output to compare")
        es = []
        for i in range(min(b, 2)):
            ref = ndi.affine_transform(
                img[i, 0].astype(np.float64),
                mx.to_4x4(m[i]),
                output_shape=out_shape,
                order=1,
                mode="grid-constant",
                cval=cval,
                prefilter=False,
            )
            es.append(rel_err(out[i, 0], ref))
        row("check", f"{kernel} vs scipy float64 rel err", max(es), ok=max(es) < REL_GOAL)

    attempt("check", "scipy", scipy_ref)

    def fallback() -> None:
        if dev.type != "cuda":
            return
        out, out_lab = warp_torch(
            img_t, lab_t, m, out_shape, cval=cval, programs=progs, backend="torch"
        )
        e = rel_err(out, ref_img)
        row("check", "torch path on device rel err", e, ok=e < REL_GOAL)
        a = agree(out_lab, ref_lab)
        row("check", "torch path on device labels", a, ok=a >= LABEL_GOAL)

    attempt("check", "torch path on device", fallback)

    def compose() -> None:
        from augment.rng import batch_rngs
        from benchmarks.w1_gpu import w1_compose

        patch = (24, 28, 32) if not ctx.dry else (10, 12, 14)
        aug = w1_compose(patch, intensity=True)
        srcs = [
            (rng.normal(0, 150, (1, *s)) + 40).astype(np.float32)
            for s in (in_shape, (in_shape[0] + 4, in_shape[1] - 6, in_shape[2]))
        ]
        labs = [rng.integers(0, 3, (1, *x.shape[1:])).astype(np.uint8) for x in srcs]
        out = aug(
            image=[torch.from_numpy(x).to(dev) for x in srcs],
            label=[torch.from_numpy(x).to(dev) for x in labs],
            rng=batch_rngs(ctx.seed, 0, range(2)),
            backend=backend,
        )
        gens = batch_rngs(ctx.seed, 0, range(2))
        es, ls = [], []
        for i in range(2):
            ref = aug(image=srcs[i], label=labs[i], rng=gens[i])
            es.append(rel_err(out["image"][i], ref["image"]))
            ls.append(agree(out["label"][i], ref["label"]))
        row("check", "Compose on device vs numpy rel err", max(es), ok=max(es) < REL_GOAL)
        row("check", "Compose on device vs numpy labels", min(ls), ok=min(ls) >= LABEL_GOAL)

    attempt("check", "Compose", compose)


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


WARM_NUMBA = """
import numpy as np
from augment import matrices as mx
from augment.kernels import program as pg
from augment.warp import warp_numpy
img = np.zeros((1, 6, 7, 8), np.float32)
lab = np.zeros((1, 6, 7, 8), np.uint8)
m = mx.to_3x4(mx.about(mx.rotation([0.1, 0.2, 0.3]), mx.centre((4, 5, 6)), mx.centre((6, 7, 8))))
warp_numpy(img, lab, m, (4, 5, 6), program=pg.op(pg.NOISE, 0.1, 3))
warp_numpy(img, None, m, (4, 5, 6))
"""


def warm_numba() -> Any:
    """Compile the numba kernels into their on-disk cache in a background process, so the
    ``check`` section loads them instead of compiling while the device waits."""
    import subprocess

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        return subprocess.Popen(
            [sys.executable, "-c", WARM_NUMBA],
            cwd=str(ROOT),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except Exception:
        traceback.print_exc()
        return None


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
        default=225.0,
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
        from augment.torch_warp import triton_available

        use_triton = triton_available()
        if not use_triton:
            try:
                import augment.kernels.triton_warp  # noqa: F401
            except Exception:
                traceback.print_exc()
    ctx = Ctx(device=device, dry=dry, triton=use_triton, seed=args.seed, budget_s=args.budget)
    warm = warm_numba() if ("check" in names and not dry) else None
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

    if warm is not None and warm.poll() is None:
        warm.kill()
        warm.wait()
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
