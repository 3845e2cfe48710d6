"""AST: the audio feature extractor of Synchformer.

The Audio Spectrogram Transformer (Gong et al., Interspeech 2021) fine-tuned on AudioSet
(`MIT/ast-finetuned-audioset-10-10-0.4593`): a ViT-B over 16x16 patches of a log-mel spectrogram taken
with stride 10 in frequency and time. Its 12 (frequency) x 6 (time) output tokens of a 0.64 s segment
are pooled over frequency within each time step, then optionally over time and segments.

The encoder is our own, not transformers' `ASTModel`: the published checkpoints use the parameter names of
transformers 4.27 (`ast.encoder.layer.N.attention.attention.query`, ...), which transformers 5 renamed
(`layers.N.attention.q_proj`, ...) and may rename again. Keeping those names in a small module of our own
keeps the checkpoints loadable without renaming hooks, and the forward pass under our control (fused
attention). transformers is imported only to read pre-trained weights, which `ast_state_dict_from_hf`
renames to ours: building the model does not import it (nor torchao, which it imports when installed)."""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.modules.aggregators import build_aggregator, init_linear_and_norm
from model.modules.cpu_bf16 import scaled_dot_product_attention
from model.modules.feat_extractors.base import SegmentFeatureExtractor, run_blocks, submodule_state_dict
from utils.checkpoint import load_checkpoint
from utils.utils import ConfigError


@dataclass(frozen=True)
class ASTConfig:
    """The sizes of the published AST: the defaults of transformers' `ASTConfig`."""

    num_mel_bins: int = 128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02


class ASTSelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value projections, as in the checkpoints."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            proj(x).unflatten(2, (self.num_heads, -1)).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        return scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (N, L, D) <- (N, h, L, d)


