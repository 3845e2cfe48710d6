import logging
import math

import pytest
import torch
from torch import nn

from model.modules.bridges import (
    AppendZerosToHidden,
    AvgPoolBridgeAudio,
    AvgPoolBridgeVisual,
    ConvBridgeAudio,
    ConvBridgeVisual,
    DoNothingBridge,
)
from model.modules.transformer import (
    Block,
    NoPosEncoding,
    RandInitPositionalEncoding,
    SelfAttention,
    SinCosInitPositionalEncoding,
    ZeroInitPositionalEncoding,
)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(n_embd=16, n_head=4).eval()
    x = torch.randn(2, 5, 16)
    heads = lambda t: t.view(2, 5, 4, 4).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = SelfAttention(n_embd=16, n_head=4, attn_pdrop=0.5)
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x), atol=0, rtol=0)


def test_attention_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(n_embd=10, n_head=4)


def test_block_shape_nan_backward_and_keys():
    block = Block(n_embd=16, n_head=2, attn_pdrop=0.1, resid_pdrop=0.1)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
    assert {k.rsplit(".", 1)[0] for k in block.state_dict()} == {
        "ln1", "ln2", "attn.key", "attn.query", "attn.value", "attn.proj", "mlp.0", "mlp.2"
    }  # fmt: skip


def test_position_encodings():
    x = torch.randn(2, 6, 8)
    rand, zero = RandInitPositionalEncoding([6], 8), ZeroInitPositionalEncoding([6], 8)
    assert rand.pos_emb.shape == (1, 6, 8) and rand.pos_emb.std() > 0.5
    torch.testing.assert_close(rand(x), x + rand.pos_emb)
    torch.testing.assert_close(zero(x), x)
    torch.testing.assert_close(NoPosEncoding(block_shape=[6], n_embd=8)(x), x)


def test_sincos_init_is_smooth_in_the_token_index():
    enc = SinCosInitPositionalEncoding([198], 64)
    table = enc.pos_emb[0]  # (198, 64)
    assert enc.pos_emb.requires_grad and torch.isfinite(table).all()
    torch.testing.assert_close(table.norm(dim=-1), torch.full((198,), math.sqrt(32)))  # sin^2 + cos^2 per pair
    sim = table @ table.T  # neighbours resemble each other more than distant tokens do
    assert (sim.diagonal(1)[:158] > sim.diagonal(40)).all()
    assert len({tuple(row.tolist()) for row in table.round(decimals=4)}) == 198  # every position distinct


def test_position_encoding_trims_longer_and_rejects_shorter(caplog):
    parent = nn.Module()
    parent.pos_emb_cfg = RandInitPositionalEncoding([4], 8)
    longer = torch.randn(1, 6, 8)
    with caplog.at_level(logging.WARNING):
        parent.load_state_dict({"pos_emb_cfg.pos_emb": longer})
    torch.testing.assert_close(parent.pos_emb_cfg.pos_emb.data, longer[:, :4])
    assert "Trimming 'pos_emb_cfg.pos_emb'" in caplog.text
    with pytest.raises(ValueError, match="shorter sequences"):
        parent.load_state_dict({"pos_emb_cfg.pos_emb": torch.randn(1, 3, 8)})


def test_bridges():
    v, a = torch.randn(2, 8, 3, 4, 4), torch.randn(2, 8, 5, 6)  # (B, D, t, h, w), (B, D, f, t)
    assert DoNothingBridge(in_features=8, out_features=8)(a) is a
    assert ConvBridgeVisual(in_channels=8, out_channels=4, kernel_size=[1, 4, 4])(v).shape == (2, 4, 3, 1, 1)
    assert ConvBridgeAudio(in_channels=8, out_channels=4, kernel_size=[5, 1])(a).shape == (2, 4, 1, 6)
    assert "bridge.0.weight" in ConvBridgeAudio(in_channels=8, out_channels=4, kernel_size=1).state_dict()
    assert AvgPoolBridgeVisual(kernel_size=[1, 4, 4])(v).shape == (2, 8, 3, 1, 1)
    torch.testing.assert_close(AvgPoolBridgeAudio(kernel_size=[5, 1])(a), a.mean(dim=2, keepdim=True))
    padded = AppendZerosToHidden(target_hidden_size=12, dim=1)(a)
    assert padded.shape == (2, 12, 5, 6) and padded[:, 8:].abs().sum() == 0
    torch.testing.assert_close(padded[:, :8], a)
