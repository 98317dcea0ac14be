"""The classes a run segments: which label values, their names, and the region each one scores.

A :class:`Classes` maps the values of label files onto the segnet's output classes
``0 .. K-1`` (class 0 is the background, label 0) and back. ``values[k]`` is the label value
of class ``k``; the cache keeps the label files' own values and the trainer maps them with
:meth:`Classes.lut` as batches arrive.

Regions. With ``regions="nested"`` (the default; LiTS, MSD liver, pancreas and KiTS are built
this way: the tumour lies inside the organ) class ``k``'s region is ``label >= values[k]``:
LiTS' liver is ``label >= 1`` (tumour included) and its tumour ``label >= 2``, and a label
value that is not a class joins the class below it. With ``regions="separate"`` (organs side
by side, e.g. multi-organ CT) class ``k``'s region is ``label == values[k]``, and a value that
is not a class is background. Metrics are computed per class on these regions, the gates on
the region of ``data.gate_class``.

Which classes (``data.classes``): ``"all"``, every label value the dataset declares
(dataset.json's ``labels``, LiTS 0/1/2, SLIVER07 0/1) or, where nothing is declared, every
value present in its label files; ``"liver"``, background and ``label >= 1`` (the seed's
binary task); ``"auto"``, ``"liver"`` for the generated phantom and ``"all"`` otherwise.
``data.class_values`` given explicitly overrides these (``[0, 2]``: the tumour alone).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CLASS_MODES", "REGIONS", "Classes", "ClassesError", "resolve_classes"]

REGIONS = ("nested", "separate")
"""How a class's region is read from a label: ``label >= value`` or ``label == value``."""
CLASS_MODES = ("auto", "all", "liver")
"""The values of ``data.classes``."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")


class ClassesError(ValueError):
    """The classes cannot be made from the data or the settings; the message says why."""


@dataclass(frozen=True)
class Classes:
    """The segnet's classes.

    Attributes:
        values: the label value of each class, increasing, ``values[0] == 0``.
        names: a name per class (``names[0]`` is the background's).
        regions: ``"nested"`` or ``"separate"`` (see the module docstring).
    """

    values: tuple[int, ...]
    names: tuple[str, ...]
    regions: str = "nested"

    def __post_init__(self) -> None:
        values = tuple(int(v) for v in self.values)
        names = tuple(str(n) for n in self.names)
        increasing = all(b > a for a, b in zip(values, values[1:], strict=False))
        if len(values) < 2 or values[0] != 0 or not increasing:
            raise ClassesError(
                f"class values must start with 0 (background) and increase, with at least "
                f"one foreground class; got {list(self.values)}"
            )
        if values[-1] > 255:
            raise ClassesError(f"label values must be at most 255, got {values[-1]}")
        if len(names) != len(values):
            raise ClassesError(f"{len(names)} class names {list(names)} for values {list(values)}")
        if len(set(names)) != len(names) or not all(_NAME.match(n) for n in names):
            raise ClassesError(
                f"class names must be distinct words (letters, digits, ' ', '.', '_', '-'), "
                f"got {list(names)}"
            )
        if self.regions not in REGIONS:
            raise ClassesError(f"regions must be one of {REGIONS}, got {self.regions!r}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "names", names)

    @property
    def count(self) -> int:
        """The number of classes K (the segnet's output channels), background included."""
        return len(self.values)

    @property
    def foreground(self) -> range:
        """The foreground class indices, ``1 .. K-1``."""
        return range(1, self.count)

    def lut(self, size: int = 256) -> np.ndarray:
        """Label value -> class index, as a lookup table.

        Args:
            size: entries (one past the largest label value to map).

        Returns:
            ``(size,)`` uint8.
        """
        values = np.arange(size)
        if self.regions == "nested":
            index = np.searchsorted(np.asarray(self.values), values, side="right") - 1
        else:
            index = np.zeros(size, np.int64)
            for k, v in enumerate(self.values):
                if v < size:
                    index[v] = k
        return index.astype(np.uint8)

    def index(self, label: np.ndarray) -> np.ndarray:
        """Class indices of a label array (label values, any non-negative integer dtype).

        Returns:
            uint8 class indices, same shape.
        """
        arr = np.asarray(label)
        top = int(arr.max()) if arr.size else 0
        return self.lut(max(top + 1, 256))[arr]

    def label_values(self, classes: np.ndarray) -> np.ndarray:
        """Label values of a class-index array (the inverse of :meth:`index` on class values).

        Returns:
            uint8 label values, same shape.
        """
        return np.asarray(self.values, dtype=np.uint8)[np.asarray(classes)]

    def region(self, classes: Any, k: int) -> Any:
        """Class ``k``'s region of a class-index array (numpy or torch): ``classes >= k``
        (nested) or ``classes == k`` (separate)."""
        if not 1 <= k < self.count:
            raise ValueError(f"class {k} is not a foreground class of {self.count} classes")
        return classes >= k if self.regions == "nested" else classes == k

    def describe(self, k: int) -> str:
        """Class ``k`` in words, e.g. ``"liver (label >= 1)"``."""
        op = ">=" if self.regions == "nested" else "=="
        return f"{self.names[k]} (label {op} {self.values[k]})"

    def as_dict(self) -> dict[str, str]:
        """``{label value: name}`` of the foreground classes, for summaries."""
        return {str(v): n for v, n in zip(self.values[1:], self.names[1:], strict=True)}


def _name(value: int, names: Mapping[int, str] | None) -> str:
    if names is not None and value in names:
        return names[value]
    return "background" if value == 0 else f"label_{value}"


def resolve_classes(
    *,
    mode: str,
    regions: str,
    declared: Mapping[int, str] | None,
    present: Sequence[int],
    values: Sequence[int] = (),
    names: Sequence[str] = (),
    phantom: bool = False,
) -> Classes:
    """The classes of a run, from the settings and the data.

    Args:
        mode: ``data.classes`` (see the module docstring).
        regions: ``data.regions``.
        declared: the label values the dataset declares and their names, or None.
        present: the label values found in the label files.
        values: ``data.class_values``; when given they decide (the mode is not used).
        names: ``data.class_names``; default: the declared names (``label_<v>`` otherwise).
        phantom: the data is the generated phantom (``"auto"`` means ``"liver"``).

    Returns:
        The classes.

    Raises:
        ClassesError: an unknown mode, ``"liver"`` with separate regions, no foreground
            value in the data, names that do not fit the values.
    """
    if mode not in CLASS_MODES:
        raise ClassesError(f"data.classes = {mode!r}: expected one of {', '.join(CLASS_MODES)}")
    if values:
        chosen = tuple(int(v) for v in values)
    elif mode == "liver" or (mode == "auto" and phantom):
        if regions != "nested":
            raise ClassesError(
                'data.classes = "liver" is label >= 1, a nested region: it needs '
                'data.regions = "nested"'
            )
        chosen = (0, 1)
    else:
        found = sorted(set(declared) if declared is not None else {int(v) for v in present})
        chosen = tuple(sorted({0, *found}))
        if len(chosen) < 2:
            where = "declares" if declared is not None else "holds"
            raise ClassesError(
                f"the dataset {where} no label value besides 0 (background): nothing to segment"
            )
    if names:
        chosen_names = tuple(names)
    else:
        chosen_names = tuple(_name(v, declared) for v in chosen)
        if mode == "liver" and not values and chosen_names[1] == "label_1":
            chosen_names = (chosen_names[0], "liver")
    return Classes(chosen, chosen_names, regions)
