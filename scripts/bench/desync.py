"""Videos/s of DeSync (av-benchmark's protocol): the folder path of `scripts/desync.py` (DataLoader workers,
batched model calls, 24 shared segments per 8 s video) at each precision, against the one-video-at-a-time
path (decoding in the main process, each 4.8 s window a forward of its own: 28 segments), on the same
videos in the same run, with the agreement of their outputs.

    python -m scripts.bench.desync [--precisions fp32 bf16 int8] [--n_videos 4] [--torchrun] [--features]
    python -m scripts.bench.desync --tiny       # 1-layer, 32-wide extractors (CI)

`--torchrun` also times whole `scripts/desync.py` runs: 1 process with 2 threads against 2 torchrun
processes with 1 thread each. `--features` also times `scripts/extract_features.py` (visual only, and with
audio) at each precision against the folder path: the same decoding, workers and batch size, model loading
included in both. Weights are random: speed does not depend on them."""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dataset.avbench import SEGMENT_FRAMES, STEP_FRAMES, DesyncInputs, Pair, normalise_frames, segments, window_slices
from dataset.synthetic import ClipSpec, make_clip
from model.pretrained import load_model
from scripts import desync, extract_features
from scripts.bench.common import cpu_description
from utils.checkpoint import save_checkpoint
from utils.cli import run_cli
from utils.config import untrained_config
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json

REPO = Path(__file__).resolve().parents[2]


@torch.inference_mode()
def one_video_at_a_time(model, pairs: list[Pair]) -> tuple[float, torch.Tensor]:
    """(seconds, probabilities (N, 2, K)) of the plain path: each window of each video on its own."""
    inputs, probs = DesyncInputs(pairs), []
    start = time.perf_counter()
    for i in range(len(inputs)):
        item = inputs[i]
        vis = segments(normalise_frames(item["frames"]), SEGMENT_FRAMES, STEP_FRAMES)[None]  # (1, S, 16, 3, H, W)
        aud = item["audio"][None]  # (1, S, 1, 128, 66)
        windows = window_slices(vis.shape[1])
        probs.append(torch.cat([model(vis[:, w], aud[:, w])[1].softmax(-1) for w in windows]))  # (2, K)
    return time.perf_counter() - start, torch.stack(probs)


def folder_argv(args, ckpt: Path, videos: Path, precision: str, out: Path) -> list[str]:
    argv = [str(videos), "--ckpt_path", str(ckpt), "--out", str(out), "--device", "cpu", "--precision", precision]
    return argv + ["--num_workers", str(args.num_workers), "--batch_size", str(args.batch_size)]


def seconds_of(command, argv: list[str]) -> float:
    """Seconds of a command's `main` on `argv`, quietly (this bench prints one line)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        command.main(command.get_parser().parse_args(argv))
    return time.perf_counter() - start


def folder_path(args, ckpt: Path, videos: Path, precision: str, out: Path) -> tuple[float, torch.Tensor]:
    """(seconds, probabilities (N, 2, K)) of `scripts/desync.py` on the folder, its model loading included."""
    seconds = seconds_of(desync, folder_argv(args, ckpt, videos, precision, out))
    videos_out = json.loads(out.read_text())["videos"]
    return seconds, torch.tensor([[w["probs"] for w in v["windows"]] for v in videos_out])


def whole_process(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = get_parser().parse_args(argv)
    reuse_freed_memory()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench_desync_"))
    videos = root / "videos"
    videos.mkdir()
    for i in range(args.n_videos):  # 8.5 s synthetic clips with their audio
        make_clip(videos / f"clip{i}.mp4", ClipSpec(duration_sec=8.5, seed=100 + i))
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=args.tiny, tiny_inputs=False)
    ckpt = root / "model.pt"
    save_checkpoint({"model": instantiate_from_config(cfg.model).state_dict(), "args": cfg}, ckpt)
    model, _ = load_model(ckpt_path=ckpt)
    pairs = [Pair(v.name, v) for v in sorted(videos.glob("*.mp4"))]
    base_sec, base_probs = one_video_at_a_time(model, pairs)
    result = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "n_videos": len(pairs), "tiny": args.tiny}
    result["one_video_at_a_time_fp32"] = {"videos_per_sec": len(pairs) / base_sec}
    for precision in args.precisions:
        seconds, probs = folder_path(args, ckpt, videos, precision, root / f"{precision}.json")
        result[f"folder_{precision}"] = {
            "videos_per_sec": len(pairs) / seconds,
            "speedup": base_sec / seconds,
            "max_prob_diff": float((probs - base_probs).abs().max()),
            "top1_agreement": float((probs.argmax(-1) == base_probs.argmax(-1)).float().mean()),
        }
        for name, extra in (("visual", []), ("visual_audio", ["--audio"])) if args.features else ():
            argv = folder_argv(args, ckpt, videos, precision, root / f"features_{name}_{precision}") + extra
            result[f"folder_{precision}"][f"features_{name}_vs_desync"] = seconds / seconds_of(extract_features, argv)
    if args.torchrun:
        script = [str(REPO / "scripts" / "desync.py"), str(videos), "--ckpt_path", str(ckpt)]
        script += ["--device", "cpu", "--num_workers", "0"]
        one = whole_process([sys.executable, *script, "--out", str(root / "p1.json")], threads=2)
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        two = whole_process([*run, *script, "--out", str(root / "p2.json")], threads=1)
        same = json.loads((root / "p1.json").read_text()) == json.loads((root / "p2.json").read_text())
        result["torchrun"] = {"one_process_2_threads_sec": one, "two_processes_1_thread_sec": two, "same_json": same}
    folder = ", ".join(f"{p} {result[f'folder_{p}']['speedup']:.2f}x" for p in args.precisions)
    features = ", ".join(
        f"{p} visual {r['features_visual_vs_desync']:.2f}x, +audio {r['features_visual_audio_vs_desync']:.2f}x"
        for p, r in ((p, result[f"folder_{p}"]) for p in args.precisions if args.features)
    )
    print(
        f"bench.desync ({'tiny' if args.tiny else 'full'}, {len(pairs)} videos, {result['cpu']}): one at a time "
        f"{result['one_video_at_a_time_fp32']['videos_per_sec']:.3g} videos/s; folder path {folder}"
        + (f"; torchrun 2x1 / 1x2 threads {two / one:.2f}" if args.torchrun else "")
        + (f"; feature caches against the folder path: {features}" if args.features else "")
    )
    if args.out:
        write_json(args.out, result)
    return result


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--n_videos", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="1-layer, 32-wide extractors (a smoke run)")
    parser.add_argument("--torchrun", action="store_true", help="also 2 torchrun processes against 1")
    parser.add_argument("--features", action="store_true", help="also scripts/extract_features.py at each precision")
    parser.add_argument("--out", help="Write the numbers to this JSON file")
    return parser


if __name__ == "__main__":
    run_cli(lambda: main() and 0)
