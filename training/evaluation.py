"""Evaluation: the gates' measurements and the final validation, all in mode-safe contexts.

Every function here runs the networks inside :func:`training.modes.evaluating` (directly or
through :func:`training.inference.sliding_window_inference`), which puts them in eval mode
without autograd and gives every submodule its own ``training`` flag back afterwards, so an
evaluation in the middle of stage 2 leaves the frozen segnet exactly as it found it.

Train VoE (the gate of stages 1 and 3) is defined as: the mean, over the training cases
(``run.gate_cases`` of them, or all), of the per-case volume overlap error ``1 - |P & G| /
|P | G|`` between the gate class's region (``data.gate_class``; by default liver, label >= 1)
of the label and of the argmax of sliding-window inference over the whole (resampled,
normalised) volume, in eval mode, with the training patch size, overlap ``run.gate_overlap``
and Gaussian blending, keeping the foreground's largest connected component
(``run.largest_component``; validation masks are made the same way). It is measured on
whole volumes rather than on the epoch's patches because patches are foreground-oversampled
and augmented (their VoE depends on where they were cut and how they were deformed), and
because whole volumes are what the validation measures: the gate then means what it says.
Under DDP each rank evaluates its share of the cases and the sum and count are reduced.

Validation measures every foreground class's region (``training.classes``) of each
validation case twice: on the cache grid (the training spacing), and at native resolution:
the class probabilities resampled back onto the case's own file grid
(``training.native.to_native``) and compared there with the label file, distances in the
file's spacing. The native figures are the headline: they are what LiTS and SLIVER07 score.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage
from torch import Tensor, nn

from loaders.volume import read_volume
from training import distributed as D
from training.classes import Classes
from training.data import Volume
from training.inference import sliding_window_inference
from training.losses import adversary_accuracy, one_hot
from training.metrics import case_metrics, voe
from training.modes import evaluating
from training.native import to_native

__all__ = [
    "RESOLUTIONS",
    "VAL_KEYS",
    "class_metrics",
    "heldout_scores",
    "keep_largest_component",
    "mean_metrics",
    "probabilities",
    "segment",
    "train_voe",
    "validate",
    "validation_summary",
    "write_case_csv",
]

VAL_KEYS = ("voe", "dice", "rvd", "assd_mm", "msd_mm", "rmsd_mm")
"""The validation metrics reported in summary.json (means over the validation cases)."""
RESOLUTIONS = ("native", "cache")
"""Where validation metrics are computed: each case's own file grid and spacing, or the
cache grid (the training spacing)."""


def keep_largest_component(classes: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of the foreground (class > 0); the other
    foreground voxels become background (the liver is one connected organ, and its tumours
    lie inside it: the usual liver post-processing).

    Args:
        classes: integer class indices.

    Returns:
        The same array (unchanged) or a copy with the smaller components cleared.
    """
    mask = classes > 0
    if not mask.any():
        return classes
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return classes
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.where(components == int(sizes.argmax()), classes, 0).astype(classes.dtype)


def probabilities(
    segnet: nn.Module | Any,
    image: Tensor,
    *,
    patch_size: Sequence[int],
    overlap: float,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    autocast: bool,
    mirror_axes: Sequence[int] = (),
) -> np.ndarray:
    """The segnet's class probabilities of a whole image (sliding window, Gaussian blending).

    Args:
        segnet: the network (or a callable on windows).
        image: the normalised image ``(1, D, H, W)``.
        mirror_axes: flip test-time augmentation over these axes (0, 1, 2: z, y, x).
        Others: :func:`training.inference.sliding_window_inference`'s.

    Returns:
        ``(K, D, H, W)`` float32 softmax probabilities, on the host.
    """
    probs = sliding_window_inference(
        image,
        segnet,
        patch_size=patch_size,
        overlap=overlap,
        batch_size=batch_size,
        output="probabilities",
        device=device,
        autocast=autocast,
        channels_last=channels_last,
        mirror_axes=mirror_axes,
    )
    return probs.cpu().numpy().astype(np.float32, copy=False)


def segment(
    segnet: nn.Module,
    volume: Volume,
    *,
    largest_component: bool = True,
    **kwargs: Any,
) -> np.ndarray:
    """The segnet's classes of a whole volume on its grid (sliding window, argmax).

    Args:
        segnet: the network.
        volume: the case.
        largest_component: keep only the foreground's largest connected component
            (:func:`keep_largest_component`).
        kwargs: :func:`probabilities`' options.

    Returns:
        uint8 class indices ``(D, H, W)``.
    """
    classes = np.argmax(probabilities(segnet, volume.image, **kwargs), axis=0).astype(np.uint8)
    return keep_largest_component(classes) if largest_component else classes


