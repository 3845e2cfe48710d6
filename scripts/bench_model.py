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

# Small extractors and transformer (32 wide, one layer each) on small inputs: checks that the benchmark
# runs end to end, says nothing about real speed.
TINY_SIZES = {
    "model.params.vfeat_extractor.params": dict(img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2),
    "model.params.afeat_extractor.params": dict(
        max_spec_t=26, num_mel_bins=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ),
    "model.params.vproj.params": dict(in_features=32),
    "model.params.aproj.params": dict(in_features=32),
    "model.params.transformer.params": dict(n_layer=1, n_head=2, n_embd=32),
}


def build_model(config: str, n_segments: int, tiny: bool) -> torch.nn.Module:
    cfg = OmegaConf.load(config)
    if tiny:
        for path, sizes in TINY_SIZES.items():
            OmegaConf.select(cfg, path).update(sizes)
    for extractor in ("afeat_extractor", "vfeat_extractor"):
        cfg.model.params[extractor].params.ckpt_path = None  # random weights time the same
    model = instantiate_from_config(cfg.model).eval()
    # one position per token: OFF, the visual tokens of all segments, MOD, the audio ones
    tokens_per_segment = model.vfeat_extractor.grid[0] + model.afeat_extractor.grid[1]  # t of (t, h, w), (f, t)
    cfg.model.params.transformer.params.pos_emb_cfg.params.block_shape = [1 + n_segments * tokens_per_segment + 1]
    model.transformer = instantiate_from_config(cfg.model.params.transformer).eval()
    return model


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
    model = build_model(args.config, args.segments, args.tiny)
    B, S = args.batch_size, args.segments
    C, Tv, H, W = model.vfeat_extractor.segment_shape
    Ta, F = model.afeat_extractor.segment_shape
    vis = torch.randn(B, S, Tv, C, H, W)
    aud = torch.randn(B, S, 1, F, Ta)
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
