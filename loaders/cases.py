"""A case (an image and its optional label), reading a pair, and label mappings."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loaders.errors import CaseError, DatasetError, DataWarning
from loaders.orientation import Reorientation, to_canonical
from loaders.volume import Volume, read_volume, resample

__all__ = [
    "FOREGROUND_WARN_FRACTION",
    "Case",
    "LabelMap",
    "apply_label_map",
    "canonical_pair",
    "label_map_key",
    "label_values",
    "liver_label",
    "read_case",
]

FOREGROUND_WARN_FRACTION = 0.9
"""A label with more foreground than this fraction of its voxels draws a ``DataWarning``:
organ labels cover a few percent of a CT volume, so this is most likely an image/label pair
swapped or a label with inverted values."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

LabelMap = Callable[[np.ndarray], np.ndarray] | Mapping[int, int]
"""A label mapping: a function ``label -> label`` (module-level, so that worker processes
can pickle it) or a dict ``{source value: target value}`` (values not listed become 0)."""


@dataclass(frozen=True)
class Case:
    """One case of a dataset.

    Attributes:
        id: a unique name, letters, digits, ``.``, ``_`` and ``-`` only (it names folders).
        image: the image file (or DICOM folder).
        label: the label file, or None for an unlabelled case.
        labels: the label values the dataset declares (e.g. dataset.json's ``labels``),
            sorted; ``read_case`` refuses a label file holding any other value. None: not
            declared, every value is accepted.
    """

    id: str
    image: Path
    label: Path | None = None
    labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.match(self.id):
            raise DatasetError(
                self.image, f"invalid case id {self.id!r}: use letters, digits, '.', '_', '-'"
            )
        object.__setattr__(self, "image", Path(self.image))
        if self.label is not None:
            object.__setattr__(self, "label", Path(self.label))
        if self.labels is not None:
            values = tuple(sorted({int(v) for v in self.labels}))
            if not values or values[0] < 0:
                raise DatasetError(
                    self.image, f"declared labels must be integers >= 0, got {self.labels!r}"
                )
            object.__setattr__(self, "labels", values)


def liver_label(label: np.ndarray) -> np.ndarray:
    """Liver segmentation from a LiTS/MSD-style label (1 liver, 2 tumour): ``label >= 1``."""
    return (label >= 1).astype(np.uint8)


def apply_label_map(label: np.ndarray, label_map: LabelMap | None) -> np.ndarray:
    """Apply a ``LabelMap`` (None: unchanged) and return the result as uint8.

    Raises:
        ValueError: the mapped labels do not fit uint8 or are not integers.
    """
    if label_map is None:
        out = label
    elif callable(label_map):
        out = np.asarray(label_map(label))
        if out.shape != label.shape:
            raise ValueError(
                f"label map {label_map_key(label_map)} changed the shape {label.shape} -> "
                f"{out.shape}"
            )
    else:
        values = np.unique(label)
        lut = np.zeros(int(values.max()) + 1, dtype=np.int64)
        for src, dst in label_map.items():
            if 0 <= int(src) < lut.size:
                lut[int(src)] = int(dst)
        out = lut[label]
    if out.dtype == np.uint8:
        return out
    if out.dtype.kind == "f" and not np.array_equal(out, np.round(out)):
        raise ValueError("mapped label has non-integer values")
    if out.size and (out.min() < 0 or out.max() > 255):
        raise ValueError(f"mapped label values must lie in 0..255, got {out.min()}..{out.max()}")
    return out.astype(np.uint8)


def label_map_key(label_map: LabelMap | None) -> str:
    """A stable text identity of a label map (it enters cache fingerprints)."""
    if label_map is None:
        return "none"
    if callable(label_map):
        name = getattr(label_map, "__qualname__", None) or type(label_map).__qualname__
        return f"{getattr(label_map, '__module__', '?')}.{name}"
    return "dict:" + ",".join(f"{int(k)}:{int(v)}" for k, v in sorted(label_map.items()))


def _check_geometry(
    image: Volume,
    label: Volume,
    *,
    spacing_rtol: float,
    origin_atol: float,
    direction_atol: float,
) -> None:
    lp = label.path
    if image.shape != label.shape:
        raise CaseError(
            lp,
            f"label shape (z, y, x) {label.shape} differs from the image's "
            f"{image.shape} ({image.path})",
        )
    sp_i, sp_l = np.array(image.spacing), np.array(label.spacing)
    if not np.allclose(sp_l, sp_i, rtol=spacing_rtol, atol=0.0):
        raise CaseError(
            lp,
            f"label spacing (z, y, x) {label.spacing} differs from the image's "
            f"{image.spacing} ({image.path}) beyond rtol={spacing_rtol}",
        )
    if not np.allclose(label.origin, image.origin, rtol=0.0, atol=origin_atol):
        raise CaseError(
            lp,
            f"label origin (z, y, x) {label.origin} differs from the image's "
            f"{image.origin} ({image.path}) beyond {origin_atol} mm",
        )
    if not np.allclose(label.direction, image.direction, rtol=0.0, atol=direction_atol):
        raise CaseError(
            lp,
            f"label direction {label.direction.round(4).tolist()} differs from "
            f"the image's {image.direction.round(4).tolist()} ({image.path})",
        )


