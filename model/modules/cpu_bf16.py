"""Attention and MLP layers that run bfloat16 autocast on the CPU at close to GEMM speed.

In float32 and on GPUs these are PyTorch's fused attention kernel and timm's `Mlp`, unchanged (parity
with the original holds). Under bf16 on the CPU, profiles of the full model on a Zen 4 found two
costs besides the GEMMs (README, "bf16 and int8 on the CPU"):
- the fused attention kernel runs the short sequences of this model (9 keys in time attention, 197 in
  space attention, one query in the CLS rows) 1.8-6x slower than two batched matmuls do;
- the MLP's (tokens, 3072) hidden activations go out to memory three times (bias, GELU, second GEMM).
Both are computed in chunks that stay in the caches, with the same numbers per chunk.
"""

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

SCORES_PER_CHUNK = 2**20  # 2 MiB of bf16 attention scores: the fastest chunk on a Zen 4 (1 MiB L2 per core)
TOKENS_PER_CHUNK = 2048  # a 12 MiB bf16 hidden activation of a 3072-wide MLP: it stays in the L3 cache


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (..., L, d) queries and (..., L', d) keys and values."""
    # the scale is a power of two for d = 64, so scaling q first rounds nothing
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (..., L, L')
    # the CPU softmax of bf16 accumulates in float32: as accurate as a float32 softmax rounded to bf16
    return scores.softmax(-1) @ v  # (..., L, d)


def scaled_dot_product_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, dropout_p=...)` without a mask, on (N, ..., L, d) inputs."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or dropout_p > 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scores_per_item = q[0].numel() // q.shape[-1] * k.shape[-2]
    chunk = max(1, SCORES_PER_CHUNK // scores_per_item)
    return torch.cat([matmul_attention(*qkv) for qkv in zip(q.split(chunk), k.split(chunk), v.split(chunk))])


def over_token_chunks(forward, x: torch.Tensor) -> torch.Tensor:
    """`forward(x)` for a token-wise layer, on chunks of `TOKENS_PER_CHUNK` tokens under CPU autocast
    (1.1x faster for a Linear layer there, 1.2x for an MLP; in float32 chunks are slower, so it runs whole)."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return forward(x)
    tokens = x.flatten(0, -2)  # (B*N, D)
    return torch.cat([forward(part) for part in tokens.split(TOKENS_PER_CHUNK)]).view(*x.shape[:-1], -1)


class ChunkedLinear(nn.Linear):
    """`nn.Linear` (the same parameters) over chunks of tokens (`over_token_chunks`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return over_token_chunks(super().forward, x)


class ChunkedMlp(Mlp):
    """timm's `Mlp` (the same parameters) over chunks of tokens (`over_token_chunks`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return over_token_chunks(super().forward, x)
