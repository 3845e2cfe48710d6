"""DeSync: how far out of sync the audio of videos is, as Synchformer measures it (seconds, lower is better).

    python scripts/desync.py VIDEO_DIR [--audio_dir AUDIO_DIR] [--out results.json | results.csv]
    torchrun --nproc-per-node N scripts/desync.py VIDEO_DIR ...   # the videos are shared out over N processes

`--protocol av-benchmark` (the default) is the number video-to-audio papers report (MMAudio and later), as
`hkchengrex/av-benchmark` computes it with the AudioSet model 24-01-04T16-39-21 (see `dataset/avbench.py`):
the first 8 s of every video and its audio, 24 segments, and the windows 0-4.8 s and 3.2-8.0 s.
`--protocol synchformer` uses Synchformer's own test pipeline (the model config's transforms: 256 px,
centre crop 224) on the first and the last 4.8 s of the whole video.
Either way a video's DeSync is the mean |predicted offset| of its two windows, and the overall DeSync the
mean over all windows of all scored videos.

The audio is `AUDIO_DIR/<video stem>.<wav, flac, ...>` with `--audio_dir`, else the video's own track.
Pairs that cannot be scored are listed with their reasons, never replaced by another file; videos whose
names are the same up to case and extension (`x.mp4`, `x.MP4`) are all left out. With several processes
the results are gathered to rank 0, which alone writes. As each batch is scored it is logged in
`<out>.progress.jsonl` (see `utils/resumable.py`), so an interrupted run resumes; a rerun into the same
`--out` with another model, precision, protocol or audio is refused."""

import argparse
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import torch
from tqdm import tqdm

from dataset.avbench import (
    MEL,
    SEGMENT_FRAMES,
    SIZE,
    SPEC_FRAMES,
    STEP_FRAMES,
    DesyncInputs,
    Pair,
    collate,
    n_segments,
    normalise_frames,
    segments,
    window_slices,
    window_times,
)
from dataset.io import BadVideoError, decode_video
from dataset.segment_pipeline import load_for_model, n_frames
from model.tracking import WindowPredictor, offset_grid
from scripts.common import (
    VIDEO_SUFFIXES,
    add_model_args,
    find_pairs,
    load_model_from_args,
    model_provenance,
    results_log_on_rank0,
)
from utils import dist
from utils.cli import UserError, number, report_skipped, run_cli
from utils.precision import autocast
from utils.resumable import ResultLog, writing
from utils.utils import reuse_freed_memory, write_csv, write_json

WINDOW_NAMES = ("first", "last")


def video_record(name: str, times: list[tuple[float, float]], logits: torch.Tensor, grid: torch.Tensor) -> dict:
    """A scored video: each window's time span, offset (the class of the argmax), its probability and all
    class probabilities; the video's DeSync is the mean |offset| of its windows."""
    probs = torch.softmax(logits.float(), dim=-1)  # (W, K)
    windows = [
        {"start_sec": s, "end_sec": e, "offset_sec": float(grid[k]), "prob": float(p[k]), "probs": p.tolist()}
        for (s, e), p, k in zip(times, probs, probs.argmax(-1).tolist())
    ]
    return {"video": name, "desync": sum(abs(w["offset_sec"]) for w in windows) / len(windows), "windows": windows}