def label_values(label: np.ndarray) -> dict[int, int]:
    """The values present in an integer label array and their voxel counts.

    Args:
        label: a non-negative integer (or bool) array.

    Returns:
        ``{value: count}`` sorted by value, for the values present only.
    """
    arr = np.asarray(label)
    if arr.size == 0:
        return {}
    if arr.dtype.kind in "ub" and int(arr.max()) < 1 << 16:
        counts = np.bincount(arr.ravel())  # O(n); np.unique sorts, 10x slower at 512^3
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(arr, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts, strict=True)}


def _check_declared(label: Volume, case: Case) -> None:
    if case.labels is None:
        return
    found = label_values(label.array)
    extra = {v: n for v, n in found.items() if v not in case.labels}
    if extra:
        listed = ", ".join(f"{v} ({n} voxels)" for v, n in list(extra.items())[:10])
        raise CaseError(
            case.label,
            f"label values {listed} are not among the label values the dataset declares "
            f'{list(case.labels)} (dataset.json "labels", or the layout\'s); fix the label '
            "file or declare the value",
        )


def canonical_pair(
    image: Volume,
    label: Volume | None,
    *,
    spacing: Sequence[float] | None = None,
) -> tuple[Volume, Volume | None, Reorientation]:
    """Put a case's image and label on the canonical grid, then resample them.

    The image's reorientation (``loaders.orientation.to_canonical``) is applied to both,
    so a label whose direction differs from the image's within ``read_case``'s tolerance
    gets the same permutation.

    Args:
        image: the image as read (``read_case`` without ``canonical`` and ``spacing``).
        label: its label, or None.
        spacing: resample both to this spacing (z, y, x) in mm afterwards (label: nearest).

    Returns:
        ``(image, label, reorientation)``; the reorientation maps the canonical grid of
        the original spacing back to the stored file (``Reorientation.undo``).

    Raises:
        VolumeError: the image is oblique (see ``to_canonical``).
    """
    image, reo = to_canonical(image)
    if label is not None:
        label = reo.apply_volume(label)
    if spacing is not None:
        image = resample(image, spacing)
        label = None if label is None else resample(label, spacing, is_label=True)
    return image, label, reo


def read_case(
    case: Case,
    *,
    canonical: bool = False,
    spacing: Sequence[float] | None = None,
    label_map: LabelMap | None = None,
    allow_empty_label: bool = False,
    spacing_rtol: float = 1e-3,
    origin_atol: float = 1e-2,
    direction_atol: float = 1e-3,
) -> tuple[Volume, Volume | None]:
    """Read a case's image and label and check that they belong together.

    The geometry is compared on the files as stored (before reorientation and
    resampling, which are then applied to both in the same way). Label values outside
    ``case.labels`` are refused; a label whose foreground (after ``label_map``) is more
    than ``FOREGROUND_WARN_FRACTION`` of the volume draws a ``DataWarning``.

    Args:
        case: the case.
        canonical: put both on the canonical grid (``canonical_pair``; oblique volumes
            are refused).
        spacing: resample both to this spacing (z, y, x) in mm (label: nearest).
        label_map: applied to the label; the result is uint8.
        allow_empty_label: accept a label without any foreground (after mapping).
        spacing_rtol: relative tolerance of the spacing comparison.
        origin_atol: tolerance of the origin comparison, mm.
        direction_atol: tolerance of the direction-cosine comparison.

    Returns:
        ``(image, label)``; label is None for an unlabelled case, else a uint8 ``Volume``.

    Raises:
        VolumeError: either file is unreadable or invalid (see ``read_volume``), or
            oblique with ``canonical``.
        CaseError: shape / spacing / origin / direction mismatch, undeclared label values,
            an empty label, or a label map that fails; the message starts with the
            label's path.
    """
    image = read_volume(case.image)
    if case.label is None:
        label = None
    else:
        label = read_volume(case.label, is_label=True)
        _check_geometry(
            image,
            label,
            spacing_rtol=spacing_rtol,
            origin_atol=origin_atol,
            direction_atol=direction_atol,
        )
        _check_declared(label, case)
        try:
            mapped = apply_label_map(label.array, label_map)
        except ValueError as exc:
            raise CaseError(case.label, f"label map {label_map_key(label_map)}: {exc}") from None
        foreground = int(np.count_nonzero(mapped))
        if not allow_empty_label and not foreground:
            raise CaseError(
                case.label,
                "label is empty (no foreground voxel"
                + (" after the label map)" if label_map is not None else ")"),
            )
        if foreground > FOREGROUND_WARN_FRACTION * mapped.size:
            warnings.warn(
                f"{case.label}: the label's foreground is {foreground / mapped.size:.1%} of "
                f"the volume (more than {FOREGROUND_WARN_FRACTION:.0%}): image and label "
                f"swapped, or label values inverted? (image {case.image})",
                DataWarning,
                stacklevel=2,
            )
        label = label.with_array(mapped)
    if canonical:
        image, label, _ = canonical_pair(image, label, spacing=spacing)
    elif spacing is not None:
        image = resample(image, spacing)
        label = None if label is None else resample(label, spacing, is_label=True)
    return image, label
