"""MotionFormer: the video feature extractor of Synchformer.

A ViT-B/16 over 2x16x16 tubelets of a 16x224x224 segment (Patrick et al., "Keeping Your Eye on the Ball:
Trajectory Attention in Video Transformers", NeurIPS 2021), pre-trained on Something-Something v2. Its
8x14x14 output tokens are pooled over space within each frame, then optionally over time and segments.
Three attention types, as published with Motionformer: 'divided' (time then space attention in every
block; Synchformer's checkpoints), 'joint' (full space-time attention) and 'trajectory' (Motionformer's).
State-dict names are those of the original checkpoints."""

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.layers import DropPath, trunc_normal_
from torch import nn

from model.modules.aggregators import build_aggregator, init_linear_and_norm
from model.modules.cpu_bf16 import ChunkedLinear, ChunkedMlp, scaled_dot_product_attention
from model.modules.feat_extractors.base import SegmentFeatureExtractor, run_blocks, submodule_state_dict
from utils.checkpoint import load_checkpoint
from utils.download import download
from utils.utils import ConfigError

# The published Motionformer SSv2 checkpoints and the attention type each was trained with.
ATTN_TYPE_OF_CKPT = {
    "ssv2_divided_224_16x4.pyth": "divided",
    "ssv2_joint_224_16x4.pyth": "joint",
    "ssv2_motionformer_224_16x4.pyth": "trajectory",
}
MOTIONFORMER_URL = "https://dl.fbaipublicfiles.com/motionformer"


class Attention(nn.Module):
    """Multi-head attention of all tokens to all tokens ('joint' space-time attention); its subclasses
    restrict which tokens each patch token attends to. Tokens are `[CLS, (frame, patch)...]`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = ChunkedLinear(dim, 3 * dim)
        self.proj = ChunkedLinear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(1, 2).flatten(2))  # (B, N, D) <- (B, h, N, d)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # (B, h, N, d)
        return self.merge_heads(scaled_dot_product_attention(q, k, v))


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention within each of G groups: (B, h, G, L, d) queries, (B, h, G, L', d) keys and values. Fused
    attention kernels take 4-D inputs only, hence the flattening."""
    out = scaled_dot_product_attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2))  # (B, h*G, L, d)
    return out.unflatten(1, q.shape[1:3])  # (B, h, G, L, d)


class DividedAttention(Attention):
    """Patch tokens attend to the CLS token and the patches of their own frame (`axis='space'`) or of their
    own location in the other frames (`axis='time'`); the CLS token attends to all tokens.

    The G groups of L patches become the batch of one attention call. Two copies move the data: one into
    that grouped layout (with each group's keys and values led by the CLS ones), one of the output back
    into token order with the heads merged."""

    def __init__(self, dim: int, num_heads: int, axis: str):
        super().__init__(dim, num_heads)
        # (F, P) patch grid -> (G, L) groups: F frames of P patches, or P locations over F frames
        self.group_dims = {"space": (1, 2), "time": (2, 1)}[axis]

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        h, d = self.num_heads, D // self.num_heads
        qkv = self.qkv(x).view(B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        cls_out = scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, h, 1, d)

        patches = qkv[:, 1:].unflatten(1, grid).permute(3, 0, *self.group_dims, 4, 5)  # (3, B, G, L, h, d)
        G, L = patches.shape[2:4]
        grouped = qkv.new_empty(3, B, G, h, 1 + L, d)  # slot 0: the CLS key and value (unused for queries)
        grouped[:, :, :, :, 1:] = patches.transpose(3, 4)
        grouped[1:, :, :, :, 0] = qkv[:, None, 0, 1:].movedim(2, 0)  # (2, B, 1, h, d), the same for all groups
        q_, k_, v_ = grouped.flatten(1, 2).unbind(0)  # (B*G, h, 1+L, d)
        out = scaled_dot_product_attention(q_[:, :, 1:], k_, v_)  # (B*G, h, L, d)

        merged = qkv.new_empty(B, N, h, d)  # back in token order
        merged[:, 0] = cls_out[:, :, 0]
        patch_out = merged[:, 1:].unflatten(1, grid).permute(0, *self.group_dims, 3, 4)  # (B, G, L, h, d) view
        patch_out.copy_(out.view(B, G, h, L, d).transpose(2, 3))
        return self.proj(merged.flatten(2))