class AVBenchScorer:
    """av-benchmark's protocol: decoding and preprocessing in DataLoader workers, `batch_size` videos per
    model call, each of the 24 segments computed once for both windows."""

    def __init__(self, model, precision: str, duration_sec: float, batch_size: int, num_workers: int):
        shapes = (tuple(model.vfeat_extractor.segment_shape), tuple(model.afeat_extractor.segment_shape))
        if shapes != ((3, SEGMENT_FRAMES, SIZE, SIZE), (SPEC_FRAMES, MEL["n_mels"])):
            raise UserError(
                f"--protocol av-benchmark feeds 16-frame 224 px segments and 128x66 spectrograms, but this model takes "
                f"(C, T, H, W) {shapes[0]} and (T, F) {shapes[1]}: use --protocol synchformer for it"
            )
        self.model, self.precision, self.device = model, precision, next(model.parameters()).device
        self.duration_sec, self.batch_size, self.num_workers = duration_sec, batch_size, num_workers

    @torch.inference_mode()
    def logits(self, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, 224, 224) uint8, audio (B, S, 1, 128, 66) -> logits (B, 2 windows, K)."""
        # (B, S, 16, 3, 224, 224)
        vis = segments(normalise_frames(frames.to(self.device)), SEGMENT_FRAMES, STEP_FRAMES, dim=1)
        with autocast(self.precision, self.device):
            vfeat = self.model.extract_vfeats(vis)  # (B, S, tv, D)
            afeat = self.model.extract_afeats(audio.to(self.device))  # (B, S, ta, D)
            # each stream's first and last 14 segments, as av-benchmark slices them
            windows = zip(window_slices(vfeat.shape[1]), window_slices(afeat.shape[1]))
            return torch.stack([self.model.compare_v_a(vfeat[:, v], afeat[:, a]) for v, a in windows], 1).float()

    def __call__(self, pairs: list[Pair]) -> Iterator[tuple[list[dict], list[tuple[str, str]]]]:
        inputs = DesyncInputs(pairs, self.duration_sec)
        loader = torch.utils.data.DataLoader(inputs, self.batch_size, num_workers=self.num_workers, collate_fn=collate)
        for batch in loader:
            records = []
            if batch["names"]:
                logits = self.logits(batch["frames"], batch["audio"]).cpu()  # (B, 2, K)
                times = window_times(n_segments(batch["frames"].shape[1], SEGMENT_FRAMES, STEP_FRAMES))
                grid = offset_grid(self.model.cfg, logits.shape[-1])
                records = [video_record(n, times, lg, grid) for n, lg in zip(batch["names"], logits)]
            yield records, batch["skipped"]


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


class SynchformerScorer:
    """Synchformer's own test pipeline on the first and the last window of each whole video, one video at
    a time. Separate audio is resampled to the model's rate; such a video must be at the model's fps and size
    (with its own audio track it is re-encoded when needed)."""

    def __init__(self, model, precision: str, work_dir: Path):
        self.predictor = WindowPredictor(model, model.cfg, precision)
        self.work_dir = work_dir

    def score(self, pair: Pair) -> dict:
        cfg = self.predictor.cfg
        if pair.audio is None:
            item = load_for_model(pair.video, cfg, self.work_dir, self.predictor.pipeline)
        else:  # generated videos may have no audio track: read the frames alone
            rgb, fps = decode_video(pair.video)
            if round(fps, 3) != cfg.data.vfps or min(rgb.shape[-2:]) != cfg.data.size_before_crop:
                raise BadVideoError(
                    pair.video,
                    f"is {fps:g} fps, {tuple(rgb.shape[-2:])} px",
                    f"re-encode it to {cfg.data.vfps} fps with {cfg.data.size_before_crop} px on the short side, "
                    "or use --protocol av-benchmark, which takes any frame rate and size",
                )
            audio = read_audio(pair.audio, cfg.data.afps)
            meta = {"video": {"fps": [fps]}, "audio": {"framerate": [cfg.data.afps]}}
            item = self.predictor.pipeline.prepare(rgb, audio, meta, str(pair.video))
        try:
            windows = first_and_last_windows(n_frames(item), item["audio"].shape[0], cfg)
        except ValueError as e:
            raise BadVideoError(pair.video, str(e)) from e
        logits = self.predictor.predict(item, windows)
        seg_v, fps = cfg.data.segment_size_vframes, cfg.data.vfps
        times = [(w[0][0] / fps, (w[-1][0] + seg_v) / fps) for w in windows]  # the frames its segments cover
        return video_record(pair.name, times, logits, offset_grid(cfg, logits.shape[-1]))

    def __call__(self, pairs: list[Pair]) -> Iterator[tuple[list[dict], list[tuple[str, str]]]]:
        for pair in pairs:
            try:
                yield [self.score(pair)], []
            except BadVideoError as e:
                yield [], [(pair.name, str(e))]


def write_results(out: Path, log: ResultLog, unpaired: list[tuple[str, str]]) -> int:
    """Writes `out` (atomically) from the log of scored and skipped videos; prints the summary and returns the
    exit status."""
    scored = {name: r for name, r in log.records.items() if "skip" not in r}
    skipped = {name: r["skip"] for name, r in log.records.items() if "skip" in r} | dict(unpaired)
    videos = [scored[name] for name in sorted(scored)]
    skipped_list = [{"video": name, "reason": skipped[name]} for name in sorted(skipped)]
    with writing(out, "--out"):
        if out.suffix == ".json":
            write_json(out, {**log.provenance, **summary(videos), "videos": videos, "skipped": skipped_list})
        else:
            write_csv(out, [_row(v) for v in videos] + [_row({"video": s["video"]}, s["reason"]) for s in skipped_list])
    s = summary(videos)
    if s["n_scored"]:
        print(
            f"DeSync: {s['desync']:.4f} s over {s['n_scored']} videos ({s['n_windows']} windows), {len(skipped)} "
            f"skipped; protocol {log.provenance['protocol']}, precision {log.provenance['precision']}; results: {out}"
        )
    return report_skipped(sorted(skipped.items()), s["n_scored"])


def summary(videos: list[dict]) -> dict:
    n_windows = sum(len(v["windows"]) for v in videos)
    desync = sum(abs(w["offset_sec"]) for v in videos for w in v["windows"]) / max(n_windows, 1)
    return {"desync": desync if videos else None, "n_scored": len(videos), "n_windows": n_windows}


WINDOW_KEYS = ("start_sec", "end_sec", "offset_sec", "prob")


def _row(record: dict, reason: str = "") -> dict:
    """A CSV row: the video, its DeSync and each window's span, offset and probability (or why it was skipped)."""
    windows = record.get("windows", [{}] * len(WINDOW_NAMES))
    cells = {f"{name}_{key}": w.get(key, "") for name, w in zip(WINDOW_NAMES, windows) for key in WINDOW_KEYS}
    return {"video": record["video"], "desync": record.get("desync", ""), **cells, "skipped_reason": reason}


