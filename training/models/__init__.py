"""The networks: the 3D U-Net segnet and the (image, mask) adversary."""

from __future__ import annotations

from training.models.adversary import Discriminator3D
from training.models.unet import ConvBlock, UNet3D

__all__ = ["ConvBlock", "Discriminator3D", "UNet3D"]
