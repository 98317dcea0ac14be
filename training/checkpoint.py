"""Atomic checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers::

    {
        "format": 1,
        "models": {name: state_dict},           # DDP / torch.compile wrappers unwrapped
        "optimizers": {name: state_dict},
        "scaler": GradScaler state_dict or None,
        "stage": str | int, "epoch": int, "step": int,
        "rng": {
            "torch_cpu": ByteTensor,                # torch's global CPU RNG (dropout)
            "torch_cuda": [ByteTensor, ...],        # one per visible device, [] without CUDA
            "numpy": {name: bit_generator.state},   # plain dicts of ints and strings
            "torch_generators": {name: ByteTensor},
        },
        "config": dict of primitives,
        "extra": dict of primitives and tensors,
    }

:func:`make_checkpoint` turns numpy scalars into Python numbers, enums into their values,
paths into strings, dataclasses into dicts and numpy arrays into ``{"__ndarray__", "dtype"}``
dicts (which :func:`restore_checkpoint` turns back); anything else raises ``TypeError`` at
save time rather than failing at load time.

Files are written to a temporary name in the target directory, flushed and fsynced, then
renamed over the target with ``os.replace`` (atomic on POSIX and Windows), and the directory
is fsynced. A crash at any point leaves either the previous file or the complete new one,
never a torn file under a checkpoint name; :func:`latest_checkpoint` ignores the temporary
files.

Beside each checkpoint, :func:`save_checkpoint` writes ``<name>.digest``: its size in bytes
and the SHA-256 of its bytes, as JSON, placed (atomically, like the checkpoint) before the
checkpoint itself, so a checkpoint that is there has its digest. :func:`load_checkpoint`
checks them, so a file cut short or changed after it was written (a full disk, a copy that
stopped, bit rot) is refused with :class:`CheckpointError` naming the file, and so is a file
that is not one of these checkpoints (for instance a pickle of arbitrary objects, which a
weights-only load refuses). :func:`load_latest_checkpoint` falls back to the newest intact
checkpoint with a warning for each one it skips. A checkpoint without a digest (written
before digests existed) is loaded unchecked. :func:`prune_checkpoints` keeps the newest step
checkpoints and every tagged one.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "capture_rng_state",
    "checkpoint_path",
    "digest_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "make_checkpoint",
    "prune_checkpoints",
    "restore_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "state_dict_mismatch",
]

FORMAT = 1
DIGEST_SUFFIX = ".digest"
_CHUNK = 1 << 20
_NAME = re.compile(r"^ckpt-(\d{9,})(?:-([A-Za-z0-9_.-]+))?\.pt$")
_PRIMITIVE = (bool, int, float, str)


class CheckpointError(ValueError):
    """A checkpoint file is damaged or is not a checkpoint of this trainer.

    Attributes:
        path: the file (or, when no checkpoint in a directory is intact, the directory).
        reason: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path}: {reason}")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an earlier, intact one."""


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, DistributedDataParallel | DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _plain(value: Any, where: str) -> Any:
    """Containers of primitives and tensors only, so ``weights_only=True`` can load them."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if value is None or isinstance(value, torch.Tensor):
        return value
    # Exact builtin types: subclasses (np.float64, str enums) pickle as their own classes,
    # which weights_only loading rejects.
    for kind in _PRIMITIVE:
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where}: {type(value).__name__} {value!r} cannot be stored in a weights_only "
        "checkpoint; convert it to primitives, tensors, dicts, lists or tuples"
    )


def _unplain(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__ndarray__", "dtype"}:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def capture_rng_state(
    *,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
    torch_generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Snapshot of torch's global CPU and CUDA RNGs and of the given explicit generators.

    Args:
        numpy_generators: named numpy Generators (their bit generators' states are stored).
        torch_generators: named torch Generators.

    Returns:
        The ``"rng"`` entry of a checkpoint (plain containers and tensors).
    """
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": cuda,
        "numpy": {
            name: _plain(g.bit_generator.state, f"numpy_generators[{name!r}]")
            for name, g in (numpy_generators or {}).items()
        },
        "torch_generators": {name: g.get_state() for name, g in (torch_generators or {}).items()},
    }


