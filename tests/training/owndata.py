"""Small datasets and run folders for the own-data tests, written with SimpleITK directly.

Geometry arguments are in SimpleITK's own (x, y, z) order, as its setters take them, so the
files are an independent reference for the project's (z, y, x) code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from training.checkpoint import checkpoint_path, make_checkpoint, save_checkpoint
from training.config import Config, resolve_config, to_dict, to_toml
from training.models import UNet3D

SHAPE = (14, 36, 32)  # (z, y, x)
SPACING_XYZ = (1.6, 1.4, 3.5)
ORIGIN_XYZ = (-30.0, 12.5, -80.0)
FLIP_XYZ = np.diag([-1.0, -1.0, 1.0])  # RAS-stored NIfTI, as in LiTS


def image(
    array: np.ndarray,
    *,
    spacing_xyz: Sequence[float] = SPACING_XYZ,
    origin_xyz: Sequence[float] = ORIGIN_XYZ,
    direction_xyz: np.ndarray | None = None,
) -> sitk.Image:
    """A SimpleITK image with geometry in (x, y, z) order."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    img.SetOrigin(tuple(float(o) for o in origin_xyz))
    if direction_xyz is not None:
        img.SetDirection(tuple(np.asarray(direction_xyz, dtype=float).ravel()))
    return img