class ASTLayer(nn.Module):
    """Pre-norm transformer layer; the nested names (`attention.output.dense`, ...) are the checkpoints'."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, layer_norm_eps: float):
        super().__init__()
        self.attention = nn.ModuleDict(
            dict(
                attention=ASTSelfAttention(hidden_size, num_heads),
                output=nn.ModuleDict(dict(dense=nn.Linear(hidden_size, hidden_size))),
            )
        )
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(hidden_size, intermediate_size)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(intermediate_size, hidden_size)))
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ASTEmbeddings(nn.Module):
    """Spectrogram (N, T, F) -> tokens [CLS, DIST, f*t patches] (N, 2+f*t, D), patches frequency-major."""

    def __init__(self, config: ASTConfig, num_patches: int):
        super().__init__()
        D = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, D))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 2 + num_patches, D))
        stride = (config.frequency_stride, config.time_stride)
        self.patch_embeddings = nn.ModuleDict(dict(projection=nn.Conv2d(1, D, config.patch_size, stride=stride)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        x = self.patch_embeddings.projection(x.unsqueeze(1).transpose(2, 3))  # (N, D, f, t) <- (N, 1, F, T)
        x = x.flatten(2).transpose(1, 2)  # (N, f*t, D)
        special = (self.cls_token.expand(N, -1, -1), self.distillation_token.expand(N, -1, -1))
        return torch.cat([*special, x], dim=1) + self.position_embeddings  # (N, 2+f*t, D)


class ASTEncoder(nn.Module):
    """The AST transformer: spectrogram (N, T, F) -> normalised tokens (N, 2+f*t, D)."""

    def __init__(self, config: ASTConfig, num_patches: int):
        super().__init__()
        self.embeddings = ASTEmbeddings(config, num_patches)
        layer_args = (config.hidden_size, config.num_attention_heads, config.intermediate_size, config.layer_norm_eps)
        layers = nn.ModuleList(ASTLayer(*layer_args) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict(dict(layer=layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        return self.layernorm(run_blocks(self.encoder.layer, self.embeddings(x), checkpointed=checkpointed))


class AST(SegmentFeatureExtractor):
    """Spectrogram segments (B, S, T, F) (T = `max_spec_t` frames, F mel bins) -> features (B, S, t, D)
    with `agg_time_module` Identity, else (B, S, D), and the clip feature (B, D) if `add_global_repr`.

    `ckpt_path`: None (random init), a stage-1 '.pt' checkpoint (its 'a_encoder'), or a Hugging Face model
    id or local folder of AST weights (e.g. 'MIT/ast-finetuned-audioset-10-10-0.4593'), whose position
    embeddings, made for 1024 frames, are cut to `max_spec_t` frames. The size arguments default to
    `ASTConfig`'s (the published model). `grad_checkpointing`, `for_loop`: see `SegmentFeatureExtractor`."""

    def __init__(
        self, extract_features: bool = True, ckpt_path: str | None = None, max_spec_t: int = 66,
        factorize_freq_time: bool = True, agg_freq_module: str = "TransformerEncoderLayer",
        agg_time_module: str = "torch.nn.Identity", add_global_repr: bool = False,
        agg_segments_module: str | None = None, max_segments: int | None = None,
        *,
        num_mel_bins: int = ASTConfig.num_mel_bins, hidden_size: int = ASTConfig.hidden_size,
        num_hidden_layers: int = ASTConfig.num_hidden_layers, num_attention_heads: int = ASTConfig.num_attention_heads,
        intermediate_size: int = ASTConfig.intermediate_size, grad_checkpointing: bool = False, for_loop: bool = False,
    ):  # fmt: skip
        super().__init__(grad_checkpointing, for_loop)
        if not (extract_features and factorize_freq_time):
            raise ConfigError("AST supports only extract_features=True, factorize_freq_time=True.")
        config = ASTConfig(
            num_mel_bins=num_mel_bins,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
        )
        self.segment_shape = (max_spec_t, num_mel_bins)
        self.grid = (  # (f, t) patches
            (num_mel_bins - config.patch_size) // config.frequency_stride + 1,
            (max_spec_t - config.patch_size) // config.time_stride + 1,
        )
        self.hidden_size = hidden_size
        self.ast = ASTEncoder(config, num_patches=self.grid[0] * self.grid[1])
        # as transformers 4.27 initialised AST: the CLS, DIST and position embeddings stay zero
        self.ast.apply(init_linear_and_norm)
        nn.init.trunc_normal_(self.ast.embeddings.patch_embeddings.projection.weight, std=config.initializer_range)
        nn.init.zeros_(self.ast.embeddings.patch_embeddings.projection.bias)

        layer_kwargs = dict(d_model=hidden_size, nhead=num_attention_heads, dim_feedforward=intermediate_size)
        self.freq_attn_agg = build_aggregator(agg_freq_module, allow_identity=False, **layer_kwargs)
        self.build_time_and_segment_aggregators(
            agg_time_module, add_global_repr, agg_segments_module, max_segments, **layer_kwargs
        )
        if ckpt_path is None:
            return
        if str(ckpt_path).endswith(".pt"):
            self.load_weights(submodule_state_dict(load_checkpoint(ckpt_path)["model"], "a_encoder"), str(ckpt_path))
        else:
            self.load_weights(
                ast_state_dict_from_hf(ckpt_path, num_patches=self.grid[0] * self.grid[1]),
                str(ckpt_path),
                fresh_prefixes=("freq_attn_agg.", "temp_attn_agg.", "global_attn_agg."),
            )

    def forward_segments(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, F) spectrograms -> (N, t, D) or (N, D) features."""
        N = x.shape[0]
        f, t = self.grid
        x = self.ast(x, self.grad_checkpointing)[:, 2:]  # without CLS and DIST: (N, f*t, D)
        x = x.view(N, f, t, self.hidden_size).transpose(1, 2).reshape(N * t, f, self.hidden_size)  # (N*t, f, D)
        x = self.freq_attn_agg(x).view(N, t, self.hidden_size)  # (N, t, D)
        return self.temp_attn_agg(x)  # (N, t, D) or (N, D)


# transformers 5 names -> the checkpoints' (transformers 4.27) names; older names pass unchanged
_HF_RENAMES = [
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
]


def ast_state_dict_from_hf(name_or_path: str, num_patches: int) -> dict:
    """Reads AST weights from a Hugging Face model id or folder (`save_pretrained` layout) and returns
    them as our `AST` state dict (under 'ast.'), position embeddings cut to `num_patches` (+ CLS, DIST)."""
    from transformers import ASTModel

    try:
        hf_model = ASTModel.from_pretrained(name_or_path)
    except OSError as e:
        raise FileNotFoundError(
            f"Could not load AST weights '{name_or_path}' ({e}). Give a Hugging Face model id (needs internet "
            "or the HF cache) or a folder written by `save_pretrained`."
        ) from e
    state_dict = {}
    for key, value in hf_model.state_dict().items():
        key = key.removeprefix("audio_spectrogram_transformer.")
        for pattern, replacement in _HF_RENAMES:
            key, renamed = re.subn(pattern, replacement, key)
            if renamed:
                break
        state_dict[f"ast.{key}"] = value
    pos = "ast.embeddings.position_embeddings"
    state_dict[pos] = state_dict[pos][:, : 2 + num_patches].clone()
    return state_dict
