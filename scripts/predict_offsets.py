"""Tracks the audio-visual offset over a video of any length (or every video in a folder).

    python scripts/predict_offsets.py VIDEO_OR_DIR --exp_name 24-01-04T16-39-21 [--stride_sec 1.28] [--out_dir DIR]

A window of the model's clip length (5 s) slides over the video; every window gets the predicted offset,
its probability and the entropy of the class distribution. Each segment's features are computed once
and shared by all windows that contain it (strides that are multiples of 0.32 s share everything).
Per video it writes `<video name>.csv` (one row per window), `<video name>.json` (the overall offset: the
class with the highest summed probability over windows, and a drift flag when the first and the second
half of the video disagree by two classes or more) and `<video name>.png` (offset over time), e.g.
`clip.mp4.csv`; a folder run also writes `summary.csv`. Videos whose names are the same up to case and
extension (`x.mp4`, `x.MP4`) are all left out. Each finished video is logged in `offsets.progress.jsonl`
(see `utils/resumable.py`): an interrupted run resumes, and a rerun into the same `--out_dir` with another
model, precision, stride or offset is refused. The video is decoded a batch of segments at a time, so
memory does not grow with its length."""

import argparse
import logging
import math
from pathlib import Path

from tqdm import tqdm

from dataset.io import BadVideoError
from model.tracking import WindowPredictor, predict_track
from scripts.common import VIDEO_SUFFIXES, add_tracking_args, list_videos, load_model_from_args, model_provenance
from utils.cli import UserError, number, report_skipped, run_cli
from utils.resumable import ResultLog, output_folder, writing
from utils.utils import reuse_freed_memory, write_csv, write_json


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


def track_video(predictor: WindowPredictor, path: Path, args) -> dict:
    rows, summary = predict_track(predictor, path, args.out_dir / "reencoded", args.stride_sec, args.offset_sec,
                                  args.progress)  # fmt: skip
    out = args.out_dir / path.name  # the video's name with its extension: no result of another video, nor summary.csv
    with writing(out, "--out_dir"):
        write_csv(f"{out}.csv", rows)
        plot_track(rows, summary, Path(f"{out}.png"), path.name)
        write_json(f"{out}.json", {**summary, "windows": rows})
    return summary


def main(args) -> int:
    reuse_freed_memory()
    src = Path(args.input)
    is_folder = src.is_dir()
    videos, skipped = list_videos(src) if is_folder else ([src], [])
    if not videos and not skipped:
        raise UserError(f"No videos in {src}: it holds no {', '.join(sorted(VIDEO_SUFFIXES))} files.")
    args.out_dir = output_folder(args.out_dir, "--out_dir")
    model, cfg = load_model_from_args(args)
    predictor = WindowPredictor(model, cfg, args.precision, args.batch_segments, args.batch_windows)
    provenance = {**model_provenance(args), "stride_sec": args.stride_sec, "offset_sec": args.offset_sec}
    log = ResultLog(args.out_dir / "offsets.progress.jsonl", provenance, "--out_dir")
    for path in tqdm(videos, desc="videos", disable=not is_folder):
        if log.records.get(path.name, {}).get("video") == str(path):  # finished in an earlier run
            continue
        try:
            s = track_video(predictor, path, args)
        except BadVideoError as e:
            if not is_folder:
                raise
            logging.error(f"Skipping {e}")
            skipped.append((path.name, str(e).removeprefix(f"{path}: ")))
            continue
        log.append(path.name, s)
        drift = " (DRIFT: the two halves disagree)" if s["drift"] else ""
        print(
            f"{path.name}: offset {s['offset_sec']:+.2f} s, confidence {s['confidence']:.3f} ({s['precision']}){drift}"
        )
    summaries = [log.records[v.name] for v in videos if v.name in log.records]
    if summaries:
        with writing(args.out_dir / "summary.csv", "--out_dir"):
            write_csv(args.out_dir / "summary.csv", summaries)
    print(f"{len(summaries)} videos done, {len(skipped)} skipped; segments computed: {predictor.segments_computed}")
    return report_skipped(skipped, len(summaries))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="A video or a folder of videos")
    parser.add_argument(
        "--offset_sec", type=number(float, -math.inf), default=0.0, help="Shift the audio earlier by this much first"
    )
    parser.add_argument("--out_dir", default="./offsets", help="Where CSV/JSON/PNG results go")
    add_tracking_args(parser)
    return parser


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_cli(lambda: main(get_parser().parse_args()))
