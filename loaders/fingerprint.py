"""Content fingerprints of source volumes, for incremental cache builds.

A source is a file (plus, for MetaImage / detached NRRD headers, the data file the header
names) or a DICOM folder (every regular file directly in it). Its digest is the SHA-256
of the contents; a stat signature (names, sizes, mtimes) lets an unchanged source reuse
the digest recorded last time without being read again.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = ["SourceDigest", "digest_source", "source_files", "stat_signature"]

_CHUNK = 1 << 22
_MHD_DATA = re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_NHDR_DATA = re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)

SourceDigest = dict[str, object]
"""``{"path": str, "stat": str, "sha256": str}`` as stored in the cache manifest."""


def _detached_data(header: Path, pattern: re.Pattern[str]) -> list[Path]:
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return []
    m = pattern.search(text)
    if m is None:
        return []
    name = m.group(1).strip()
    if name.upper() in ("LOCAL", "LIST") or name.upper().startswith("LIST") or " " in name:
        # data in the header itself, or a list/pattern of files: hash the header's folder
        # siblings that share the header's stem as a conservative approximation.
        return sorted(p for p in header.parent.glob(header.stem + ".*") if p != header)
    data = header.parent / name
    return [data] if data.is_file() else []


def source_files(path: str | os.PathLike[str]) -> list[Path]:
    """All files whose contents define the volume at ``path`` (sorted, path first)."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    name = p.name.lower()
    if name.endswith(".mhd"):
        return [p, *_detached_data(p, _MHD_DATA)]
    if name.endswith(".nhdr"):
        return [p, *_detached_data(p, _NHDR_DATA)]
    return [p]


def stat_signature(path: str | os.PathLike[str]) -> str:
    """Names, sizes and modification times of ``source_files(path)``, as one string."""
    parts = []
    for f in source_files(path):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def digest_source(
    path: str | os.PathLike[str], previous: SourceDigest | None = None
) -> SourceDigest:
    """The content digest of a source, reusing ``previous`` when its stat is unchanged.

    Args:
        path: a volume file or DICOM folder.
        previous: the digest recorded by an earlier build for the same path, if any.

    Returns:
        ``{"path", "stat", "sha256"}``.
    """
    p = Path(path)
    stat = stat_signature(p)
    if previous is not None and previous.get("path") == str(p) and previous.get("stat") == stat:
        return previous
    h = hashlib.sha256()
    for f in source_files(p):
        if p.is_dir():  # member names matter in a folder; a single file may be renamed
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
    return {"path": str(p), "stat": stat, "sha256": h.hexdigest()}
