"""Bridges: small adapters between a feature extractor's output and what the next module expects.

`DoNothingBridge` is the projection of the stage-1 (AVCLIP) configs; the convolution and pooling bridges
are kept for configs that name them. The stored parameter names (`bridge.0.weight`) are the original's.
"""

import torch
from torch import nn


class DoNothingBridge(nn.Identity):
    """Identity; accepts and ignores the arguments of a projection (e.g. in/out_features) so configs can swap it in."""


class ConvBridge(nn.Module):
    """Convolution + GELU; `ndim` 2 for spectrogram features (B, D, F, T), 3 for video features (B, D, T, H, W)."""

    def __init__(self, ndim: int, **conv_kwargs):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[ndim]
        self.bridge = nn.Sequential(conv(**conv_kwargs), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bridge(x)


class AvgPoolBridge(nn.Module):
    """Average pooling; `ndim` as in `ConvBridge`."""

    def __init__(self, ndim: int, kernel_size, stride=None, **pool_kwargs):
        super().__init__()
        pool = {2: nn.AvgPool2d, 3: nn.AvgPool3d}[ndim]
        self.bridge = pool(kernel_size=kernel_size, stride=stride, **pool_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bridge(x)


class ConvBridgeAudio(ConvBridge):
    def __init__(self, **conv_kwargs):
        super().__init__(2, **conv_kwargs)


class ConvBridgeVisual(ConvBridge):
    def __init__(self, **conv_kwargs):
        super().__init__(3, **conv_kwargs)


class AvgPoolBridgeAudio(AvgPoolBridge):
    def __init__(self, **pool_kwargs):
        super().__init__(2, **pool_kwargs)


class AvgPoolBridgeVisual(AvgPoolBridge):
    def __init__(self, **pool_kwargs):
        super().__init__(3, **pool_kwargs)


class AppendZerosToHidden(nn.Module):
    """Pads dimension `dim` with zeros up to `target_hidden_size` (e.g. 512-d features into a 768-d model)."""

    def __init__(self, target_hidden_size: int, dim: int):
        super().__init__()
        self.target_hidden_size = target_hidden_size
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_shape = list(x.shape)
        pad_shape[self.dim] = self.target_hidden_size - x.shape[self.dim]
        return torch.cat([x, x.new_zeros(pad_shape)], dim=self.dim)