class TrajectoryAttention(Attention):
    """Motionformer's trajectory attention. Each query attends to the patches of every frame separately,
    which gives it one 'trajectory point' per frame; then the trajectory point in the query's own frame
    attends over the query's F trajectory points. As in the published model (Motionformer's
    `use_original_code=True`), the values of that second step are the trajectory points themselves, so the
    value half of `proj_kv` is unused (it stays for checkpoint compatibility)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.proj_q = nn.Linear(dim, dim)
        self.proj_kv = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        Fr, P = grid
        h, d = self.num_heads, D // self.num_heads
        q, k, v = self.split_heads(x)  # (B, h, 1+Fr*P, d)
        cls_out = scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, h, 1, d)

        # every query attends within each frame: (B, h, Fr, Fr*P, d)
        queries = q[:, :, None, 1:].expand(-1, -1, Fr, -1, -1)
        traj = attend_grouped(queries, k[:, :, 1:].unflatten(2, (Fr, P)), v[:, :, 1:].unflatten(2, (Fr, P)))
        traj = traj.permute(0, 3, 2, 1, 4).reshape(B, Fr * P, Fr, D)  # (B, Fr*P, Fr, D): query, frame, feature

        # the query's trajectory point in its own frame: (B, Fr*P, D)
        own = traj.view(B, Fr, P, Fr, D).diagonal(dim1=1, dim2=3)  # (B, P, D, Fr)
        own = own.permute(0, 3, 1, 2).reshape(B, Fr * P, D)
        q2 = self.proj_q(own).view(B, Fr * P, 1, h, d).permute(0, 3, 1, 2, 4)  # (B, h, Fr*P, 1, d)
        k2 = F.linear(traj, self.proj_kv.weight[:D], self.proj_kv.bias[:D])  # only the key half: (B, Fr*P, Fr, D)
        k2 = k2.view(B, Fr * P, Fr, h, d).permute(0, 3, 1, 2, 4)  # (B, h, Fr*P, Fr, d)
        v2 = traj.view(B, Fr * P, Fr, h, d).permute(0, 3, 1, 2, 4)  # (B, h, Fr*P, Fr, d)
        out = attend_grouped(q2, k2, v2).squeeze(3)  # (B, h, Fr*P, d)
        return self.merge_heads(torch.cat([cls_out, out], dim=2))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn: nn.Module, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ChunkedMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DividedSpaceTimeBlock(Block):
    """A `Block` with space attention, preceded by a time-attention residual (without stochastic depth,
    as in Motionformer)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__(dim, num_heads, mlp_ratio, DividedAttention(dim, num_heads, "space"), drop_path)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.timeattn = DividedAttention(dim, num_heads, "time")

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), grid)
        return super().forward(x, grid)


