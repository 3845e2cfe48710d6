"""The benchmark scripts in their reduced CI modes (so they cannot rot) and the opt-in int8 CPU mode.
They check that the numbers are produced and sane, not how fast anything is."""

import json
import math
import sys
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from scripts.bench import common
from scripts.bench import desync as bench_desync
from scripts.bench import model as bench_model
from scripts.bench import precision as bench_precision
from scripts.bench import tracking as bench_tracking
from scripts.bench import train as bench_train
from tests.tiny import AUD_SEGMENT, VIS_SEGMENT
from utils.precision import quantize_for_cpu

CPU = ProfilerActivity.CPU


def run_script(module, monkeypatch, capsys, tmp_path, *argv) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv, "--out", str(out)])
    module.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # one summary line
    return json.loads(out.read_text()), lines[0]


def test_bench_model_tiny(monkeypatch, capsys, tmp_path):
    result, line = run_script(
        bench_model, monkeypatch, capsys, tmp_path, "--tiny", "--segments", "2", "--device", "cpu"
    )
    assert [(r["precision"], r["batch_size"]) for r in result["runs"]] == [("fp32", 1), ("bf16", 1), ("int8", 1)]
    assert result["gflop_per_clip"] > 0.01 and result["weights"] == "detfill"
    for r in result["runs"]:
        assert r["seconds_per_clip"] > 0 and all(g["fp32"] > 0 and g["bf16"] > 0 for g in r["gemm_gflops"])
        assert math.isclose(r["gflops"], result["gflop_per_clip"] / r["seconds_per_clip"])
        assert r["fraction_of_fp32_gemm"] > 0 and r["fraction_of_bf16_gemm"] > 0
    (row,) = result["agreement"]  # one generated clip at two offsets
    assert row["clip"] == "generated0.mp4" and row["max_abs_logit_diff_fp32"] == 0
    assert all(len(row[f"top1_{p}"]) == 2 for p in ("fp32", "bf16", "int8"))
    assert 0 < row["max_abs_logit_diff_bf16"] < 0.1 and 0 < row["max_abs_logit_diff_int8"] < 0.1
    assert line.startswith("bench.model (configs/sync.yaml tiny, S=2") and "of bf16 GEMM" in line
    assert result["cpu"] in line and "bf16 top-1 = fp32 on" in line


def test_bench_train_tiny(monkeypatch, capsys, tmp_path):
    result, line = run_script(bench_train, monkeypatch, capsys, tmp_path, "--tiny", "--device", "cpu")
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
    assert "per-window" in line and "peak RSS of tracking 0.2 min" in line
    (rss,) = result["peak_rss"]
    assert rss["minutes"] == 0.2 and 0 < rss["model_built_mb"] <= rss["peak_mb"]


def test_bench_precision_tiny(monkeypatch, capsys, tmp_path):
    result, line = run_script(bench_precision, monkeypatch, capsys, tmp_path, "--tiny", "--device", "cpu")
    names = ["fp16 + unfused attention", "bf16 + fused attention"]
    assert [r["precision"] for r in result["inference"]] == [r["precision"] for r in result["training"]] == names
    for r in result["inference"]:
        assert r["clips_per_second"] > 0 and 0 <= r["top1_agreement_with_float32"] <= 1
        assert 0 < r["max_abs_logit_diff_vs_float32"] < 1  # autocast is on, and it stays close
    assert all(r["iterations_per_second"] > 0 for r in result["training"])
    assert line.startswith("bench.precision (configs/sync.yaml tiny, S=14, cpu")


@pytest.mark.parametrize("precision", [bench_precision.ORIGINAL, bench_precision.OURS])
def test_precision_settings_switch_the_attention_kernel(precision):
    model = common.build_model("configs/sync.yaml", n_segments=14, tiny=True)
    vis, aud = torch.randn(1, 14, *VIS_SEGMENT), torch.randn(1, 14, *AUD_SEGMENT)
    with torch.inference_mode(), precision.context(torch.device("cpu")), profile(activities=[CPU]) as prof:
        model(vis, aud)
    kernels = {event.key for event in prof.key_averages()}
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in kernels) == precision.fused_attention
    assert ("aten::_scaled_dot_product_attention_math" in kernels) != precision.fused_attention


def test_quantize_for_cpu_keeps_the_model_and_stays_close():
    from torchao.quantization import Int8Tensor

    model = common.build_model("configs/sync.yaml", n_segments=14, tiny=True)
    vis, aud = torch.randn(2, 14, *VIS_SEGMENT), torch.randn(2, 14, *AUD_SEGMENT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated API underneath
        quantized = quantize_for_cpu(model)
        with torch.inference_mode():
            _, expected = model(vis, aud)
            _, logits = quantized(vis, aud)

    def linears(m: torch.nn.Module, int8: bool) -> set:
        return {
            name
            for name, layer in m.named_modules()
            if isinstance(layer, torch.nn.Linear) and isinstance(layer.weight, Int8Tensor) == int8
        }

    # the float32 model is untouched; in the copy only the pooling layers' Linears (see quantize_for_cpu) stay
    kept, int8 = linears(quantized, int8=False), linears(quantized, int8=True)
    assert kept and int8 and all("attn_agg" in name for name in kept)
    assert kept | int8 == linears(model, int8=False) and not linears(model, int8=True)
    assert logits.shape == expected.shape and torch.isfinite(logits).all()
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max() + 1e-3
    with pytest.raises(ValueError, match="on the CPU"):
        quantize_for_cpu(model.to("meta"))


def test_bench_desync_tiny(capsys, tmp_path):
    out = tmp_path / "result.json"
    argv = ["--tiny", "--n_videos", "1", "--precisions", "fp32", "--num_workers", "0", "--features", "--out", str(out)]
    result = bench_desync.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.desync (tiny, 1 videos") and "fp32" in lines[0]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["one_video_at_a_time_fp32"]["videos_per_sec"] > 0
    folder = result["folder_fp32"]
    assert folder["speedup"] > 0 and folder["top1_agreement"] == 1.0 and folder["max_prob_diff"] < 1e-5
    # feature caches of the same videos, timed against the folder path
    assert folder["features_visual_vs_desync"] > 0 and folder["features_visual_audio_vs_desync"] > 0
    assert "feature caches against the folder path: fp32 visual" in lines[0]
