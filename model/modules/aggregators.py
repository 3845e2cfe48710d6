"""Layers that pool one axis of a feature tensor into a single vector.

The feature extractors pool their patch tokens step by step: over space within each frame (video) or
over frequency within each time step (audio), then optionally over time, then optionally over the
segments of a clip. Every aggregator here maps `(N, L, D) -> (N, D)` by pooling the `L` axis.
Configs name them 'TransformerEncoderLayer', 'AveragePooling' or a dotted '...Identity' (no pooling)."""

import torch
from timm.layers import trunc_normal_
from torch import nn

from utils.utils import ConfigError


class CLSTokenAggregator(nn.TransformerEncoderLayer):
    """Pools a sequence into the output of a learnable CLS token after one pre-norm encoder layer.

    Subclasses `nn.TransformerEncoderLayer` so that the state-dict names (`self_attn.in_proj_weight`,
    `linear1`, `norm1`, ...) are those of the published checkpoints. Only the CLS token's output is kept,
    so only its row is computed after the keys and values: its query attends over every token, and the
    output projection and the feed-forward run on it alone. The same function as the whole layer followed
    by `[:, 0]`, at about a sixth of the layer's multiply-adds."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0):
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation=nn.GELU(),
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepend_cls(x)  # (N, 1+L, D)
        h = self.norm1(x)
        cls = h[:, :1]  # (N, 1, D): the only query
        # attention (batch_first) transposes its inputs to (1+L, N, D); keys and values already contiguous in
        # that layout keep their projection one GEMM, where matmul would otherwise expand the weight over 1+L
        # (a copy of (1+L) x D x 2D numbers: 17x slower under bf16 autocast, the same numbers)
        kv = h.transpose(0, 1).contiguous().transpose(0, 1)  # (N, 1+L, D), stored as (1+L, N, D)
        x = x[:, :1] + self.dropout1(self.self_attn(cls, kv, kv, need_weights=False)[0])  # (N, 1, D)
        x = x + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(self.norm2(x))))))
        return x[:, 0]  # (N, D)

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class PositionalCLSTokenAggregator(CLSTokenAggregator):
    """A `CLSTokenAggregator` with its own position embedding, for pooling segments: unlike patches, the
    segment features carry no position of their own (every segment got the same one)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, max_len: int, dropout: float = 0.0):
        super().__init__(d_model, nhead, dim_feedforward, dropout)
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + max_len, d_model))  # +1 for the CLS token
        self.pos_drop = nn.Dropout(dropout)
        trunc_normal_(self.pos_emb, std=0.02)

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        x = super().prepend_cls(x)  # (N, 1+L, D)
        if x.shape[1] > self.pos_emb.shape[1]:
            raise ValueError(
                f"Got {x.shape[1] - 1} segments but the aggregator has position embeddings for at most "
                f"{self.pos_emb.shape[1] - 1}: raise `max_segments` in the config."
            )
        return self.pos_drop(x + self.pos_emb[:, : x.shape[1]])


class AveragePooling(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def build_aggregator(
    name: str, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0, max_len: int | None = None,
    allow_identity: bool = True,
) -> nn.Module:  # fmt: skip
    """The aggregator a config names; `max_len` adds position embeddings to the encoder-layer aggregator."""
    if name == "TransformerEncoderLayer":
        if max_len is None:
            return CLSTokenAggregator(d_model, nhead, dim_feedforward, dropout)
        return PositionalCLSTokenAggregator(d_model, nhead, dim_feedforward, max_len, dropout)
    if name == "AveragePooling":
        return AveragePooling()
    if "Identity" in name and allow_identity:
        return nn.Identity()
    options = "'TransformerEncoderLayer', 'AveragePooling'" + (", 'torch.nn.Identity'" if allow_identity else "")
    raise ConfigError(f"Unknown aggregation module {name!r} here: use one of {options}.")


def init_linear_and_norm(m: nn.Module) -> None:
    """Transformer initialisation used throughout: truncated-normal linear weights, zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
