"""What the benchmarks share: how a model runs (`Precision`), untrained models and random inputs of the
published sizes, timing with the device's queue drained, and the CPU's name for every reported figure."""

import contextlib
import copy
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from dataset.synthetic import ClipSpec, make_clip
from scripts.common import list_videos
from utils.config import read_yaml, untrained_config
from utils.utils import instantiate_from_config

CPU_FLAGS = ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


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


def resized_for_segments(model: torch.nn.Module, cfg: DictConfig, n_segments: int) -> torch.nn.Module:
    """`model` if its position embedding fits `n_segments`, else a copy with a fresh transformer that does."""
    # one position per token: OFF, the visual tokens of all segments, MOD, the audio ones
    tokens_per_segment = model.vfeat_extractor.grid[0] + model.afeat_extractor.grid[1]  # t of (t, h, w), (f, t)
    pos_emb = getattr(model.transformer.pos_emb_cfg, "pos_emb", None)
    if pos_emb is not None and pos_emb.shape[1] == 1 + n_segments * tokens_per_segment + 1:
        return model
    resized = copy.deepcopy(model)
    transformer = copy.deepcopy(cfg.model.params.transformer)
    transformer.params.pos_emb_cfg.params.block_shape = [1 + n_segments * tokens_per_segment + 1]
    resized.transformer = instantiate_from_config(transformer).to(next(model.parameters()).device).eval()
    return resized


def build_model(config: str, n_segments: int, tiny: bool) -> torch.nn.Module:
    """The stage-2 model of `config` with random weights and a transformer sized for `n_segments`."""
    cfg = untrained_config(config, tiny)
    return resized_for_segments(instantiate_from_config(cfg.model).eval(), cfg, n_segments)


def random_inputs(model: torch.nn.Module, batch_size: int, n_segments: int, device) -> tuple[torch.Tensor, ...]:
    """Random video (B, S, Tv, C, H, W) and spectrogram (B, S, 1, F, Ta) segments of the model's sizes."""
    C, Tv, H, W = model.vfeat_extractor.segment_shape
    Ta, F = model.afeat_extractor.segment_shape
    vis = torch.randn(batch_size, n_segments, Tv, C, H, W, device=device)
    return vis, torch.randn(batch_size, n_segments, 1, F, Ta, device=device)


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


def cpu_description() -> str:
    """The CPU's model name (family and model number) and the instruction sets that decide bf16 and int8 speed."""
    info = {}
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = [f for f in CPU_FLAGS if capabilities.get(f)]
    return f"{name}, {' '.join(flags) or 'no AVX-512/AMX flags'}"


def clips_or_generated(clips_dir: Path | None, n: int, tmp: Path) -> list[Path]:
    """The first `n` videos of `clips_dir` (e.g. the sample clips: scripts/download_metadata.py --samples), or `n`
    generated 10 s clips (flashes and beeps) at the model's frame rate, sample rate and size, written to `tmp`."""
    if clips_dir is not None:
        return list_videos(clips_dir)[0][:n]
    for i in range(n):
        make_clip(tmp / f"generated{i}.mp4", ClipSpec(duration_sec=10, seed=i))
    return list_videos(tmp)[0]


def bench_training(
    config: str, tiny: bool, batch_size: int, iterations: int, segments: int, device, precision: Precision = FLOAT32
) -> dict:
    """Iterations per second over `iterations` steps after one warm-up step (float16 with a loss scaler)."""
    cfg = read_yaml(config)
    torch.manual_seed(0)
    model = build_model(config, segments, tiny).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.training.base_learning_rate, betas=tuple(cfg.training.optimizer.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.autocast_dtype == torch.float16)
    vis, aud = random_inputs(model, batch_size, segments, device)
    targets = torch.randint(0, cfg.data.num_off_cls, (batch_size,), device=device)
    run = torch.compile(model) if precision.compile else model

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with precision.context(device):
            loss, _ = run(vis, aud, targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.training.max_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    step()  # warm-up: allocates the optimizer state (and compiles)
    seconds, losses = zip(*(timed(step, device) for _ in range(iterations)))
    loss = losses[-1]
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"bench.train: the {config} loss is {loss}")
    return {
        "size": "tiny" if tiny else "full",
        "precision": precision.name,
        "batch_size": batch_size,
        "segments": segments,
        "trainable_params": sum(p.numel() for p in params),
        "iterations_per_second": 1 / statistics.median(seconds),
        "seconds_per_iteration": list(seconds),
    }
