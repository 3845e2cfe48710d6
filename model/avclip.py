"""AVCLIP (stage 1): contrastive pre-training of the visual and audio feature extractors on segments.

Both extractors turn each segment into one feature (their temporal aggregation is on); matching
segments of the two streams are pulled together, all others in the batch pushed apart."""

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.avclip_loss import contrastive_loss
from utils.logger import segment_similarities
from utils.utils import ConfigError, instantiate_from_config


class AVCLIP(nn.Module):
    """Visual encoder `v_encoder`, audio encoder `a_encoder`, projections and a learnable temperature.

    `logit_scale` is a temperature (similarities are divided by it), initialised to `init_scale` and
    clamped to [clamp_scale_min, clamp_scale_max] at every forward. When the extractors also return a
    whole-clip feature (`add_global_repr: True`), a global contrastive loss with its own temperature
    `global_logit_scale` is added. `gather_for_loss` takes negatives from all ranks."""

    def __init__(
        self, n_embd: int, afeat_extractor: Mapping, vfeat_extractor: Mapping, aproj: Mapping, vproj: Mapping,
        init_scale: float = 0.07, clamp_scale_min: float = 0.001, clamp_scale_max: float = 0.5,
        gather_for_loss: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.n_embd = n_embd
        self.v_encoder = instantiate_from_config(vfeat_extractor)
        self.a_encoder = instantiate_from_config(afeat_extractor)
        self.vproj = instantiate_from_config(vproj)
        self.aproj = instantiate_from_config(aproj)
        self.clamp_scale_min, self.clamp_scale_max = clamp_scale_min, clamp_scale_max
        self.gather_for_loss = gather_for_loss
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        add_global = [cfg.get("params", {}).get("add_global_repr", False) for cfg in (vfeat_extractor, afeat_extractor)]
        if add_global[0] != add_global[1]:
            raise ConfigError(
                f"add_global_repr must be the same for both extractors, got (visual, audio) = {add_global}"
            )
        self.global_logit_scale = nn.Parameter(torch.tensor(float(init_scale))) if add_global[0] else None

    def encode(self, vis: torch.Tensor, aud: torch.Tensor, for_loop: bool = False):
        """vis (B, S, C, Tv, H, W), aud (B, S, Ta, F) -> ((v_segment, v_global), (a_segment, a_global)).

        Segment features are (B*S, D), global ones (B, D) or None; all L2-normalised."""
        streams = []
        for x, encoder, proj in ((vis, self.v_encoder, self.vproj), (aud, self.a_encoder, self.aproj)):
            segment, whole = encoder(x, for_loop=for_loop)  # (B, S, D), (B, D) or None
            segment = F.normalize(proj(segment.flatten(0, 1)), dim=-1)  # (B*S, D), rows b-major
            streams.append((segment, F.normalize(proj(whole), dim=-1) if whole is not None else None))
        return tuple(streams)

    def forward(self, vis: torch.Tensor, aud: torch.Tensor, for_loop: bool = False) -> dict:
        """vis (B, S, C, Tv, H, W), aud (B, S, Ta, F) -> dict with

        'rgb_features', 'audio_features': (segment (B*S, D), global (B, D) or None), L2-normalised;
        'logit_scales': (segment temperature, global temperature or None), after clamping;
        'losses': {'segment_contrastive_loss'[, 'global_contrastive_loss']}."""
        logit_scales = (self.logit_scale, self.global_logit_scale)
        with torch.no_grad():
            for scale in logit_scales:
                if scale is not None:
                    scale.clamp_(self.clamp_scale_min, self.clamp_scale_max)
        (v_seg, v_glob), (a_seg, a_glob) = self.encode(vis, aud, for_loop)
        losses = {"segment_contrastive_loss": contrastive_loss(v_seg, a_seg, self.logit_scale, self.gather_for_loss)[0]}
        if v_glob is not None:
            losses["global_contrastive_loss"] = contrastive_loss(
                v_glob, a_glob, self.global_logit_scale, self.gather_for_loss
            )[0]
        return {
            "rgb_features": (v_seg, v_glob),
            "audio_features": (a_seg, a_glob),
            "logit_scales": logit_scales,
            "losses": losses,
        }

    @torch.no_grad()
    def forward_for_logging(self, vis: torch.Tensor, aud: torch.Tensor, for_loop: bool = False) -> dict:
        """Evaluation on this rank's batch: segment features, their similarity matrices (B*S, B*S) and the loss."""
        (v, _), (a, _) = self.encode(vis, aud, for_loop)
        loss, _ = contrastive_loss(v, a, self.logit_scale)
        sims = {f"segment_sim_{k}": s for k, s in segment_similarities(v, a, self.logit_scale).items()}
        return {"segment_vfeat": v, "segment_afeat": a, **sims, "segment_contrastive_loss": loss}
