"""``python -m training.predict``: apply a trained run to new scans, masks in their own geometry.

::

    python -m training.predict --run runs/NAME --input PATH --output DIR
        [--checkpoint FILE] [--tta] [--save-probs] [--device cpu|cuda|cuda:N]
        [--no-largest-component] [--overlap F] [--batch N] [--no-progress]

``--input`` is a volume file (NIfTI ``.nii`` / ``.nii.gz``, MetaImage ``.mha`` / ``.mhd``,
NRRD ``.nrrd`` / ``.nhdr``), a folder of such files (and of DICOM series sub-folders), or one
DICOM series folder. Each scan goes the way the run's validation cases went: read with
SimpleITK, put on the canonical axis order (an exact permutation/flip; oblique scans are
refused, as in training), resampled to the run's ``data.spacing``, normalised as the run was
(CT window or per-case z-score), segmented by sliding-window inference with the run's patch
size (``--tta``: averaged over the 8 flips of the three axes), and the class probabilities
resampled back onto the scan's own grid (``training.native``), where the argmax and the
largest-component clean-up (the run's ``run.largest_component``) are taken. Everything comes
from the run folder's ``config.toml``: no other flag is needed.

``DIR/<input file name>`` receives the mask (uint8 label values: the run's
``data.class_values``) with exactly the input's size, spacing, origin and direction, in its
format (a DICOM series gives ``<folder name>.mha``, MetaImage, which keeps its
double-precision geometry exactly); ``--save-probs`` adds
``DIR/<case>.probabilities.npz`` (``probabilities``: ``(K, z, y, x)`` float32 on the input's
grid and voxel order, ``class_values``, ``class_names``, ``spacing``, ``origin``,
``direction`` in (z, y, x) order). Files are written whole (a temporary name, then a rename)
so an interrupted run leaves no partial mask.

The checkpoint is the run's newest intact one (``--checkpoint`` for another); it must fit the
run's configuration (its classes and input channels). A scan that does not look like the
modality the run was trained on (no air below -500 HU for a CT run; CT-like values for an
MR run; a DICOM Modality tag that differs) draws a warning.

Exit status: 0 done; 2 bad input or settings (the message names the file: no such run,
no usable checkpoint, a checkpoint that does not fit, unreadable / 4D / oblique input, an
output folder that is a file; masks written before the failing scan stay, complete);
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn
from tqdm.auto import tqdm

from loaders.errors import LoaderError
from loaders.orientation import Geometry, to_canonical
from loaders.volume import (
    SUPPORTED_SUFFIXES,
    Volume,
    dicom_series,
    read_volume,
    resample,
    volume_suffix,
    write_volume,
)
from training.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    load_checkpoint,
    load_latest_checkpoint,
    state_dict_mismatch,
)
from training.classes import Classes, ClassesError
from training.config import Config, ConfigError, check_device, from_dict, load_config
from training.evaluation import keep_largest_component, probabilities
from training.models import UNet3D
from training.native import NativePrediction, to_native
from training.normalize import Normalization

__all__ = [
    "ModalityWarning",
    "PredictError",
    "Predictor",
    "list_inputs",
    "load_predictor",
    "main",
    "predict_file",
]

TTA_AXES = (0, 1, 2)
"""``--tta`` averages the logits over every combination of flips of these axes (z, y, x)."""
DICOM_OUTPUT = ".mha"
"""The mask of a DICOM series is ``<folder name>.mha``: MetaImage keeps DICOM's
double-precision spacing, origin and direction exactly (NIfTI stores them as float32, NRRD
reads its axis vectors back 1 ulp off)."""
CT_AIR_BELOW = -500.0
"""A CT scan in Hounsfield units holds air (about -1000 HU) around the body: a scan without
any voxel below this value is unlikely to be one."""


class PredictError(ValueError):
    """Predict cannot go on: a bad run folder, checkpoint, input or output (named)."""


class ModalityWarning(UserWarning):
    """A scan does not look like the modality the run was trained on."""


@dataclass
class Predictor:
    """A trained segnet with everything its run decided, ready for whole scans.

    Attributes:
        segnet: the network (eval mode is set for inference).
        classes: the run's classes.
        normalization: the run's intensity normalisation.
        spacing: the run's training spacing (z, y, x) in mm, or None (each scan's own).
        patch_size: the sliding window.
        overlap: the windows' overlap.
        batch_size: windows per forward pass.
        device: where inference runs.
        autocast: bf16 autocast (CUDA).
        largest_component: keep the foreground's largest connected component.
        tta: flip test-time augmentation.
        modality: the modality the run was trained on (``""`` unknown).
    """

    segnet: nn.Module
    classes: Classes
    normalization: Normalization
    spacing: tuple[float, ...] | None
    patch_size: tuple[int, ...]
    overlap: float
    batch_size: int
    device: torch.device
    autocast: bool = False
    largest_component: bool = True
    tta: bool = False
    modality: str = ""

    def predict(self, volume: Volume, *, keep_probabilities: bool = False) -> NativePrediction:
        """Segment one scan; the result is on the scan's own grid and voxel order.

        Args:
            volume: the scan as read (``loaders.read_volume``).
            keep_probabilities: also return the class probabilities on that grid.

        Returns:
            The ``NativePrediction`` (class indices; ``Classes.label_values`` gives the
            label values).

        Raises:
            VolumeError: the scan is oblique.
        """
        canonical, reorientation = to_canonical(volume)
        if self.spacing:
            canonical = resample(canonical, self.spacing)
        image = self.normalization.apply(canonical.array)
        probs = probabilities(
            self.segnet,
            torch.from_numpy(image)[None],
            patch_size=self.patch_size,
            overlap=self.overlap,
            batch_size=self.batch_size,
            device=self.device,
            channels_last=False,
            autocast=self.autocast,
            mirror_axes=TTA_AXES if self.tta else (),
        )
        native = to_native(
            probs, Geometry.of(canonical), reorientation, keep_probabilities=keep_probabilities
        )
        if self.largest_component:
            cleaned = keep_largest_component(native.classes)
            native = NativePrediction(cleaned, native.probabilities, native.geometry)
        return native


def _run_config(run: Path) -> Config:
    if not run.is_dir():
        raise PredictError(f"--run {run}: no such run folder")
    path = run / "config.toml"
    if not path.is_file():
        raise PredictError(
            f"--run {run}: not a run folder (no config.toml; python -m training.run writes one)"
        )
    try:
        return load_config(path).validate()
    except ConfigError as exc:
        raise PredictError(f"{path}: {exc}") from None


def _classes(cfg: Config) -> Classes:
    d = cfg.data
    if not d.class_values:  # a run from before the classes came from the data: binary liver
        return Classes((0, 1), ("background", "liver"), "nested")
    try:
        names = d.class_names or tuple(f"label_{v}" for v in d.class_values)
        return Classes(d.class_values, names, d.regions)
    except ClassesError as exc:
        raise PredictError(f"the run's data.class_values / class_names: {exc}") from None


def _check_fits(path: Path, ckpt: dict[str, Any], segnet: UNet3D, cfg: Config) -> None:
    """Refuse a checkpoint whose segnet does not fit the run's configuration."""
    state = ckpt.get("models", {}).get("segnet")
    if not isinstance(state, dict):
        raise CheckpointError(path, "holds no segnet")
    head = state.get("heads.0.weight")
    first = state.get("encoder.0.0.0.weight")
    want_k, want_c = int(segnet.num_classes), int(segnet.in_channels)
    names = list(cfg.data.class_names) or ["background", "liver"]
    if isinstance(head, torch.Tensor) and head.shape[0] != want_k:
        raise CheckpointError(
            path,
            f"its segnet has {head.shape[0]} output classes, but the run's configuration has "
            f"{want_k} ({', '.join(names)}): the checkpoint belongs to another run",
        )
    if isinstance(first, torch.Tensor) and first.shape[1] != want_c:
        raise CheckpointError(
            path,
            f"its segnet takes {first.shape[1]} input channels, the run's configuration "
            f"{want_c}: the checkpoint belongs to another run",
        )
    saved = (ckpt.get("config") or {}).get("data", {}).get("class_values")
    if saved and cfg.data.class_values and list(saved) != list(cfg.data.class_values):
        raise CheckpointError(
            path,
            f"it was trained for label values {list(saved)}, the run's configuration says "
            f"{list(cfg.data.class_values)}: the checkpoint belongs to another run",
        )
    mismatch = state_dict_mismatch(segnet, state)
    if mismatch:
        raise CheckpointError(
            path, f"its segnet does not fit the run's model settings (config.toml): {mismatch}"
        )