def class_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    classes: Classes,
) -> list[dict[str, Any]]:
    """Every metric of every foreground class's region (``Classes.region``).

    Args:
        pred: predicted class indices.
        gt: reference class indices, same shape.
        spacing: voxel size (z, y, x) in mm.
        classes: the classes.

    Returns:
        One dict per foreground class: ``class`` (its name), ``training.metrics.
        case_metrics``' keys, ``voxels_gt`` and ``voxels_pred``.
    """
    rows = []
    for k in classes.foreground:
        p, g = classes.region(pred, k), classes.region(gt, k)
        rows.append(
            {
                "class": classes.names[k],
                **case_metrics(p, g, spacing),
                "voxels_gt": int(np.count_nonzero(g)),
                "voxels_pred": int(np.count_nonzero(p)),
            }
        )
    return rows


def _shard(items: Sequence[Any]) -> list[Any]:
    return list(items[D.get_rank() :: D.get_world_size()])


def train_voe(
    segnet: nn.Module,
    volumes: Sequence[Volume],
    *,
    classes: Classes,
    gate_class: int = 1,
    **kwargs: Any,
) -> float:
    """Train VoE as the module docstring defines it, reduced over ranks.

    Args:
        segnet: the network (unwrapped; it is evaluated in eval mode, flags restored).
        volumes: the gate's training volumes (every rank passes the same list).
        classes: the classes.
        gate_class: the class whose region is compared.
        kwargs: :func:`segment`'s options.

    Returns:
        The mean per-case VoE.
    """
    total, count = 0.0, 0.0
    for v in _shard(volumes):
        pred = segment(segnet, v, **kwargs)
        total += voe(classes.region(pred, gate_class), classes.region(v.label, gate_class))
        count += 1
    total = float(D.all_reduce_sum(total))
    count = float(D.all_reduce_sum(count))
    return total / max(count, 1.0)


def heldout_scores(
    segnet: nn.Module,
    adversary: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    autocast: Any,
    classes: Classes | None = None,
    gate_class: int = 1,
) -> dict[str, float]:
    """The adversary's accuracy on held-out (image, mask) pairs, and the segnet's VoE there.

    Each held-out patch gives two pairs: (image, ground-truth one-hot), which should score
    "real", and (image, segnet softmax), which should score "fake". Both networks run in
    eval mode without autograd; their flags are restored afterwards.

    Args:
        segnet: the segnet (unwrapped).
        adversary: the adversary (unwrapped).
        batches: ``(image, label)`` held-out batches on the networks' device (labels as
            class indices).
        num_classes: classes of the one-hot masks.
        autocast: a callable returning the autocast context.
        classes: the classes (for the gate class's region); None: class > 0.
        gate_class: the class whose region the VoE compares.

    Returns:
        ``{"accuracy", "segnet_voe"}``: pairs classified correctly (reduced over ranks) and
        the pooled VoE ``1 - sum|P & G| / sum|P | G|`` of the segnet on these patches.
    """
    correct = torch.zeros((), dtype=torch.float64)
    pairs = torch.zeros((), dtype=torch.float64)
    inter = torch.zeros((), dtype=torch.float64)
    union = torch.zeros((), dtype=torch.float64)
    with evaluating(segnet, adversary):
        for image, label in batches:
            with autocast():
                out = segnet(image)
                probs = (out if isinstance(out, Tensor) else out[0]).float().softmax(1)
                real = adversary(image, one_hot(label, num_classes, dtype=image.dtype))
                fake = adversary(image, probs.to(image.dtype))
            n = 2 * image.shape[0]
            correct += adversary_accuracy(real.float(), fake.float()).double().cpu() * n
            pairs += n
            pred_c, gt_c = probs.argmax(1), label[:, 0]
            if classes is None:
                pred, gt = pred_c > 0, gt_c > 0
            else:
                pred, gt = classes.region(pred_c, gate_class), classes.region(gt_c, gate_class)
            inter += (pred & gt).sum().double().cpu()
            union += (pred | gt).sum().double().cpu()
    reduced = D.all_reduce_sum(torch.stack([correct, pairs, inter, union]))
    assert isinstance(reduced, Tensor)
    c, p, i, u = reduced.tolist()
    return {"accuracy": c / max(p, 1.0), "segnet_voe": 1.0 - i / u if u > 0 else 0.0}


def _overlay(volume: Volume, pred: np.ndarray, classes: Classes, k: int) -> dict[str, Any]:
    gt = classes.region(volume.label, k)
    z = int(np.round(np.argwhere(gt).mean(0)[0])) if gt.any() else 0
    return {
        "image": volume.image[0, z].numpy().astype(np.float16),
        "label": gt[z],
        "pred": classes.region(pred, k)[z],
        "z": z,
    }


