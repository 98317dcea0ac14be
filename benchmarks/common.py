"""Shared pieces of the benchmark workloads: result records and timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

CHECKOUT_RESULTS = Path("benchmarks", "results")
"""Where results go when the current folder is a checkout of this project."""
ELSEWHERE_RESULTS = Path("benchmark-results")
"""Where results go from any other folder (an installed package is never written to)."""


@dataclass(frozen=True)
class Result:
    """One measured figure; ``ratio`` is value / baseline value from the same invocation."""

    workload: str
    name: str
    value: float
    unit: str
    baseline: str | None = None
    ratio: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_ratios(results: list[Result]) -> list[Result]:
    """Fill ``ratio`` for every result whose ``baseline`` names another result of its workload.

    For time-like units (``ms``) a lower value is better, so the ratio is baseline / value,
    i.e. how many times faster than the baseline; for rates it is value / baseline.
    """
    by_key = {(r.workload, r.name): r for r in results}
    out = []
    for r in results:
        base = by_key.get((r.workload, r.baseline)) if r.baseline else None
        if base is None or base.value == 0 or r.value == 0:
            out.append(r)
            continue
        lower_is_better = r.unit in ("ms", "s", "bytes", "MB")
        ratio = base.value / r.value if lower_is_better else r.value / base.value
        out.append(Result(**{**asdict(r), "ratio": round(ratio, 3)}))
    return out


def default_results_dir(cwd: Path | None = None) -> Path:
    """The folder ``benchmarks.run`` writes to and ``benchmarks.report`` reads from.

    Args:
        cwd: the folder to resolve against (default: the current one).

    Returns:
        ``cwd/benchmarks/results`` when ``cwd`` is a checkout of this project (it holds
        ``benchmarks/run.py``), else ``cwd/benchmark-results``; never the installed package.
    """
    base = Path.cwd() if cwd is None else cwd
    if (base / "benchmarks" / "run.py").is_file():
        return base / CHECKOUT_RESULTS
    return base / ELSEWHERE_RESULTS


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info
