"""Dataset layouts: MSD / nnU-Net, LiTS, SLIVER07, ``images/`` + ``labels/`` folders and plain
(image, label) pair lists, and the detection of a folder's layout.

Every function returns a list of ``Case`` sorted by id, after checking that the files it
names exist. Nothing is read here beyond file names and dataset.json; reading and the
image/label consistency checks happen in ``read_case`` (and so in ``VolumeCache.build``).
``detect_layout`` names the layout of a folder from its file names alone, and
``dataset_folder`` reads a folder in its (detected or given) layout, with the label names and
the modality the layout declares.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.cases import Case
from loaders.errors import DatasetError
from loaders.volume import SUPPORTED_SUFFIXES, detached_data_names, volume_suffix

__all__ = [
    "LAYOUTS",
    "LITS_LABELS",
    "LITS_NAMES",
    "SLIVER_LABELS",
    "SLIVER_NAMES",
    "DatasetFolder",
    "case_id_from_path",
    "dataset_folder",
    "declared_label_names",
    "declared_labels",
    "declared_modality",
    "detect_layout",
    "folder_pair_cases",
    "load_dataset_json",
    "lits_cases",
    "msd_cases",
    "pair_cases",
    "sliver_cases",
]

PathLike = str | os.PathLike[str]

LITS_LABELS = (0, 1, 2)
"""LiTS label values: background, liver, tumour."""
SLIVER_LABELS = (0, 1)
"""SLIVER07 label values: background, liver."""
LITS_NAMES = {0: "background", 1: "liver", 2: "tumour"}
"""The names of the LiTS label values."""
SLIVER_NAMES = {0: "background", 1: "liver"}
"""The names of the SLIVER07 label values."""
LAYOUTS = ("msd", "lits", "sliver07", "pairs")
"""The folder layouts ``detect_layout`` knows, in the order it tries them."""


def case_id_from_path(path: PathLike) -> str:
    """A case id from a file name: the name without its volume suffix, with characters
    outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")
    return name or "case"