class PatchEmbed(nn.Module):
    """Non-overlapping patches (2D) or tubelets (3D) to tokens: (N, C, *size) -> (N, num_patches, D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_shape: tuple[int, ...]):
        super().__init__()
        conv = nn.Conv3d if len(patch_shape) == 3 else nn.Conv2d
        self.proj = conv(in_chans, embed_dim, kernel_size=patch_shape, stride=patch_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MotionFormer(SegmentFeatureExtractor):
    """Video segments (B, S, C, T, H, W) -> features (B, S, t, D) with `agg_time_module` Identity, else
    (B, S, D); `forward` returns them with the clip feature (B, D) if `add_global_repr`, else None.

    The attention type comes from the Motionformer checkpoint's name (or, for a stage-1 '.pt' checkpoint,
    from the name its config started from); 'divided' without a checkpoint. `attn_type` may name it when
    no checkpoint decides. The size arguments default to the published model (t = num_frames / tubelet_size).
    `grad_checkpointing`, `for_loop`: see `SegmentFeatureExtractor`."""

    def __init__(
        self, extract_features: bool = True, ckpt_path: str | None = None, factorize_space_time: bool = True,
        agg_space_module: str = "TransformerEncoderLayer", agg_time_module: str = "torch.nn.Identity",
        add_global_repr: bool = False, agg_segments_module: str | None = None, max_segments: int | None = None,
        *,
        attn_type: str | None = None, img_size: int = 224, num_frames: int = 16, patch_size: int = 16,
        tubelet_size: int = 2, in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
        mlp_ratio: float = 4.0, drop_path_rate: float = 0.2, zero_init_tubelet: bool = True,
        grad_checkpointing: bool = False, for_loop: bool = False,
    ):  # fmt: skip
        super().__init__(grad_checkpointing, for_loop)
        if not (extract_features and factorize_space_time):
            raise ConfigError("MotionFormer supports only extract_features=True, factorize_space_time=True.")
        if ckpt_path is not None and Path(ckpt_path).name in ATTN_TYPE_OF_CKPT:
            download(f"{MOTIONFORMER_URL}/{Path(ckpt_path).name}", ckpt_path)  # no-op if it is there
        ckpt = None if ckpt_path is None else load_checkpoint(ckpt_path)
        self.attn_type = _attn_type_of(ckpt_path, ckpt, attn_type)
        self.segment_shape = (in_chans, num_frames, img_size, img_size)
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)  # (t, h, w)
        t, h, w = self.grid
        self.embed_dim = embed_dim

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + h * w, embed_dim))
        if self.attn_type == "joint":
            self.st_embed = nn.Parameter(torch.zeros(1, 1 + t * h * w, embed_dim))
            trunc_normal_(self.st_embed, std=0.02)
            self.pos_embed.requires_grad_(False)  # unused with joint embeddings, kept for the checkpoints
        else:
            self.temp_embed = nn.Parameter(torch.zeros(1, t, embed_dim))
        # unused: Motionformer kept its image patch embedding in the checkpoints; frozen like there
        self.patch_embed = PatchEmbed(in_chans, embed_dim, (patch_size, patch_size)).requires_grad_(False)
        self.patch_embed_3d = PatchEmbed(in_chans, embed_dim, (tubelet_size, patch_size, patch_size))

        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also when built on "meta"
        attention = {"joint": Attention, "trajectory": TrajectoryAttention}.get(self.attn_type)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, attention(embed_dim, num_heads), p)
            if attention
            else DividedSpaceTimeBlock(embed_dim, num_heads, mlp_ratio, p)
            for p in drop_path
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_linear_and_norm)
        # Motionformer zero-initialises the tubelet projection (it is inflated from the image one when
        # pre-training starts from ImageNet weights); from scratch that makes all features equal, so
        # `zero_init_tubelet=False` keeps the random init
        if zero_init_tubelet:
            nn.init.zeros_(self.patch_embed_3d.proj.weight)

        layer_kwargs = dict(d_model=embed_dim, nhead=num_heads, dim_feedforward=int(mlp_ratio * embed_dim))
        self.spatial_attn_agg = build_aggregator(agg_space_module, allow_identity=False, **layer_kwargs)
        self.build_time_and_segment_aggregators(
            agg_time_module, add_global_repr, agg_segments_module, max_segments, **layer_kwargs
        )
        if ckpt is not None:
            self.load_weights(
                motionformer_state_dict(ckpt, ckpt_path, self.grid),
                str(ckpt_path),
                fresh_prefixes=("spatial_attn_agg.", "temp_attn_agg.", "global_attn_agg."),
            )

    def forward_segments(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) segments -> (N, t, D) or (N, D) features."""
        N = x.shape[0]
        t, h, w = self.grid
        if self.attn_type == "joint":
            pos = self.st_embed  # (1, 1+t*h*w, D)
        else:  # 'separate' embeddings: image position (1, 1, h*w, D) + frame index (1, t, 1, D)
            space_time = (self.pos_embed[:, None, 1:] + self.temp_embed[:, :, None]).flatten(1, 2)  # (1, t*h*w, D)
            pos = torch.cat([self.pos_embed[:, :1], space_time], dim=1)
        x = self.patch_embed_3d(x)  # (N, t*h*w, D), tokens ordered (t, h, w)
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1) + pos  # (N, 1+t*h*w, D)
        x = run_blocks(self.blocks, x, (t, h * w), checkpointed=self.grad_checkpointing)
        x = self.norm(x[:, 1:])  # the CLS token is not a feature: (N, t*h*w, D)
        x = self.spatial_attn_agg(x.view(N * t, h * w, self.embed_dim)).view(N, t, self.embed_dim)  # (N, t, D)
        return self.temp_attn_agg(x)  # (N, t, D) or (N, D)


