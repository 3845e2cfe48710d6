"""Tracks the audio-visual offset over a video of any length (or every video in a folder).

    python scripts/predict_offsets.py VIDEO_OR_DIR --exp_name 24-01-04T16-39-21 [--stride_sec 1.28] [--out_dir DIR]

A window of the model's clip length (5 s) slides over the video; every window gets the predicted offset,
its probability and the entropy of the class distribution. Each segment's features are computed once
and shared by all windows that contain it (strides that are multiples of 0.32 s share everything).
Per video it writes `<stem>.csv` (one row per window), `<stem>.json` (the overall offset: the class with
the highest summed probability over windows, and a drift flag when the first and the second half of
the video disagree by two classes or more) and `<stem>.png` (offset over time). A folder run skips
videos whose JSON exists, so an interrupted run resumes, and writes `summary.csv`."""

import argparse
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from dataset.io import BadVideoError, get_video_and_audio, probe_video, reencode_video
from utils.cli import UserError, report_skipped, run_cli
from utils.config import cfg_get
from utils.inference import WindowPredictor, add_model_args, entropy, load_model_from_args, offset_grid
from utils.utils import reuse_freed_memory, write_csv, write_json

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm"}


def load_for_model(path: Path, cfg, work_dir: Path):
    """Decoded (rgb, audio, meta) at the model's fps / sample rate / size, re-encoding when needed; the
    audio decoded as the model was trained (`data.audio_priming_compat`, default True as published)."""
    info = probe_video(path)
    vfps, afps, size = cfg.data.vfps, cfg.data.afps, cfg.data.size_before_crop
    if (info["fps"], info["sample_rate"], min(info["height"], info["width"])) != (vfps, afps, size):
        logging.info(f"Re-encoding {path} to {vfps} fps, {afps} Hz, {size} px")
        path = reencode_video(path, vfps, afps, size, out_dir=work_dir)
    return get_video_and_audio(path, get_meta=True, audio_priming_compat=cfg_get(cfg, "data.audio_priming_compat"))


def summarise(starts: list[float], probs: torch.Tensor, grid: torch.Tensor) -> dict:
    """Overall offset (confidence-weighted mode), its share of the probability mass, and drift."""
    step = float(grid[1] - grid[0])
    overall = int(probs.sum(0).argmax())
    half = len(starts) // 2
    first, second = (int(p.sum(0).argmax()) for p in (probs[: max(half, 1)], probs[half:]))
    drift = abs(float(grid[second] - grid[first]))
    return {
        "n_windows": len(starts),
        "offset_sec": float(grid[overall]),
        "confidence": float(probs.sum(0)[overall] / len(starts)),
        "offset_first_half_sec": float(grid[first]),
        "offset_second_half_sec": float(grid[second]),
        "drift": drift >= 2 * step - 1e-6,
    }


