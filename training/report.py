"""The run report: the metrics log, PNG plots (matplotlib's Agg canvas, no GUI backend),
summary.json, a table.

``metrics.jsonl`` holds one JSON object per line, appended as training goes
(:class:`MetricsLog`) and read back with :func:`read_metrics`. Plots are drawn on
``matplotlib.figure.Figure`` objects with the Agg canvas directly, so importing this module
never switches the process's matplotlib backend.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.schedule import STAGES

__all__ = [
    "MetricsLog",
    "plot_montage",
    "plot_overlays",
    "plot_stages",
    "read_metrics",
    "summary_table",
    "write_summary",
]

_LOSSES = ("loss_seg", "loss_gen", "loss_d")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended (rank 0 only).

    Args:
        path: the file.
        enabled: write at all (False on the ranks other than 0).
    """

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"event": event, "time": <unix seconds>, **fields}``.

        Args:
            event: the record's kind (``"epoch"``, ``"gate"``, ``"checkpoint"``, ...).
            fields: its values (JSON-serialisable; numpy and torch scalars as floats).
        """
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; after a resume, the later record of an epoch wins."""
    p = Path(path)
    if not p.exists():
        return []
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for n, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill -9
            continue
        if rec.get("event") in ("epoch", "gate"):
            key: tuple[Any, ...] = ("epoch", rec.get("stage"), rec.get("epoch"))
        else:
            key = ("line", n)
        by_key.pop(key, None)
        by_key[key] = rec
    return list(by_key.values())


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_stages(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Loss (top) and gate metric (bottom) per epoch, one column per stage.

    Args:
        records: from :func:`read_metrics`.
        path: the PNG to write.

    Returns:
        The path.
    """
    fig = _figure(13, 6.5)
    axes = fig.subplots(2, 3, squeeze=False)
    epochs = [r for r in records if r.get("event") in ("epoch", "gate")]
    ends = {r["name"]: r for r in records if r.get("event") == "stage_end"}
    for col, stage in enumerate(STAGES):
        rows = sorted((r for r in epochs if r.get("stage") == stage), key=lambda r: r["epoch"])
        top, bottom = axes[0][col], axes[1][col]
        top.set_title(stage)
        for key in _LOSSES:
            pts = [(r["epoch"], r[key]) for r in rows if key in r]
            if pts:
                top.plot(*zip(*pts, strict=True), marker="o", ms=3, label=key)
        top.set_xlabel("epoch")
        top.set_ylabel("loss")
        if top.lines:
            top.legend(fontsize=8)
        gates = [r for r in rows if r.get("event") == "gate"]
        metric = "heldout_accuracy" if stage == "adversary" else "train_voe"
        pts = [(r["epoch"], r[metric]) for r in gates if metric in r]
        if pts:
            bottom.plot(*zip(*pts, strict=True), marker="o", ms=4, label=metric)
        for extra in ("segnet_voe", "train_voe") if stage == "adversary" else ():
            pts = [(r["epoch"], r[extra]) for r in gates if extra in r]
            if pts:
                bottom.plot(*zip(*pts, strict=True), marker="x", ls="--", label=f"frozen {extra}")
        if gates:
            gate = gates[-1].get("gate", "")
            try:
                bottom.axhline(float(gate.split()[-1]), color="k", lw=0.8, ls=":", label=gate)
            except (ValueError, IndexError):
                pass
        end = ends.get(stage)
        if end is not None:
            verdict = "reached" if end.get("reached") else "capped"
            bottom.set_title(f"{verdict} after {end.get('epochs')} epochs", fontsize=9)
        bottom.set_xlabel("epoch")
        bottom.set_ylabel("VoE" if stage != "adversary" else "accuracy / VoE")
        if bottom.lines:
            bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _contour(ax: Any, mask: np.ndarray, color: str) -> None:
    m = np.asarray(mask, dtype=float)
    if m.any() and not m.all():
        ax.contour(m, levels=[0.5], colors=[color], linewidths=1.0)


def plot_montage(
    samples: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, columns: int = 4
) -> Path:
    """Augmented training patches: the central axial slice with the label's outline.

    Args:
        samples: dicts with ``image`` ``(1, d, h, w)`` and ``label`` ``(1, d, h, w)``.
        path: the PNG to write.
        columns: samples per row.

    Returns:
        The path.
    """
    n = max(len(samples), 1)
    rows = math.ceil(n / columns)
    fig = _figure(3 * columns, 3 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(samples):
            continue
        img = np.asarray(samples[i]["image"])[0]
        lab = np.asarray(samples[i]["label"])[0] > 0
        z = img.shape[0] // 2
        ax.imshow(img[z], cmap="gray", vmin=0, vmax=1)
        _contour(ax, lab[z], "lime")
        ax.set_title(str(samples[i].get("title", i)), fontsize=8)
    fig.suptitle("augmented patches (central axial slice; green: label)")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_overlays(
    overlays: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> Path:
    """Validation: an axial slice through each case's liver, ground truth and prediction.

    Args:
        overlays: from ``training.evaluation.validate``.
        rows: the per-case metric rows (for the titles).
        path: the PNG to write.

    Returns:
        The path.
    """
    n = max(len(overlays), 1)
    columns = min(n, 4)
    fig = _figure(3.5 * columns, 3.7 * math.ceil(n / columns))
    axes = fig.subplots(math.ceil(n / columns), columns, squeeze=False)
    metrics = {r["case"]: r for r in rows}
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(overlays):
            continue
        o = overlays[i]
        ax.imshow(np.asarray(o["image"], dtype=np.float32), cmap="gray", vmin=0, vmax=1)
        _contour(ax, o["label"], "lime")
        _contour(ax, o["pred"], "red")
        m = metrics.get(o["case"], {})
        ax.set_title(
            f"{o['case']} z={o['z']}\nVoE {m.get('voe', math.nan):.3f} "
            f"Dice {m.get('dice', math.nan):.3f}",
            fontsize=8,
        )
    fig.suptitle("validation (green: ground truth, red: segnet)")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``summary.json``, strict JSON (NaN as null, infinities as the strings "inf")."""
    Path(path).write_text(json.dumps(_finite(dict(summary)), indent=2) + "\n")
    return Path(path)


def _shown(key: str, value: Any) -> str:
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


def summary_table(summary: Mapping[str, Any]) -> str:
    """The summary as a few lines of text for the terminal."""
    lines = [
        f"run {summary.get('run_dir', '?')} on {summary.get('device', '?')}: "
        f"{summary.get('wall_s', math.nan):.0f} s wall, {summary.get('steps', 0)} steps",
        f"{'stage':<12} {'gate':<26} {'value':>8}  {'result':<8} epochs",
    ]
    for s in summary.get("stages", []):
        value = s.get("value")
        shown = f"{value:8.4f}" if isinstance(value, float) else f"{value!s:>8}"
        result = "reached" if s.get("reached") else "CAPPED"
        lines.append(f"{s['name']:<12} {s['gate']:<26} {shown}  {result:<8} {s['epochs']}")
    for key in ("val", "val_cache_grid"):
        val = summary.get(key) or {}
        if not val:
            continue
        if "classes" not in val:  # one flat block of means (summaries before per-class ones)
            lines.append(
                f"validation ({summary.get('val_cases', '?')} cases): "
                + "  ".join(_shown(k, v) for k, v in val.items())
            )
            continue
        lines.append(
            f"validation ({val.get('cases', summary.get('val_cases', '?'))} cases) at "
            f"{val.get('resolution', '?')} resolution, on {val.get('grid', '?')}:"
        )
        width = max([len(str(n)) for n in val["classes"]] + [6])
        for name, means in val["classes"].items():
            lines.append(f"  {name:<{width}} " + "  ".join(_shown(k, v) for k, v in means.items()))
    frac = summary.get("data_wait_fraction")
    if isinstance(frac, float):
        lines.append(f"data wait: {100 * frac:.1f}% of the training loop's time")
    return "\n".join(lines)
