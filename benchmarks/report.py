"""``python -m benchmarks.report [RESULTS.json] [--check]``: a results file as Markdown.

Prints the table of one ``benchmarks.run`` results file (by default the newest in the
folder ``benchmarks.run`` writes to from the current folder: ``benchmarks/results/`` in a
checkout, else ``benchmark-results/``) as Markdown, with the machine and date it was measured
on, ready for the README's "Performance" section. ``--check`` recomputes every ratio from
the values in the file (``value / baseline`` for rates, ``baseline / value`` for times and
sizes) and exits with status 1 when one does not match what the file says.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import Result, default_results_dir, with_ratios


def load(path: Path) -> dict[str, Any]:
    """A results file, with its ``results`` as :class:`Result` objects."""
    try:
        data = json.loads(path.read_text())
        data["results"] = [Result(**r) for r in data["results"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a benchmarks.run results file ({exc})") from exc
    return data


def mismatches(results: list[Result], tol: float = 2e-3) -> list[str]:
    """Ratios in ``results`` that do not follow from the values (relative tolerance ``tol``)."""
    bare = [dataclasses.replace(r, ratio=None) for r in results]
    bad = []
    for r, want in zip(results, with_ratios(bare), strict=True):
        if (r.ratio is None) != (want.ratio is None) or (
            r.ratio is not None
            and want.ratio is not None
            and abs(r.ratio - want.ratio) > tol * max(abs(want.ratio), 1e-9)
        ):
            bad.append(f"{r.workload}/{r.name}: ratio {r.ratio} but the values give {want.ratio}")
    return bad


def markdown(data: dict[str, Any]) -> str:
    """The results as a Markdown table, headed by the machine and the date."""
    m = data.get("machine", {})
    where = ", ".join(f"{k} {v}" for k, v in m.items())
    lines = [
        f"Measured {data.get('date', '?')} on {where}"
        + (" (`--quick`)" if data.get("quick") else "")
        + ".",
        "",
        "| workload | way | value | unit | against | ratio |",
        "|---|---|---:|---|---|---:|",
    ]
    for r in data["results"]:
        value = "n/a" if r.value != r.value else f"{r.value:,.2f}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            f"| {r.workload} | {r.name} | {value} | {r.unit} | {r.baseline or ''} | {ratio} |"
        )
    return "\n".join(lines)


def latest(directory: Path | None = None) -> Path:
    """The newest results file in ``directory`` (default: where ``benchmarks.run`` writes)."""
    directory = default_results_dir() if directory is None else directory
    files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no results in {directory}; run python -m benchmarks.run first")
    return files[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("path", nargs="?", type=Path, help="a results file (default: newest)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="recompute the ratios from the values; exit 1 on a mismatch",
    )
    args = parser.parse_args(argv)
    path = args.path or latest()
    data = load(path)
    if args.check:
        bad = mismatches(data["results"])
        for line in bad:
            print(f"{path}: {line}", file=sys.stderr)
        if bad:
            return 1
        print(f"{path}: {len(data['results'])} figures, every ratio follows from the values")
        return 0
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
