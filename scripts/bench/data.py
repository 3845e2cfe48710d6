"""Throughput of the test-time data pipeline (decode + `transform_sequence_test` of configs/sync.yaml)
on sample or generated clips, ours vs a baseline, in one run, with a check that both give identical items.

- ours: `dataset.dataset_utils.load_item` with windowed decoding (only the frames the fixed-offset crop
  needs, threaded H.264 decoding, frames nobody references skipped before the window) and the transforms
  as `get_transforms` builds them (segments as views, the pixel-wise ops as one table lookup);
- baseline: a plain full PyAV decode (every frame, one decoding thread) followed by the transforms in
  the config's order, i.e. what a straightforward reader (like the original's `read_video`) does.

    python -m scripts.bench.data            # 3 generated clips x 3 fixed offsets, 3 repeats
    python -m scripts.bench.data --quick    # one clip, one offset, one repeat (CI)

Both run with `--threads` torch threads (1 by default, as in a DataLoader worker; more threads only
contend on a small shared machine); the video decoder's own threads are part of "ours"."""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from omegaconf import OmegaConf

from dataset.dataset_utils import get_transforms, load_item
from dataset.io import decode_audio
from scripts.bench.common import clips_or_generated
from utils.cli import run_cli
from utils.utils import reuse_freed_memory, write_json

REPO = Path(__file__).resolve().parents[2]
# (offset_sec, v_start_i_sec) pairs
CASES = [(1.6, 0.0), (-1.0, 3.0), (0.4, 2.52)]


def baseline_item(path, targets: dict, transforms) -> dict:
    """Full single-threaded decode of every frame, then the transforms."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream) if f.pts >= 0]
    rgb = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (Tv, 3, H, W)
    audio, sr = decode_audio(path)
    meta = {"video": {"fps": [fps]}, "audio": {"framerate": [sr]}}
    item = {"video": rgb, "audio": audio, "meta": meta, "path": str(path), "targets": dict(targets), "split": "test"}
    return transforms(item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1)")
    parser.add_argument("--clips_dir", type=Path, help="videos to load, e.g. the sample clips; default: generated")
    args = parser.parse_args()
    reuse_freed_memory()
    torch.set_num_threads(args.threads)

    cfg = OmegaConf.load(REPO / "configs" / "sync.yaml")
    transforms, plain_transforms = get_transforms(cfg, "test"), get_transforms(cfg, "test", fuse=False)
    tmp = tempfile.TemporaryDirectory()
    clips, cases = clips_or_generated(args.clips_dir, 3, Path(tmp.name)), CASES
    if args.quick:
        clips, cases, args.repeats = clips[:1], cases[:1], 1
    jobs = [(clip, {"offset_sec": o, "v_start_i_sec": v}) for clip in clips for o, v in cases]

    loaders = {
        "baseline": lambda clip, targets: baseline_item(clip, targets, plain_transforms),
        "ours": lambda clip, targets: load_item(clip, "test", targets, transforms),
    }
    wall, cpu, identical = {k: 0.0 for k in loaders}, {k: 0.0 for k in loaders}, True
    load_item(jobs[0][0], "test", jobs[0][1], transforms)  # warm-up (imports, mel filterbank)
    # alternate per clip, so that both see the same load of a shared machine
    for _ in range(args.repeats):
        for clip, targets in jobs:
            items = {}
            for name, load in loaders.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                items[name] = load(clip, targets)
                wall[name] += time.perf_counter() - start_wall
                cpu[name] += time.process_time() - start_cpu
            ours, base = items["ours"], items["baseline"]
            identical &= torch.equal(ours["video"], base["video"]) and torch.equal(ours["audio"], base["audio"])
    base_sec, ours_sec = wall["baseline"], wall["ours"]
    n = len(jobs) * args.repeats
    result = {
        "clips": n,
        "ours_sec_per_clip": ours_sec / n,
        "baseline_sec_per_clip": base_sec / n,
        "ours_clips_per_sec": n / ours_sec,
        "baseline_clips_per_sec": n / base_sec,
        "speedup": base_sec / ours_sec,
        "ours_cpu_sec_per_clip": cpu["ours"] / n,  # all threads of the process (the decoder's included)
        "baseline_cpu_sec_per_clip": cpu["baseline"] / n,
        "load_average_1min": os.getloadavg()[0],
        "identical_outputs": identical,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"data pipeline: ours {result['ours_clips_per_sec']:.2f} clips/s ({result['ours_sec_per_clip']:.3f} s/clip), "
        f"baseline {result['baseline_clips_per_sec']:.2f} clips/s, speedup x{result['speedup']:.2f}, "
        f"identical outputs: {identical} (cpu s/clip ours {result['ours_cpu_sec_per_clip']:.3f}, baseline "
        f"{result['baseline_cpu_sec_per_clip']:.3f}; load average {result['load_average_1min']:.2f})"
    )
    print(json.dumps(result))
    if args.json:
        write_json(args.json, result)
    if not identical:
        raise SystemExit("ours and the baseline disagree")


if __name__ == "__main__":
    run_cli(main)
