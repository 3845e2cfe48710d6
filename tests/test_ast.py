"""AST on tiny sizes: shapes, gradients, Hugging Face weights, stage-1 checkpoints."""

import dataclasses
import logging
import subprocess
import sys

import pytest
import torch
from transformers import ASTConfig, ASTModel

from model.modules.feat_extractors.audio import ast
from model.modules.feat_extractors.audio.ast import AST
from tests.reference_data import REPO

# segments of 36 frames x 32 mel bins: (f, t) = (2, 3) patches
TINY = dict(
    max_spec_t=36, num_mel_bins=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)
HF_TINY = dict(
    num_mel_bins=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=1024
)


def tiny_input(B=2, S=3):
    return torch.randn(B, S, 36, 32)


@pytest.mark.parametrize("agg_freq", ["TransformerEncoderLayer", "AveragePooling"])
@pytest.mark.parametrize("agg_time", ["TransformerEncoderLayer", "AveragePooling", "torch.nn.Identity"])
def test_aggregator_choices_shapes_and_gradients(agg_freq, agg_time):
    model = AST(agg_freq_module=agg_freq, agg_time_module=agg_time, **TINY)
    y, global_y = model(tiny_input())
    assert y.shape == ((2, 3, 3, 32) if "Identity" in agg_time else (2, 3, 32)) and global_y is None
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("agg_segments", ["TransformerEncoderLayer", "AveragePooling"])
def test_global_representation(agg_segments):
    model = AST(agg_time_module="AveragePooling", add_global_repr=True, agg_segments_module=agg_segments, **TINY)
    y, global_y = model(tiny_input())
    assert y.shape == (2, 3, 32) and global_y.shape == (2, 32) and torch.isfinite(global_y).all()
    global_y.square().mean().backward()
    assert all(p.grad is not None for p in model.global_attn_agg.parameters())


def test_for_loop_over_segments_gives_the_same_features():
    model = AST(**TINY).eval()
    x = tiny_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x, for_loop=True)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_wrong_input_layout_is_rejected():
    with pytest.raises(ValueError, match=r"expects input \(B, S, 36, 32\)"):
        AST(**TINY)(tiny_input().transpose(2, 3))


def test_published_names_and_shapes():
    with torch.device("meta"):  # shapes only
        state = AST().state_dict()
    assert state["ast.embeddings.position_embeddings"].shape == (1, 2 + 12 * 6, 768)
    assert state["ast.encoder.layer.11.attention.attention.query.weight"].shape == (768, 768)
    assert state["ast.encoder.layer.11.output.dense.weight"].shape == (768, 3072)
    assert state["freq_attn_agg.linear1.weight"].shape == (3072, 768)


def test_hugging_face_weights_load_and_compute_like_transformers(tmp_path, caplog):
    torch.manual_seed(0)
    hf = ASTModel(ASTConfig(**HF_TINY)).eval()  # position embeddings for 1024 frames: 2 + 2 * 101
    for p in hf.parameters():  # non-trivial values everywhere, also where transformers initialises zeros
        torch.nn.init.normal_(p, std=0.2)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = AST(ckpt_path=str(tmp_path), **TINY).eval()
    assert not caplog.records

    hf_state = hf.state_dict()
    ours = model.state_dict()
    torch.testing.assert_close(
        ours["ast.encoder.layer.1.attention.attention.key.weight"], hf_state["layers.1.attention.k_proj.weight"]
    )
    torch.testing.assert_close(ours["ast.encoder.layer.0.output.dense.bias"], hf_state["layers.0.mlp.fc2.bias"])
    torch.testing.assert_close(
        ours["ast.embeddings.position_embeddings"], hf_state["embeddings.position_embeddings"][:, :8]
    )

    # transformers' AST for our segment length, with the cut position embeddings, computes the same tokens
    hf_short = ASTModel(ASTConfig(**{**HF_TINY, "max_length": 36})).eval()
    hf_short.load_state_dict({**hf_state, "embeddings.position_embeddings": ours["ast.embeddings.position_embeddings"]})
    x = torch.randn(4, 36, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.ast(x), hf_short(x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_loads_stage1_checkpoint(tmp_path, caplog):
    source = AST(agg_time_module="AveragePooling", **TINY)
    state = {f"a_encoder.{k}": v for k, v in source.state_dict().items()}
    state["v_encoder.cls_token"] = torch.zeros(1, 1, 32)
    path = tmp_path / "stage1.pt"
    torch.save({"epoch": 1, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    with caplog.at_level(logging.WARNING):
        model = AST(ckpt_path=str(path), agg_time_module="AveragePooling", **TINY)
    assert not caplog.records
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_stage1_checkpoint_with_other_sizes_warns(tmp_path, caplog):
    source = AST(**{**TINY, "num_hidden_layers": 1})
    path = tmp_path / "stage1.pt"
    torch.save({"state_dict": {f"module.a_encoder.{k}": v for k, v in source.state_dict().items()}}, path)
    with caplog.at_level(logging.WARNING):
        AST(ckpt_path=str(path), **TINY)
    assert "ast.encoder.layer.1.layernorm_before.weight" in caplog.text


def test_published_sizes_are_transformers_ast_defaults():
    ours, theirs = ast.ASTConfig(), ASTConfig()
    assert {f.name: getattr(theirs, f.name) for f in dataclasses.fields(ours)} == dataclasses.asdict(ours)


def test_a_float32_model_imports_neither_transformers_nor_torchao():
    """transformers imports torchao when it is installed, and torchao's import prints warnings: only reading
    Hugging Face weights and --precision int8 may import them."""
    code = (
        "import sys, example, main, hubconf\n"
        "from utils.config import untrained_config\nfrom utils.utils import instantiate_from_config\n"
        "instantiate_from_config(untrained_config('configs/sync.yaml', tiny=True).model)\n"
        "print(sorted({'transformers', 'torchao'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert (run.stdout, run.stderr) == ("[]\n", "")
