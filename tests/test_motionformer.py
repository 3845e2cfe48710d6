"""MotionFormer on tiny sizes: shapes, gradients, attention patterns against naive references, checkpoints."""

import logging

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.modules.feat_extractors.visual.motionformer import (
    DividedAttention,
    MotionFormer,
    TrajectoryAttention,
)

# grid (t, h, w) = (2, 2, 2); segments are (C, T, H, W) = (3, 4, 32, 32)
TINY = dict(img_size=32, num_frames=4, patch_size=16, embed_dim=32, depth=2, num_heads=2)


def tiny_input(B=2, S=3):
    return torch.randn(B, S, 3, 4, 32, 32)


def assert_trains(model, x, expected_shape, unused=()):
    y, global_y = model(x)
    assert y.shape == expected_shape and torch.isfinite(y).all()
    loss = y.square().mean() + (0 if global_y is None else global_y.square().mean())
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in unused]
    assert [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0] == []
    return y, global_y


@pytest.mark.parametrize("attn_type", ["divided", "joint", "trajectory"])
def test_attention_types_shapes_and_gradients(attn_type):
    model = MotionFormer(attn_type=attn_type, **TINY)
    # in trajectory attention no patch token attends to the CLS token, whose output is not a feature
    assert_trains(model, tiny_input(), (2, 3, 2, 32), unused=("cls_token",) if attn_type == "trajectory" else ())
    assert not model.patch_embed.proj.weight.requires_grad  # kept for the checkpoints only


@pytest.mark.parametrize("agg_space", ["TransformerEncoderLayer", "AveragePooling"])
@pytest.mark.parametrize("agg_time", ["TransformerEncoderLayer", "AveragePooling", "torch.nn.Identity"])
def test_aggregator_choices(agg_space, agg_time):
    model = MotionFormer(agg_space_module=agg_space, agg_time_module=agg_time, **TINY)
    expected = (2, 3, 2, 32) if "Identity" in agg_time else (2, 3, 32)
    assert_trains(model, tiny_input(), expected)


@pytest.mark.parametrize("agg_segments", ["TransformerEncoderLayer", "AveragePooling"])
def test_global_representation(agg_segments):
    model = MotionFormer(
        agg_time_module="AveragePooling", add_global_repr=True, agg_segments_module=agg_segments, max_segments=4, **TINY
    )
    _, global_y = assert_trains(model, tiny_input(), (2, 3, 32))
    assert global_y.shape == (2, 32)
    if agg_segments == "TransformerEncoderLayer":
        assert model.global_attn_agg.pos_emb.shape == (1, 5, 32)


def test_global_representation_needs_pooled_time():
    with pytest.raises(ValueError, match="agg_time_module"):
        MotionFormer(add_global_repr=True, agg_segments_module="AveragePooling", **TINY)


@pytest.mark.parametrize("attn_type", ["divided", "trajectory"])
def test_for_loop_over_segments_gives_the_same_features(attn_type):
    model = MotionFormer(attn_type=attn_type, **TINY).eval()
    x = tiny_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x, for_loop=True)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_zero_init_tubelet_makes_features_input_independent():
    """Motionformer's zero tubelet projection (the faithful default) sees no pixels until trained; the
    from-scratch option keeps a random projection, so different clips get different features."""
    x = tiny_input()
    for zero_init, differ in ((True, False), (False, True)):
        torch.manual_seed(0)
        feats, _ = MotionFormer(zero_init_tubelet=zero_init, **TINY).eval()(x)  # (B, S, t, D)
        assert (feats[0] - feats[1]).abs().max().item() > 1e-3 if differ else torch.allclose(feats[0], feats[1])


def test_wrong_input_layout_is_rejected():
    with pytest.raises(ValueError, match=r"expects input \(B, S, 3, 4, 32, 32\)"):
        MotionFormer(**TINY)(tiny_input().transpose(2, 3))


