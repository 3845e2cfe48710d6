"""Synchformer (stage 2): frozen segment-level feature extractors + a transformer that predicts the A/V offset.

Each segment of the video (16 frames) and of the audio (a 0.64 s spectrogram) is turned into a few
features by its extractor: 8 visual features (one per temporal patch) and 6 audio ones. All segments'
features are flattened into one sequence `[OFF, v_1 ... v_S*8, MOD, a_1 ... a_S*6]`; the output at the
OFF token is classified into one of the offset classes (or sync / not sync for the synchronizability head)."""

import os
from collections.abc import Mapping

import safetensors.torch
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from omegaconf import DictConfig, OmegaConf
from torch import nn

from model.modules.transformer import Block, NoPosEncoding
from utils.checkpoint import CheckpointError, config_of, load_checkpoint, load_weights_into
from utils.config import check_targets, read_yaml, resolved, targets_of
from utils.download import hub_weights
from utils.utils import atomic_path, instantiate_from_config, write_json


def init_weights(module: nn.Module) -> None:
    """minGPT's initialisation: N(0, 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class StandardizeOverClip(nn.Module):
    """(B, S, t, D) -> each channel minus its mean over the clip's S*t tokens, over their std."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        mean, std = feat.mean(dim=(1, 2), keepdim=True), feat.std(dim=(1, 2), keepdim=True)  # (B, 1, 1, D)
        return (feat - mean) / (std + self.eps)


