"""``python -m benchmarks.run [w1 w2 ...] [--quick] [--out DIR | --json PATH]``: table, plot.

Runs the named workloads (all by default) on what this machine has, prints one table,
writes ``<machine>-<date>.json`` and a PNG plot beside it, and names the folder in its
last line. The folder is under the current one, never the installed package:
``benchmarks/results/`` in a checkout of this project, else ``benchmark-results/``
(``--out DIR`` chooses another; ``--json PATH`` names the file). Figures are ratios
against a baseline measured in the same invocation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import platform
import sys
from pathlib import Path

from benchmarks.common import Result, default_results_dir, machine_info, with_ratios

WORKLOADS = {
    "w1": "benchmarks.w1",
    "w2": "benchmarks.w2",
    "w2-remote": "benchmarks.w2_remote",
    "w3": "benchmarks.w3",
    "w4": "benchmarks.w4",
    "w5": "benchmarks.w5",
    "w5-remote": "benchmarks.w5_remote",
    "w7": "benchmarks.w7",
    "w6": "benchmarks.w6",
}


def format_table(results: list[Result]) -> str:
    rows = [("workload", "name", "value", "unit", "baseline", "ratio")]
    for r in results:
        value = "nan" if r.value != r.value else f"{r.value:,.2f}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        rows.append((r.workload, r.name, value, r.unit, r.baseline or "", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.workload}/{r.name}: {r.note}" for r in results if r.note.startswith("failed")]
    return "\n".join(lines + (["", "failures:", *notes] if notes else []))


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.value == r.value and r.value > 0:
            groups.setdefault((r.workload, r.unit), []).append(r)
    if not groups:
        return
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(6 * cols, 0.5 + 0.45 * rows * max(len(v) for v in groups.values()) + 1.5 * rows),
        squeeze=False,
    )
    for ax, ((workload, unit), rs) in zip(axes.flat, sorted(groups.items()), strict=False):
        ax.barh([r.name for r in rs], [r.value for r in rs], color="tab:blue")
        ax.set_title(f"{workload} ({unit})")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(
    results: list[Result], path: Path, *, stamp: str, quick: bool, with_plot: bool
) -> list[Path]:
    """Write the results file (and its plot beside it, as ``.png``).

    Args:
        results: the figures, ratios filled.
        path: the JSON file to write; missing folders are made.
        stamp: when the run started (``YYYYmmdd-HHMMSS``), recorded in the file.
        quick: whether the run was ``--quick`` (recorded in the file).
        with_plot: also write the PNG plot.

    Returns:
        The files written, the JSON first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_info(),
        "date": stamp,
        "quick": quick,
        "results": [r.as_dict() for r in results],
    }
    path.write_text(json.dumps(payload, indent=2, allow_nan=True))
    written = [path]
    if with_plot:
        png = path.with_suffix(".png")
        plot(results, png)
        written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("workloads", nargs="*", help=f"any of {sorted(WORKLOADS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="small repeats, each under ~20 s")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        help="folder for <machine>-<date>.json and .png (default: benchmarks/results/ in a "
        "checkout of this project, else benchmark-results/, under the current folder)",
    )
    where.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    names = args.workloads or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {sorted(WORKLOADS)}")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results: list[Result] = []
    for name in names:
        try:
            module = importlib.import_module(WORKLOADS[name])
        except ModuleNotFoundError as exc:
            if exc.name != WORKLOADS[name]:
                raise
            print(f"[{name}] not available in this checkout", file=sys.stderr)
            continue
        print(
            f"[{name}] running{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True
        )
        results.extend(module.run(quick=args.quick))
    results = with_ratios(results)

    print(format_table(results))
    path = args.json or (args.out or default_results_dir()) / (
        f"{platform.node() or 'machine'}-{stamp}.json"
    )
    written = write_results(
        results, path, stamp=stamp, quick=args.quick, with_plot=not args.no_plot
    )
    folder = path.parent.resolve()
    print(f"\nresults written to {folder}{os.sep}: {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