def _inside(root: Path, rel: Any, where: Path, what: str) -> Path:
    """``root / rel`` after checking that ``rel`` is a relative path staying inside root.

    The check is lexical (``..`` components), so a symlinked sub-folder is still allowed.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise DatasetError(where, f"{what} must be a non-empty path string, got {rel!r}")
    if os.path.isabs(rel) or Path(rel).drive:
        raise DatasetError(
            where, f"{what} {rel!r} is absolute; paths must be relative to the dataset root {root}"
        )
    full = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([full, os.path.normpath(root)]) != os.path.normpath(root):
        raise DatasetError(where, f"{what} {rel!r} escapes the dataset root {root}")
    return Path(full)


def _check_data_files(cases: Iterable[Case], root: Path | None) -> None:
    """The data files named by MetaImage / NRRD headers must stay inside ``root`` (None:
    each header's own folder), like the paths of dataset.json: ITK reads whatever file a
    header names, an absolute path or one reached through ``..`` included."""
    for c in cases:
        for header in (c.image, c.label):
            if header is None or header.is_dir():
                continue
            base = header.parent if root is None else root
            field = (
                "data file" if volume_suffix(header) in (".nhdr", ".nrrd") else "ElementDataFile"
            )
            for name in detached_data_names(header):
                if os.path.isabs(name) or Path(name).drive:
                    raise DatasetError(
                        header,
                        f"its {field} {name!r} is an absolute path; data files must lie "
                        f"inside the dataset root {base} (a name relative to the header)",
                    )
                full = os.path.normpath(os.path.join(header.parent, name))
                base_n = os.path.normpath(os.path.abspath(base))
                if os.path.commonpath([os.path.abspath(full), base_n]) != base_n:
                    raise DatasetError(
                        header,
                        f"its {field} {name!r} escapes the dataset root {base}; data files "
                        "must lie inside it",
                    )


def _check_exist(cases: Iterable[Case], where: Path) -> None:
    missing = [
        str(p) for c in cases for p in (c.image, c.label) if p is not None and not p.exists()
    ]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatasetError(
            where, f"{len(missing)} listed file(s) do not exist: {', '.join(missing[:5])}{more}"
        )


def _unique(cases: list[Case], where: Path) -> list[Case]:
    seen: dict[str, Case] = {}
    for c in cases:
        if c.id in seen:
            raise DatasetError(
                where, f"duplicate case id {c.id!r}: {seen[c.id].image} and {c.image}"
            )
        seen[c.id] = c
    return sorted(cases, key=lambda c: c.id)


def load_dataset_json(root: PathLike) -> dict[str, Any]:
    """Read and minimally validate ``root/dataset.json`` (a JSON object).

    Raises:
        DatasetError: missing file, malformed JSON (with line and column), not an object.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetError(path, "no dataset.json (not an MSD / nnU-Net dataset folder?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            path, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"not UTF-8 text: {exc}") from None
    if not isinstance(meta, dict):
        raise DatasetError(path, f"top level must be a JSON object, got {type(meta).__name__}")
    return meta


def declared_labels(meta: dict[str, Any], where: Path) -> tuple[int, ...] | None:
    """The label values a dataset.json declares in ``"labels"``.

    MSD / nnU-Net v1 map values to names (``{"0": "background", "1": "liver"}``); nnU-Net
    v2 maps names to a value or, for regions, a list of values (``{"background": 0,
    "liver": 1}``).

    Args:
        meta: the parsed dataset.json.
        where: its path, for messages.

    Returns:
        The sorted values, or None where dataset.json has no ``"labels"``.

    Raises:
        DatasetError: ``"labels"`` is not an object of integer values or keys.
    """
    labels = meta.get("labels")
    if labels is None:
        return None
    bad = DatasetError(
        where,
        '"labels" must map values to names ({"0": "background", ...}) or names to values '
        f'({{"background": 0, ...}}), got {labels!r}',
    )
    if not isinstance(labels, dict) or not labels:
        raise bad
    if all(isinstance(k, str) and re.fullmatch(r"\s*\d+\s*", k) for k in labels):
        return tuple(sorted({int(k) for k in labels}))
    values: set[int] = set()
    for v in labels.values():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise bad
            values.add(item)
    return tuple(sorted(values))


def declared_label_names(meta: dict[str, Any], where: Path) -> dict[int, str] | None:
    """The names dataset.json gives its label values.

    Args:
        meta: the parsed dataset.json.
        where: its path, for messages.

    Returns:
        ``{value: name}`` for every value of ``declared_labels``, or None where dataset.json
        has no ``"labels"``. nnU-Net v2 regions (a name mapped to a list of values) name a
        value only where no name maps to that value alone.

    Raises:
        DatasetError: as ``declared_labels``.
    """
    values = declared_labels(meta, where)
    if values is None:
        return None
    labels = meta["labels"]
    if all(re.fullmatch(r"\s*\d+\s*", k) for k in labels):
        return {int(k): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    names: dict[int, str] = {}
    for name, v in labels.items():
        if not isinstance(v, list):
            names.setdefault(int(v), str(name))
    for name, v in labels.items():
        for item in v if isinstance(v, list) else []:
            names.setdefault(int(item), str(name))
    return {v: names[v] for v in values}


def declared_modality(meta: dict[str, Any]) -> str | None:
    """The imaging modality dataset.json names (MSD ``"modality"``, nnU-Net v2
    ``"channel_names"``), e.g. ``"CT"`` or ``"MRI"``.

    Args:
        meta: the parsed dataset.json.

    Returns:
        The name of its single channel (several channels: the names joined with ``+``), or
        None where dataset.json names none.
    """
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        return None
    names = [str(channels[k]).strip() for k in sorted(channels, key=str)]
    return "+".join(n for n in names if n) or None


def msd_cases(root: PathLike, *, split: str = "training") -> list[Case]:
    """Cases of a Medical Segmentation Decathlon or nnU-Net (v1/v2) dataset folder.

    MSD / nnU-Net v1: dataset.json lists ``"training": [{"image": ..., "label": ...}]``
    and ``"test": [...]`` with paths relative to root. nnU-Net v2 (no ``"training"`` list):
    labels are ``labelsTr/<id><file_ending>`` and images ``imagesTr/<id>_0000<file_ending>``
    (single channel only); test images ``imagesTs/<id>_0000<file_ending>``.

    Args:
        root: the dataset folder holding dataset.json.
        split: ``"training"`` (labelled) or ``"test"`` (images only, label None).

    Returns:
        The cases sorted by id; the id is the image file name without suffix (and without
        nnU-Net's ``_0000`` channel suffix). Their ``labels`` are dataset.json's declared
        label values (``declared_labels``), so undeclared values are refused when read.

    Raises:
        DatasetError: malformed dataset.json, wrong entry types, a path that is absolute or
            escapes root (in dataset.json or in a MetaImage / NRRD header's data file),
            duplicate ids, listed files that do not exist, no cases.
    """
    if split not in ("training", "test"):
        raise ValueError(f"split must be 'training' or 'test', got {split!r}")
    root = Path(root)
    meta = load_dataset_json(root)
    where = root / "dataset.json"
    labels = declared_labels(meta, where)
    if "training" in meta or "test" in meta:
        entries = meta.get(split, [])
        if not isinstance(entries, list):
            raise DatasetError(where, f'"{split}" must be a list, got {type(entries).__name__}')
        cases = []
        for i, e in enumerate(entries):
            if split == "test":
                img_rel = e["image"] if isinstance(e, dict) and "image" in e else e
                lab = None
            else:
                if not isinstance(e, dict) or "image" not in e or "label" not in e:
                    raise DatasetError(
                        where,
                        f'"training"[{i}] must be an object with "image" and "label", got {e!r}',
                    )
                img_rel = e["image"]
                lab = _inside(root, e["label"], where, f'"training"[{i}]["label"]')
            img = _inside(
                root, img_rel, where, f'"{split}"[{i}]' + ("" if split == "test" else '["image"]')
            )
            cases.append(Case(case_id_from_path(img), img, lab, labels))
    else:
        ending = meta.get("file_ending")
        if not isinstance(ending, str) or not ending.startswith("."):
            raise DatasetError(
                where,
                'neither a "training" list (MSD) nor a "file_ending" '
                f"(nnU-Net v2) found; file_ending={ending!r}",
            )
        channels = meta.get("channel_names", meta.get("modality", {"0": "?"}))
        if not isinstance(channels, dict) or len(channels) != 1:
            raise DatasetError(
                where, f"only single-channel datasets are supported, got channel_names={channels!r}"
            )
        cases = []
        if split == "training":
            for lab in sorted((root / "labelsTr").glob(f"*{ending}")):
                cid = lab.name[: -len(ending)]
                cases.append(Case(cid, root / "imagesTr" / f"{cid}_0000{ending}", lab, labels))
        else:
            for img in sorted((root / "imagesTs").glob(f"*_0000{ending}")):
                cases.append(Case(img.name[: -len(ending) - 5], img, None))
    if not cases:
        raise DatasetError(where, f"no {split} cases listed")
    cases = _unique(cases, where)
    _check_exist(cases, where)
    _check_data_files(cases, root)
    return cases


def _numbered(root: Path, pattern: str) -> dict[int, Path]:
    rx = re.compile(pattern, re.IGNORECASE)
    found: dict[int, Path] = {}
    for p in sorted(root.rglob("*")):
        m = rx.match(p.name)
        if m is None or not p.is_file():
            continue
        n = int(m.group(1))
        if n in found:
            raise DatasetError(root, f"two files for number {n}: {found[n]} and {p}")
        found[n] = p
    return found


def _root_dir(root: PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "no such dataset folder")
    return root


def lits_cases(root: PathLike, *, require_labels: bool = True) -> list[Case]:
    """Cases of the LiTS layout: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]``
    anywhere under root (e.g. in "Training Batch 1" / "Training Batch 2").

    Args:
        root: the dataset folder (searched recursively).
        require_labels: a volume without a segmentation is an error (otherwise its case
            has ``label=None``).

    Returns:
        Cases ``lits_NNN`` sorted by N. LiTS labels are 1 liver, 2 tumour (other values
        are refused when read): pass ``label_map=liver_label`` to the cache for liver =
        label >= 1.
    """
    root = _root_dir(root)
    vols = _numbered(root, r"^volume-(\d+)\.nii(\.gz)?$")
    segs = _numbered(root, r"^segmentation-(\d+)\.nii(\.gz)?$")
    return _pair_numbered(root, vols, segs, "lits", require_labels, "volume-N.nii", LITS_LABELS)


def sliver_cases(root: PathLike, *, require_labels: bool = True) -> list[Case]:
    """Cases of the SLIVER07 layout: ``liver-origNNN.mhd`` with ``liver-segNNN.mhd``
    (MetaImage headers next to their .raw data) anywhere under root.

    Args:
        root: the dataset folder (searched recursively).
        require_labels: an image without a segmentation is an error (otherwise its case
            has ``label=None``, like the SLIVER07 test cases).

    Returns:
        Cases ``sliver_NNN`` sorted by number; labels are 0/1 (other values are refused
        when read). A header's data file must lie inside root.
    """
    root = _root_dir(root)
    vols = _numbered(root, r"^liver-orig(\d+)\.(mhd|mha)$")
    segs = _numbered(root, r"^liver-seg(\d+)\.(mhd|mha)$")
    return _pair_numbered(
        root, vols, segs, "sliver", require_labels, "liver-origNNN.mhd", SLIVER_LABELS
    )


def _pair_numbered(
    root: Path,
    vols: dict[int, Path],
    segs: dict[int, Path],
    prefix: str,
    require_labels: bool,
    pattern: str,
    labels: tuple[int, ...],
) -> list[Case]:
    if not vols:
        raise DatasetError(root, f"no {pattern} files found under the folder")
    orphans = sorted(set(segs) - set(vols))
    if orphans:
        raise DatasetError(
            segs[orphans[0]], f"segmentation without an image (numbers {orphans[:10]})"
        )
    unlabelled = sorted(set(vols) - set(segs))
    if unlabelled and require_labels:
        raise DatasetError(
            vols[unlabelled[0]],
            f"{len(unlabelled)} image(s) without a segmentation (numbers {unlabelled[:10]})",
        )
    cases = [Case(f"{prefix}_{n:03d}", vols[n], segs.get(n), labels) for n in sorted(vols)]
    _check_data_files(cases, root)
    return cases


def pair_cases(
    pairs: Iterable[Sequence[PathLike | None]],
    *,
    ids: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    root: PathLike | None = None,
) -> list[Case]:
    """Cases from a plain list of ``(image, label)`` pairs (label may be None).

    Args:
        pairs: ``(image, label)`` or ``(image,)`` items.
        ids: case ids, one per pair; by default the image file names without suffix.
        labels: the label values the files may hold (others are refused when read);
            None accepts any.
        root: the folder the data files of MetaImage / NRRD headers must lie in; by
            default each header's own folder.

    Returns:
        The cases in the given order.

    Raises:
        DatasetError: malformed pair, missing file, duplicate id, a header's data file
            outside ``root``.
    """
    cases = []
    items = list(pairs)
    if ids is not None and len(ids) != len(items):
        raise ValueError(f"got {len(ids)} ids for {len(items)} pairs")
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)) or len(item) not in (1, 2):
            raise DatasetError(None, f"pair {i} must be (image, label) or (image,), got {item!r}")
        image = Path(item[0])  # type: ignore[arg-type]
        label = Path(item[1]) if len(item) == 2 and item[1] is not None else None
        cid = ids[i] if ids is not None else case_id_from_path(image)
        cases.append(Case(cid, image, label, None if labels is None else tuple(labels)))
    seen: dict[str, Path] = {}
    for c in cases:
        if c.id in seen:
            raise DatasetError(
                c.image, f"duplicate case id {c.id!r} (also {seen[c.id]}); pass ids="
            )
        seen[c.id] = c.image
        for p in (c.image, c.label):
            if p is not None and not p.exists():
                raise DatasetError(p, "no such file (listed in the pair list)")
    _check_data_files(cases, None if root is None else Path(root))
    return cases


def _volume_files(folder: Path) -> dict[str, Path]:
    """The volume files directly in ``folder`` by case id (duplicates refused)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or volume_suffix(p) not in SUPPORTED_SUFFIXES:
            continue
        cid = case_id_from_path(p)
        if cid in found:
            raise DatasetError(p, f"two files for case {cid!r}: {found[cid].name} and {p.name}")
        found[cid] = p
    return found


def folder_pair_cases(root: PathLike, *, require_labels: bool = True) -> list[Case]:
    """Cases of a plain ``images/`` + ``labels/`` folder: ``root/images/<name>`` with
    ``root/labels/<name>``, matched by file name without its suffix (``a.nii.gz`` goes with
    ``a.nii.gz`` or ``a.mha``; nnU-Net's ``_0000`` channel suffix on an image name is allowed).

    Args:
        root: the dataset folder holding ``images`` and ``labels``.
        require_labels: an image without a label is an error (otherwise its case has
            ``label=None``).

    Returns:
        The cases sorted by id; no label values are declared (``labels=None``): the values
        present in the files decide.

    Raises:
        DatasetError: a missing folder, no images, an image without a label, a label without
            an image (naming the file), two files for one case, a header's data file outside
            root.
    """
    root = _root_dir(root)
    folders = {name: root / name for name in ("images", "labels")}
    for folder in folders.values():
        if not folder.is_dir():
            raise DatasetError(
                folder,
                "no such folder: the pairs layout is <root>/images/ and <root>/labels/ with "
                "matching file names",
            )
    images = _volume_files(folders["images"])
    labels = _volume_files(folders["labels"])
    if not images:
        raise DatasetError(
            folders["images"], f"holds no volume files ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    for cid in list(images):
        if cid not in labels and cid.endswith("_0000") and cid[:-5] in labels:
            images[cid[:-5]] = images.pop(cid)
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetError(
            labels[orphans[0]],
            f"label without an image: images/ has no file named {orphans[0]}.* "
            f"({len(orphans)} such label(s): {', '.join(orphans[:10])})",
        )
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled and require_labels:
        raise DatasetError(
            images[unlabelled[0]],
            f"image without a label: labels/ has no file named {unlabelled[0]}.* "
            f"({len(unlabelled)} such image(s): {', '.join(unlabelled[:10])})",
        )
    cases = [Case(cid, images[cid], labels.get(cid)) for cid in sorted(images)]
    _check_data_files(cases, root)
    return cases


_LITS_IMAGE = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_SLIVER_IMAGE = re.compile(r"^liver-orig(\d+)\.(mhd|mha)$", re.IGNORECASE)
_LAYOUT_NEEDS = {
    "msd": "a dataset.json (MSD / nnU-Net)",
    "lits": "volume-N.nii[.gz] files with segmentation-N.nii[.gz]",
    "sliver07": "liver-origNNN.mhd files with liver-segNNN.mhd",
    "pairs": "images/ and labels/ folders with matching file names",
}


def _listing(root: Path, files: list[Path]) -> str:
    """What a folder holds, in a few words, for the message of ``detect_layout``."""
    top = sorted(root.iterdir(), key=lambda p: p.name)
    if not top:
        return "the folder is empty"
    dirs = [p.name + "/" for p in top if p.is_dir()]
    plain = [p.name for p in top if not p.is_dir()]
    parts = []
    for what, names in (("folder", dirs), ("file", plain)):
        if names:
            more = ", ..." if len(names) > 8 else ""
            s = "s" if len(names) > 1 else ""
            parts.append(f"{len(names)} {what}{s} ({', '.join(names[:8])}{more})")
    counts: dict[str, int] = {}
    for p in files:
        suffix = volume_suffix(p)
        if suffix in SUPPORTED_SUFFIXES:
            counts[suffix] = counts.get(suffix, 0) + 1
    volumes = sum(counts.values())
    text = " and ".join(parts) + " at the top; "
    if volumes:
        by = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
        text += f"{volumes} volume file(s) in all ({by})"
    else:
        text += f"no volume files ({', '.join(SUPPORTED_SUFFIXES)}) anywhere below"
    if (root / "imagesTr").is_dir() and not (root / "dataset.json").exists():
        text += "; imagesTr/ without a dataset.json (an MSD / nnU-Net folder needs one)"
    return text


def detect_layout(root: PathLike) -> str:
    """The layout of a dataset folder, from its file names.

    Tried in the order of ``LAYOUTS``: ``msd`` (a ``dataset.json``: MSD or nnU-Net v1/v2),
    ``lits`` (``volume-N.nii[.gz]`` anywhere below), ``sliver07`` (``liver-origNNN.mhd``
    anywhere below), ``pairs`` (``images/`` and ``labels/`` folders).

    Args:
        root: the dataset folder.

    Returns:
        One of ``LAYOUTS``.

    Raises:
        DatasetError: no such folder, or no layout matches; the message lists what the
            folder holds and the layouts that were tried.
    """
    root = _root_dir(root)
    if (root / "dataset.json").is_file():
        return "msd"
    files = [p for p in root.rglob("*") if p.is_file()]
    if any(_LITS_IMAGE.match(p.name) for p in files):
        return "lits"
    if any(_SLIVER_IMAGE.match(p.name) for p in files):
        return "sliver07"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "pairs"
    tried = "; ".join(f"{name} ({need})" for name, need in _LAYOUT_NEEDS.items())
    raise DatasetError(
        root, f"no known dataset layout: found {_listing(root, files)}. Layouts tried: {tried}"
    )


@dataclass(frozen=True)
class DatasetFolder:
    """A dataset folder read in its layout.

    Attributes:
        root: the folder.
        layout: one of ``LAYOUTS``.
        cases: the cases, sorted by id.
        label_names: the declared label values and their names (dataset.json's ``labels``,
            or the layout's: LiTS 0/1/2, SLIVER07 0/1); None where nothing is declared (the
            values present in the label files decide).
        modality: the modality the dataset declares (dataset.json's, or ``"CT"`` for LiTS
            and SLIVER07); None where unknown.
    """

    root: Path
    layout: str
    cases: tuple[Case, ...]
    label_names: dict[int, str] | None
    modality: str | None


def dataset_folder(
    root: PathLike, *, layout: str = "auto", require_labels: bool = True
) -> DatasetFolder:
    """Read a dataset folder in its layout (``"auto"``: ``detect_layout``).

    Args:
        root: the folder.
        layout: ``"auto"`` or one of ``LAYOUTS``.
        require_labels: an image without a label is an error (MSD's training list and
            nnU-Net's ``labelsTr`` always have labels).

    Returns:
        The ``DatasetFolder``.

    Raises:
        DatasetError: an unknown layout name, no layout detected, or what the layout's
            reader raises.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise DatasetError(
            root, f"unknown layout {layout!r}: expected auto or one of {', '.join(LAYOUTS)}"
        )
    root = _root_dir(root)
    found = detect_layout(root) if layout == "auto" else layout
    names: dict[int, str] | None = None
    modality: str | None = None
    if found == "msd":
        cases = msd_cases(root)
        meta = load_dataset_json(root)
        names = declared_label_names(meta, root / "dataset.json")
        modality = declared_modality(meta)
    elif found == "lits":
        cases = lits_cases(root, require_labels=require_labels)
        names, modality = dict(LITS_NAMES), "CT"
    elif found == "sliver07":
        cases = sliver_cases(root, require_labels=require_labels)
        names, modality = dict(SLIVER_NAMES), "CT"
    else:
        cases = folder_pair_cases(root, require_labels=require_labels)
    return DatasetFolder(root, found, tuple(cases), names, modality)
