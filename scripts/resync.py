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
next to the corrected copies, for cleaning a dataset. Each finished video is logged in
`resync.progress.jsonl` (see `utils/resumable.py`), after its copy is complete: an interrupted run
resumes, redoing from the original any video whose row is missing, and a rerun with another model,
precision or setting is refused. `--out_dir` may not be the input folder, nor `--out` the input video:
the original must stay until the correction is recorded, so that no video is corrected twice."""

import argparse
import logging
import math
import tempfile
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from dataset.io import BadVideoError, add_audio_stream, audio_frame, decode_planar
from model.tracking import WindowPredictor, predict_track
from scripts.common import VIDEO_SUFFIXES, add_tracking_args, list_videos, load_model_from_args, model_provenance
from utils.cli import UserError, number, run_cli
from utils.resumable import ResultLog, output_folder, writing
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
            wave = None if delay == 0 else decode_planar(container.demux(audio), src)  # (C, Ta)
        if wave is not None and abs(delay) >= wave.shape[1]:
            raise BadVideoError(src, f"has {wave.shape[1] / sr:.2f} s of audio: a shift by {delay_sec:+g} s leaves "
                                "only silence", "give an --offset_sec shorter than the audio")  # fmt: skip
        wave = None if wave is None else shift_audio(wave, delay)
        # a failure to write is the output's (disk full, read-only), not the input's
        with writing(dst, "--out/--out_dir"), atomic_path(dst) as tmp, av.open(str(src)) as container, \
                av.open(str(tmp), "w") as out:  # fmt: skip
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
    out = Path(args.out or args.out_dir)
    if out.resolve() == src.resolve():
        raise UserError(f"{out}: the corrected copies must go elsewhere than the input (the original is kept)")
    if args.out and (out.is_dir() or out.suffix.lower() not in VIDEO_SUFFIXES):
        raise UserError(f"--out {out}: give a video file name ({', '.join(sorted(VIDEO_SUFFIXES))})")
    output_folder(out.parent if args.out else out, "--out" if args.out else "--out_dir")
    model, cfg = load_model_from_args(args)
    predictor = WindowPredictor(model, cfg, args.precision, args.batch_segments, args.batch_windows)
    if args.out:
        return 0 if resync_video(predictor, src, out, args)["output"] else 1

    settings = {k: getattr(args, k) for k in ("stride_sec", "offset_sec", "min_confidence", "force")}
    log = ResultLog(out / "resync.progress.jsonl", {**model_provenance(args), **settings}, "--out_dir")
    videos, clashes = list_videos(src)
    bad = [dict.fromkeys(REPORT_FIELDS, "") | {"video": str(src / n), "action": f"bad: {r}"} for n, r in clashes]
    for path in tqdm(videos, desc="videos"):
        if log.records.get(path.name, {}).get("video") == str(path):  # finished in an earlier run
            continue
        try:
            log.append(path.name, resync_video(predictor, path, out / path.name, args))
        except BadVideoError as e:
            logging.error(f"Skipping {path}: {e}")
            bad.append(dict.fromkeys(REPORT_FIELDS, "") | {"video": str(path), "action": f"bad: {e}"})
    rows = [log.records[v.name] for v in videos if v.name in log.records] + bad
    with writing(out / "resync.csv", "--out_dir"):
        write_csv(out / "resync.csv", rows, REPORT_FIELDS)
    counts = {a: sum(r["action"].startswith(a) for r in rows) for a in ("corrected", "in sync", "refused", "bad")}
    print(", ".join(f"{n} {a}" for a, n in counts.items()) + f"; report: {out / 'resync.csv'}")
    return 0 if rows and counts["bad"] < len(rows) else 1


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="A video, or a folder of videos")
    parser.add_argument("--out", help="The corrected copy of a video (e.g. FIXED.mp4)")
    parser.add_argument("--out_dir", help="Where the corrected copies of a folder's videos and resync.csv go")
    parser.add_argument(
        "--offset_sec",
        type=number(float, -math.inf),
        help="Apply this offset (positive: audio ahead) instead of predicting it",
    )
    parser.add_argument(
        "--min_confidence", type=number(float, 0), default=0.2, help="Refuse below this mean probability"
    )
    parser.add_argument("--force", action="store_true", help="Correct even with low confidence or drift")
    add_tracking_args(parser)
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_parser().parse_args()))
