"""The benchmark scripts in their reduced CI modes (so they cannot rot) and the opt-in int8 CPU mode.
They check that the numbers are produced and sane, not how fast anything is."""

import json
import math
import sys
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from scripts import bench_model, bench_precision, bench_tracking, bench_train
from tests.tiny import AUD_SEGMENT, VIS_SEGMENT
from utils.inference import quantize_for_cpu

CPU = ProfilerActivity.CPU


def run_script(module, monkeypatch, capsys, tmp_path, *argv) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv, "--out", str(out)])
    module.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # one summary line
    return json.loads(out.read_text()), lines[0]


def test_bench_model_tiny(monkeypatch, capsys, tmp_path):
    result, line = run_script(bench_model, monkeypatch, capsys, tmp_path, "--tiny", "--int8", "--batch-sizes", "2")
    assert [(r["mode"], r["batch_size"]) for r in result["runs"]] == [("float32", 2), ("int8", 2)]
    assert all(0 <= r["top1_agreement_with_float32"] <= 1 for r in result["runs"] if r["mode"] == "int8")
    assert result["gflop_per_clip"] > 0.01
    for r in result["runs"]:
        assert r["seconds_per_clip"] > 0 and all(g > 0 for g in r["gemm_gflops"])
        assert math.isclose(r["gflops"], result["gflop_per_clip"] / r["seconds_per_clip"])
        assert 0 < r["fraction_of_gemm_peak"]
    assert line.startswith("bench_model (configs/sync.yaml tiny, S=14") and "of GEMM" in line


def test_bench_train_tiny(monkeypatch, capsys, tmp_path):
    result, line = run_script(bench_train, monkeypatch, capsys, tmp_path, "--tiny")
    (run,) = result["runs"]
    assert run["size"] == "tiny" and run["iterations_per_second"] > 0 and len(run["seconds_per_iteration"]) == 2
    # stage 2 trains the projections and the transformer, the extractors are frozen
    assert 0 < run["trainable_params"] < 200_000
    assert "tiny B=4:" in line


def test_bench_tracking_tiny(monkeypatch, capsys, tmp_path):
    result, line = run_script(bench_tracking, monkeypatch, capsys, tmp_path, "--tiny", "--duration", "6.6")
    assert result["windows"] == 2  # 5 s windows 1.28 s apart
    assert result["distinct_segments"] == 14 + 4 < result["segments_per_window_total"] == 28
    assert result["max_abs_logit_diff"] <= 1e-4
    assert all(result[k] > 0 for k in ("extractor_pass_seconds", "reuse_seconds", "per_window_seconds"))
    assert "per-window" in line


def test_bench_precision_tiny(monkeypatch, capsys, tmp_path):
    result, line = run_script(bench_precision, monkeypatch, capsys, tmp_path, "--tiny", "--device", "cpu")
    names = ["fp16 + unfused attention", "bf16 + fused attention"]
    assert [r["precision"] for r in result["inference"]] == [r["precision"] for r in result["training"]] == names
    for r in result["inference"]:
        assert r["clips_per_second"] > 0 and 0 <= r["top1_agreement_with_float32"] <= 1
        assert 0 < r["max_abs_logit_diff_vs_float32"] < 1  # autocast is on, and it stays close
    assert all(r["iterations_per_second"] > 0 for r in result["training"])
    assert line.startswith("bench_precision (configs/sync.yaml tiny, S=14, cpu")


@pytest.mark.parametrize("precision", [bench_precision.ORIGINAL, bench_precision.OURS])
def test_precision_settings_switch_the_attention_kernel(precision):
    model = bench_model.build_model("configs/sync.yaml", n_segments=14, tiny=True)
    vis, aud = torch.randn(1, 14, *VIS_SEGMENT), torch.randn(1, 14, *AUD_SEGMENT)
    with torch.inference_mode(), precision.context(torch.device("cpu")), profile(activities=[CPU]) as prof:
        model(vis, aud)
    kernels = {event.key for event in prof.key_averages()}
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in kernels) == precision.fused_attention
    assert ("aten::_scaled_dot_product_attention_math" in kernels) != precision.fused_attention


def test_quantize_for_cpu_keeps_the_model_and_stays_close():
    model = bench_model.build_model("configs/sync.yaml", n_segments=14, tiny=True)
    vis, aud = torch.randn(2, 14, *VIS_SEGMENT), torch.randn(2, 14, *AUD_SEGMENT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warnings of torch.ao are handled inside
        quantized = quantize_for_cpu(model)
    with torch.inference_mode():
        _, expected = model(vis, aud)
        _, logits = quantized(vis, aud)

    def float_linears(m: torch.nn.Module) -> set:
        return {name for name, layer in m.named_modules() if isinstance(layer, torch.nn.Linear)}

    # the float32 model is untouched; in the copy only the pooling layers' Linears (see quantize_for_cpu) stay
    int8 = {
        name for name, layer in quantized.named_modules() if isinstance(layer, torch.ao.nn.quantized.dynamic.Linear)
    }
    kept = float_linears(quantized)
    assert kept and all("attn_agg" in name for name in kept)
    assert kept | int8 == float_linears(model) and not kept & int8
    assert logits.shape == expected.shape and torch.isfinite(logits).all()
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max() + 1e-3
    with pytest.raises(ValueError, match="on the CPU"):
        quantize_for_cpu(model.to("meta"))


def test_bench_desync_tiny(capsys, tmp_path):
    from scripts import bench_desync

    out = tmp_path / "result.json"
    result = bench_desync.main(
        ["--tiny", "--n_videos", "1", "--precisions", "fp32", "--num_workers", "0", "--out", str(out)]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_desync (tiny, 1 videos") and "fp32" in lines[0]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["one_video_at_a_time_fp32"]["videos_per_sec"] > 0
    folder = result["folder_fp32"]
    assert folder["speedup"] > 0 and folder["top1_agreement"] == 1.0 and folder["max_prob_diff"] < 1e-5