def load_predictor(
    run: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | None = None,
    tta: bool = False,
    largest_component: bool | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
) -> tuple[Predictor, Path]:
    """A :class:`Predictor` from a run folder.

    Args:
        run: the run folder (``runs/NAME``: ``config.toml`` and ``checkpoints/``).
        checkpoint: a checkpoint file; default: the run's newest intact one (damaged ones
            are skipped with a ``CheckpointWarning``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default the run's
            ``run.device``.
        tta: flip test-time augmentation.
        largest_component: default the run's ``run.largest_component``.
        overlap: sliding-window overlap; default the run's ``run.val_overlap``.
        batch_size: windows per forward pass; default the run's ``run.infer_batch``.

    Returns:
        ``(predictor, the checkpoint file)``.

    Raises:
        PredictError: no run folder or config.toml, no checkpoint, bad settings.
        CheckpointError: a damaged checkpoint, or one that does not fit the run.
    """
    run = Path(run)
    cfg = _run_config(run)
    classes = _classes(cfg)
    try:
        cfg = from_dict({"run": {"device": device or cfg.run.device}}, base=cfg).validate()
        check_device(cfg)
    except ConfigError as exc:
        raise PredictError(f"--device: {exc}") from None
    if cfg.run.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.run.device)
    if checkpoint is not None:
        path = Path(checkpoint)
        try:
            ckpt = load_checkpoint(path)
        except FileNotFoundError:
            raise PredictError(f"--checkpoint {path}: no such file") from None
    else:
        try:
            path, ckpt = load_latest_checkpoint(run / "checkpoints")
        except FileNotFoundError:
            raise PredictError(
                f"--run {run}: no checkpoint in {run / 'checkpoints'} (has it trained a step?)"
            ) from None
    m = cfg.model
    segnet = UNet3D(
        in_channels=1,
        num_classes=classes.count,
        base_width=m.base_width,
        depth=m.depth,
        max_width=m.max_width,
        dropout=m.dropout,
        deep_supervision=m.deep_supervision,
    )
    _check_fits(path, ckpt, segnet, cfg)
    segnet.load_state_dict(ckpt["models"]["segnet"])
    segnet.to(dev).eval()
    mode = cfg.data.normalize if cfg.data.normalize in ("ct", "zscore") else "ct"
    predictor = Predictor(
        segnet=segnet,
        classes=classes,
        normalization=Normalization(mode, tuple(cfg.data.window)),  # type: ignore[arg-type]
        spacing=tuple(cfg.data.spacing) or None,
        patch_size=tuple(cfg.data.patch_size),
        overlap=cfg.run.val_overlap if overlap is None else float(overlap),
        batch_size=cfg.run.infer_batch if batch_size is None else int(batch_size),
        device=dev,
        autocast=dev.type == "cuda" and cfg.run.amp != "off",
        largest_component=(
            cfg.run.largest_component if largest_component is None else largest_component
        ),
        tta=tta,
        modality=cfg.data.modality or ("CT" if mode == "ct" else ""),
    )
    if not 0 <= predictor.overlap < 1 or predictor.batch_size < 1:
        raise PredictError(
            f"--overlap must be in [0, 1) and --batch >= 1, got {predictor.overlap}, "
            f"{predictor.batch_size}"
        )
    return predictor, path


