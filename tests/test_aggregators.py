import pytest
import torch
from torch import nn

from model.modules.aggregators import (
    AveragePooling,
    CLSTokenAggregator,
    PositionalCLSTokenAggregator,
    build_aggregator,
)

LAYER = dict(d_model=16, nhead=2, dim_feedforward=32)


@pytest.mark.parametrize("name", ["TransformerEncoderLayer", "AveragePooling"])
@pytest.mark.parametrize("max_len", [None, 5])
def test_aggregator_pools_the_sequence_axis(name, max_len):
    agg = build_aggregator(name, max_len=max_len, **LAYER)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = agg(x)
    assert y.shape == (3, 16) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in agg.parameters())


def test_builder_names():
    assert type(build_aggregator("TransformerEncoderLayer", **LAYER)) is CLSTokenAggregator
    assert type(build_aggregator("TransformerEncoderLayer", max_len=4, **LAYER)) is PositionalCLSTokenAggregator
    assert type(build_aggregator("AveragePooling", **LAYER)) is AveragePooling
    assert type(build_aggregator("torch.nn.Identity", **LAYER)) is nn.Identity
    with pytest.raises(ValueError, match="Unknown aggregation"):
        build_aggregator("torch.nn.Identity", allow_identity=False, **LAYER)
    with pytest.raises(ValueError, match="Unknown aggregation"):
        build_aggregator("MaxPooling", **LAYER)


def test_checkpoint_names():
    keys = set(build_aggregator("TransformerEncoderLayer", max_len=4, **LAYER).state_dict())
    assert {"cls_token", "pos_emb", "self_attn.in_proj_weight", "linear1.weight", "norm1.weight"} <= keys
    assert build_aggregator("TransformerEncoderLayer", max_len=4, **LAYER).pos_emb.shape == (1, 5, 16)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cls_aggregator_equals_the_whole_encoder_layer(mode):
    """Computing only the CLS row gives what the full `nn.TransformerEncoderLayer` gives at position 0."""
    agg = getattr(CLSTokenAggregator(**LAYER), mode)()  # dropout 0: both modes are deterministic
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        whole_layer = nn.TransformerEncoderLayer.forward(agg, agg.prepend_cls(x))[:, 0]
        torch.testing.assert_close(agg(x), whole_layer, atol=1e-6, rtol=1e-5)


def test_cls_output_depends_on_every_position_and_not_on_order_without_pos_emb():
    agg = CLSTokenAggregator(**LAYER).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(agg(x), agg(x.flip(1)), atol=1e-5, rtol=1e-5)
    positional = PositionalCLSTokenAggregator(**LAYER, max_len=5).eval()
    assert not torch.allclose(positional(x), positional(x.flip(1)), atol=1e-4)


def test_too_many_segments_for_position_embeddings():
    with pytest.raises(ValueError, match="max_segments"):
        PositionalCLSTokenAggregator(**LAYER, max_len=3)(torch.randn(1, 4, 16))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cls_aggregator_projects_keys_and_values_in_one_gemm(dtype):
    """No batched matmul in the layer: a (N, L, D) key tensor in attention's (L, N, D) view would make
    the projection a bmm over L copies of its weight (17x slower under bf16 autocast at full size)."""
    agg = CLSTokenAggregator(**LAYER).eval()
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        torch.profiler.profile() as prof,
    ):
        agg(torch.randn(3, 7, 16))
    ops = {event.key for event in prof.key_averages()}
    assert "aten::addmm" in ops and "aten::bmm" not in ops
