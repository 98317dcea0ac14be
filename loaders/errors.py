"""Exceptions raised by ``loaders``; every message starts with the file it is about."""

from __future__ import annotations

import os

__all__ = [
    "CacheError",
    "CaseError",
    "DataWarning",
    "DatasetError",
    "LoaderError",
    "VolumeError",
    "VolumeNotFoundError",
]


class LoaderError(ValueError):
    """Base class of the errors raised by ``loaders`` for bad input data.

    Args:
        path: the file or folder the problem is about (``None`` when there is none).
        problem: what is wrong, echoing the bad value.
    """

    def __init__(self, path: str | os.PathLike[str] | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")

    def __reduce__(self):  # keep (path, problem) across process boundaries
        return (type(self), (self.path, self.problem))


class VolumeError(LoaderError):
    """A volume file cannot be read, or what it holds is not a valid 3D volume."""


class VolumeNotFoundError(VolumeError, FileNotFoundError):
    """A volume file or DICOM folder does not exist (also a ``FileNotFoundError``)."""


class CaseError(LoaderError):
    """An image and its label do not belong together (shape, geometry), or a label is
    unusable (empty, non-integer, out of range)."""


class DatasetError(LoaderError):
    """A dataset description (dataset.json, folder layout, pair list) is invalid."""


class CacheError(LoaderError):
    """A volume cache is missing, from an incompatible version, or was changed under us."""


class DataWarning(UserWarning):
    """Input that is accepted but probably wrong (a label that is mostly foreground, a
    volume smaller than the training patch); the message names the file or case."""
