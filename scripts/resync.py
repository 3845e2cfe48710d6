"""Re-synchronises videos: predicts the audio-visual offset and writes a copy with the audio moved back.

    python scripts/resync.py VIDEO --out FIXED.mp4 [--offset_sec O] [--force] [--exp_name ... | --ckpt_path ...]
    python scripts/resync.py VIDEO_DIR --out_dir FIXED_DIR [--force]

The sign: an offset O, as the model predicts it (see example.py and model/tracking.py), is positive
when the audio runs ahead of the video, each sound O seconds before its picture. The correction delays
the audio by O: O seconds of silence go before it and its last O seconds are dropped (for O < 0 its
first |O| seconds are dropped and silence is added at its end), so both streams keep their duration.

1. Prediction: the 5 s windows of `predict_offsets.py` slide over the whole video; the offset is the
   class with the highest summed probability, its confidence that class's mean probability, and the
   video drifts when its two halves disagree by two classes or more. Low confidence
   (`--min_confidence`) or drift refuse the correction unless `--force`; `--offset_sec` skips the
   prediction and applies the given offset.
2. Correction: the video packets are copied unchanged (remuxed, byte-identical); the audio is decoded,
   shifted by whole samples and re-encoded as AAC at its own sample rate and channels (an offset of 0
   copies it too). The corrected copy is written under a temporary name and renamed.
3. Verification: the corrected copy is predicted again and the residual offset is printed.

A folder run writes `resync.csv` into `--out_dir` (video, offset, confidence, drift, action, residual)
next to the corrected copies, for cleaning a dataset; videos whose copy exists are skipped (resume)."""

import argparse
import csv
import logging
import tempfile
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from dataset.io import BadVideoError, add_audio_stream, audio_frame, decode_planar
from model.tracking import WindowPredictor, predict_track
from scripts.common import add_tracking_args, list_videos, load_model_from_args
from utils.cli import UserError, run_cli
from utils.utils import atomic_path, reuse_freed_memory, write_csv

AAC_FRAME = 1024  # samples per AAC frame
REPORT_FIELDS = ["video", "offset_sec", "confidence", "drift", "action", "residual_sec", "output"]


def shift_audio(wave: np.ndarray, delay: int) -> np.ndarray:
    """`wave` (C, Ta) delayed by `delay` samples (advanced when negative), zero-padded, of the same length."""
    shifted = np.zeros_like(wave)
    n = wave.shape[1]
    if delay >= 0:
        shifted[:, delay:] = wave[:, : max(0, n - delay)]
    else:
        shifted[:, : max(0, n + delay)] = wave[:, -delay:]
    return shifted


def write_resynced(src: Path, dst: Path, delay_sec: float) -> int:
    """Writes `src` to `dst` with the video packets copied and the audio delayed by `delay_sec` (advanced
    when negative); returns the delay in samples. Atomic: a temporary name, renamed when complete."""
    try:
        with av.open(str(src)) as container:
            if not (container.streams.video and container.streams.audio):
                raise BadVideoError(src, "needs a video and an audio stream")
            audio = container.streams.audio[0]
            sr, layout, bit_rate = audio.sample_rate, audio.layout.name, audio.bit_rate
            delay = round(delay_sec * sr)
            wave = None if delay == 0 else shift_audio(decode_planar(container.demux(audio), src), delay)  # (C, Ta)
        with atomic_path(dst) as tmp, av.open(str(src)) as container, av.open(str(tmp), "w") as out:
            video, audio = container.streams.video[0], container.streams.audio[0]
            streams = {video: out.add_stream_from_template(video)}
            if wave is None:  # nothing to shift: the audio packets are copied too
                streams[audio] = out.add_stream_from_template(audio)
            else:
                a_out = add_audio_stream(out, sr, layout, bit_rate)
            encoded = 0  # samples handed to the encoder, interleaved with the video by time
            for packet in container.demux(*streams):
                if not packet.size:  # the empty packet that ends a stream
                    continue
                t = packet.pts if packet.dts is None else packet.dts  # Matroska leaves the first dts unset
                while wave is not None and encoded < min(wave.shape[1], (t * packet.time_base + 1) * sr):
                    encoded = encode_chunk(out, a_out, wave, encoded)
                packet.stream = streams[packet.stream]
                out.mux(packet)
            while wave is not None and encoded < wave.shape[1]:
                encoded = encode_chunk(out, a_out, wave, encoded)
            if wave is not None:
                out.mux(a_out.encode())
    except av.FFmpegError as e:
        raise BadVideoError(src, f"cannot be remuxed: {e}", "check that the video is complete") from e
    return delay


