"""Bridges: small adapters between a feature extractor's output and what the next module expects.

`DoNothingBridge` is the projection of the stage-1 (AVCLIP) configs; the convolution and pooling bridges
are kept for configs that name them. The stored parameter names (`bridge.0.weight`) are the original's."""

import torch
from torch import nn


class DoNothingBridge(nn.Identity):
    """Identity; accepts and ignores the arguments of a projection (e.g. in/out_features) so configs can swap it in."""


class _Bridge(nn.Module):
    """Applies `self.bridge`, the name the checkpoints store its parameters under."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bridge(x)


class ConvBridgeAudio(_Bridge):
    """Convolution + GELU over spectrogram features (B, D, F, T)."""

    conv = nn.Conv2d

    def __init__(self, **conv_kwargs):
        super().__init__()
        self.bridge = nn.Sequential(self.conv(**conv_kwargs), nn.GELU())


class ConvBridgeVisual(ConvBridgeAudio):
    """Convolution + GELU over video features (B, D, T, H, W)."""

    conv = nn.Conv3d


class AvgPoolBridgeAudio(_Bridge):
    """Average pooling over spectrogram features (B, D, F, T)."""

    pool = nn.AvgPool2d

    def __init__(self, kernel_size, stride=None, **pool_kwargs):
        super().__init__()
        self.bridge = self.pool(kernel_size=kernel_size, stride=stride, **pool_kwargs)


class AvgPoolBridgeVisual(AvgPoolBridgeAudio):
    """Average pooling over video features (B, D, T, H, W)."""

    pool = nn.AvgPool3d


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