def plot_track(rows: list[dict], summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    t = [r["start_sec"] for r in rows]
    sc = ax.scatter(t, [r["offset_sec"] for r in rows], c=[r["prob"] for r in rows], cmap="viridis", vmin=0, vmax=1)
    ax.axhline(summary["offset_sec"], color="tab:red", lw=1, label=f"overall {summary['offset_sec']:+.2f} s")
    ax.set(xlabel="window start (s)", ylabel="predicted offset (s)", title=title, ylim=(-2.2, 2.2))
    fig.colorbar(sc, ax=ax, label="probability")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def predict_track(
    predictor: WindowPredictor, path: Path, work_dir: Path, stride_sec: float, offset_sec: float = 0.0,
    progress: bool = False,
) -> tuple[list[dict], dict]:  # fmt: skip
    """`(one row per window, the summary)` of the windows every `stride_sec` over the video, with the
    audio shifted earlier by `offset_sec` first; `work_dir` takes re-encoded copies."""
    rgb, audio, meta = load_for_model(path, predictor.cfg, work_dir)
    item = predictor.pipeline.prepare(rgb, audio, meta, str(path))
    starts = predictor.window_starts(item, stride_sec)
    if not starts:
        crop = predictor.cfg.data.crop_len_sec
        raise BadVideoError(path, f"shorter than one {crop} s window", f"the model needs a video of at least {crop} s")
    windows = [predictor.pipeline.window_segments(item, s, offset_sec) for s in starts]
    logits = predictor.predict(item, windows, progress=progress)
    grid = offset_grid(predictor.cfg, logits.shape[-1])
    probs = torch.softmax(logits, -1)
    top = probs.argmax(-1)
    rows = [
        {
            "start_sec": round(s, 3),
            "end_sec": round(s + predictor.cfg.data.crop_len_sec, 3),
            "offset_sec": round(float(grid[k]), 2),
            "class": int(k),
            "prob": round(float(p[k]), 4),
            "entropy": round(float(h), 4),
        }
        for s, k, p, h in zip(starts, top, probs, entropy(probs))
    ]
    return rows, {"video": str(path), "precision": predictor.precision, **summarise(starts, probs, grid)}


def track_video(predictor: WindowPredictor, path: Path, args) -> dict:
    rows, summary = predict_track(predictor, path, args.out_dir / "reencoded", args.stride_sec, args.offset_sec,
                                  args.progress)  # fmt: skip
    stem = args.out_dir / path.stem
    write_csv(f"{stem}.csv", rows)
    plot_track(rows, summary, Path(f"{stem}.png"), path.name)
    write_json(f"{stem}.json", {**summary, "windows": rows})
    return summary


def main(args) -> int:
    reuse_freed_memory()
    args.out_dir = Path(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(args.input)
    is_folder = src.is_dir()
    videos = sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES) if is_folder else [src]
    if not videos:
        raise UserError(f"No videos in {src}: it holds no {', '.join(sorted(VIDEO_SUFFIXES))} files.")
    model, cfg = load_model_from_args(args)
    predictor = WindowPredictor(model, cfg, args.precision, args.batch_segments, args.batch_windows)
    summaries, skipped = [], []
    for path in tqdm(videos, desc="videos", disable=not is_folder):
        done = args.out_dir / f"{path.stem}.json"
        if done.is_file():  # resume: this video was finished in an earlier run
            summaries.append({k: v for k, v in json.loads(done.read_text()).items() if k != "windows"})
            continue
        try:
            summaries.append(track_video(predictor, path, args))
        except BadVideoError as e:
            if not is_folder:
                raise
            logging.error(f"Skipping {e}")
            skipped.append((path.name, str(e).removeprefix(f"{path}: ")))
            continue
        s = summaries[-1]
        drift = " (DRIFT: the two halves disagree)" if s["drift"] else ""
        confidence = f"confidence {s['confidence']:.3f} ({s['precision']})"
        print(f"{path.name}: offset {s['offset_sec']:+.2f} s, {confidence}{drift}")
    if summaries:
        write_csv(args.out_dir / "summary.csv", summaries)
    print(f"{len(summaries)} videos done, {len(skipped)} skipped; segments computed: {predictor.segments_computed}")
    return report_skipped(skipped, len(summaries))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="A video or a folder of videos")
    parser.add_argument("--offset_sec", type=float, default=0.0, help="Shift the audio earlier by this much first")
    parser.add_argument("--out_dir", default="./offsets", help="Where CSV/JSON/PNG results go")
    add_tracking_args(parser)
    return parser


def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    """The sliding windows' and the model's arguments (shared with resync.py)."""
    parser.add_argument("--stride_sec", type=float, default=1.28, help="Window step; multiples of 0.32 s share work")
    parser.add_argument("--batch_segments", type=int, default=14, help="Segments per feature-extractor call")
    parser.add_argument("--batch_windows", type=int, default=32, help="Windows per head call")
    parser.add_argument("--progress", action="store_true", help="Show a progress bar over segment batches")
    add_model_args(parser, default_exp="24-01-04T16-39-21")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_cli(lambda: main(get_parser().parse_args()))
