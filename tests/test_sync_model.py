import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from model.sync_model import GlobalTransformer, GlobalTransformerWithSyncabilityHead, Synchformer
from tests.reference_data import REPO, keys_of, reference_arrays, reference_keys
from utils.detfill import det_state_dict
from utils.utils import instantiate_from_config

HEAD_PARTS = ("vproj", "aproj", "transformer")


def build_head(config: str) -> nn.ModuleDict:
    """The full-size projections and transformer of a stage-2 config, without the feature extractors."""
    cfg = OmegaConf.load(REPO / "configs" / config)
    head = {name: instantiate_from_config(cfg.model.params[name]) for name in HEAD_PARTS}
    return nn.ModuleDict({**head, "feature_norm": nn.Identity()})  # the published models do not standardise


@pytest.mark.parametrize("config, name", [("sync.yaml", "parity_sync"), ("ft_synchability.yaml", "parity_syncability")])
def test_head_matches_original_on_reference_features(config, name):
    """The original's extractor outputs through our projections + transformer give the original's logits."""
    ref = reference_arrays(name)
    head = build_head(config)
    head.load_state_dict(det_state_dict(head.state_dict(), seed=0))
    head.eval()
    outputs = {}
    hooked = {"vproj_out": head.vproj, "aproj_out": head.aproj, "transformer_blocks_out": head.transformer.blocks}
    for key, module in {**hooked, "transformer_ln_f_out": head.transformer.ln_f}.items():
        module.register_forward_hook(lambda m, i, out, key=key: outputs.__setitem__(key, out))
    with torch.no_grad():
        outputs["logits"] = Synchformer.forward_head(head, ref["vfeat"], ref["afeat"])
    for key, out in outputs.items():
        assert (out - ref[key]).abs().max() <= 1e-4, key


@pytest.mark.parametrize("config, name", [("sync.yaml", "sync_model"), ("ft_synchability.yaml", "syncability_model")])
def test_head_state_dict_matches_original(config, name):
    expected = {k: v for k, v in reference_keys(name).items() if k.split(".")[0] in HEAD_PARTS}
    assert list(keys_of(build_head(config).state_dict()).items()) == list(expected.items())


def tiny_transformer(cls=GlobalTransformer, n_tokens=1 + 2 * 3 + 1 + 2 * 2, **kwargs) -> GlobalTransformer:
    return cls(
        n_layer=2, n_head=2, n_embd=16, tok_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1,
        pos_emb_cfg={"target": "model.modules.transformer.RandInitPositionalEncoding",
                     "params": {"block_shape": [n_tokens], "n_embd": 16}},
        off_head_cfg={"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 5}},
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("cls, n_classes", [(GlobalTransformer, 5), (GlobalTransformerWithSyncabilityHead, 2)])
def test_global_transformer_shape_nan_backward(cls, n_classes):
    model = tiny_transformer(cls)
    v, a = torch.randn(3, 6, 16), torch.randn(3, 4, 16)  # 2 segments of 3 visual and 2 audio tokens
    logits = model(v, a)
    assert logits.shape == (3, n_classes) and torch.isfinite(logits).all()
    assert model.forward_features(v, a).shape == (3, 1 + 6 + 1 + 4, 16)
    logits.sum().backward()
    unused = {"off_head"} if cls is GlobalTransformerWithSyncabilityHead else set()
    for name, p in model.named_parameters():
        assert name.split(".")[0] not in unused and p.grad is not None and torch.isfinite(p.grad).all(), name


def test_global_transformer_is_deterministic_in_eval_and_reads_off_token():
    model = tiny_transformer().eval()
    v, a = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    torch.testing.assert_close(model(v, a), model(v, a), atol=0, rtol=0)
    torch.testing.assert_close(model(v, a), model.off_head(model.forward_features(v, a)[:, 0]))
    # every token influences the prediction: no masking, all segments count
    a2 = a.clone()
    a2[:, -1] += torch.randn(16)  # not a constant shift: the input LayerNorm removes that
    assert not torch.allclose(model(v, a), model(v, a2))


def event_tokens(rng: np.random.Generator, B: int, pattern: torch.Tensor, grid: np.ndarray, S: int = 4):
    """Token features of one flash and its tone burst, the tone `offset` s earlier, with the token timing
    of the extractors (segments of 0.64 s every 0.32 s; visual tokens every 0.08 s, audio every 0.1 s):
    tokens that overlap the event carry `pattern`, all carry noise. -> (B, S*8, D), (B, S*6, D), labels."""
    y = rng.integers(len(grid), size=B)
    t_v = rng.uniform(0.7, 0.9, size=B)  # inside both streams' windows for every offset of the grid
    t_a = t_v - grid[y]
    v_start = (0.32 * np.arange(S)[:, None] + 0.08 * np.arange(8)).reshape(-1)  # (S*8,) token start times
    a_start = (0.32 * np.arange(S)[:, None] + 0.10 * np.arange(6)).reshape(-1)  # (S*6,)
    v_on = (v_start < t_v[:, None] + 0.16) & (v_start + 0.08 > t_v[:, None])  # (B, S*8): a 0.16 s flash
    a_on = (a_start < t_a[:, None] + 0.2) & (a_start + 0.16 > t_a[:, None])  # (B, S*6): a 0.2 s tone
    D = len(pattern)
    v = torch.from_numpy(v_on).float()[..., None] * pattern + 0.1 * torch.randn(B, S * 8, D)
    a = torch.from_numpy(a_on).float()[..., None] * pattern + 0.1 * torch.randn(B, S * 6, D)
    return v, a, torch.from_numpy(y)


def test_global_transformer_learns_offsets_from_event_timing():
    """The head has to compare where the visual and the audio event sit in its token sequence; with the
    sine/cosine-initialised position embedding of the tiny configs it learns that in 150 steps."""
    torch.manual_seed(0)
    S, D, grid = 4, 32, np.linspace(-0.6, 0.6, 7)
    head = GlobalTransformer(
        n_layer=2,
        n_head=4,
        n_embd=D,
        pos_emb_cfg={
            "target": "model.modules.transformer.SinCosInitPositionalEncoding",
            "params": {"block_shape": [2 + S * (8 + 6)], "n_embd": D},
        },
        off_head_cfg={"target": "torch.nn.Linear", "params": {"in_features": D, "out_features": len(grid)}},
    )
    pattern, rng = torch.randn(D), np.random.default_rng(0)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(150):
        v, a, y = event_tokens(rng, 32, pattern, grid, S)
        loss = F.cross_entropy(head(v, a), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    v, a, y = event_tokens(np.random.default_rng(1), 500, pattern, grid, S)  # unseen events
    with torch.no_grad():
        accuracy = (head.eval()(v, a).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance: 1/7 (measured 0.83)