class GlobalTransformer(nn.Module):
    """Joint transformer over the visual and audio features of all segments, read out at the OFF token.
    `pos_emb_cfg` and `off_head_cfg` are `{target, params}` configs; when absent, no position encoding is
    added and `forward` returns the OFF token's features (B, n_embd) instead of logits."""

    def __init__(
        self, n_layer: int, n_head: int, n_embd: int, tok_pdrop: float = 0.0, embd_pdrop: float = 0.0,
        resid_pdrop: float = 0.0, attn_pdrop: float = 0.0, pos_emb_cfg: Mapping | None = None,
        off_head_cfg: Mapping | None = None,
    ):  # fmt: skip
        super().__init__()
        # learned tokens: OFF is read out for the prediction, MOD separates the visual and audio parts
        self.OFF_tok = nn.Parameter(torch.randn(1, 1, n_embd))
        self.MOD_tok = nn.Parameter(torch.randn(1, 1, n_embd))
        # the two extractors' features live on different scales
        self.vis_in_lnorm = nn.LayerNorm(n_embd)
        self.aud_in_lnorm = nn.LayerNorm(n_embd)
        # Dropout1d on (B, N, D) zeroes whole tokens
        self.tok_drop_vis = nn.Dropout1d(tok_pdrop) if tok_pdrop > 0 else nn.Identity()
        self.tok_drop_aud = nn.Dropout1d(tok_pdrop) if tok_pdrop > 0 else nn.Identity()
        # the odd name `pos_emb_cfg` is the one in the published checkpoints
        self.pos_emb_cfg = instantiate_from_config(pos_emb_cfg) if pos_emb_cfg is not None else NoPosEncoding()
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, attn_pdrop, resid_pdrop) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.off_head = instantiate_from_config(off_head_cfg) if off_head_cfg is not None else nn.Identity()
        self.apply(init_weights)

    def forward_features(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """v: (B, Nv, D) visual tokens, a: (B, Na, D) audio tokens -> (B, 1+Nv+1+Na, D) after the final norm."""
        B, Nv, D = v.shape
        v = self.tok_drop_vis(self.vis_in_lnorm(v))
        a = self.tok_drop_aud(self.aud_in_lnorm(a))
        x = torch.cat((self.OFF_tok.expand(B, 1, D), v, self.MOD_tok.expand(B, 1, D), a), dim=1)  # (B, 1+Nv+1+Na, D)
        x = self.drop(self.pos_emb_cfg(x))
        return self.ln_f(self.blocks(x))

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """-> offset logits (B, num_offset_classes)."""
        return self.off_head(self.forward_features(v, a)[:, 0])


class GlobalTransformerWithSyncabilityHead(GlobalTransformer):
    """The same transformer with a 2-way head: is the clip synchronisable (1) or not (0)? It is fine-tuned
    from an offset model, so it accepts (and drops) the offset head's config."""

    def __init__(self, n_embd: int, off_head_cfg: Mapping | None = None, **kwargs):
        super().__init__(n_embd=n_embd, off_head_cfg=None, **kwargs)
        self.sync_head = nn.Linear(n_embd, 2)
        init_weights(self.sync_head)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """-> synchronizability logits (B, 2)."""
        return self.sync_head(super().forward(v, a))


class Synchformer(
    nn.Module, PyTorchModelHubMixin, library_name="synchformer", license="mit",
    paper_url="https://arxiv.org/abs/2401.16423", tags=["audio-visual", "synchronization"],
):  # fmt: skip
    """Feature extractors, projections and the global transformer, each built from a `{target, params}` config.

    An extractor config with `is_trainable: False` freezes that extractor: its parameters get
    `requires_grad=False` and it stays in eval mode when the model is put in training mode (its dropout
    stays off), as in the original training loop.

    `standardize_features` (off in the published models) standardises each feature channel over all
    tokens of a clip before the projections: the features of small, barely trained extractors share a
    large common part, and without it the events the head must find stand out less (the tiny configs)."""

    def __init__(
        self, afeat_extractor: Mapping, vfeat_extractor: Mapping, aproj: Mapping, vproj: Mapping,
        transformer: Mapping, standardize_features: bool = False,
    ):  # fmt: skip
        super().__init__()
        # no parameters: the state dict is the same either way
        self.feature_norm = StandardizeOverClip() if standardize_features else nn.Identity()
        self.vfeat_extractor = instantiate_from_config(vfeat_extractor)
        self.afeat_extractor = instantiate_from_config(afeat_extractor)
        self.vproj = instantiate_from_config(vproj)
        self.aproj = instantiate_from_config(aproj)
        self.transformer = instantiate_from_config(transformer)
        extractor_cfgs = {"vfeat_extractor": vfeat_extractor, "afeat_extractor": afeat_extractor}
        self.frozen_extractors = [name for name, cfg in extractor_cfgs.items() if not cfg.get("is_trainable", True)]
        for name in self.frozen_extractors:
            getattr(self, name).requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "Synchformer":
        super().train(mode)
        for name in self.frozen_extractors:
            getattr(self, name).eval()
        return self

    def extract_vfeats(self, vis: torch.Tensor, for_loop: bool = False) -> torch.Tensor:
        """vis (B, S, Tv, C, H, W) -> segment features (B, S, tv, D). The name and layout av-benchmark
        and MMAudio call."""
        if vis.ndim != 6:
            raise ValueError(f"extract_vfeats expects vis (B, S, Tv, C, H, W), got {tuple(vis.shape)}.")
        # the extractor also returns a global (whole-clip) feature, not used for synchronisation
        vfeat, _ = self.vfeat_extractor(vis.permute(0, 1, 3, 2, 4, 5), for_loop=for_loop)  # in: (B, S, C, Tv, H, W)
        return vfeat

    def extract_afeats(self, aud: torch.Tensor, for_loop: bool = False) -> torch.Tensor:
        """aud (B, S, 1, F, Ta) log-mel segments -> segment features (B, S, ta, D)."""
        if aud.ndim != 5 or aud.shape[2] != 1:
            raise ValueError(f"extract_afeats expects aud (B, S, 1, F, Ta), got {tuple(aud.shape)}.")
        afeat, _ = self.afeat_extractor(aud[:, :, 0].transpose(2, 3), for_loop=for_loop)  # in: (B, S, Ta, F)
        return afeat

    def extract_features(self, vis: torch.Tensor, aud: torch.Tensor, for_loop: bool = False):
        """vis (B, S, Tv, C, H, W), aud (B, S, 1, F, Ta) -> segment features (B, S, tv, D) and (B, S, ta, D);
        `for_loop=True` runs the extractors one segment at a time (less memory, slower)."""
        if vis.ndim != 6 or aud.ndim != 5 or aud.shape[2] != 1:
            raise ValueError(
                f"Synchformer expects vis (B, S, Tv, C, H, W) and aud (B, S, 1, F, Ta), got {tuple(vis.shape)} and "
                f"{tuple(aud.shape)}: check the PermuteStreams transform of the config."
            )
        return self.extract_vfeats(vis, for_loop), self.extract_afeats(aud, for_loop)

    def forward_head(self, vfeat: torch.Tensor, afeat: torch.Tensor) -> torch.Tensor:
        """vfeat (B, S, tv, Dv), afeat (B, S, ta, Da) -> logits (B, num_classes)."""
        vfeat, afeat = self.feature_norm(vfeat), self.feature_norm(afeat)
        vfeat, afeat = self.vproj(vfeat), self.aproj(afeat)  # (B, S, tv, D), (B, S, ta, D)
        B, S, tv, D = vfeat.shape
        ta = afeat.shape[2]
        # all segments form one sequence
        return self.transformer(vfeat.reshape(B, S * tv, D), afeat.reshape(B, S * ta, D))

    # av-benchmark's and MMAudio's name for the head
    compare_v_a = forward_head

    def _save_pretrained(self, save_directory) -> None:
        """`save_pretrained(folder)` (Hugging Face's): `model.safetensors` and `config.json`, the `model` and
        `data` sections of the config it was loaded with (`self.cfg`, set by `load_model`), which the commands read."""
        if getattr(self, "cfg", None) is None:
            raise ValueError("save_pretrained needs `model.cfg`, the config that built the model (load_model sets it).")
        sections = {k: OmegaConf.to_container(self.cfg[k], resolve=True) for k in ("model", "data") if k in self.cfg}
        write_json(save_directory / "config.json", sections)
        with atomic_path(save_directory / "model.safetensors") as tmp:
            safetensors.torch.save_model(self, str(tmp))

    @classmethod
    def from_pretrained(cls, repo_id_or_folder: str | os.PathLike, revision: str | None = None, map_location="cpu"):
        """A model of `save_pretrained` or `scripts/convert_to_hf.py`: a local folder or a Hugging Face Hub model
        id (downloaded into the Hub's cache), in eval mode with its config at `.cfg`. Its `config.json` is read
        as a checkpoint's own config is (`load_synchformer`: it may build only trusted classes), never passed to
        the constructor as the mixin would."""
        model, cfg = load_synchformer(hub_weights(repo_id_or_folder, revision), map_location=map_location)
        model.cfg = cfg
        return model

    def forward(
        self, vis: torch.Tensor, aud: torch.Tensor, targets: torch.Tensor | None = None, for_loop: bool = False
    ):
        """vis (B, S, Tv, C, H, W), aud (B, S, 1, F, Ta), targets (B,) class ids -> (loss or None, logits (B, K))."""
        logits = self.forward_head(*self.extract_features(vis, aud, for_loop))
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return loss, logits


def load_synchformer(
    ckpt_path: str | os.PathLike, cfg: DictConfig | str | os.PathLike | None = None, map_location="cpu",
    trusted_cfg: bool = True,
) -> tuple[Synchformer, DictConfig]:  # fmt: skip
    """Builds a stage-2 model and loads a checkpoint into it; returns (model in eval mode, config).

    `ckpt_path`: a published checkpoint `{'model': state_dict, 'args': config, ...}` or a bare state dict
    (DDP's `module.` prefixes are removed). `cfg`: the training config (DictConfig or YAML path); required
    for a bare state dict, otherwise it replaces the stored one. The stored config, and a `cfg` that is not
    `trusted_cfg` (a downloaded one), may build only trusted classes (`utils.config.check_targets`). The
    `ckpt_path`s inside the model's config are ignored: all weights are in the checkpoint."""
    ckpt = load_checkpoint(ckpt_path, map_location)
    source = str(ckpt_path)
    if cfg is None:
        cfg, trusted_cfg = config_of(ckpt), False
        if cfg is None:
            raise CheckpointError(
                f"{ckpt_path} is a bare state dict without the config it was trained with: pass that config "
                "(--cfg_path on the command line, `cfg=` of load_synchformer), e.g. configs/sync.yaml."
            )
    elif not isinstance(cfg, DictConfig):
        cfg, source = read_yaml(cfg), str(cfg)
    cfg = resolved(cfg, source)
    if OmegaConf.select(cfg, "model.params.transformer.target") is None:
        raise CheckpointError(
            f"The config of {ckpt_path} describes a {OmegaConf.select(cfg, 'model.target')}, not a stage-2 "
            "Synchformer (a stage-1 checkpoint holds only the feature extractors): pass a stage-2 checkpoint."
        )
    # early checkpoints name the transformer's module differently
    cfg.model.params.transformer.target = str(cfg.model.params.transformer.target).replace(
        ".modules.feature_selector.", ".sync_model."
    )
    if not trusted_cfg:
        check_targets(cfg, source)
    for _, part in targets_of(cfg.model):
        if isinstance(part.get("params"), DictConfig) and "ckpt_path" in part.params:
            part.params.ckpt_path = None
    model = instantiate_from_config(cfg.model)
    load_weights_into(model, ckpt["model"], ckpt_path)
    return model.eval(), cfg