def _native_rows(
    probs: np.ndarray, volume: Volume, classes: Classes, largest_component: bool
) -> list[dict[str, Any]]:
    """The metrics at native resolution: the prediction on the label file's grid."""
    assert volume.grid is not None and volume.reorientation is not None
    assert volume.label_file is not None
    native = to_native(probs, volume.grid, volume.reorientation)
    pred = keep_largest_component(native.classes) if largest_component else native.classes
    label = read_volume(volume.label_file, is_label=True)
    if label.shape != pred.shape:
        raise ValueError(
            f"{volume.label_file}: shape {label.shape} differs from the prediction's "
            f"{pred.shape} on its image's grid"
        )
    return class_metrics(pred, classes.index(label.array), label.spacing, classes)


def validate(
    segnet: nn.Module,
    volumes: Sequence[Volume],
    *,
    classes: Classes,
    gate_class: int = 1,
    native: bool = True,
    largest_component: bool = True,
    **kwargs: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-case, per-class metrics of the validation volumes, gathered from all ranks.

    Args:
        segnet: the network (unwrapped).
        volumes: the validation volumes (every rank passes the same list).
        classes: the classes.
        gate_class: the class drawn in the overlays.
        native: also measure at native resolution (volumes without a label file or a
            reorientation are measured on the cache grid only).
        largest_component: post-processing of both predictions (:func:`segment`).
        kwargs: :func:`probabilities`' options.

    Returns:
        ``(rows, overlays)``: one row per case, resolution (``RESOLUTIONS``) and foreground
        class: ``case``, ``resolution``, ``class`` plus ``training.metrics.case_metrics``'
        keys and ``voxels_gt`` / ``voxels_pred``, in case order, native first; and per case an
        axial slice of the cache grid through the gate class's centre for the report.
    """
    rows, overlays = [], []
    for v in _shard(volumes):
        probs = probabilities(segnet, v.image, **kwargs)
        pred = np.argmax(probs, axis=0).astype(np.uint8)
        if largest_component:
            pred = keep_largest_component(pred)
        if native and v.label_file is not None and v.reorientation is not None:
            for r in _native_rows(probs, v, classes, largest_component):
                rows.append({"case": v.id, "resolution": "native", **r})
        for r in class_metrics(pred, v.label, v.spacing, classes):
            rows.append({"case": v.id, "resolution": "cache", **r})
        overlays.append({"case": v.id, **_overlay(v, pred, classes, gate_class)})
    if D.is_distributed():
        got: list[Any] = [None] * D.get_world_size()
        dist.all_gather_object(got, (rows, overlays))
        rows = [r for g in got for r in g[0]]
        overlays = [o for g in got for o in g[1]]
    order = {v.id: i for i, v in enumerate(volumes)}
    rows.sort(key=lambda r: (order[r["case"]], RESOLUTIONS.index(r["resolution"])))
    overlays.sort(key=lambda o: order[o["case"]])
    return rows, overlays


def mean_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means of :data:`VAL_KEYS` over the rows (inf stays inf: a case with an empty mask)."""
    out = {}
    for k in VAL_KEYS:
        values = [float(r[k]) for r in rows]
        out[k] = float(np.mean(values)) if values else math.nan
    return out


def validation_summary(
    rows: Sequence[dict[str, Any]], classes: Classes, *, cache_spacing: Sequence[float] | None
) -> dict[str, dict[str, Any]]:
    """The validation blocks of summary.json: per resolution, the class means.

    Args:
        rows: :func:`validate`'s rows.
        classes: the classes (their order).
        cache_spacing: the cache grid's spacing (``data.spacing``; None: each case's own).

    Returns:
        ``{"val": native block, "val_cache_grid": cache block}`` (``"val"`` is the cache
        block where no row is native). Each block: ``resolution``, ``grid`` (in words),
        ``cases`` and ``classes``: ``{name: {metric: mean}}``.
    """
    blocks: dict[str, dict[str, Any]] = {}
    for resolution in RESOLUTIONS:
        mine = [r for r in rows if r["resolution"] == resolution]
        if not mine:
            continue
        if resolution == "native":
            grid = "each case's own file grid and spacing (predictions resampled back)"
        elif cache_spacing:
            grid = "the cache grid, " + " x ".join(f"{s:g}" for s in cache_spacing) + " mm"
        else:
            grid = "the cache grid, each case's own spacing"
        blocks[resolution] = {
            "resolution": resolution,
            "grid": grid,
            "cases": len({r["case"] for r in mine}),
            "classes": {
                name: mean_metrics([r for r in mine if r["class"] == name])
                for name in classes.names[1:]
            },
        }
    out = {"val": blocks.get("native", blocks.get("cache", {}))}
    if "native" in blocks and "cache" in blocks:
        out["val_cache_grid"] = blocks["cache"]
    return out


def write_case_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """The per-case metrics table as CSV (one row per case, resolution and class; a header
    line)."""
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