def restore_rng_state(
    state: Mapping[str, Any],
    *,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
    torch_generators: Mapping[str, torch.Generator] | None = None,
    global_torch: bool = True,
) -> None:
    """Put the RNGs back to a :func:`capture_rng_state` snapshot.

    Args:
        state: the snapshot.
        numpy_generators: generators to restore in place, by name; each must be stored.
        torch_generators: likewise for torch Generators.
        global_torch: also restore torch's global CPU RNG and, where the device counts
            match, the CUDA RNGs.
    """
    if global_torch:
        torch.set_rng_state(state["torch_cpu"])
        cuda = state.get("torch_cuda", [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    for name, g in (numpy_generators or {}).items():
        if name not in state["numpy"]:
            raise KeyError(f"no numpy generator {name!r} in the checkpoint")
        g.bit_generator.state = _unplain(state["numpy"][name])
    for name, tg in (torch_generators or {}).items():
        if name not in state["torch_generators"]:
            raise KeyError(f"no torch generator {name!r} in the checkpoint")
        tg.set_state(state["torch_generators"][name])


def make_checkpoint(
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    stage: str | int = 0,
    epoch: int = 0,
    step: int = 0,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
    torch_generators: Mapping[str, torch.Generator] | None = None,
    config: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (see the module docstring) from live training objects.

    Args:
        models: networks by name; DDP and ``torch.compile`` wrappers are unwrapped.
        optimizers: optimizers by name.
        scaler: the AMP gradient scaler, if any.
        stage: the current stage.
        epoch: epochs completed in that stage.
        step: global optimizer steps.
        numpy_generators: numpy Generators to save, by name.
        torch_generators: explicit torch Generators to save, by name.
        config: the resolved configuration: a mapping or dataclass of primitives.
        extra: anything else small (gate history, best metric), primitives and tensors.

    Returns:
        The dict to pass to :func:`save_checkpoint`.
    """
    return {
        "format": FORMAT,
        "models": {name: _unwrap(m).state_dict() for name, m in models.items()},
        "optimizers": {name: o.state_dict() for name, o in (optimizers or {}).items()},
        "scaler": None if scaler is None else scaler.state_dict(),
        "stage": _plain(stage, "stage"),
        "epoch": int(epoch),
        "step": int(step),
        "rng": capture_rng_state(
            numpy_generators=numpy_generators, torch_generators=torch_generators
        ),
        "config": _plain(config, "config"),
        "extra": _plain(dict(extra or {}), "extra"),
    }


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """How a saved state dict fails to fit a model, in words, or None when it fits.

    Args:
        model: the network (wrappers are unwrapped).
        state: a state dict from a checkpoint's ``"models"``.

    Returns:
        The missing and unexpected keys and the tensors whose shapes differ (saved vs the
        model's), or None.
    """
    own = _unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} (the model's {tuple(own[k].shape)})"
        for k in own
        if k in state
        and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}" + (", ..." if len(missing) > 3 else ""))
    if unexpected:
        parts.append(
            f"unexpected {', '.join(unexpected[:3])}" + (", ..." if len(unexpected) > 3 else "")
        )
    if shapes:
        parts.append("shapes " + "; ".join(shapes[:3]) + ("; ..." if len(shapes) > 3 else ""))
    return "; ".join(parts) or None


def restore_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
    torch_generators: Mapping[str, torch.Generator] | None = None,
    restore_global_rng: bool = True,
) -> dict[str, Any]:
    """Load states from a checkpoint dict into live objects (strictly: every name must exist).

    Args:
        checkpoint: a dict from :func:`load_checkpoint`.
        models: networks to load into, by the names they were saved under.
        optimizers: optimizers to load into.
        scaler: gradient scaler to load into.
        numpy_generators: numpy Generators to restore in place.
        torch_generators: torch Generators to restore in place.
        restore_global_rng: also restore torch's global CPU / CUDA RNG states.

    Returns:
        ``{"stage", "epoch", "step", "config", "extra"}`` from the checkpoint, numpy arrays
        in config and extra turned back into arrays.
    """
    if checkpoint.get("format") != FORMAT:
        raise ValueError(f"unsupported checkpoint format {checkpoint.get('format')!r}")
    for name, m in models.items():
        if name not in checkpoint["models"]:
            raise KeyError(f"no model {name!r} in the checkpoint: {sorted(checkpoint['models'])}")
        _unwrap(m).load_state_dict(checkpoint["models"][name])
    for name, o in (optimizers or {}).items():
        if name not in checkpoint["optimizers"]:
            raise KeyError(f"no optimizer {name!r} in the checkpoint")
        o.load_state_dict(checkpoint["optimizers"][name])
    if scaler is not None:
        if checkpoint["scaler"] is None:
            raise KeyError("the checkpoint holds no GradScaler state")
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(
        checkpoint["rng"],
        numpy_generators=numpy_generators,
        torch_generators=torch_generators,
        global_torch=restore_global_rng,
    )
    meta = {k: checkpoint[k] for k in ("stage", "epoch", "step")}
    meta.update(config=_unplain(checkpoint["config"]), extra=_unplain(checkpoint["extra"]))
    return meta


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; os.replace is durable enough there.
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest_path(path: str | os.PathLike[str]) -> Path:
    """Where the size and SHA-256 of checkpoint ``path`` are kept: ``<path>.digest``."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def _temporary(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically, and its digest beside it.

    The checkpoint goes to a temporary file (fsynced); its size and SHA-256 go to a
    temporary digest file (fsynced); the digest is renamed into place, then the checkpoint,
    then the directory is fsynced.

    Args:
        checkpoint: a dict from :func:`make_checkpoint` (or any weights_only-safe dict).
        path: the target file; its directory is created if missing.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = digest_path(path)
    fd, tmp = _temporary(path)
    tmp_digest: str | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(checkpoint), f)
            f.flush()
            os.fsync(f.fileno())
        fd_digest, tmp_digest = _temporary(digest)
        with os.fdopen(fd_digest, "w") as f:
            f.write(json.dumps(_digest(Path(tmp))) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_digest, digest)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if tmp_digest is not None:
            Path(tmp_digest).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _check_digest(path: Path) -> None:
    """Compare ``path`` with its digest; no digest (an older checkpoint) passes unchecked."""
    digest = digest_path(path)
    try:
        record = json.loads(digest.read_text())
        want_bytes, want_sha = int(record["bytes"]), str(record["sha256"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(path, f"its digest {digest.name} is unreadable ({exc})") from None
    try:
        got = _digest(path)
    except OSError as exc:
        raise CheckpointError(path, f"unreadable ({exc.strerror or exc})") from None
    if got["bytes"] < want_bytes:
        raise CheckpointError(
            path, f"truncated: {got['bytes']} of the {want_bytes} bytes it was written with"
        )
    if got["bytes"] != want_bytes:
        raise CheckpointError(path, f"{got['bytes']} bytes, but it was written with {want_bytes}")
    if got["sha256"] != want_sha:
        raise CheckpointError(path, "corrupted: its SHA-256 differs from the one written with it")


def _refused_global(message: str) -> str:
    """The Python object a weights-only load refused, as torch names it (or "")."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return f" ({m.group(1)})" if m else ""


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint: its digest checked, then ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        map_location: where tensors are loaded (CPU by default; the RNG states must be CPU
            tensors anyway).

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: there is no such file.
        CheckpointError: the file is truncated, corrupted, or not a checkpoint of this
            format (for instance a pickle of arbitrary Python objects, which is never
            unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    _check_digest(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on the pickle protocol of a file
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(path, f"unreadable: {_first_line(exc)}") from None
        raise CheckpointError(
            path,
            "not a checkpoint of this trainer: it is a pickle of Python objects"
            f"{_refused_global(str(exc))} besides tensors and plain containers, and is not "
            "loaded, since unpickling it could run arbitrary code",
        ) from None
    except Exception as exc:  # torch reports a damaged zip as RuntimeError, EOFError, ...
        raise CheckpointError(path, f"unreadable: {_first_line(exc)}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        if not isinstance(checkpoint, dict):
            found = f"a {type(checkpoint).__name__}"
        elif "format" in checkpoint:
            found = f"format {checkpoint['format']!r}"
        else:
            found = f"a dict without 'format' (keys {sorted(map(str, checkpoint))[:6]})"
        raise CheckpointError(
            path,
            f"not a checkpoint of this trainer: expected a dict of format {FORMAT}, found {found}",
        )
    return checkpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0].split(". ")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def checkpoint_path(directory: str | os.PathLike[str], step: int, *, tag: str = "") -> Path:
    """The conventional file name, ``ckpt-{step:09d}[-{tag}].pt``, in ``directory``.

    Args:
        directory: the checkpoint directory.
        step: global step.
        tag: optional label, e.g. ``"stage1-end"`` (letters, digits, ``_ . -``).

    Returns:
        The path.
    """
    name = f"ckpt-{int(step):09d}" + (f"-{tag}" if tag else "") + ".pt"
    if not _NAME.match(name):
        raise ValueError(f"tag {tag!r} makes an invalid checkpoint name {name!r}")
    return Path(directory) / name


def _tag(path: Path) -> str:
    m = _NAME.match(path.name)
    return (m.group(2) or "") if m else ""


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints in ``directory``, newest first: highest step, then latest modified.

    Only files named as :func:`checkpoint_path` makes them count, so temporary files from an
    interrupted write (and digests) are never listed.

    Args:
        directory: the checkpoint directory (need not exist).

    Returns:
        The paths.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p.stat().st_mtime_ns, p.name, p))
    return [entry[3] for entry in sorted(found, reverse=True)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint in ``directory`` (see :func:`list_checkpoints`), or None.

    Args:
        directory: the checkpoint directory (need not exist).

    Returns:
        The path, or None when there is none.
    """
    found = list_checkpoints(directory)
    return found[0] if found else None


def load_latest_checkpoint(
    directory: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """The newest intact checkpoint in ``directory``, loaded.

    A checkpoint that :func:`load_checkpoint` refuses is skipped with a
    :class:`CheckpointWarning` naming it and the reason; the one before it is tried next.

    Args:
        directory: the checkpoint directory.
        map_location: as for :func:`load_checkpoint`.

    Returns:
        ``(path, checkpoint)``.

    Raises:
        FileNotFoundError: there is no checkpoint in ``directory``.
        CheckpointError: there are checkpoints, and none is intact; the message lists them.
    """
    found = list_checkpoints(directory)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    refused: list[CheckpointError] = []
    for path in found:
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CheckpointError as exc:
            refused.append(exc)
            warnings.warn(
                f"skipping {exc}; trying the checkpoint before it", CheckpointWarning, stacklevel=2
            )
    raise CheckpointError(
        directory,
        f"none of its {len(found)} checkpoints is intact ("
        + "; ".join(f"{e.path.name}: {e.reason}" for e in refused)
        + "); start afresh without --resume",
    )


def prune_checkpoints(directory: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest untagged (step) checkpoints, with their digests.

    Tagged checkpoints (``ckpt-<step>-<tag>.pt``: stage ends, interrupts) are always kept;
    digests left without their checkpoint by a crash between the two renames are removed.

    Args:
        directory: the checkpoint directory.
        keep: step checkpoints to keep, >= 1.

    Returns:
        The checkpoints deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    steps = [p for p in list_checkpoints(directory) if not _tag(p)]
    deleted = steps[keep:]
    for p in deleted:
        p.unlink(missing_ok=True)
        digest_path(p).unlink(missing_ok=True)
    for d in Path(directory).glob(f"ckpt-*.pt{DIGEST_SUFFIX}"):
        if not d.with_name(d.name[: -len(DIGEST_SUFFIX)]).exists():
            d.unlink(missing_ok=True)
    return deleted
