"""DeSync: how far out of sync generated audio is from its video, as measured by Synchformer.

    python scripts/desync.py VIDEO_DIR [--audio_dir AUDIO_DIR] [--out results.csv]

For every video, Synchformer (by default the AudioSet model 24-01-04T16-39-21, as video-to-audio papers
use) predicts the offset of the first 4.8 s and of the last 4.8 s (14 segments of 0.64 s with 50%
overlap each); a video's DeSync is the mean absolute predicted offset of the two, and the score is the
mean over videos. The audio comes from the video file itself, or from `AUDIO_DIR/<video stem>.*` (wav,
flac, mp3, m4a, ...) when given, resampled to 16 kHz mono.
"""

import argparse
import logging
from pathlib import Path

import av
import numpy as np
import torch
from tqdm import tqdm

from dataset.io import BadVideoError, decode_video
from scripts.predict_offsets import VIDEO_SUFFIXES, load_for_model
from utils.cli import UserError, run_cli
from utils.inference import WindowPredictor, add_model_args, load_model_from_args, offset_grid
from utils.utils import reuse_freed_memory, write_csv

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".mp4", ".mkv", ".webm"}


def read_audio(path: Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform (Ta,) of any audio file, resampled with PyAV to `sample_rate`."""
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise BadVideoError(path, "has no audio stream")
            chunks = [f.to_ndarray()[0] for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    except av.FFmpegError as e:
        raise BadVideoError(path, f"cannot be decoded as audio: {e}") from e
    chunks += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return torch.from_numpy(np.concatenate(chunks).astype(np.float32))


def first_and_last_windows(n_frames: int, n_samples: int, cfg) -> list[list[tuple[int, int]]]:
    """Segment keys (first frame, first sample) of the first and the last `n_segments` segments."""
    seg_v, step_v = cfg.data.segment_size_vframes, int(cfg.data.segment_size_vframes * cfg.data.step_size_seg)
    span_v = seg_v + step_v * (cfg.data.n_segments - 1)  # 120 frames = 4.8 s
    samples_per_frame = cfg.data.afps / cfg.data.vfps
    last_start = min(n_frames, int(n_samples / samples_per_frame)) - span_v
    if last_start < 0:
        raise ValueError(f"shorter than {span_v / cfg.data.vfps:.2f} s")
    return [
        [(s + j * step_v, round((s + j * step_v) * samples_per_frame)) for j in range(cfg.data.n_segments)]
        for s in (0, last_start)
    ]


def desync_of(predictor: WindowPredictor, video: Path, audio_file: Path | None, work_dir: Path) -> dict:
    cfg = predictor.cfg
    if audio_file is None:
        rgb, audio, meta = load_for_model(video, cfg, work_dir)
    else:  # generated videos may have no audio track: read the frames alone
        rgb, fps = decode_video(video)
        if round(fps, 3) != cfg.data.vfps or min(rgb.shape[-2:]) != cfg.data.size_before_crop:
            raise BadVideoError(
                video,
                f"is {fps:g} fps, {tuple(rgb.shape[-2:])} px",
                f"re-encode it to {cfg.data.vfps} fps with {cfg.data.size_before_crop} px on the short side",
            )
        audio = read_audio(audio_file, cfg.data.afps)
        meta = {"video": {"fps": [fps]}, "audio": {"framerate": [cfg.data.afps]}}
    item = predictor.pipeline.prepare(rgb, audio, meta, str(video))
    try:
        windows = first_and_last_windows(item["video"].shape[0], item["audio"].shape[0], cfg)
    except ValueError as e:
        raise BadVideoError(video, str(e)) from e
    logits = predictor.predict(item, windows)
    grid = offset_grid(cfg, logits.shape[-1])
    first, last = (float(grid[k]) for k in logits.argmax(-1))
    desync = (abs(first) + abs(last)) / 2
    return {"video": video.name, "offset_first_sec": first, "offset_last_sec": last, "desync": desync}


def main(args) -> int:
    reuse_freed_memory()
    videos = sorted(p for p in Path(args.video_dir).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    audio_files = {}
    if args.audio_dir is not None:
        audio_files = {p.stem: p for p in Path(args.audio_dir).iterdir() if p.suffix.lower() in AUDIO_SUFFIXES}
        missing = [v.name for v in videos if v.stem not in audio_files]
        if missing:
            logging.warning(f"{len(missing)} videos have no audio file in {args.audio_dir}, e.g. {missing[:3]}")
            videos = [v for v in videos if v.stem in audio_files]
    if not videos:
        raise UserError(f"No videos to score in {args.video_dir}: no {', '.join(sorted(VIDEO_SUFFIXES))} files.")
    model, cfg = load_model_from_args(args)
    predictor = WindowPredictor(model, cfg)
    rows = []
    for video in tqdm(videos, desc="DeSync"):
        try:
            rows.append(desync_of(predictor, video, audio_files.get(video.stem), Path(args.work_dir)))
        except BadVideoError as e:
            logging.error(f"Skipping: {e}")
    if not rows:
        raise SystemExit("No video could be scored.")
    write_csv(args.out, rows)
    score = sum(r["desync"] for r in rows) / len(rows)
    print(f"DeSync: {score:.4f} s over {len(rows)} videos ({len(videos) - len(rows)} skipped); per video: {args.out}")
    return 0


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video_dir", help="A folder of videos")
    parser.add_argument("--audio_dir", help="A folder of generated audio files named like the videos")
    parser.add_argument("--out", default="desync.csv", help="Per-video results")
    parser.add_argument("--work_dir", default="./vis", help="Where re-encoded videos go")
    add_model_args(parser, default_exp="24-01-04T16-39-21")
    return parser


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_cli(lambda: main(get_parser().parse_args()))
