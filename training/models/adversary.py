"""A 3D convolutional discriminator ("adversary") over (image, mask) pairs."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from training.models._init import he_init_

__all__ = ["Discriminator3D"]


class Discriminator3D(nn.Module):
    """PatchGAN-style 3D discriminator that judges whether a mask belongs to an image.

    The mask is the ground truth one-hot encoded, or the segnet's softmax; both are
    ``(B, mask_channels, D, H, W)`` with values in [0, 1]. The image and mask are concatenated
    along channels, then ``depth`` stride-2 4x4x4 convolutions (InstanceNorm3d from the second
    on, LeakyReLU) halve the resolution each time. ``output="patch"`` ends in a 3x3x3
    convolution to one logit per receptive-field patch; ``output="global"`` averages the last
    features over space and maps them to one logit per sample with a linear layer.

    Instance norm is per sample, so a real and a fake batch never leak statistics into each
    other (the reason DCGAN-style code keeps them in separate batches under BatchNorm).

    Args:
        image_channels: channels of the image.
        mask_channels: channels of the mask (the number of classes).
        base_width: channels after the first convolution; doubles per level.
        depth: number of stride-2 levels.
        max_width: channel cap.
        output: ``"patch"`` or ``"global"``.
        negative_slope: LeakyReLU slope.
        generator: draws the initial weights (He normal); None means a generator seeded 0.

    Shape:
        image ``(B, image_channels, D, H, W)``, mask ``(B, mask_channels, D, H, W)`` with D, H,
        W multiples of ``2 ** depth``; output ``(B, 1, D / 2**depth, H / 2**depth,
        W / 2**depth)`` for ``"patch"``, ``(B, 1)`` for ``"global"``. Logits (no sigmoid).
    """

    def __init__(
        self,
        *,
        image_channels: int = 1,
        mask_channels: int = 2,
        base_width: int = 16,
        depth: int = 3,
        max_width: int = 256,
        output: Literal["patch", "global"] = "patch",
        negative_slope: float = 0.2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if output not in ("patch", "global"):
            raise ValueError(f"output must be 'patch' or 'global', got {output!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth!r}")
        self.image_channels = image_channels
        self.mask_channels = mask_channels
        self.depth = depth
        self.output = output
        widths = [min(base_width * 2**i, max_width) for i in range(depth)]
        with torch.random.fork_rng(devices=[]):
            layers: list[nn.Module] = []
            c_in = image_channels + mask_channels
            for i, w in enumerate(widths):
                layers.append(nn.Conv3d(c_in, w, 4, stride=2, padding=1, bias=i == 0))
                if i > 0:
                    layers.append(nn.InstanceNorm3d(w, affine=True))
                layers.append(nn.LeakyReLU(negative_slope, inplace=True))
                c_in = w
            self.features = nn.Sequential(*layers)
            self.head: nn.Module
            if output == "patch":
                self.head = nn.Conv3d(c_in, 1, 3, padding=1)
            else:
                self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, 1))
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        he_init_(self, negative_slope=negative_slope, generator=generator)

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        """Score (image, mask) pairs; high logits mean "ground truth".

        Args:
            image: images.
            mask: one-hot ground truth or softmax probabilities, same spatial size.

        Returns:
            Logits, per patch or per sample (see the class docstring).
        """
        if image.ndim != 5 or image.shape[1] != self.image_channels:
            raise ValueError(
                f"expected image (B, {self.image_channels}, D, H, W), got {tuple(image.shape)}"
            )
        if mask.ndim != 5 or mask.shape[1] != self.mask_channels:
            raise ValueError(
                f"expected mask (B, {self.mask_channels}, D, H, W), got {tuple(mask.shape)}"
            )
        if image.shape[0] != mask.shape[0] or image.shape[2:] != mask.shape[2:]:
            raise ValueError(
                f"image {tuple(image.shape)} and mask {tuple(mask.shape)} do not pair up"
            )
        x = torch.cat([image, mask.to(image.dtype)], dim=1)
        return self.head(self.features(x))
