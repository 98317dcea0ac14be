"""Weight initialisation from an explicit generator, shared by the segnet and the adversary."""

from __future__ import annotations

import torch
from torch import nn


def he_init_(module: nn.Module, *, negative_slope: float, generator: torch.Generator) -> None:
    """Initialise convolutions with He (Kaiming) normal weights and zero biases, norms to 1/0.

    Args:
        module: the network; every Conv3d, ConvTranspose3d, Linear and affine InstanceNorm3d
            in it is re-initialised in place.
        negative_slope: slope of the LeakyReLU that follows the layers (He's ``a``).
        generator: the ``torch.Generator`` all random weights are drawn from.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, a=negative_slope, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm3d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