def encode_chunk(out, stream, wave: np.ndarray, start: int) -> int:
    """Encodes one AAC frame of `wave` (C, Ta) from sample `start`; returns where the next one starts."""
    chunk = wave[:, start : start + AAC_FRAME]
    out.mux(stream.encode(audio_frame(chunk, stream.layout.name, stream.sample_rate, start)))
    return start + chunk.shape[1]


def refusal(summary: dict, min_confidence: float) -> str | None:
    """Why the predicted offset should not be applied, or None."""
    if summary["drift"]:
        first, second = summary["offset_first_half_sec"], summary["offset_second_half_sec"]
        return f"the offset drifts ({first:+.2f} s in the first half, {second:+.2f} s in the second)"
    if summary["confidence"] < min_confidence:
        return f"low confidence ({summary['confidence']:.3f} < --min_confidence {min_confidence})"
    return None


def predict(predictor: WindowPredictor, path: Path, args) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as work_dir:  # for a copy in the model's format, when needed
        return predict_track(predictor, path, Path(work_dir), args.stride_sec, progress=args.progress)


def resync_video(predictor: WindowPredictor, path: Path, out: Path, args) -> dict:
    """Predicts, corrects and verifies one video; returns its report row."""
    row = dict.fromkeys(REPORT_FIELDS, "") | {"video": str(path), "offset_sec": args.offset_sec}
    if args.offset_sec is None:
        _, summary = predict(predictor, path, args)
        row |= {k: summary[k] for k in ("offset_sec", "confidence", "drift")}
        print(f"{path.name}: offset {summary['offset_sec']:+.2f} s (positive: the audio is ahead), "
              f"confidence {summary['confidence']:.3f}{', drifts' if summary['drift'] else ''}")  # fmt: skip
        reason = refusal(summary, args.min_confidence)
        if reason is not None and not args.force:
            print(f"{path.name}: not corrected: {reason}. Pass --force to correct it anyway, or --offset_sec.")
            return row | {"action": f"refused: {reason}"}
    write_resynced(path, out, row["offset_sec"])
    row |= {"action": "corrected" if row["offset_sec"] else "in sync: copied", "output": str(out)}
    _, check = predict(predictor, out, args)
    row["residual_sec"] = check["offset_sec"]
    print(f"{out}: audio delayed by {row['offset_sec']:+.2f} s; residual offset {check['offset_sec']:+.2f} s "
          f"(confidence {check['confidence']:.3f})")  # fmt: skip
    return row


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    reuse_freed_memory()
    src = Path(args.input)
    if src.is_dir() == (args.out_dir is None) or (args.out is None) == (args.out_dir is None):
        raise UserError("Pass a video with --out FIXED.mp4, or a folder of videos with --out_dir DIR.")
    model, cfg = load_model_from_args(args)
    predictor = WindowPredictor(model, cfg, args.precision, args.batch_segments, args.batch_windows)
    if not src.is_dir():
        row = resync_video(predictor, src, Path(args.out), args)
        return 0 if row["output"] else 1

    out_dir = Path(args.out_dir)
    report = out_dir / "resync.csv"
    previous = {}
    if report.is_file():
        with open(report, newline="") as f:
            previous = {r["video"]: r for r in csv.DictReader(f)}
    rows = []
    for path in tqdm(list_videos(src), desc="videos"):
        out = out_dir / path.name
        if str(path) in previous and (out.is_file() or previous[str(path)]["action"].startswith("refused")):
            rows.append(previous[str(path)])  # done in an earlier run
            continue
        try:
            rows.append(resync_video(predictor, path, out, args))
        except BadVideoError as e:
            logging.error(f"Skipping {path}: {e}")
            rows.append(dict.fromkeys(REPORT_FIELDS, "") | {"video": str(path), "action": f"bad: {e}"})
        write_csv(report, rows, REPORT_FIELDS)  # after every video, so that an interrupted run resumes
    counts = {a: sum(r["action"].startswith(a) for r in rows) for a in ("corrected", "in sync", "refused", "bad")}
    print(", ".join(f"{n} {a}" for a, n in counts.items()) + f"; report: {report}")
    return 0 if rows and counts["bad"] < len(rows) else 1


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="A video, or a folder of videos")
    parser.add_argument("--out", help="The corrected copy of a video (e.g. FIXED.mp4)")
    parser.add_argument("--out_dir", help="Where the corrected copies of a folder's videos and resync.csv go")
    parser.add_argument(
        "--offset_sec", type=float, help="Apply this offset (positive: audio ahead) instead of predicting it"
    )
    parser.add_argument("--min_confidence", type=float, default=0.2, help="Refuse below this mean probability")
    parser.add_argument("--force", action="store_true", help="Correct even with low confidence or drift")
    add_tracking_args(parser)
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_parser().parse_args()))
