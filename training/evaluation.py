"""Evaluation: the gates' measurements and the final validation, all in mode-safe contexts.

Every function here runs the networks inside :func:`training.modes.evaluating` (directly or
through :func:`training.inference.sliding_window_inference`), which puts them in eval mode
without autograd and gives every submodule its own ``training`` flag back afterwards, so an
evaluation in the middle of stage 2 leaves the frozen segnet exactly as it found it.

Train VoE (the gate of stages 1 and 3) is defined as: the mean, over the training cases
(``run.gate_cases`` of them, or all), of the per-case volume overlap error ``1 - |P & G| /
|P | G|`` between the liver label and the argmax of sliding-window inference over the whole
(resampled, windowed) volume, in eval mode, with the training patch size, overlap
``run.gate_overlap`` and Gaussian blending, keeping the mask's largest connected component
(``run.largest_component``; validation masks are made the same way). It is measured on
whole volumes rather than on
the epoch's patches because patches are foreground-oversampled and augmented (their VoE
depends on where they were cut and how they were deformed), and because whole volumes are
what the validation measures: the gate then means what it says. Under DDP each rank
evaluates its share of the cases and the sum and count are reduced.
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

from training import distributed as D
from training.data import Volume
from training.inference import sliding_window_inference
from training.losses import adversary_accuracy, one_hot
from training.metrics import case_metrics, voe
from training.modes import evaluating

__all__ = [
    "VAL_KEYS",
    "heldout_scores",
    "mean_metrics",
    "segment",
    "train_voe",
    "validate",
    "write_case_csv",
]

VAL_KEYS = ("voe", "dice", "rvd", "assd_mm", "msd_mm")
"""The validation metrics reported in summary.json (means over the validation cases)."""


def segment(
    segnet: nn.Module,
    volume: Volume,
    *,
    patch_size: Sequence[int],
    overlap: float,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    autocast: bool,
    largest_component: bool = True,
) -> np.ndarray:
    """The segnet's liver mask of a whole volume (sliding window, Gaussian blending).

    Args:
        largest_component: keep only the largest 26-connected component of the mask (the
            liver is one connected organ; the usual liver post-processing).

    Returns:
        A boolean ``(D, H, W)`` array: argmax class > 0.
    """
    labels = sliding_window_inference(
        volume.image,
        segnet,
        patch_size=patch_size,
        overlap=overlap,
        batch_size=batch_size,
        output="argmax",
        device=device,
        autocast=autocast,
        channels_last=channels_last,
    )
    mask = (labels > 0).cpu().numpy()
    if largest_component and mask.any():
        components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            mask = components == int(sizes.argmax())
    return mask


def _shard(items: Sequence[Any]) -> list[Any]:
    return list(items[D.get_rank() :: D.get_world_size()])


def train_voe(segnet: nn.Module, volumes: Sequence[Volume], **kwargs: Any) -> float:
    """Train VoE as the module docstring defines it, reduced over ranks.

    Args:
        segnet: the network (unwrapped; it is evaluated in eval mode, flags restored).
        volumes: the gate's training volumes (every rank passes the same list).
        kwargs: :func:`segment`'s options.

    Returns:
        The mean per-case VoE.
    """
    total, count = 0.0, 0.0
    for v in _shard(volumes):
        total += voe(segment(segnet, v, **kwargs), v.label)
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
) -> dict[str, float]:
    """The adversary's accuracy on held-out (image, mask) pairs, and the segnet's VoE there.

    Each held-out patch gives two pairs: (image, ground-truth one-hot), which should score
    "real", and (image, segnet softmax), which should score "fake". Both networks run in
    eval mode without autograd; their flags are restored afterwards.

    Args:
        segnet: the segnet (unwrapped).
        adversary: the adversary (unwrapped).
        batches: ``(image, label)`` held-out batches on the networks' device.
        num_classes: classes of the one-hot masks.
        autocast: a callable returning the autocast context.

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
            pred, gt = probs.argmax(1) > 0, label[:, 0] > 0
            inter += (pred & gt).sum().double().cpu()
            union += (pred | gt).sum().double().cpu()
    reduced = D.all_reduce_sum(torch.stack([correct, pairs, inter, union]))
    assert isinstance(reduced, Tensor)
    c, p, i, u = reduced.tolist()
    return {"accuracy": c / max(p, 1.0), "segnet_voe": 1.0 - i / u if u > 0 else 0.0}


def _overlay(volume: Volume, pred: np.ndarray) -> dict[str, Any]:
    z = int(np.round(np.argwhere(volume.label).mean(0)[0])) if volume.label.any() else 0
    return {
        "image": volume.image[0, z].numpy().astype(np.float16),
        "label": volume.label[z],
        "pred": pred[z],
        "z": z,
    }


def validate(
    segnet: nn.Module, volumes: Sequence[Volume], **kwargs: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-case metrics of the validation volumes, gathered from all ranks.

    Args:
        segnet: the network (unwrapped).
        volumes: the validation volumes (every rank passes the same list).
        kwargs: :func:`segment`'s options.

    Returns:
        ``(rows, overlays)``: one row per case (``case`` plus ``training.metrics.
        case_metrics``' keys and ``voxels_gt`` / ``voxels_pred``), in case order; and per
        case an axial slice through the liver's centre for the report.
    """
    rows, overlays = [], []
    for v in _shard(volumes):
        pred = segment(segnet, v, **kwargs)
        m = case_metrics(pred, v.label, v.spacing)
        rows.append(
            {"case": v.id, **m, "voxels_gt": int(v.label.sum()), "voxels_pred": int(pred.sum())}
        )
        overlays.append({"case": v.id, **_overlay(v, pred)})
    if D.is_distributed():
        got: list[Any] = [None] * D.get_world_size()
        dist.all_gather_object(got, (rows, overlays))
        rows = [r for g in got for r in g[0]]
        overlays = [o for g in got for o in g[1]]
    order = {v.id: i for i, v in enumerate(volumes)}
    rows.sort(key=lambda r: order[r["case"]])
    overlays.sort(key=lambda o: order[o["case"]])
    return rows, overlays


def mean_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means of :data:`VAL_KEYS` over the cases (inf stays inf: a case with an empty mask)."""
    out = {}
    for k in VAL_KEYS:
        values = [float(r[k]) for r in rows]
        out[k] = float(np.mean(values)) if values else math.nan
    return out


def write_case_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """The per-case metrics table as CSV (one row per case, a header line)."""
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
