"""Content fingerprints of source volumes, for incremental cache builds.

A source is a file (plus, for MetaImage / detached NRRD headers, the data file the header
names) or a DICOM folder (every regular file directly in it). Its digest is the SHA-256
of the contents; a stat signature (names, sizes, mtimes) lets an unchanged source reuse
the digest recorded last time without being read again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from loaders.volume import detached_data_names

__all__ = ["SourceDigest", "digest_source", "source_files", "stat_signature"]

_CHUNK = 1 << 22

SourceDigest = dict[str, object]
"""``{"path": str, "stat": str, "sha256": str}`` as stored in the cache manifest."""


def _detached_data(header: Path) -> list[Path]:
    """The existing data files a MetaImage / NRRD header names (``detached_data_names``)."""
    files = [header.parent / name for name in detached_data_names(header)]
    return [f for f in files if f.is_file()]


def source_files(path: str | os.PathLike[str]) -> list[Path]:
    """All files whose contents define the volume at ``path`` (sorted, path first)."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return [p, *_detached_data(p)]


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