def write(img: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def liver_case(seed: int, shape: Sequence[int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 image (air, body, liver, a tumour inside the liver) and its 0/1/2 label.

    The liver is an ellipsoid, the tumour a ball inside it; both move with the seed.
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    nz, ny, nx = shape
    body = ((yy - ny / 2) / (0.45 * ny)) ** 2 + ((xx - nx / 2) / (0.45 * nx)) ** 2 <= 1
    c = np.array([nz / 2, ny / 2, nx / 2]) + rng.uniform(-1.5, 1.5, 3)
    r = np.array([0.33 * nz, 0.3 * ny, 0.28 * nx])
    liver = (((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) <= 1
    t = c + rng.uniform(-1.0, 1.0, 3)
    tumour = liver & (
        ((zz - t[0]) / 2.2) ** 2 + ((yy - t[1]) / 4.0) ** 2 + ((xx - t[2]) / 4.0) ** 2 <= 1
    )
    img = np.full(shape, -1000.0)
    img[body] = 40.0
    img[liver] = 130.0
    img[tumour] = 70.0
    img += rng.normal(0.0, 8.0, shape)
    label = np.zeros(shape, np.uint8)
    label[liver] = 1
    label[tumour] = 2
    return np.round(img).astype(np.int16), label


def write_lits(root: Path, n: int = 4, *, flipped: Sequence[int] = (3,)) -> Path:
    """A LiTS-layout folder: ``volume-i.nii`` / ``segmentation-i.nii`` (0/1/2); the cases in
    ``flipped`` are stored RAS (direction diag(-1, -1, 1)) like most LiTS files."""
    for i in range(n):
        img, lab = liver_case(i)
        kw = {"direction_xyz": FLIP_XYZ} if i in flipped else {}
        folder = root / f"Training Batch {1 + i % 2}"
        write(image(img, **kw), folder / f"volume-{i}.nii")
        write(image(lab, **kw), folder / f"segmentation-{i}.nii")
    return root


def write_msd(root: Path, n: int = 3, *, modality: str = "CT") -> Path:
    """An MSD-layout folder with dataset.json (labels 0/1/2, the given modality)."""
    training = []
    for i in range(n):
        img, lab = liver_case(10 + i)
        if modality != "CT":
            img = (img.astype(np.float32) + 1000.0) * 0.5  # MR-like: no negative values
        write(image(img), root / "imagesTr" / f"case_{i}.nii.gz")
        write(image(lab), root / "labelsTr" / f"case_{i}.nii.gz")
        training.append(
            {"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"}
        )
    meta = {
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "modality": {"0": modality},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_sliver(root: Path, n: int = 3) -> Path:
    """A SLIVER07-layout folder: ``liver-origNNN.mhd`` / ``liver-segNNN.mhd`` (0/1)."""
    for i in range(n):
        img, lab = liver_case(20 + i)
        write(image(img), root / f"liver-orig{i + 1:03d}.mhd")
        write(image((lab > 0).astype(np.uint8)), root / f"liver-seg{i + 1:03d}.mhd")
    return root


def write_pairs(root: Path, n: int = 3) -> Path:
    """An ``images/`` + ``labels/`` folder whose masks are 0/255 (nothing declared)."""
    for i in range(n):
        img, lab = liver_case(30 + i)
        write(image(img), root / "images" / f"p{i}.nrrd")
        write(image(((lab > 0) * 255).astype(np.uint8)), root / "labels" / f"p{i}.nrrd")
    return root


def smoke_data_overrides(root: Path, runs: Path, *extra: str) -> list[str]:
    """``--set`` values for training the smoke preset on a small test dataset."""
    return [
        f'data.root="{root}"',
        "data.phantom=false",
        f'run.runs_dir="{runs}"',
        "run.progress=false",
        "data.build_workers=1",
        "data.spacing=[3.0, 2.0, 2.0]",
        "data.patch_size=[16, 16, 16]",
        *extra,
    ]


def threshold_net() -> nn.Module:
    """A pointwise 'segnet' on the CT window's [0, 1]: class 1 above 0.55 (47.5 HU), class 2
    above 0.75 (137.5 HU), linear logits, so no voxel of an int16 image is a tie."""
    conv = nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 20.0
        conv.bias[1] = -11.0
        conv.weight[2, 0] = 40.0
        conv.bias[2] = -26.0
    return conv


def make_run(
    runs: Path,
    name: str = "synthetic",
    *,
    class_values: Sequence[int] = (0, 1, 2),
    class_names: Sequence[str] = ("background", "liver", "tumour"),
    checkpoint_classes: int | None = None,
    overrides: Sequence[str] = (),
) -> tuple[Path, Config]:
    """A run folder as ``training.run`` leaves one (config.toml, a checkpoint), with an
    untrained segnet of the smoke preset's size (weights from a fixed generator)."""
    cfg = resolve_config(
        preset="smoke",
        overrides=[
            f'run.runs_dir="{runs}"',
            f'run.name="{name}"',
            f"data.class_values={list(class_values)}",
            f"data.class_names={json.dumps(list(class_names))}",
            "data.normalize=ct",
            'data.modality="CT"',
            "data.spacing=[3.0, 2.0, 2.0]",
            "data.patch_size=[16, 16, 16]",
            *overrides,
        ],
    )
    m = cfg.model
    segnet = UNet3D(
        in_channels=1,
        num_classes=checkpoint_classes or len(class_values),
        base_width=m.base_width,
        depth=m.depth,
        max_width=m.max_width,
        deep_supervision=m.deep_supervision,
        generator=torch.Generator().manual_seed(3),
    )
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(cfg))
    save_checkpoint(
        make_checkpoint(models={"segnet": segnet}, config=to_dict(cfg), step=1),
        checkpoint_path(run / "checkpoints", 1),
    )
    return run, cfg


def write_dicom(
    img: sitk.Image, folder: Path, *, series_uid: str = "1.2.826.0.1.3680043.2.1125.7"
) -> None:
    """A 3D int16 image as a DICOM series (one file per slice; the tags GDCM needs)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for i in range(img.GetDepth()):
        sl = img[:, :, i]
        for tag, value in (
            ("0020|000e", series_uid),
            ("0020|0037", orientation),
            ("0008|0060", "CT"),
            ("0018|0050", str(img.GetSpacing()[2])),
            ("0008|0018", f"{series_uid}.{i + 1}"),
            ("0020|0013", str(i + 1)),
            ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, i))))),
        ):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{i:03d}.dcm"))
        writer.Execute(sl)
