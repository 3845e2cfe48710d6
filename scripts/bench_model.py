"""Times the stage-2 forward pass (feature extractors + transformer) on random inputs.

    python -m scripts.bench_model                      # full size, 14 segments, B=1, float32, all cores
    python -m scripts.bench_model --tiny --out b.json  # reduced model for CI

Prints one summary line and, with --out, writes the measurements as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from utils.utils import instantiate_from_config

# Small extractors and transformer: checks that the benchmark runs, says nothing about real speed.
TINY_OVERRIDES = [
    "model.params.transformer.params.n_layer=1",
    "model.params.transformer.params.n_head=2",
    "model.params.transformer.params.n_embd=32",
]


def build_model(config: str, n_segments: int, overrides: list[str]) -> torch.nn.Module:
    cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(overrides))
    for extractor in ("afeat_extractor", "vfeat_extractor"):
        cfg.model.params[extractor].params.ckpt_path = None  # random weights time the same
    # one position per token: OFF, 8 visual and 6 audio tokens per segment, MOD
    cfg.model.params.transformer.params.pos_emb_cfg.params.block_shape = [1 + n_segments * 8 + 1 + n_segments * 6]
    return instantiate_from_config(cfg.model).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sync.yaml")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--segments", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="reduced model and input size (CI smoke run)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.config, args.segments, TINY_OVERRIDES if args.tiny else [])
    side = 224
    B, S = args.batch_size, args.segments
    vis = torch.randn(B, S, 16, 3, side, side)  # (B, S, Tv, C, H, W)
    aud = torch.randn(B, S, 1, 128, 66)  # (B, S, 1, F, Ta)
    times = []
    with torch.inference_mode():
        for _ in range(1 + args.repeats):
            start = time.perf_counter()
            _, logits = model(vis, aud)
            times.append(time.perf_counter() - start)
    assert torch.isfinite(logits).all(), "the forward pass produced NaN/inf"
    per_clip = statistics.median(times[1:]) / B
    result = {
        "config": args.config,
        "tiny": args.tiny,
        "batch_size": B,
        "segments": S,
        "dtype": "float32",
        "threads": args.threads,
        "seconds_per_clip": per_clip,
        "seconds_per_forward": times[1:],
        "warmup_seconds": times[0],
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"bench_model: {per_clip:.3f} s/clip ({args.config}{' tiny' if args.tiny else ''}, B={B}, S={S}, "
          f"float32, {args.threads} threads, median of {args.repeats})")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