def _token_positions(F_, P):
    """Frame and location of every token; the CLS token (index 0) gets -1 for both."""
    index = torch.arange(F_ * P)
    return torch.cat([torch.tensor([-1]), index // P]), torch.cat([torch.tensor([-1]), index % P])


@pytest.mark.parametrize("axis", ["space", "time"])
@pytest.mark.parametrize("grid", [(3, 4), (2, 20), (20, 2)])
def test_divided_attention_equals_masked_full_attention(axis, grid):
    (F_, P), D = grid, 16
    attn = DividedAttention(D, num_heads=2, axis=axis)
    x = torch.randn(2, 1 + F_ * P, D)
    frame, location = _token_positions(F_, P)
    group = frame if axis == "space" else location
    allowed = (group[:, None] == group[None, :]) | (torch.arange(1 + F_ * P) == 0)[None, :]
    allowed[0] = True  # the CLS token attends to all tokens
    q, k, v = attn.split_heads(x)
    expected = attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
    torch.testing.assert_close(attn(x, (F_, P)), expected, atol=1e-5, rtol=1e-5)


def test_trajectory_attention_equals_per_frame_loop():
    F_, P, D, h = 3, 4, 16, 2
    d = D // h
    attn = TrajectoryAttention(D, num_heads=h)
    x = torch.randn(2, 1 + F_ * P, D)
    B = x.shape[0]
    q, k, v = attn.split_heads(x)  # (B, h, N, d)
    cls = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / d**0.5, -1) @ v  # (B, h, 1, d)
    points = []
    for f in range(F_):
        frame = slice(1 + f * P, 1 + (f + 1) * P)
        weights = torch.softmax(q[:, :, 1:] @ k[:, :, frame].transpose(-1, -2) / d**0.5, -1)
        points.append((weights @ v[:, :, frame]).transpose(1, 2).flatten(2))  # (B, F*P, D)
    points = torch.stack(points, dim=2)  # (B, F*P, F, D): query, frame, feature
    own = points[:, torch.arange(F_ * P), torch.arange(F_ * P) // P]  # (B, F*P, D)
    q2 = attn.proj_q(own).view(B, F_ * P, h, d)
    k2 = attn.proj_kv(points)[..., :D].view(B, F_ * P, F_, h, d)
    weights = torch.softmax(torch.einsum("bshd,bsfhd->bshf", q2, k2) / d**0.5, -1)
    out = torch.einsum("bshf,bsfhd->bshd", weights, points.view(B, F_ * P, F_, h, d)).flatten(2)
    expected = attn.proj(torch.cat([cls.transpose(1, 2).flatten(2), out], dim=1))
    torch.testing.assert_close(attn(x, (F_, P)), expected, atol=1e-5, rtol=1e-5)


def _motionformer_state(model):
    """What a Motionformer '.pyth' holds: the backbone and an SSv2 classification head."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_attn_agg") and "attn_agg." not in k}
    state["pre_logits.fc.weight"], state["pre_logits.fc.bias"] = torch.randn(32, 32), torch.randn(32)
    state["head.weight"], state["head.bias"] = torch.randn(174, 32), torch.randn(174)
    return state


def _save_pyth(path, state):
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    torch.save({"epoch": 35, "model_state": state, "optimizer_state": optimizer, "cfg": "VIT:\n  DEPTH: 2\n"}, path)


@pytest.mark.parametrize("attn_type", ["divided", "joint", "trajectory"])
def test_loads_motionformer_pyth_and_picks_its_attention(tmp_path, caplog, attn_type):
    name = {"divided": "ssv2_divided", "joint": "ssv2_joint", "trajectory": "ssv2_motionformer"}[attn_type]
    path = tmp_path / f"{name}_224_16x4.pyth"
    state = _motionformer_state(MotionFormer(attn_type=attn_type, **TINY))
    _save_pyth(path, state)
    with caplog.at_level(logging.WARNING):
        model = MotionFormer(ckpt_path=str(path), **TINY)
    assert model.attn_type == attn_type and not caplog.records
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith(("head.", "pre_logits.")))


def test_position_embeddings_are_resized_to_the_model(tmp_path, caplog):
    path = tmp_path / "ssv2_divided_224_16x4.pyth"
    state = _motionformer_state(MotionFormer(**TINY))  # 2x2 patches, 2 time steps
    _save_pyth(path, state)
    with caplog.at_level(logging.WARNING):
        model = MotionFormer(ckpt_path=str(path), **{**TINY, "img_size": 48, "num_frames": 8})
    assert not caplog.records
    assert model.pos_embed.shape == (1, 1 + 9, 32) and model.temp_embed.shape == (1, 4, 32)
    torch.testing.assert_close(model.pos_embed[:, 0], state["pos_embed"][:, 0])
    assert model(torch.randn(1, 1, 3, 8, 48, 48))[0].shape == (1, 1, 4, 32)


def test_loads_stage1_checkpoint_with_its_start_attention(tmp_path, caplog):
    source = MotionFormer(attn_type="trajectory", agg_time_module="AveragePooling", **TINY)
    args = OmegaConf.create(
        {"model": {"params": {"vfeat_extractor": {"params": {"ckpt_path": "a/ssv2_motionformer_224_16x4.pyth"}}}}}
    )
    state = {f"module.v_encoder.{k}": v for k, v in source.state_dict().items()}
    state["module.a_encoder.ast.layernorm.weight"] = torch.ones(32)
    path = tmp_path / "epoch_best.pt"
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}, "args": args}, path)
    with caplog.at_level(logging.WARNING):
        model = MotionFormer(ckpt_path=str(path), agg_time_module="AveragePooling", **TINY)
    assert model.attn_type == "trajectory" and not caplog.records
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_unknown_checkpoint_and_conflicting_attention_are_rejected(tmp_path):
    path = tmp_path / "ssv2_joint_224_16x4.pyth"
    _save_pyth(path, _motionformer_state(MotionFormer(attn_type="joint", **TINY)))
    with pytest.raises(ValueError, match="needs 'joint'"):
        MotionFormer(ckpt_path=str(path), attn_type="divided", **TINY)
    other = tmp_path / "my_weights.pth"
    other.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="neither a Motionformer checkpoint"):
        MotionFormer(ckpt_path=str(other), **TINY)
