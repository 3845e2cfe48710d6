"""Videos/s of feature caches (`scripts/extract_features.py`: visual only, and visual with audio) against DeSync
(`scripts/desync.py`, av-benchmark's protocol) on the same videos in the same run: the same decoding, the
same DataLoader workers and batch size, each command's model loading included.

    python -m scripts.bench.features [--n_videos 4] [--precision fp32] [--clips_dir DIR] [--out b.json]
    python -m scripts.bench.features --tiny      # 1-layer, 32-wide extractors (CI)

Weights are random: speed does not depend on them."""

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

from scripts import desync, extract_features
from scripts.bench.common import clips_or_generated, cpu_description
from utils.checkpoint import save_checkpoint
from utils.cli import run_cli
from utils.config import untrained_config
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json

REPO = Path(__file__).resolve().parents[2]


def seconds_of(command, argv: list[str]) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # this bench prints one line
        command.main(command.get_parser().parse_args(argv))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = get_parser().parse_args(argv)
    reuse_freed_memory()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench_features_"))
    videos = root / "videos"
    videos.mkdir()
    clips = clips_or_generated(Path(args.clips_dir) if args.clips_dir else None, args.n_videos, videos)
    for clip in clips if args.clips_dir else []:  # one folder of just these
        (videos / clip.name).symlink_to(clip.resolve())
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=args.tiny, tiny_inputs=False)
    ckpt = root / "model.pt"
    save_checkpoint({"model": instantiate_from_config(cfg.model).state_dict(), "args": cfg}, ckpt)
    common = ["--ckpt_path", str(ckpt), "--device", "cpu", "--precision", args.precision]
    common += ["--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers)]
    common += ["--duration", args.duration]
    runs = {
        "desync": (desync, [str(videos), "--out", str(root / "desync.json"), *common]),
        "features_visual": (extract_features, [str(videos), "--out", str(root / "visual"), *common]),
        "features_visual_audio": (extract_features, [str(videos), "--out", str(root / "both"), "--audio", *common]),
    }
    result = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "n_videos": len(clips), "tiny": args.tiny}
    result["precision"] = args.precision
    for name, (command, command_argv) in runs.items():
        result[name] = {"videos_per_sec": len(clips) / seconds_of(command, command_argv)}
    for name in ("features_visual", "features_visual_audio"):
        result[name]["vs_desync"] = result[name]["videos_per_sec"] / result["desync"]["videos_per_sec"]
    visual, both = result["features_visual"]["vs_desync"], result["features_visual_audio"]["vs_desync"]
    print(
        f"bench.features ({'tiny' if args.tiny else 'full'}, {len(clips)} videos, {args.precision}, {result['cpu']}): "
        f"DeSync {result['desync']['videos_per_sec']:.3g} videos/s; features visual {visual:.2f}x, "
        f"visual+audio {both:.2f}x"
    )
    if args.out:
        write_json(args.out, result)
    return result


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_videos", type=int, default=4)
    parser.add_argument("--clips_dir", help="Videos to time (default: generated 10 s clips)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--duration", default="8", help="Seconds of each video (DeSync needs 4.8 or more)")
    parser.add_argument("--batch_size", type=int, default=1, help="Videos per round of both commands")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="1-layer, 32-wide extractors (a smoke run)")
    parser.add_argument("--out", help="Write the numbers to this JSON file")
    return parser


if __name__ == "__main__":
    run_cli(lambda: main() and 0)
