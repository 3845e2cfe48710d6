"""Stage-1 AVCLIP on tiny extractors: outputs, gradients, temperature clamping, the optional global loss."""

import pytest
import torch
from omegaconf import OmegaConf

from model.avclip import AVCLIP
from tests.reference_data import REPO
from tests.tiny import AUD_SEGMENT, TINY_EXTRACTORS, VIS_SEGMENT, D
from utils.utils import get_obj_from_str, instantiate_from_config


def tiny_avclip(add_global_repr: bool = False) -> AVCLIP:
    cfg = OmegaConf.load(REPO / "configs" / "segment_avclip.yaml")
    cfg.data.n_segments_train = 2
    p = cfg.model.params
    p.n_embd = D
    for name, sizes in TINY_EXTRACTORS.items():
        p[name].params.update(sizes, ckpt_path=None, add_global_repr=add_global_repr)
    torch.manual_seed(0)
    return instantiate_from_config(cfg.model)


def inputs(B: int = 2, S: int = 2):
    """Stage-1 layouts: video (B, S, C, Tv, H, W), audio (B, S, Ta, F)."""
    Tv, C, H, W = VIS_SEGMENT
    _, F, Ta = AUD_SEGMENT
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, S, C, Tv, H, W, generator=g), torch.randn(B, S, Ta, F, generator=g)


def test_config_path_resolves_to_avclip():
    assert get_obj_from_str("model.modules.feat_extractors.train_clip_src.open_clip.model.AVCLIP") is AVCLIP


def test_forward_outputs_and_gradients():
    model = tiny_avclip().train()
    out = model(*inputs())
    (v, v_glob), (a, a_glob) = out["rgb_features"], out["audio_features"]
    assert v.shape == a.shape == (4, D) and v_glob is None and a_glob is None
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    assert out["logit_scales"][0] is model.logit_scale and out["logit_scales"][1] is None
    loss = out["losses"]["segment_contrastive_loss"]
    assert set(out["losses"]) == {"segment_contrastive_loss"} and torch.isfinite(loss)
    loss.backward()
    assert model.logit_scale.grad is not None
    for encoder in (model.v_encoder, model.a_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_temperature_is_clamped_at_forward():
    model = tiny_avclip()
    assert model.logit_scale.item() == pytest.approx(0.07) and model.logit_scale.ndim == 0
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    model(*inputs())
    assert model.logit_scale.item() == pytest.approx(0.5)


def test_global_contrastive_loss():
    model = tiny_avclip(add_global_repr=True)
    out = model(*inputs())
    assert out["rgb_features"][1].shape == out["audio_features"][1].shape == (2, D)
    assert out["logit_scales"][1] is model.global_logit_scale
    assert set(out["losses"]) == {"segment_contrastive_loss", "global_contrastive_loss"}
    sum(out["losses"].values()).backward()
    assert model.global_logit_scale.grad is not None


def test_forward_for_logging_matches_forward():
    model = tiny_avclip().eval()
    vis, aud = inputs()
    out, logs = model(vis, aud), model.forward_for_logging(vis, aud)
    torch.testing.assert_close(logs["segment_vfeat"], out["rgb_features"][0])
    torch.testing.assert_close(logs["segment_contrastive_loss"], out["losses"]["segment_contrastive_loss"])
    for key in ("segment_sim_v2a", "segment_sim_a2v", "segment_sim_v2v", "segment_sim_a2a"):
        assert logs[key].shape == (4, 4)
    torch.testing.assert_close(logs["segment_sim_v2v"].diagonal(), torch.full((4,), 1 / model.logit_scale.item()))