def list_inputs(path: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """The scans of ``--input`` and the file name of each one's mask.

    Args:
        path: a volume file, a folder of volume files and DICOM series sub-folders, or a
            DICOM series folder.

    Returns:
        ``(scan, output file name)`` pairs, sorted by name.

    Raises:
        PredictError: nothing to read there, an unsupported file, two scans whose masks
            would have the same name.
    """
    p = Path(path)
    if not p.exists():
        raise PredictError(f"--input {p}: no such file or folder")
    if p.is_file():
        if volume_suffix(p) not in SUPPORTED_SUFFIXES:
            raise PredictError(
                f"--input {p}: unsupported file type {volume_suffix(p) or '(none)'!r}; expected "
                f"{', '.join(SUPPORTED_SUFFIXES)} or a DICOM series folder"
            )
        return [(p, p.name)]
    files = [
        f for f in sorted(p.iterdir()) if f.is_file() and volume_suffix(f) in SUPPORTED_SUFFIXES
    ]
    series = [d for d in sorted(p.iterdir()) if d.is_dir() and dicom_series(d)]
    if not files and not series:
        if dicom_series(p):
            return [(p, f"{p.name}{DICOM_OUTPUT}")]
        raise PredictError(
            f"--input {p}: no volume files ({', '.join(SUPPORTED_SUFFIXES)}) and no DICOM "
            "series in the folder"
        )
    items = [(f, f.name) for f in files] + [(d, f"{d.name}{DICOM_OUTPUT}") for d in series]
    seen: dict[str, Path] = {}
    for src, name in items:
        if name in seen:
            raise PredictError(f"{src} and {seen[name]} would both be written as {name}")
        seen[name] = src
    return items


def _dicom_modality(folder: Path) -> str | None:
    """The Modality tag (0008,0060) of a DICOM series folder's first file, if any."""
    files = next(iter(dicom_series(folder).values()), [])
    if not files:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else None


def check_modality(volume: Volume, predictor: Predictor, source: Path) -> None:
    """Warn (``ModalityWarning``) when a scan does not look like the run's modality."""
    trained = (predictor.modality or "").upper()
    lowest = float(np.min(volume.array))
    tag = _dicom_modality(source) if source.is_dir() else None
    if tag and trained and (tag.upper() == "CT") != (trained == "CT"):
        warnings.warn(
            f"{source}: its DICOM Modality is {tag}, but the run was trained on {trained}",
            ModalityWarning,
            stacklevel=2,
        )
    elif predictor.normalization.mode == "ct" and lowest > CT_AIR_BELOW:
        warnings.warn(
            f"{source}: no voxel below {CT_AIR_BELOW:g} (lowest {lowest:g}): it does not look "
            f"like CT in Hounsfield units, which the run was trained on; check the modality "
            "or the scan's rescaling",
            ModalityWarning,
            stacklevel=2,
        )
    elif predictor.normalization.mode == "zscore" and lowest <= CT_AIR_BELOW:
        warnings.warn(
            f"{source}: values down to {lowest:g} look like CT in Hounsfield units, but the run "
            f"was trained on {trained or 'a z-scored modality'}",
            ModalityWarning,
            stacklevel=2,
        )


def _snapped(direction: np.ndarray) -> np.ndarray:
    """Direction cosines within 1e-12 of 0 or +-1 set to it. ITK's NRRD reader divides the
    stored axis vectors by their lengths and leaves such 1-ulp residues (1.9 mm along y
    reads back as 0.9999999999999999); writing them back would store a vector 1 ulp off
    the input's, so the mask's geometry would not read back as the input's."""
    d = np.asarray(direction, dtype=np.float64)
    r = np.round(d)
    return np.where(np.abs(d - r) < 1e-12, r, d)


def _write_whole(out: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` in a private folder beside ``out``, then move what it wrote
    into place, the file named ``out`` last (a header after its data file)."""
    tmp = Path(tempfile.mkdtemp(prefix=".predict-", dir=out.parent))
    try:
        write(tmp / out.name)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == out.name):
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def predict_file(
    predictor: Predictor,
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    save_probs: bool = False,
) -> Path:
    """Segment one scan and write its mask (and probabilities) in its own geometry.

    Args:
        predictor: the predictor.
        source: the scan (a volume file or a DICOM series folder).
        output: the mask's path (its suffix decides the format).
        save_probs: also write ``<case>.probabilities.npz`` beside it.

    Returns:
        The mask's path.

    Raises:
        VolumeError: the scan is unreadable, not 3D, or oblique (the message names it).
    """
    src, out = Path(source), Path(output)
    volume = read_volume(src)
    check_modality(volume, predictor, src)
    native = predictor.predict(volume, keep_probabilities=save_probs)
    g = native.geometry
    mask = Volume(
        predictor.classes.label_values(native.classes),
        spacing=g.spacing,
        origin=g.origin,
        direction=_snapped(g.direction),
    )
    if save_probs:
        assert native.probabilities is not None
        probs = out.with_name(f"{out.name[: -len(volume_suffix(out))]}.probabilities.npz")
        _write_whole(
            probs,
            lambda tmp: np.savez_compressed(
                tmp,
                probabilities=native.probabilities,
                class_values=np.asarray(predictor.classes.values),
                class_names=np.asarray(predictor.classes.names),
                spacing=np.asarray(g.spacing),
                origin=np.asarray(g.origin),
                direction=g.direction,
            ),
        )
    _write_whole(out, lambda tmp: write_volume(mask, tmp))
    return out


def _output_folder(path: Path, inputs: Sequence[tuple[Path, str]]) -> Path:
    if path.exists() and not path.is_dir():
        raise PredictError(f"--output {path} is a file; give a folder for the masks")
    for src, _ in inputs:
        folder = src if src.is_dir() else src.parent
        if path.exists() and folder.resolve() == path.resolve():
            raise PredictError(
                f"--output {path} is the folder of the input {src}: the masks would replace "
                "the scans; give another folder"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PredictError(f"--output {path}: cannot make the folder ({exc.strerror})") from None
    return path


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show checkpoint and modality warnings as one ``warning: ...`` line on stderr."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, CheckpointWarning | ModalityWarning):
                tqdm.write(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m training.predict",
        description="Segment scans with a trained run; masks keep each scan's geometry.",
    )
    p.add_argument("--run", required=True, type=Path, help="the run folder (runs/NAME)")
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        help="a volume file, a folder of them (and of DICOM series folders), or a DICOM "
        "series folder",
    )
    p.add_argument("--output", required=True, type=Path, help="the folder for the masks")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint file (default: the newest)")
    p.add_argument("--tta", action="store_true", help="average over the flips of the 3 axes")
    p.add_argument("--save-probs", action="store_true", help="also write <case>.probabilities.npz")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the run's)")
    p.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the foreground's largest connected component (default: the run's)",
    )
    p.add_argument("--overlap", type=float, help="window overlap (default: the run's)")
    p.add_argument("--batch", type=int, help="windows per forward pass (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = parse_args(argv)
    try:
        with _warnings_as_lines():
            inputs = list_inputs(args.input)
            out_dir = _output_folder(args.output, inputs)
            predictor, ckpt = load_predictor(
                args.run,
                checkpoint=args.checkpoint,
                device=args.device,
                tta=args.tta,
                largest_component=args.largest_component,
                overlap=args.overlap,
                batch_size=args.batch,
            )
            t0 = time.perf_counter()
            bar = tqdm(inputs, desc="predict", unit="case", disable=args.no_progress)
            for src, name in bar:
                bar.set_postfix_str(name, refresh=False)
                predict_file(predictor, src, out_dir / name, save_probs=args.save_probs)
            wall = time.perf_counter() - t0
    except (PredictError, CheckpointError, LoaderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the masks written so far are complete", file=sys.stderr)
        return 130
    print(
        f"wrote {len(inputs)} mask(s) to {out_dir} with {ckpt} "
        f"({wall / max(len(inputs), 1):.2f} s per case on {predictor.device})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
