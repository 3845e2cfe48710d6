"""The cost of tracking the offset over a long synthetic video (`dataset.synthetic.make_clip`) with
`utils.inference.WindowPredictor`, which extracts each distinct segment's features once and runs only the
synchronisation transformer per window, against recomputing every window's segments, in one run:

- one extractor pass: the features of every distinct segment of the windows, once;
- tracking with reuse: the whole `WindowPredictor.predict` (segment inputs, extractors, one head per window);
- per-window recomputation: `predict` called on each window alone, so nothing is shared.

Also checks that both give the same per-window logits (max abs diff), and measures the peak memory
(RSS) of `predict_track`, which decodes the video a batch of segments at a time, against the video's
length: each length (the generated clip looped) in a fresh process, beside that process's RSS once
the model is built.

    python -m scripts.bench.tracking                     # full-size model (random weights), 60 s video
    python -m scripts.bench.tracking --tiny --out t.json # 32-wide one-layer model, 12 s video (CI)
    python -m scripts.bench.tracking --tiny --rss_minutes 2 8 32  # the tiny model on long videos

Prints one summary line and, with --out, writes the measurements as JSON."""

import argparse
import multiprocessing
import os
import resource
import tempfile
from pathlib import Path

import av
import torch

from dataset.io import get_video_and_audio
from dataset.synthetic import ClipSpec, make_clip
from model.tracking import WindowPredictor, predict_track
from scripts.bench.common import timed
from utils.cli import run_cli
from utils.config import untrained_config
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json


def looped(src: Path, dst: Path, times: int) -> None:
    """`src` played `times` times in a row, its packets copied with shifted timestamps: an hour-long video
    in seconds, without rendering it."""
    with av.open(str(dst), "w") as out:
        for i in range(times):
            with av.open(str(src)) as inp:
                streams = (inp.streams.video[0], inp.streams.audio[0])
                if i == 0:
                    outs = [out.add_stream_from_template(s) for s in streams]
                    spans = [round(inp.duration / 1e6 / s.time_base) for s in streams]  # one play, in ticks
                for packet in inp.demux(*streams):
                    if packet.dts is None or (i and packet.pts < 0):  # the end marker; the audio priming
                        continue
                    j = streams.index(packet.stream)
                    packet.pts, packet.dts = packet.pts + i * spans[j], packet.dts + i * spans[j]
                    packet.stream = outs[j]
                    out.mux(packet)


def peak_rss_mb(config: str, tiny: bool, path: Path, stride_sec: float, threads: int) -> tuple[float, float]:
    """`(RSS with the model built, peak RSS after tracking path)` in MB, of this (fresh) process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = untrained_config(config, tiny, tiny_inputs=False)
    predictor = WindowPredictor(instantiate_from_config(cfg.model), cfg)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    predict_track(predictor, path, path.parent, stride_sec)
    return built, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sync.yaml")
    parser.add_argument("--duration", type=float, help="video length in seconds (default: 60, 12 with --tiny)")
    parser.add_argument("--stride_sec", type=float, default=1.28, help="window step, as in predict_offsets")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="32-wide one-layer model, 12 s video (CI)")
    parser.add_argument("--rss_minutes", type=float, nargs="*", help="video lengths for peak RSS (2 8 32; --tiny: 0.2)")
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
        rss = []
        for minutes in (0.2,) if args.tiny and args.rss_minutes is None else args.rss_minutes or (2, 8, 32):
            long = Path(tmp) / f"{minutes:g}min.mp4"
            looped(path, long, round(minutes * 60 / duration))
            with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process: its own peak
                built, peak = pool.apply(peak_rss_mb, (args.config, args.tiny, long, args.stride_sec, args.threads))
            rss.append({"minutes": minutes, "model_built_mb": built, "peak_mb": peak})
    starts = predictor.window_starts(item, args.stride_sec)
    windows = [predictor.pipeline.window_segments(item, s) for s in starts]
    distinct = list(dict.fromkeys(k for w in windows for k in w))

    cpu = torch.device("cpu")
    pass_s, _ = timed(lambda: predictor.features(item, distinct), cpu)
    reuse_s, shared = timed(lambda: predictor.predict(item, windows), cpu)
    per_window_s, alone = timed(lambda: torch.cat([predictor.predict(item, [w]) for w in windows]), cpu)
    max_diff = (shared - alone).abs().max().item()
    load = os.getloadavg()
    peaks = ", ".join(f"{r['minutes']:g} min: {r['peak_mb']:.0f} MB" for r in rss)
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
        "peak_rss": rss,
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average": load,
    }
    print(f"bench.tracking ({args.config}{' tiny' if args.tiny else ''}, {duration:g} s video, {len(windows)} windows, "
          f"{len(distinct)} distinct segments, load {load[0]:.2f}): one extractor pass {pass_s:.2f} s, "
          f"tracking with reuse {reuse_s:.2f} s ({reuse_s / pass_s:.2f}x), per-window {per_window_s:.2f} s "
          f"({per_window_s / pass_s:.2f}x), max logit diff {max_diff:.1e}; peak RSS of tracking "
          f"{peaks} (model built: {rss[0]['model_built_mb']:.0f} MB)")  # fmt: skip
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    run_cli(main)
