"""Times the stage-2 forward pass (feature extractors + transformer) on random inputs against the
physical limit: the model's FLOPs (counted with `torch.utils.flop_counter`) over the seconds it takes,
as a fraction of the dense GEMM throughput the same device reaches in the same run (a large float32
matmul on CPU, bfloat16 on an accelerator). The GEMM is timed right before and after every forward, so
a machine shared with other jobs is compared with itself at the same moment.

    python -m scripts.bench_model                          # full size, 14 segments, B=1 and B=4, float32
    python -m scripts.bench_model --batch-sizes 1 --int8   # also the opt-in int8 CPU mode, same run
    python -m scripts.bench_model --tiny --out b.json      # reduced model, one repetition (CI)

Prints one summary line and, with --out, writes the measurements as JSON.
"""

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from utils.cli import run_cli
from utils.config import read_yaml
from utils.inference import quantize_for_cpu
from utils.precision import resolve_device
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json

# Small extractors and transformer (32 wide, one layer each): checks that a benchmark runs end to end,
# says nothing about real speed. TINY_INPUTS also shrinks the inputs (not for real videos).
TINY_WIDTHS = {
    "model.params.vfeat_extractor.params": dict(embed_dim=32, depth=1, num_heads=2),
    "model.params.afeat_extractor.params": dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ),
    "model.params.vproj.params": dict(in_features=32),
    "model.params.aproj.params": dict(in_features=32),
    "model.params.transformer.params": dict(n_layer=1, n_head=2, n_embd=32),
}
TINY_INPUTS = {
    "model.params.vfeat_extractor.params": dict(img_size=32, num_frames=4),
    "model.params.afeat_extractor.params": dict(max_spec_t=26, num_mel_bins=32),
}


@dataclass(frozen=True)
class Precision:
    """How a benchmark runs the model: under autocast to `autocast_dtype` (None: float32), with the fused
    attention kernels or the unfused one (softmax(QK^T)V as separate ops), `torch.compile`d or not."""

    name: str
    autocast_dtype: torch.dtype | None = None
    fused_attention: bool = True
    compile: bool = False

    def context(self, device: torch.device) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(device.type, dtype=self.autocast_dtype))
        if not self.fused_attention:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack


FLOAT32 = Precision("float32")


def bench_config(config: str | Path, tiny: bool, tiny_inputs: bool = True) -> DictConfig:
    """The config (resolved) with random extractor weights; `tiny`: TINY_WIDTHS (and TINY_INPUTS)."""
    cfg = read_yaml(config)
    for sizes in (TINY_WIDTHS, TINY_INPUTS if tiny_inputs else {}) if tiny else ():
        for path, values in sizes.items():
            OmegaConf.select(cfg, path).update(values)
    for extractor in ("afeat_extractor", "vfeat_extractor"):
        cfg.model.params[extractor].params.ckpt_path = None  # random weights time the same
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def build_model(config: str, n_segments: int, tiny: bool) -> torch.nn.Module:
    """The stage-2 model of `config` with random weights and a transformer sized for `n_segments`."""
    cfg = bench_config(config, tiny)
    model = instantiate_from_config(cfg.model).eval()
    # one position per token: OFF, the visual tokens of all segments, MOD, the audio ones
    tokens_per_segment = model.vfeat_extractor.grid[0] + model.afeat_extractor.grid[1]  # t of (t, h, w), (f, t)
    cfg.model.params.transformer.params.pos_emb_cfg.params.block_shape = [1 + n_segments * tokens_per_segment + 1]
    model.transformer = instantiate_from_config(cfg.model.params.transformer).eval()
    return model


def random_inputs(model: torch.nn.Module, batch_size: int, n_segments: int, device) -> tuple[torch.Tensor, ...]:
    """Random video (B, S, Tv, C, H, W) and spectrogram (B, S, 1, F, Ta) segments of the model's sizes."""
    C, Tv, H, W = model.vfeat_extractor.segment_shape
    Ta, F = model.afeat_extractor.segment_shape
    vis = torch.randn(batch_size, n_segments, Tv, C, H, W, device=device)
    return vis, torch.randn(batch_size, n_segments, 1, F, Ta, device=device)