def _attn_type_of(ckpt_path: str | None, ckpt: dict | None, attn_type: str | None) -> str:
    """The attention type the checkpoint was trained with, or `attn_type` (default 'divided') without one."""
    if ckpt_path is None:
        found = attn_type or "divided"
    elif Path(ckpt_path).name in ATTN_TYPE_OF_CKPT:
        found = ATTN_TYPE_OF_CKPT[Path(ckpt_path).name]
    elif str(ckpt_path).endswith(".pt"):
        # a stage-1 checkpoint: its extractor started from a Motionformer checkpoint or from scratch (divided)
        start = OmegaConf.select(
            ckpt.get("args") or OmegaConf.create(), "model.params.vfeat_extractor.params.ckpt_path"
        )
        found = ATTN_TYPE_OF_CKPT[Path(start).name] if start else "divided"
    else:
        raise ConfigError(
            f"MotionFormer ckpt_path {ckpt_path} is neither a Motionformer checkpoint "
            f"({', '.join(ATTN_TYPE_OF_CKPT)}) nor a stage-1 '.pt' checkpoint."
        )
    if found not in ATTN_TYPE_OF_CKPT.values() or (attn_type is not None and attn_type != found):
        raise ConfigError(f"attn_type={attn_type!r} is not possible here: {ckpt_path} needs {found!r}.")
    return found


def motionformer_state_dict(ckpt: dict, ckpt_path: str, grid: tuple[int, int, int]) -> dict:
    """The MotionFormer state dict in a loaded checkpoint: a Motionformer '.pyth' (its SSv2 classification
    head dropped) or the 'v_encoder' of a stage-1 '.pt'. Position embeddings of another grid are resized."""
    if str(ckpt_path).endswith(".pt"):
        state_dict = submodule_state_dict(ckpt["model"], "v_encoder")
    else:
        state_dict = {k: v for k, v in ckpt["model"].items() if not k.startswith(("head.", "pre_logits."))}
    t, h, w = grid
    if "pos_embed" in state_dict and state_dict["pos_embed"].shape[1] != 1 + h * w:
        pos = state_dict["pos_embed"]  # (1, 1+h'*w', D)
        side = int((pos.shape[1] - 1) ** 0.5)
        image = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, h', w')
        image = F.interpolate(image, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
        state_dict["pos_embed"] = torch.cat([pos[:, :1], image.flatten(2).transpose(1, 2)], dim=1)
    if "temp_embed" in state_dict and state_dict["temp_embed"].shape[1] != t:
        time = state_dict["temp_embed"].transpose(1, 2)  # (1, D, t')
        state_dict["temp_embed"] = F.interpolate(time, size=t, mode="linear", align_corners=False).transpose(1, 2)
    return state_dict
