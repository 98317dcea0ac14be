"""``python -m benchmarks.gpu_check --seconds 60``: the trainer's numbers on a GPU, as a table.

Runs the real :class:`training.trainer.Trainer` (``gpu`` preset: bf16 autocast, GPU
augmentation through ``PatchLoader(mode="gpu")``) on a small phantom dataset and measures,
per stage, after a warm-up: batches per second, the fraction of the loop's time spent
waiting for data, and peak GPU memory. Stage 1 is the segnet alone; stage 3 alternates the
adversary and the segnet with the adversarial loss. The loss is read back every step here
(``run.log_every=1``), so host timings follow the GPU and the data wait is the time the GPU
had nothing to do.

Needs no network. Each section is guarded: a failure prints its error in the table and the
exit status is 1. The results also go to ``runs/gpu_check/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from training.config import Config, resolve_config
from training.trainer import Trainer, channels_last_weights

__all__ = ["main", "measure_stage"]


def measure_stage(
    trainer: Trainer, stage: str, *, seconds: float, warmup_s: float
) -> dict[str, Any]:
    """Time ``stage`` of ``trainer`` for ``seconds`` after ``warmup_s`` of warm-up.

    Returns:
        ``{"stage", "batches", "batches_per_s", "samples_per_s", "data_wait_fraction",
        "peak_mem_gib", "loader_wait_s", "seconds"}``.
    """
    trainer.goto(stage)
    trainer.fit(stop_after=stage, max_seconds=warmup_s)  # cudnn autotuning, kernel builds
    torch.cuda.synchronize()
    trainer.state.reset_timing()
    trainer.loader.stats.reset()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(stop_after=stage, max_seconds=seconds)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    timing = trainer.timing()
    n = timing["steps"].get(stage, 0)
    return {
        "stage": stage,
        "batches": n,
        "batches_per_s": n / wall if wall > 0 else 0.0,
        "samples_per_s": n * trainer.cfg.data.batch_size / wall if wall > 0 else 0.0,
        "data_wait_fraction": timing["data_wait_fraction"],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loader_wait_s": trainer.loader.stats.wait_s,
        "seconds": wall,
    }


def _config(args: argparse.Namespace) -> Config:
    overrides = [
        f'data.root="{args.data}"',
        "data.phantom_cases=6",
        "data.val_cases=2",
        'run.name="gpu_check"',
        "run.log_every=1",
        "run.checkpoint_every=0",
        "run.progress=false",
        "run.gate_every=1000",  # no gate evaluations inside the timed windows
        "stage1.max_epochs=999",
        "stage1.gate=0.0",
        "stage3.max_epochs=999",
        "stage3.gate=0.0",
        "stage3.k_d=1",
        "stage3.k_g=1",
        *args.overrides,
    ]
    return resolve_config(preset="gpu", overrides=overrides)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'section':<28} {'batch/s':>8} {'samp/s':>8} {'wait':>7} {'peak GiB':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['section']:<28} {'-':>8} {'-':>8} {'-':>7} {'-':>9}  FAILED: {r['error']}"
            )
            continue
        lines.append(
            f"{r['section']:<28} {r['batches_per_s']:8.2f} {r['samples_per_s']:8.2f} "
            f"{100 * r['data_wait_fraction']:6.1f}% {r['peak_mem_gib']:9.2f}  "
            f"{r['batches']} batches in {r['seconds']:.1f} s"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="total timed seconds, split over the sections (default 60)",
    )
    p.add_argument("--data", default="data/phantom-gpu-check", help="phantom dataset folder")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="also time stage 1 with channels_last_3d (off in the gpu preset)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (see python -m training.run --help)",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
    rows: list[dict[str, Any]] = []
    t_setup = time.perf_counter()
    try:
        cfg = _config(args)
        trainer = Trainer(cfg, progress=False)
    except Exception as exc:
        traceback.print_exc()
        print(f"setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    d = cfg.data
    print(
        f"setup (phantoms, cache, models): {time.perf_counter() - t_setup:.1f} s; patch "
        f"{list(d.patch_size)} x batch {d.batch_size}, U-Net width {cfg.model.base_width} "
        f"depth {cfg.model.depth}, amp {cfg.run.amp}, loader mode "
        f"{trainer.loader.mode} with {d.num_workers} workers"
    )
    n_sections = 2 + int(args.channels_last)
    each = args.seconds / n_sections
    warm = min(15.0, max(3.0, 0.25 * each))
    sections: list[tuple[str, str, str | None]] = [
        ("stage 1 (segnet)", "segnet", None),
        ("stage 3 (adversarial)", "adversarial", None),
    ]
    if args.channels_last:
        sections.append(("stage 1, channels_last_3d", "segnet", "on"))
    try:
        for label, stage, cl in sections:
            try:
                if cl is not None:
                    trainer.channels_last = cl == "on"
                    channels_last_weights(trainer.segnet)
                    channels_last_weights(trainer.adversary)
                r = measure_stage(trainer, stage, seconds=each, warmup_s=warm)
                rows.append({"section": label, **r})
            except Exception as exc:
                traceback.print_exc()
                rows.append({"section": label, "error": f"{type(exc).__name__}: {exc}"[:200]})
                torch.cuda.empty_cache()
    finally:
        trainer.close()
    print(_table(rows))
    try:
        out = trainer.run_dir / "gpu_check.json"
        out.write_text(json.dumps({"device": props.name, "rows": rows}, indent=2))
        print(f"written: {out}")
    except OSError as exc:
        print(f"could not write the JSON: {exc}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
