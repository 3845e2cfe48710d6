"""Clips per second of `scripts/prepare_data.py` with 1 and 2 worker processes, in one run, on three clips
(the first three of `--clips_dir`, or generated ones), each listed `--repeat` times.

    python -m scripts.bench.prepare [--repeat 4] [--workers 1 2] [--out result.json]
    python -m scripts.bench.prepare --quick   # two short synthetic clips (CI)

Every worker count re-encodes all clips into a fresh folder. Prints one summary line and, with --out,
writes the measurements as JSON."""

import argparse
import os
import tempfile
import time
from pathlib import Path

from dataset.io import AFPS, SIDE, VFPS
from dataset.synthetic import ClipSpec, make_clip
from scripts.bench.common import clips_or_generated
from scripts.prepare_data import list_videos, run_jobs
from utils.cli import run_cli
from utils.utils import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="how many times each sample clip is listed")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clips_dir", type=Path, help="videos to prepare, e.g. the sample clips; default: generated")
    parser.add_argument("--quick", action="store_true", help="two 2 s synthetic clips instead of the samples (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        if args.quick:
            for i in range(2):
                make_clip(src / f"clip{i}.mp4", ClipSpec(duration_sec=2, height=64, width=96, seed=i))
        else:
            clips = clips_or_generated(args.clips_dir, 3, Path(tmp))
            for i in range(args.repeat):
                for j, clip in enumerate(clips):
                    (src / f"sample{j}_copy{i}.mp4").symlink_to(clip)
        jobs = list_videos(src)
        runs = []
        for workers in args.workers:
            started = time.perf_counter()
            rows = run_jobs(jobs, src, Path(tmp) / f"dst{workers}" / "videos", VFPS, AFPS, SIDE, workers)
            seconds = time.perf_counter() - started
            assert all(r["status"] == "encoded" for r in rows), [r.get("reason") for r in rows]
            runs.append({"workers": workers, "seconds": seconds, "clips_per_second": len(jobs) / seconds})
    load = os.getloadavg()
    result = {"clips": len(jobs), "quick": args.quick, "runs": runs, "cpus": os.cpu_count(), "load_average": load}
    rates = ", ".join(f"{r['workers']} worker(s) {r['clips_per_second']:.2f} clips/s" for r in runs)
    speedup = runs[-1]["clips_per_second"] / runs[0]["clips_per_second"]
    print(f"bench.prepare ({len(jobs)} clips, {os.cpu_count()} CPUs, load {load[0]:.2f}): {rates} "
          f"({speedup:.2f}x)")  # fmt: skip
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    run_cli(main)
