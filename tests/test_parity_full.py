"""Full-size models against the original: state-dict keys (dtype, shape) and float32 CPU outputs with the
deterministic `detfill` weights and inputs recorded in ../shared/reference/parity_*.json.

One forward each (tens of seconds): B=1 as in the stage-2 references; the stage-1 reference used B=2, so
its first clip is compared here, the batch-level similarities and loss in test_avclip_loss.py.
"""

import pytest
import torch
from omegaconf import OmegaConf

from tests.reference_data import REPO, keys_of, reference_arrays, reference_keys
from utils.detfill import det_input, det_state_dict
from utils.utils import instantiate_from_config

ATOL = 1e-4


def build_full(config: str, keys_name: str) -> torch.nn.Module:
    cfg = OmegaConf.load(REPO / "configs" / config)
    for extractor in ("afeat_extractor", "vfeat_extractor"):
        cfg.model.params[extractor].params.ckpt_path = None
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    assert keys_of(model.state_dict()) == reference_keys(keys_name)
    model.load_state_dict(det_state_dict(model.state_dict(), seed=0))
    return model.eval()


def capture(outputs: dict, module: torch.nn.Module, key: str, first: bool = False) -> None:
    """Stores the module's output (its first element for the extractors' (features, global) pairs)."""
    module.register_forward_hook(lambda m, i, out: outputs.__setitem__(key, out[0] if first else out))


def assert_close_to_reference(outputs: dict, ref: dict) -> None:
    diffs = {k: (v - ref[k]).abs().max().item() for k, v in outputs.items()}
    print("max abs diff vs the original:", diffs)
    assert all(d <= ATOL for d in diffs.values()), diffs


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, name, keys_name, S",
    [
        ("sync.yaml", "parity_sync", "sync_model", 14),
        ("ft_synchability.yaml", "parity_syncability", "syncability_model", 13),
    ],
)
def test_stage2_matches_original(config, name, keys_name, S):
    ref = reference_arrays(name)
    model = build_full(config, keys_name)
    outputs = {}
    capture(outputs, model.vfeat_extractor, "vfeat", first=True)
    capture(outputs, model.afeat_extractor, "afeat", first=True)
    capture(outputs, model.vproj, "vproj_out")
    capture(outputs, model.aproj, "aproj_out")
    capture(outputs, model.transformer.blocks, "transformer_blocks_out")
    capture(outputs, model.transformer.ln_f, "transformer_ln_f_out")
    vis = torch.from_numpy(det_input((1, S, 16, 3, 224, 224), seed=1))
    aud = torch.from_numpy(det_input((1, S, 1, 128, 66), seed=2))
    with torch.no_grad():
        loss, outputs["logits"] = model(vis, aud)
    assert loss is None
    assert_close_to_reference(outputs, ref)


@pytest.mark.slow
def test_avclip_matches_original_on_first_clip():
    ref = reference_arrays("parity_avclip")
    cfg = OmegaConf.load(REPO / "configs" / "segment_avclip.yaml")
    S = cfg.data.n_segments_train
    model = build_full("segment_avclip.yaml", "avclip_model")
    outputs = {}
    capture(outputs, model.v_encoder, "v_encoder_out", first=True)
    capture(outputs, model.a_encoder, "a_encoder_out", first=True)
    capture(outputs, model.v_encoder.spatial_attn_agg, "v_spatial_agg_out")
    capture(outputs, model.a_encoder.freq_attn_agg, "a_freq_agg_out")
    # the reference's first clip of its (2, S, ...) inputs
    vis = torch.from_numpy(det_input((2, S, 3, 16, 224, 224), seed=1))[:1]
    aud = torch.from_numpy(det_input((2, S, 66, 128), seed=2))[:1]
    with torch.no_grad():
        out = model(vis, aud)
    outputs |= {
        "vfeat": out["rgb_features"][0],
        "afeat": out["audio_features"][0],
        "logit_scale": out["logit_scales"][0],
    }
    # our aggregators see (segments * t, tokens, D) and return (segments * t, D)
    outputs["v_spatial_agg_out"] = outputs["v_spatial_agg_out"].view(S, -1, 768)
    outputs["a_freq_agg_out"] = outputs["a_freq_agg_out"].view(S, -1, 768)
    first = {k: v[:S] for k, v in ref.items() if k in ("vfeat", "afeat", "v_spatial_agg_out", "a_freq_agg_out")}
    first |= {"v_encoder_out": ref["v_encoder_out"][:1], "a_encoder_out": ref["a_encoder_out"][:1]}
    first["logit_scale"] = ref["logit_scale"]
    assert out["rgb_features"][1] is None and set(out["losses"]) == {"segment_contrastive_loss"}
    assert_close_to_reference(outputs, first)
