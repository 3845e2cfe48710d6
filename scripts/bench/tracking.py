"""The cost of tracking the offset over a long synthetic video (`dataset.synthetic.make_clip`) with
`utils.inference.WindowPredictor`, which extracts each distinct segment's features once and runs only the
synchronisation transformer per window, against recomputing every window's segments, in one run:

- one extractor pass: the features of every distinct segment of the windows, once;
- tracking with reuse: the whole `WindowPredictor.predict` (segment inputs, extractors, one head per window);
- per-window recomputation: `predict` called on each window alone, so nothing is shared.

Also checks that both give the same per-window logits (max abs diff).

    python -m scripts.bench.tracking                     # full-size model (random weights), 60 s video
    python -m scripts.bench.tracking --tiny --out t.json # 32-wide one-layer model, 12 s video (CI)

Prints one summary line and, with --out, writes the measurements as JSON."""

import argparse
import os
import tempfile
from pathlib import Path

import torch

from dataset.io import get_video_and_audio
from dataset.synthetic import ClipSpec, make_clip
from model.tracking import WindowPredictor
from scripts.bench.common import timed
from utils.cli import run_cli
from utils.config import untrained_config
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sync.yaml")
    parser.add_argument("--duration", type=float, help="video length in seconds (default: 60, 12 with --tiny)")
    parser.add_argument("--stride_sec", type=float, default=1.28, help="window step, as in predict_offsets")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="32-wide one-layer model, 12 s video (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    reuse_freed_memory()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    duration = args.duration or (12.0 if args.tiny else 60.0)
    cfg = untrained_config(args.config, args.tiny, tiny_inputs=False)  # real videos need the real input sizes
    predictor = WindowPredictor(instantiate_from_config(cfg.model), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        make_clip(path, ClipSpec(duration_sec=duration, offset_sec=0.4, seed=0))
        item = predictor.pipeline.prepare(*get_video_and_audio(path, get_meta=True), str(path))
    starts = predictor.window_starts(item, args.stride_sec)
    windows = [predictor.pipeline.window_segments(item, s) for s in starts]
    distinct = list(dict.fromkeys(k for w in windows for k in w))

    cpu = torch.device("cpu")
    pass_s, _ = timed(lambda: predictor.features(item, distinct), cpu)
    reuse_s, shared = timed(lambda: predictor.predict(item, windows), cpu)
    per_window_s, alone = timed(lambda: torch.cat([predictor.predict(item, [w]) for w in windows]), cpu)
    max_diff = (shared - alone).abs().max().item()
    load = os.getloadavg()
    result = {
        "config": args.config,
        "tiny": args.tiny,
        "duration_sec": duration,
        "stride_sec": args.stride_sec,
        "windows": len(windows),
        "distinct_segments": len(distinct),
        "segments_per_window_total": sum(len(w) for w in windows),
        "extractor_pass_seconds": pass_s,
        "reuse_seconds": reuse_s,
        "per_window_seconds": per_window_s,
        "reuse_over_one_pass": reuse_s / pass_s,
        "per_window_over_one_pass": per_window_s / pass_s,
        "max_abs_logit_diff": max_diff,
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average": load,
    }
    print(f"bench.tracking ({args.config}{' tiny' if args.tiny else ''}, {duration:g} s video, {len(windows)} windows, "
          f"{len(distinct)} distinct segments, load {load[0]:.2f}): one extractor pass {pass_s:.2f} s, "
          f"tracking with reuse {reuse_s:.2f} s ({reuse_s / pass_s:.2f}x), per-window {per_window_s:.2f} s "
          f"({per_window_s / pass_s:.2f}x), max logit diff {max_diff:.1e}")  # fmt: skip
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    run_cli(main)
