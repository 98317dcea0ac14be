"""A 3D U-Net segmentation network ("segnet") in the nnU-Net mould."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.models._init import he_init_

__all__ = ["ConvBlock", "UNet3D"]


class ConvBlock(nn.Sequential):
    """Conv3d (3x3x3) -> optional Dropout3d -> InstanceNorm3d (affine) -> LeakyReLU.

    The order is nnU-Net's ConvDropoutNormReLU. The convolution has no bias: the instance
    norm's mean subtraction would cancel it.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: convolution stride; 2 halves each spatial size (the U-Net's downsampling).
        dropout: channel dropout probability; 0 leaves the Dropout3d out.
        negative_slope: LeakyReLU slope.

    Shape:
        ``(B, in_channels, D, H, W) -> (B, out_channels, D / stride, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dropout: float = 0.0,
        negative_slope: float = 0.01,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        ]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        layers += [
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(negative_slope, inplace=True),
        ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D U-Net: strided-conv encoder, transposed-conv decoder, skip connections.

    Each of the ``depth`` resolution stages has ``convs_per_stage`` ConvBlocks; stages after
    the first start with a stride-2 convolution. Widths double per stage from ``base_width``,
    capped at ``max_width``. The decoder upsamples with a 2x2x2 stride-2 transposed
    convolution, concatenates the skip and runs ``convs_per_stage`` ConvBlocks.

    With ``deep_supervision`` the forward pass in training mode returns a list of logits, one
    per decoder stage, full resolution first (as nnU-Net); in eval mode it always returns the
    full-resolution logits alone, so inference code never sees the list.

    Dropout (when ``dropout > 0``) draws from torch's global RNG, since ``nn.Dropout3d``
    takes no generator; weights are drawn from ``generator`` only, and building the network
    leaves the global RNG state as it was.

    Args:
        in_channels: image channels.
        num_classes: output channels (logits; background included).
        base_width: channels of the first stage.
        depth: number of resolution stages (``depth - 1`` downsamplings).
        max_width: channel cap.
        convs_per_stage: ConvBlocks per encoder and decoder stage.
        dropout: Dropout3d probability in every ConvBlock; 0 for none.
        deep_supervision: return multi-scale logits in training mode.
        negative_slope: LeakyReLU slope.
        generator: draws the initial weights (He normal); None means a generator seeded 0.

    Shape:
        input ``(B, in_channels, D, H, W)`` with D, H, W multiples of ``2 ** (depth - 1)``;
        output ``(B, num_classes, D, H, W)``, or with deep supervision in training mode a list
        whose i-th entry is ``(B, num_classes, D / 2**i, H / 2**i, W / 2**i)``,
        ``i = 0 .. depth - 2``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        base_width: int = 16,
        depth: int = 4,
        max_width: int = 320,
        convs_per_stage: int = 2,
        dropout: float = 0.0,
        deep_supervision: bool = False,
        negative_slope: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be at least 1, got {convs_per_stage!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.deep_supervision = deep_supervision
        widths = [min(base_width * 2**i, max_width) for i in range(depth)]
        self.widths = tuple(widths)

        def stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            convs = [
                ConvBlock(
                    c_in if j == 0 else c_out,
                    c_out,
                    stride=stride if j == 0 else 1,
                    dropout=dropout,
                    negative_slope=negative_slope,
                )
                for j in range(convs_per_stage)
            ]
            return nn.Sequential(*convs)

        with torch.random.fork_rng(devices=[]):
            self.encoder = nn.ModuleList(
                stage(in_channels if i == 0 else widths[i - 1], w, 1 if i == 0 else 2)
                for i, w in enumerate(widths)
            )
            self.upsample = nn.ModuleList(
                nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2)
                for i in reversed(range(depth - 1))
            )
            self.decoder = nn.ModuleList(
                stage(2 * widths[i], widths[i], 1) for i in reversed(range(depth - 1))
            )
            # Only the heads in use exist, so DDP never meets a parameter without a gradient.
            head_widths = widths[:-1] if deep_supervision else widths[:1]
            self.heads = nn.ModuleList(nn.Conv3d(w, num_classes, 1) for w in head_widths)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        he_init_(self, negative_slope=negative_slope, generator=generator)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (``2 ** (depth - 1)``)."""
        return 2 ** (self.depth - 1)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Segment a batch.

        Args:
            x: images.

        Returns:
            Logits, or in training mode with deep supervision a list of logits, full
            resolution first.

        Shape:
            See the class docstring.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not a multiple of {self.divisor} "
                f"(depth {self.depth}); pad or choose another patch size"
            )
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        supervise = self.deep_supervision and self.training
        outputs = []
        for j, (up, stage) in enumerate(zip(self.upsample, self.decoder, strict=True)):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
            if supervise:
                outputs.append(self.heads[self.depth - 2 - j](x))
        if supervise:
            return outputs[::-1]
        return self.heads[0](x)
