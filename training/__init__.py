"""The staged segnet + adversary trainer: models, losses, metrics, inference, checkpoints.

Names are imported lazily, so ``import training`` (and ``training.metrics``, which needs only
numpy and scipy) does not import torch; it only checks that the ``train`` extra is installed.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from augment.extras import require_extra

_TRAIN_MODULES = ("torch", "tqdm", "matplotlib", "SimpleITK", "zarr", "numcodecs") + (
    ("tomli",) if sys.version_info < (3, 11) else ()
)
"""What ``training`` and the ``loaders`` it reads data with import beyond the core: the
``train`` extra."""


require_extra("training", _TRAIN_MODULES, "train")

_EXPORTS = {
    "voe": "training.metrics",
    "dice": "training.metrics",
    "rvd": "training.metrics",
    "abs_rvd": "training.metrics",
    "assd": "training.metrics",
    "rmsd": "training.metrics",
    "msd": "training.metrics",
    "case_metrics": "training.metrics",
    "UNet3D": "training.models",
    "Discriminator3D": "training.models",
    "evaluating": "training.modes",
    "frozen": "training.modes",
    "expect_mode": "training.modes",
    "sliding_window_inference": "training.inference",
    "DiceCELoss": "training.losses",
    "DeepSupervisionLoss": "training.losses",
    "discriminator_loss": "training.losses",
    "generator_loss": "training.losses",
    "save_checkpoint": "training.checkpoint",
    "load_checkpoint": "training.checkpoint",
    "latest_checkpoint": "training.checkpoint",
}

__all__ = [
    "DeepSupervisionLoss",
    "DiceCELoss",
    "Discriminator3D",
    "UNet3D",
    "abs_rvd",
    "assd",
    "case_metrics",
    "dice",
    "discriminator_loss",
    "evaluating",
    "expect_mode",
    "frozen",
    "generator_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "msd",
    "rmsd",
    "rvd",
    "save_checkpoint",
    "sliding_window_inference",
    "voe",
]

if TYPE_CHECKING:
    from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from training.inference import sliding_window_inference
    from training.losses import (
        DeepSupervisionLoss,
        DiceCELoss,
        discriminator_loss,
        generator_loss,
    )
    from training.metrics import abs_rvd, assd, case_metrics, dice, msd, rmsd, rvd, voe
    from training.models import Discriminator3D, UNet3D
    from training.modes import evaluating, expect_mode, frozen


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
