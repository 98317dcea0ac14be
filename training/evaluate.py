"""``python -m training.evaluate``: the metrics table of predicted masks against reference masks.

::

    python -m training.evaluate --pred DIR --ref DIR [--out DIR] [--run runs/NAME]
        [--regions nested|separate] [--names 1=liver,2=tumour]

Masks are the volume files directly in each folder (NIfTI, MetaImage, NRRD), matched by
name: the file name without its suffix, with nnU-Net's ``_0000`` channel suffix dropped and
the LiTS and SLIVER07 pairs recognised (``volume-7`` goes with ``segmentation-7``,
``liver-orig007`` with ``liver-seg007``), so ``training.predict``'s masks, which keep the
scans' names, meet their references. A name on one side only is an error, and so is a pair
whose geometry differs (shape; spacing beyond a relative 1e-3; origin beyond 0.01 mm;
direction cosines beyond 1e-3: the tolerances of ``loaders.read_case``).

Every foreground class is scored on its region (``training.classes``: ``nested``, the
default, is ``label >= value`` as LiTS scores its liver; ``separate`` is ``label ==
value``): VoE, Dice, RVD, ASSD, MSD and RMSD (``training.metrics``), distances in mm from
the reference's spacing. The classes are the label values found in either folder, or a run's
(``--run``: its classes, names and regions); ``--names`` names them.

``--out`` (default: the ``--pred`` folder) receives ``evaluation.csv`` (one row per case and
class) and ``evaluation.json`` (the settings, the rows, and the means per class); the means
are printed.

Exit status: 0 done; 2 bad input (no such folder, no masks, unmatched names, differing
geometry, non-integer labels, bad options); 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loaders.errors import LoaderError
from loaders.layouts import case_id_from_path
from loaders.volume import SUPPORTED_SUFFIXES, Volume, read_volume, volume_suffix
from training.classes import REGIONS, Classes, ClassesError
from training.config import ConfigError, load_config
from training.evaluation import VAL_KEYS, class_metrics, mean_metrics, write_case_csv
from training.report import write_summary

__all__ = ["EvaluateError", "evaluate_folders", "main", "match_key", "matched_pairs"]

SPACING_RTOL = 1e-3
ORIGIN_ATOL = 1e-2  # mm
DIRECTION_ATOL = 1e-3


class EvaluateError(ValueError):
    """The folders cannot be compared; the message names the files and the problem."""


def match_key(path: str | Path) -> str:
    """The name a mask is matched by (see the module docstring).

    Args:
        path: a mask file.

    Returns:
        The file name without its suffix and nnU-Net's ``_0000``; ``lits-N`` for LiTS'
        ``volume-N`` / ``segmentation-N``, ``sliver-N`` for SLIVER07's ``liver-origN`` /
        ``liver-segN``.
    """
    name = case_id_from_path(path)
    m = re.fullmatch(r"(?:volume|segmentation)-(\d+)", name, re.IGNORECASE)
    if m:
        return f"lits-{int(m.group(1))}"
    m = re.fullmatch(r"liver-(?:orig|seg)(\d+)", name, re.IGNORECASE)
    if m:
        return f"sliver-{int(m.group(1))}"
    return name[:-5] if name.endswith("_0000") else name


def _masks(folder: Path, option: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluateError(f"{option} {folder}: no such folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or volume_suffix(p) not in SUPPORTED_SUFFIXES:
            continue
        key = match_key(p)
        if key in found:
            raise EvaluateError(f"{p} and {found[key]} both match the name {key!r}")
        found[key] = p
    if not found:
        raise EvaluateError(
            f"{option} {folder}: no mask files ({', '.join(SUPPORTED_SUFFIXES)}) in the folder"
        )
    return found


def matched_pairs(pred: str | Path, ref: str | Path) -> list[tuple[str, Path, Path]]:
    """The (name, prediction, reference) pairs of two folders.

    Raises:
        EvaluateError: a missing folder, no masks, a name on one side only.
    """
    p = _masks(Path(pred), "--pred")
    r = _masks(Path(ref), "--ref")
    only_p = sorted(set(p) - set(r))
    only_r = sorted(set(r) - set(p))
    if only_p or only_r:
        parts = []
        if only_r:
            names = ", ".join(r[k].name for k in only_r[:10])
            parts.append(f"{len(only_r)} reference(s) without a prediction: {names}")
        if only_p:
            names = ", ".join(p[k].name for k in only_p[:10])
            parts.append(f"{len(only_p)} prediction(s) without a reference: {names}")
        raise EvaluateError(f"unmatched names between {pred} and {ref}: " + "; ".join(parts))
    return [(k, p[k], r[k]) for k in sorted(p)]


def _check_geometry(pred: Volume, ref: Volume) -> None:
    where = f"{pred.path} vs its reference {ref.path}"
    if pred.shape != ref.shape:
        raise EvaluateError(f"{where}: shape (z, y, x) {pred.shape} vs {ref.shape}")
    if not np.allclose(pred.spacing, ref.spacing, rtol=SPACING_RTOL, atol=0.0):
        raise EvaluateError(f"{where}: spacing (z, y, x) {pred.spacing} vs {ref.spacing}")
    if not np.allclose(pred.origin, ref.origin, rtol=0.0, atol=ORIGIN_ATOL):
        raise EvaluateError(f"{where}: origin (z, y, x) {pred.origin} vs {ref.origin}")
    if not np.allclose(pred.direction, ref.direction, rtol=0.0, atol=DIRECTION_ATOL):
        raise EvaluateError(
            f"{where}: direction {pred.direction.round(4).tolist()} vs "
            f"{ref.direction.round(4).tolist()}"
        )


def _parse_names(text: str | None) -> dict[int, str]:
    names: dict[int, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise EvaluateError(f"--names {text!r}: expected value=name pairs, e.g. 1=liver")
        names[int(value)] = name.strip()
    return names


def _classes(
    values: Sequence[int], regions: str, names: Mapping[int, str], run: Classes | None
) -> Classes:
    try:
        if run is not None:
            given = [names.get(v, n) for v, n in zip(run.values, run.names, strict=True)]
            return Classes(run.values, tuple(given), run.regions if not regions else regions)
        chosen = tuple(sorted({0, *values}))
        if len(chosen) < 2:
            raise EvaluateError("no label value besides 0 in the masks: nothing to score")
        labels = tuple(names.get(v, "background" if v == 0 else f"label_{v}") for v in chosen)
        return Classes(chosen, labels, regions or "nested")
    except ClassesError as exc:
        raise EvaluateError(str(exc)) from None


def evaluate_folders(
    pred: str | Path,
    ref: str | Path,
    *,
    regions: str = "",
    names: Mapping[int, str] | None = None,
    classes: Classes | None = None,
) -> tuple[list[dict[str, Any]], Classes]:
    """Score every matched prediction against its reference, per class.

    Args:
        pred: the folder of predicted masks.
        ref: the folder of reference masks.
        regions: ``"nested"`` or ``"separate"`` (``""``: the run's, else nested).
        names: label value -> class name.
        classes: a run's classes (default: the label values found in the files).

    Returns:
        ``(rows, classes)``: one row per case and foreground class (``case``, ``class``,
        ``value``, the metrics of ``training.metrics.case_metrics``, ``voxels_gt``,
        ``voxels_pred``, ``spacing_mm``: the reference's), and the classes scored.

    Raises:
        EvaluateError: see the module docstring.
    """
    if regions and regions not in REGIONS:
        raise EvaluateError(f"--regions {regions!r}: expected one of {', '.join(REGIONS)}")
    pairs = matched_pairs(pred, ref)
    loaded = []
    present: set[int] = set()
    for key, p, r in pairs:
        try:
            pv = read_volume(p, is_label=True)
            rv = read_volume(r, is_label=True)
        except LoaderError as exc:
            raise EvaluateError(str(exc)) from None
        _check_geometry(pv, rv)
        for arr in (pv.array, rv.array):
            present.update(int(v) for v in np.unique(arr) if v > 0)
        loaded.append((key, pv, rv))
    chosen = _classes(sorted(present), regions, names or {}, classes)
    rows = []
    for key, pv, rv in loaded:
        for row in class_metrics(
            chosen.index(pv.array), chosen.index(rv.array), rv.spacing, chosen
        ):
            k = chosen.names.index(row["class"])
            rows.append(
                {
                    "case": key,
                    "pred": str(pv.path),
                    "ref": str(rv.path),
                    "class": row.pop("class"),
                    "value": chosen.values[k],
                    **row,
                    "spacing_mm": "x".join(f"{s:g}" for s in rv.spacing),
                }
            )
    return rows, chosen


def _table(rows: Sequence[dict[str, Any]], classes: Classes) -> str:
    keys = ("voe", "dice", "rvd", "assd_mm", "msd_mm", "rmsd_mm")
    width = max([len(n) for n in classes.names[1:]] + [5])
    cases = len({r["case"] for r in rows})
    lines = [
        f"{cases} case(s); means per class ({classes.regions} regions):",
        f"{'class':<{width}} " + " ".join(f"{k:>9}" for k in keys),
    ]
    for k in classes.foreground:
        means = mean_metrics([r for r in rows if r["class"] == classes.names[k]])
        lines.append(
            f"{classes.names[k]:<{width}} " + " ".join(f"{means[key]:>9.4g}" for key in keys)
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Per-class metrics of predicted masks against references, matched by name.",
    )
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted masks")
    p.add_argument("--ref", required=True, type=Path, help="folder of reference masks")
    p.add_argument("--out", type=Path, help="folder for evaluation.csv/json (default: --pred)")
    p.add_argument("--run", type=Path, help="take the classes, names and regions of this run")
    p.add_argument("--regions", choices=REGIONS, help="class regions (default: nested)")
    p.add_argument("--names", help="class names, e.g. 1=liver,2=tumour")
    return p.parse_args(argv)


def _run_classes(run: Path) -> Classes:
    path = run / "config.toml"
    try:
        d = load_config(path).validate().data
    except (OSError, ConfigError) as exc:
        raise EvaluateError(f"--run {run}: cannot read {path} ({exc})") from None
    if not d.class_values:
        return Classes((0, 1), ("background", "liver"), "nested")
    try:
        return Classes(d.class_values, d.class_names, d.regions)
    except ClassesError as exc:
        raise EvaluateError(f"{path}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = parse_args(argv)
    try:
        run = _run_classes(args.run) if args.run is not None else None
        rows, classes = evaluate_folders(
            args.pred,
            args.ref,
            regions=args.regions or "",
            names=_parse_names(args.names),
            classes=run,
        )
        out = args.out if args.out is not None else args.pred
        if out.exists() and not out.is_dir():
            raise EvaluateError(f"--out {out} is a file; give a folder")
        out.mkdir(parents=True, exist_ok=True)
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    write_case_csv(rows, out / "evaluation.csv")
    means = {
        classes.names[k]: mean_metrics([r for r in rows if r["class"] == classes.names[k]])
        for k in classes.foreground
    }
    write_summary(
        {
            "pred": str(args.pred),
            "ref": str(args.ref),
            "regions": classes.regions,
            "classes": classes.as_dict(),
            "distances": "mm, from each reference's spacing",
            "metrics": list(VAL_KEYS),
            "mean": means,
            "cases": rows,
        },
        out / "evaluation.json",
    )
    print(_table(rows, classes))
    print(f"wrote {out / 'evaluation.csv'} and {out / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
