"""Prepares a folder of raw videos (any fps, size, codec, sample rate) for training and evaluation.

    python scripts/prepare_data.py SRC DST [--clips clips.csv] [--workers 4] [--shard I/N]

Every video under SRC (searched recursively) is re-encoded to the training layout with
`dataset.io.reencode_video`: `DST/h264_video_25fps_256side_16000hz_aac/<id>.mp4`, H.264 at 25 fps, the
short side 256 px (both sides even), AAC 16 kHz mono. The id is the path under SRC without its suffix.
With `--clips`, a CSV of `video,start_sec,end_sec` rows (video: a path under SRC), clips are cut
instead and named like VGGSound and AudioSet clips: `<id>_<start ms>_<end ms>`.

- Resumable: a file already in DST is kept once it is checked to be complete (every packet demuxes,
  both streams decode, the format is right); files are written under a temporary name and renamed.
- Parallel and sharded: `--workers` processes; `--shard I/N` (or a SLURM array's
  `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`, see `scripts/sbatch_prepare_data.sh`) takes every
  N-th video of the sorted list, starting at the I-th.
- Records: `DST/manifest.csv` (`manifest-I-of-N.csv` per shard; `dataset.folder.VideoFolder` reads all
  of them), one row per output with its id, source, cut, duration, fps, sample rate, size and status
  (`encoded`, `done`: kept from an earlier run, or `bad`), and `DST/bad_inputs.csv` with the reasons.
- Contained: a CSV row whose video or id would lead out of SRC or DST (an absolute path, `..`, a link out
  of DST) is refused, and so are inputs whose ids collide (`x.mp4`, `x.MP4`, `x.mkv`); SRC and DST may
  not overlap (SRC may lie in DST, beside the prepared folder). A problem on the output side (disk full,
  read-only DST) stops the run in one line."""

import argparse
import csv
import errno
import glob
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import av
from tqdm import tqdm

from dataset.io import AFPS, SIDE, VFPS, BadVideoError, probe_video, reencode_video
from scripts.common import VIDEO_SUFFIXES, refuse_collisions
from utils.cli import SettingError, UserError, number, run_cli
from utils.utils import UnsafeNameError, atomic_path, safe_child, write_csv

MANIFEST_FIELDS = ["id", "source", "start_sec", "end_sec", "duration_sec", "fps", "sample_rate", "height", "width",
                   "status"]  # fmt: skip


@dataclass(frozen=True)
class Job:
    id: str
    source: str  # the input video, relative to SRC
    start_sec: float = 0.0
    end_sec: float | None = None


def list_videos(src: Path) -> list[Job]:
    paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    return [Job(p.relative_to(src).with_suffix("").as_posix(), p.relative_to(src).as_posix()) for p in paths]


