"""Synchformer's segment feature extractors without the synchronisation head: what video-to-audio models
condition on (MMAudio reads the visual features: 8 per 16-frame segment, 192 for 8 s at 25 fps).
`model.pretrained.load_feature_extractor` builds one from any trained Synchformer."""

import torch
from torch import nn

from utils.precision import autocast


class SegmentFeatures(nn.Module):
    """The frozen visual extractor, and the audio one or `nn.Identity()`, under the names the full model's state
    dict gives them (`vfeat_extractor.*`, `afeat_extractor.*`).

    `forward(vis)`: vis (B, S, T, C, H, W), segments of 16 frames normalised to [-1, 1] -> (B, S, 8, D), the
    layout MMAudio's Synchformer takes and gives; `extract_afeats(aud)`: aud (B, S, 1, F, Ta) log-mel segments ->
    (B, S, 6, D). Segments go through an extractor `chunk_segments` at a time (bounded memory for long videos,
    the same features), under the autocast of `precision` ('fp32', 'bf16', ...; see `utils.precision`)."""

    def __init__(
        self, vfeat_extractor: nn.Module, afeat_extractor: nn.Module | None = None, chunk_segments: int = 64,
        precision: str = "fp32",
    ):  # fmt: skip
        super().__init__()
        self.vfeat_extractor = vfeat_extractor
        self.afeat_extractor = nn.Identity() if afeat_extractor is None else afeat_extractor
        self.chunk_segments, self.precision = chunk_segments, precision

    def encode(self, extractor: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, *segment) in the extractor's layout -> (B, S, t, D), `chunk_segments` segments per call."""
        chunks = x.flatten(0, 1).split(self.chunk_segments)  # each (n, *segment)
        with autocast(self.precision, x.device):
            # each chunk as a clip of n segments; the extractors also return a clip feature (None here)
            feats = [extractor(chunk.unsqueeze(0))[0][0] for chunk in chunks]  # each (n, t, D)
        return torch.cat(feats).unflatten(0, x.shape[:2])  # (B, S, t, D)

    def forward(self, vis: torch.Tensor) -> torch.Tensor:
        if vis.ndim != 6:
            raise ValueError(f"SegmentFeatures expects vis (B, S, T, C, H, W), got {tuple(vis.shape)}.")
        return self.encode(self.vfeat_extractor, vis.permute(0, 1, 3, 2, 4, 5))  # in: (B, S, C, T, H, W)

    # the full model's name (av-benchmark's and MMAudio's calls)
    extract_vfeats = forward

    def extract_afeats(self, aud: torch.Tensor) -> torch.Tensor:
        if isinstance(self.afeat_extractor, nn.Identity):
            raise ValueError("This SegmentFeatures has no audio extractor: load it with audio=True.")
        if aud.ndim != 5 or aud.shape[2] != 1:
            raise ValueError(f"extract_afeats expects aud (B, S, 1, F, Ta), got {tuple(aud.shape)}.")
        return self.encode(self.afeat_extractor, aud[:, :, 0].transpose(2, 3))  # in: (B, S, Ta, F)
