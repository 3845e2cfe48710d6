"""Full-size parity of the feature extractors with the original implementation.

The reference outputs in ../shared/reference were computed by the original code with deterministic
weights (`detfill.det_state_dict`, seeded by the full state-dict key) on deterministic inputs
(`detfill.det_input`); see parity_sync.json and parity_avclip.json there.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from model.modules.feat_extractors.audio.ast import AST
from model.modules.feat_extractors.visual.motionformer import MotionFormer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
TOLERANCE = 1e-4
# Segments are encoded independently (no global representation in these configs), so the first few
# segments of the first clip are checked. `det_input` fills arrays in C order, so the first S segments of
# clip 0 are the whole of `det_input((1, S, ...))`.
S = 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference data not found at {REFERENCE}"),
]


@pytest.fixture(scope="module")
def detfill():
    spec = importlib.util.spec_from_file_location("detfill", REFERENCE / "detfill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_rows(tsv: str, prefix: str) -> dict:
    rows = {}
    for line in (REFERENCE / tsv).read_text().splitlines():
        key, dtype, shape = line.split("\t")
        if key.startswith(prefix):
            rows[key.removeprefix(prefix)] = (dtype, shape)
    return rows


def build_filled(detfill, cls, config: str, name: str, prefix: str, tsv: str):
    """The extractor of `config` with the reference's deterministic weights; checks its state-dict rows."""
    params = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / config).model.params[name].params, resolve=True)
    params["ckpt_path"] = None
    model = cls(**params).eval()
    rows = {
        k: (str(v.dtype).removeprefix("torch."), ",".join(map(str, v.shape))) for k, v in model.state_dict().items()
    }
    assert rows == reference_rows(tsv, prefix)
    filled = detfill.det_state_dict({prefix + k: v for k, v in model.state_dict().items()}, seed=0)
    model.load_state_dict({k.removeprefix(prefix): v for k, v in filled.items()})
    return model


def capture_output(module: torch.nn.Module, store: dict, name: str) -> None:
    module.register_forward_hook(lambda mod, args, out: store.__setitem__(name, out))


def assert_matches(ours: torch.Tensor, reference: np.ndarray) -> None:
    assert tuple(ours.shape) == reference.shape
    assert (ours - torch.from_numpy(reference)).abs().max().item() <= TOLERANCE


def test_sync_extractors_match_the_original(detfill):
    ref = np.load(REFERENCE / "parity_sync.npz")
    video = build_filled(detfill, MotionFormer, "sync.yaml", "vfeat_extractor", "vfeat_extractor.", "sync_model.tsv")
    audio = build_filled(detfill, AST, "sync.yaml", "afeat_extractor", "afeat_extractor.", "sync_model.tsv")
    inner = {}
    capture_output(video.norm, inner, "norm")
    capture_output(audio.ast, inner, "ast")

    vid = torch.from_numpy(detfill.det_input((1, S, 16, 3, 224, 224), seed=1))  # (B, S, T, C, H, W)
    aud = torch.from_numpy(detfill.det_input((1, S, 1, 128, 66), seed=2))  # (B, S, 1, F, T)
    with torch.no_grad():
        vfeat, vglobal = video(vid.permute(0, 1, 3, 2, 4, 5))  # (B, S, C, T, H, W) as Synchformer calls it
        afeat, aglobal = audio(aud[:, :, 0].transpose(2, 3))  # (B, S, T, F)

    assert vglobal is None and aglobal is None
    assert_matches(inner["norm"][0, :64], ref["dbg_vfe_norm_out_seg0_tok0to63"])
    assert_matches(inner["ast"][0], ref["dbg_ast_last_hidden_seg0"])
    assert_matches(vfeat, ref["vfeat"][:, :S])
    assert_matches(afeat, ref["afeat"][:, :S])


def test_avclip_extractors_match_the_original(detfill):
    ref = np.load(REFERENCE / "parity_avclip.npz")
    args = ("segment_avclip.yaml",)
    video = build_filled(detfill, MotionFormer, *args, "vfeat_extractor", "v_encoder.", "avclip_model.tsv")
    audio = build_filled(detfill, AST, *args, "afeat_extractor", "a_encoder.", "avclip_model.tsv")
    inner = {}
    capture_output(video.spatial_attn_agg, inner, "space")
    capture_output(audio.freq_attn_agg, inner, "freq")

    vid = torch.from_numpy(detfill.det_input((1, S, 3, 16, 224, 224), seed=1))  # (B, S, C, T, H, W)
    aud = torch.from_numpy(detfill.det_input((1, S, 66, 128), seed=2))  # (B, S, T, F)
    with torch.no_grad():
        vfeat, _ = video(vid)
        afeat, _ = audio(aud)

    assert_matches(vfeat, ref["v_encoder_out"][:1, :S])
    assert_matches(afeat, ref["a_encoder_out"][:1, :S])
    assert_matches(inner["space"].view(S, 8, 768), ref["v_spatial_agg_out"][:S])
    assert_matches(inner["freq"].view(S, 6, 768), ref["a_freq_agg_out"][:S])