def read_clips(csv_path: Path) -> tuple[list[Job], list[dict]]:
    """Jobs from `video,start_sec,end_sec` rows (a header row is optional), and the rows that are not."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--clips {csv_path}: cannot be read ({e}); pass a CSV of video,start_sec,end_sec rows") from e
    jobs, bad = [], []
    for i, row in enumerate(rows):
        try:
            video, start, end = row[0], float(row[1]), float(row[2])
        except (IndexError, ValueError):
            if i > 0:  # the first row may be a header
                reason = f"{csv_path} row {i + 1}: not video,start_sec,end_sec"
                bad.append({"id": "", "source": ",".join(row), "reason": reason})
            continue
        if not (0 <= start < end and math.isfinite(end)):  # also refuses nan
            bad.append({"id": "", "source": video, "reason": f"{csv_path} row {i + 1}: needs 0 <= start < end < inf"})
        else:  # `video` may be anything here (empty, absolute, `..`): `refuse` checks it
            stem = Path(os.path.splitext(video)[0]).as_posix()
            jobs.append(Job(f"{stem}_{round(start * 1000)}_{round(end * 1000)}", video, start, end))
    return jobs, bad


def refuse(jobs: list[Job], src: Path, out_dir: Path) -> tuple[list[Job], list[dict]]:
    """The jobs that read inside SRC and write inside `out_dir` (`safe_child`) under an id of their own, and
    the bad-input rows of the others."""
    kept, unsafe = [], []
    for job in jobs:
        try:
            safe_child(src, job.source, allow_links_out=True)  # a folder of links to videos elsewhere is fine
            safe_child(out_dir, f"{job.id}.mp4")
            kept.append(job)
        except UnsafeNameError as e:
            unsafe.append((job, str(e)))
    kept, collided = refuse_collisions(kept, key=lambda j: j.id, label=lambda j: j.source)
    unsafe += [(job, f"{job.source}: {why}") for job, why in collided]
    return kept, [{"id": job.id, "source": job.source, "reason": why} for job, why in unsafe]


def parse_shard(shard: str | None, environ=os.environ) -> tuple[int, int]:
    """`(I, N)` from `--shard I/N`, else from a SLURM array job, else `(0, 1)`."""
    if shard is None and "SLURM_ARRAY_TASK_ID" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))  # arrays may start at 1
        shard = f"{int(environ['SLURM_ARRAY_TASK_ID']) - first}/{environ['SLURM_ARRAY_TASK_COUNT']}"
    if shard is None:
        return 0, 1
    try:
        index, count = map(int, shard.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise SettingError(f"--shard {shard}: expected I/N with 0 <= I < N, e.g. --shard 0/8")
    return index, count


def check_prepared(path: Path, vfps: float, afps: int, size: int) -> dict:
    """The manifest fields of a prepared file, once it is checked: the right format, every packet
    demuxes and both streams decode. Raises BadVideoError otherwise."""
    info = probe_video(path)
    fmt = (info["fps"], info["sample_rate"], min(info["height"], info["width"]))
    if fmt != (vfps, afps, size):
        raise BadVideoError(path, f"is {fmt} (fps, Hz, short side), not {(vfps, afps, size)}", "delete it to redo it")
    n_frames, audio_end, decoded = 0, 0.0, set()
    try:
        with av.open(str(path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            for packet in container.demux(video, audio):
                if not packet.size:
                    continue
                if packet.stream is video:
                    n_frames += 1
                else:
                    audio_end = max(audio_end, float((packet.pts + packet.duration) * audio.time_base))
                if packet.stream.type not in decoded and packet.decode():  # decoders may need a few packets
                    decoded.add(packet.stream.type)
    except av.FFmpegError as e:
        raise BadVideoError(path, f"is corrupt: {e}", "delete it to redo it") from e
    if decoded != {"video", "audio"}:
        raise BadVideoError(path, f"has no decodable {' or '.join({'video', 'audio'} - decoded)}", "delete it")
    duration = min(n_frames / vfps, audio_end)
    return {"duration_sec": round(duration, 3), "fps": info["fps"], "sample_rate": info["sample_rate"],
            "height": info["height"], "width": info["width"]}  # fmt: skip


def prepare_one(job: Job, src: Path, out_dir: Path, vfps: float, afps: int, size: int) -> dict:
    """Re-encodes (or keeps) one output; returns its manifest row, with a `reason` when it is bad. An
    `OSError` on the output side (disk full, read-only DST) is raised: every later job would fail too."""
    row = {"id": job.id, "source": job.source, "start_sec": job.start_sec, "end_sec": job.end_sec}
    source, out = src / job.source, out_dir / f"{job.id}.mp4"
    try:
        for stale in glob.glob(f"{glob.escape(str(out))}.tmp-*.mp4"):  # `atomic_path`'s, left by a killed run
            os.remove(stale)
        if out.is_file():
            try:
                return {**row, **check_prepared(out, vfps, afps, size), "status": "done"}
            except BadVideoError as e:
                logging.warning(f"Redoing {out}: {e}")
        with atomic_path(out) as tmp:
            reencode_video(source, vfps, afps, size, start_sec=job.start_sec, end_sec=job.end_sec, out_path=tmp)
            info = check_prepared(tmp, vfps, afps, size)
            if job.end_sec is not None and info["duration_sec"] < job.end_sec - job.start_sec - 1 / vfps:
                raise BadVideoError(source, f"ends before the clip's end ({job.end_sec} s)")
        return {**row, **info, "status": "encoded"}
    except BadVideoError as e:
        reason = str(e)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        reason = f"{source}: its output's name is too long for the file system (rename it shorter)"
    except Exception as e:  # a batch over many files records every failure and goes on
        reason = f"{source}: {type(e).__name__}: {e}"
    return {**row, "status": "bad", "reason": reason}


def run_jobs(jobs: list[Job], src: Path, out_dir: Path, vfps: float, afps: int, size: int, workers: int) -> list[dict]:
    """The manifest rows of `jobs`, prepared by `workers` processes (in this one for 1)."""
    work = partial(prepare_one, src=src, out_dir=out_dir, vfps=vfps, afps=afps, size=size)
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        results = pool.map(work, jobs) if pool else map(work, jobs)
        try:
            return list(tqdm(results, total=len(jobs), desc="videos", unit="video"))
        except OSError:
            if pool:  # the jobs not started would fail the same way
                pool.shutdown(cancel_futures=True)
            raise


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder: pass the folder of your videos as SRC")
    out_dir = dst / f"h264_video_{args.vfps}fps_{args.size}side_{args.afps}hz_aac"
    if dst.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(out_dir.resolve()):
        raise UserError(f"SRC {src} and DST {dst} overlap: outputs would be taken for inputs; choose another DST")
    index, count = parse_shard(args.shard)
    jobs, bad_rows = read_clips(Path(args.clips)) if args.clips else (list_videos(src), [])
    jobs, refused = refuse(jobs, src, out_dir)
    bad_rows = bad_rows + refused if index == 0 else []  # refused before sharding: listed once, by the first shard
    jobs = sorted(jobs, key=lambda j: j.id)[index::count]
    suffix = "" if count == 1 else f"-{index}-of-{count}"
    logging.info(f"Shard {index}/{count}: {len(jobs)} videos from {src} to {out_dir}")

    started = time.time()
    manifest, bad_path = dst / f"manifest{suffix}.csv", dst / f"bad_inputs{suffix}.csv"
    try:
        rows = run_jobs(jobs, src, out_dir, args.vfps, args.afps, args.size, args.workers)
        seconds = time.time() - started
        bad_rows += [{"id": r["id"], "source": r["source"], "reason": r.pop("reason")} for r in rows if "reason" in r]
        for r in bad_rows:
            logging.error(f"Bad input: {r['reason']}")
        write_csv(manifest, rows, MANIFEST_FIELDS)
        write_csv(bad_path, bad_rows, ["id", "source", "reason"])
    except OSError as e:  # disk full, a read-only DST, a file where a folder should be
        fix = "free space, make it writable, or choose another DST"
        raise UserError(f"cannot write {e.filename or dst}: {e.strerror or e} ({fix})") from e
    n = {s: sum(r["status"] == s for r in rows) for s in ("encoded", "done")}
    print(
        f"{n['encoded']} encoded, {n['done']} already done, {len(bad_rows)} bad (listed in {bad_path}); "
        f"{n['encoded'] / seconds:.2f} clips/s with {args.workers} worker(s); manifest: {manifest}"
    )
    return 1 if bad_rows and not (n["encoded"] + n["done"]) else 0


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="A folder of videos (searched recursively)")
    parser.add_argument("dst", help="Where the prepared dataset goes")
    parser.add_argument("--clips", help="A CSV of video,start_sec,end_sec rows: cut these clips instead")
    parser.add_argument("--workers", type=number(int, 1), default=1, help="Parallel encoding processes")
    parser.add_argument("--shard", help="I/N: this process's share (default: the SLURM array task, else all)")
    parser.add_argument("--vfps", type=number(int, 1), default=VFPS)
    parser.add_argument("--afps", type=number(int, 1), default=AFPS)
    parser.add_argument("--size", type=number(int, 2), default=SIDE, help="The short side in pixels")
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_parser().parse_args()))