def default_device() -> torch.device:
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accelerator or torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def timed(fn, device: torch.device) -> tuple[float, Any]:
    """`(seconds, fn())`, with the device's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def gemm_gflops(device: torch.device, n: int, repeats: int = 2) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) matmul: float32 on CPU, bfloat16 on an accelerator."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * n**3 / seconds / 1e9


def count_flops(model: torch.nn.Module, vis: torch.Tensor, aud: torch.Tensor) -> int:
    """FLOPs of one forward (a multiply-add counts 2), counted on a meta-device copy: shapes only, no
    compute. There attention runs as its two matmuls, which `torch.utils.flop_counter` counts; it has no
    formula for the fused CPU attention kernel and would miss them."""
    meta = copy.deepcopy(model).to("meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        meta(vis.to("meta"), aud.to("meta"))
    return counter.get_total_flops()


def warm_up(model: torch.nn.Module, vis: torch.Tensor, aud: torch.Tensor) -> None:
    """One segment through the extractors: kernel selection and allocations happen before the timing."""
    with torch.inference_mode():
        model.extract_features(vis[:1, :1], aud[:1, :1])


def bench_forward(model, vis, aud, flops_per_clip: int, repeats: int, gemm_n: int, device) -> tuple[dict, torch.Tensor]:
    """Seconds per clip (median of `repeats` forwards) and achieved GFLOP/s, as a fraction of the GEMM
    throughput measured around each forward; and the logits."""
    seconds, gemm = [], [gemm_gflops(device, gemm_n)]
    with torch.inference_mode():
        for _ in range(repeats):
            forward_seconds, (_, logits) = timed(lambda: model(vis, aud), device)
            seconds.append(forward_seconds)
            gemm.append(gemm_gflops(device, gemm_n))
    B = vis.shape[0]
    per_clip = statistics.median(seconds) / B
    gflops = flops_per_clip / per_clip / 1e9
    # each forward against the mean of the GEMM runs right before and after it
    fractions = [flops_per_clip * B / s / 1e9 / ((g0 + g1) / 2) for s, g0, g1 in zip(seconds, gemm, gemm[1:])]
    return {
        "batch_size": B,
        "seconds_per_clip": per_clip,
        "seconds_per_forward": seconds,
        "gflops": gflops,
        "gemm_gflops": gemm,
        "fraction_of_gemm_peak": statistics.median(fractions),
    }, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sync.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--segments", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", type=torch.device, default=default_device())
    parser.add_argument("--int8", action="store_true", help="also time the opt-in int8 CPU mode (quantize_for_cpu)")
    parser.add_argument("--tiny", action="store_true", help="reduced model and input size, one repetition (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--default-malloc", action="store_true", help="time without `reuse_freed_memory` (the page-fault baseline)"
    )
    args = parser.parse_args()
    reuses_memory = not args.default_malloc and reuse_freed_memory()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, S = resolve_device(args.device), args.segments
    repeats, gemm_n = (1, 512) if args.tiny else (args.repeats, 4096)
    model = build_model(args.config, S, args.tiny).to(device)
    flops_per_clip = count_flops(model, *random_inputs(model, 1, S, device))
    modes = {"float32": model, **({"int8": quantize_for_cpu(model)} if args.int8 else {})}
    for m in modes.values():
        warm_up(m, *random_inputs(model, 1, S, device))
    runs = []
    for B in args.batch_sizes:
        vis, aud = random_inputs(model, B, S, device)
        top1 = {}
        for mode, m in modes.items():
            result, logits = bench_forward(m, vis, aud, flops_per_clip, repeats, gemm_n, device)
            runs.append({"mode": mode, **result})
            top1[mode] = logits.argmax(-1)
        if args.int8:  # on these random inputs
            runs[-1]["top1_agreement_with_float32"] = (top1["int8"] == top1["float32"]).float().mean().item()
    load = os.getloadavg()
    result = {
        "config": args.config,
        "tiny": args.tiny,
        "segments": S,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "reuse_freed_memory": reuses_memory,
        "torch": torch.__version__,
        "gflop_per_clip": flops_per_clip / 1e9,
        "load_average": load,
        "runs": runs,
    }
    summary = " | ".join(
        f"{r['mode']} B={r['batch_size']}: {r['seconds_per_clip']:.3f} s/clip, {r['gflops']:.1f} GFLOP/s, "
        f"{r['fraction_of_gemm_peak']:.0%} of GEMM {statistics.mean(r['gemm_gflops']):.1f}"
        for r in runs
    )
    malloc = "" if reuses_memory else ", default malloc"
    print(f"bench_model ({args.config}{' tiny' if args.tiny else ''}, S={S}, {flops_per_clip / 1e9:.4g} GFLOP/clip, "
          f"{device}, {args.threads} threads{malloc}, load {load[0]:.2f}): {summary}")  # fmt: skip
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    run_cli(main)
