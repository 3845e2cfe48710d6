"""What the video and audio feature extractors share: a clip arrives as S segments that are encoded
independently, and the segment features may be pooled into one clip feature."""

import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.modules.aggregators import build_aggregator
from utils.utils import ConfigError

log = logging.getLogger(__name__)


class SegmentFeatureExtractor(nn.Module):
    """Base of the extractors. Subclasses set `segment_shape` (the shape of one input segment), call
    `build_time_and_segment_aggregators` and define `forward_segments` for a batch of segments, running
    their transformer blocks through `run_blocks` with `checkpointed=self.grad_checkpointing`.

    Two ways to trade time for memory, neither changing the outputs (`training.grad_checkpointing` and
    `training.for_loop_segment_fwd` of stage 1 set them): `grad_checkpointing` keeps only each block's input
    for the backward pass and recomputes the rest there (about one more forward of the blocks); `for_loop`
    encodes one segment index at a time, so the activations are those of S=1."""

    segment_shape: tuple[int, ...]

    def __init__(self, grad_checkpointing: bool = False, for_loop: bool = False):
        super().__init__()
        self.grad_checkpointing, self.for_loop = grad_checkpointing, for_loop

    def forward(self, x: torch.Tensor, for_loop: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encodes `x` (B, S, *segment_shape) into segment features (B, S, ...) and, when the extractor
        adds a global representation, a clip feature (B, D), else None. `for_loop=True`: as `self.for_loop`."""
        B, S = x.shape[:2]
        if tuple(x.shape[2:]) != tuple(self.segment_shape):
            raise ValueError(
                f"{type(self).__name__} expects input (B, S, {', '.join(map(str, self.segment_shape))}), got "
                f"{tuple(x.shape)}: check the input layout and the size arguments of the extractor."
            )
        chunks = x.split(1, dim=1) if for_loop or self.for_loop else (x,)  # each (B, s, *segment_shape)
        x = torch.cat([self.forward_segments(c.flatten(0, 1)).unflatten(0, (B, -1)) for c in chunks], dim=1)
        global_x = None if self.global_attn_agg is None else self.global_attn_agg(x)  # (B, D)
        return x, global_x  # (B, S, D) or (B, S, t, D) if time is not pooled

    def build_time_and_segment_aggregators(
        self, agg_time_module: str, add_global_repr: bool, agg_segments_module: str | None, max_segments: int | None,
        **layer_kwargs,
    ) -> None:  # fmt: skip
        """Sets `temp_attn_agg` (pools the time steps of a segment) and `global_attn_agg` (pools the
        segments of a clip, or None)."""
        self.temp_attn_agg = build_aggregator(agg_time_module, **layer_kwargs)
        self.global_attn_agg = None
        if add_global_repr:
            if isinstance(self.temp_attn_agg, nn.Identity):
                raise ConfigError("add_global_repr=True needs segment vectors: set agg_time_module to a pooling one.")
            # 16 segments: a 10 s clip in 0.64 s segments
            max_len = max_segments or 16
            self.global_attn_agg = build_aggregator(
                agg_segments_module or "", max_len=max_len, allow_identity=False, **layer_kwargs
            )

    def load_weights(self, state_dict: dict, source: str, fresh_prefixes: tuple[str, ...] = ()) -> None:
        """Loads what fits and warns about the rest; keys under `fresh_prefixes` (layers the source never
        had, e.g. our aggregators in a Motionformer checkpoint) may be missing silently."""
        own = self.state_dict()
        mismatched = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
        state_dict = {k: v for k, v in state_dict.items() if k not in mismatched}
        status = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in status.missing_keys if not k.startswith(fresh_prefixes)]
        if missing or status.unexpected_keys or mismatched:
            log.warning(
                f"{type(self).__name__}: loaded {source} partially. Missing ({len(missing)}): {missing}; "
                f"unexpected ({len(status.unexpected_keys)}): {status.unexpected_keys}; "
                f"shape mismatch, kept initial values ({len(mismatched)}): {mismatched}"
            )
        else:
            log.info(f"{type(self).__name__}: loaded {source}")


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, checkpointed: bool = False) -> torch.Tensor:
    """`x` through `blocks` in turn (`block(x, *args)`); `checkpointed`: each block under gradient checkpointing
    when a backward pass may follow (checkpoint restores the RNG state: the recomputed dropout is the same)."""
    for block in blocks:
        if checkpointed and torch.is_grad_enabled():
            x = checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


def submodule_state_dict(state_dict: dict, name: str) -> dict:
    """The entries of submodule `name` (e.g. 'v_encoder' of a stage-1 AVCLIP checkpoint, saved with or
    without the DDP 'module.' prefix) with that prefix removed."""
    prefixes = (f"module.{name}.", f"{name}.")
    return {key.removeprefix(p): value for key, value in state_dict.items() for p in prefixes if key.startswith(p)}
