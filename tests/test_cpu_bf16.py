import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch.profiler import ProfilerActivity, profile

from model.modules import cpu_bf16
from model.modules.cpu_bf16 import ChunkedLinear, ChunkedMlp, matmul_attention, scaled_dot_product_attention

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def qkv(*shape, dtype=torch.float32, requires_grad=False):
    torch.manual_seed(0)
    return [torch.randn(*shape, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def kernels(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_float32_is_the_fused_kernel_unchanged():
    q, k, v = qkv(2, 3, 9, 64)
    assert FLASH in kernels(lambda: scaled_dot_product_attention(q, k, v))
    assert torch.equal(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("lq, lk", [(8, 9), (196, 197), (1, 1569)])  # time, space and CLS rows of Motionformer
def test_bf16_on_cpu_runs_matmuls_as_close_as_the_fused_kernel(lq, lk):
    q, k, v = (t.bfloat16() for t in qkv(4, 12, lk, 64))
    q = q[:, :, :lq]
    assert FLASH not in kernels(lambda: scaled_dot_product_attention(q, k, v))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = (scaled_dot_product_attention(q, k, v).double() - exact).abs().max()
    fused = (F.scaled_dot_product_attention(q, k, v).double() - exact).abs().max()
    assert scaled_dot_product_attention(q, k, v).shape == q.shape
    # the scores are rounded to bf16 before the softmax: a few bf16 steps of the output, not more
    assert ours < max(4 * fused, 0.02), (ours, fused)


def test_chunks_give_the_numbers_of_one_call(monkeypatch):
    q, k, v = (t.bfloat16() for t in qkv(10, 2, 7, 64))
    monkeypatch.setattr(cpu_bf16, "SCORES_PER_CHUNK", 2 * 7 * 7 * 3)  # chunks of 3 items: 3, 3, 3, 1
    assert torch.equal(scaled_dot_product_attention(q, k, v), matmul_attention(q, k, v))


def test_bf16_backward_and_dropout():
    q, k, v = qkv(2, 2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    out = scaled_dot_product_attention(q, k, v)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    with torch.no_grad():  # training with attention dropout keeps torch's kernel, which applies it
        torch.manual_seed(1)
        dropped = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        assert not torch.equal(dropped, out.detach())


@pytest.mark.parametrize("layer", [ChunkedLinear(16, 24), ChunkedMlp(16, 40)])
def test_token_chunks_under_cpu_autocast_give_the_numbers_of_one_call(monkeypatch, layer):
    x = torch.randn(3, 5, 16)
    base = torch.nn.Linear if isinstance(layer, ChunkedLinear) else Mlp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = base.forward(layer, x)
        monkeypatch.setattr(cpu_bf16, "TOKENS_PER_CHUNK", 4)  # 15 tokens: chunks of 4, 4, 4, 3
        chunked = layer(x)
    assert chunked.shape == whole.shape == (3, 5, 24 if base is torch.nn.Linear else 16)
    assert chunked.dtype == torch.bfloat16 and torch.equal(chunked, whole)
    assert torch.equal(layer(x), base.forward(layer, x))  # float32: one call, the plain layer


def test_chunked_layers_keep_the_parameter_names():
    assert ChunkedMlp(16, 40).state_dict().keys() == Mlp(16, 40).state_dict().keys()
    assert ChunkedLinear(4, 2).state_dict().keys() == torch.nn.Linear(4, 2).state_dict().keys()


def test_chunked_layers_backward_under_autocast(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "TOKENS_PER_CHUNK", 4)
    layer, x = ChunkedMlp(16, 40), torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