def main(args) -> int:
    reuse_freed_memory()
    device = args.device or ("cpu" if args.precision == "int8" else None)
    env = dist.init_distributed(device=device, timeout_min=args.dist_timeout_min)
    args.device = str(env.device)
    out = Path(args.out)
    if out.suffix not in (".json", ".csv") or out.is_dir():
        raise UserError(f"--out {out}: give a .json or a .csv file")
    pairs, unpaired = find_pairs(Path(args.video_dir), Path(args.audio_dir) if args.audio_dir else None)
    if not pairs and not unpaired:
        raise UserError(f"{args.video_dir}: no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) to score")
    model, cfg = load_model_from_args(args)
    audio = str(Path(args.audio_dir).resolve()) if args.audio_dir else "the videos' own"
    duration = {"duration_sec": args.duration} if args.protocol == "av-benchmark" else {}

    def provenance() -> dict:  # on rank 0 only: it hashes the checkpoint
        return {"protocol": args.protocol, **model_provenance(args), "audio": audio, **duration}

    log, done = results_log_on_rank0(env.is_main, lambda: Path(f"{out}.progress.jsonl"), provenance)
    todo = [p for p in pairs if p.name not in done]
    if args.protocol == "av-benchmark":
        per_call = args.batch_size or (8 if env.device.type == "cuda" else 1)
        scorer = AVBenchScorer(model, args.precision, args.duration, per_call, args.num_workers)
    else:
        per_call, scorer = 1, SynchformerScorer(model, args.precision, Path(args.work_dir))
    if done:
        logging.info(f"Resuming: {len(done)} videos already scored in {out}, {len(todo)} to go")
    batches = scorer(todo[env.rank :: env.world_size])
    with tqdm(total=len(todo), desc=f"DeSync ({args.protocol})", unit="video", disable=not env.is_main) as bar:
        # every rank takes part in every round (with nothing once its share is done); rank 0 logs them all
        for _ in range(math.ceil(len(todo) / (env.world_size * per_call))):
            for records, skipped in dist.all_gather_objects(next(batches, ([], []))):
                bar.update(len(records) + len(skipped))
                for record in records if env.is_main else []:
                    log.append(record["video"], record)
                for name, reason in skipped if env.is_main else []:
                    logging.warning(f"Skipping {name}: {reason}")
                    log.append(name, {"video": name, "skip": reason})
    code = write_results(out, log, unpaired) if env.is_main else 0
    dist.cleanup()
    return code


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video_dir", help="A folder of videos")
    parser.add_argument("--audio_dir", help="A folder of audio files named like the videos (else their own audio)")
    parser.add_argument("--out", default="desync.json", help="Results: .json (everything) or .csv (a row per video)")
    parser.add_argument("--protocol", choices=("av-benchmark", "synchformer"), default="av-benchmark")
    parser.add_argument(
        "--duration", type=number(float, 0, above=True), default=8.0, help="av-benchmark: seconds of each video scored"
    )
    parser.add_argument(
        "--batch_size", type=number(int, 1), help="av-benchmark: videos per model call (1 on CPU, 8 on GPU)"
    )
    parser.add_argument("--num_workers", type=number(int, 0), default=2, help="av-benchmark: decoding processes")
    parser.add_argument("--work_dir", default="./vis", help="synchformer: where re-encoded videos go")
    parser.add_argument(
        "--dist_timeout_min", type=number(float, 0, above=True), default=10, help="How long ranks wait for each other"
    )
    add_model_args(parser, default_exp="24-01-04T16-39-21")
    return parser


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_cli(lambda: main(get_parser().parse_args()))
