"""Stage-2 training iterations per second (forward, cross-entropy on the offset class, backward, Adam step,
gradient clipping as in training) on random inputs, with a tiny and with the full config of
configs/sync.yaml. The extractors are frozen in stage 2, so their forward is most of the work.

    python -m scripts.bench.train                   # tiny (B=4, 10 iterations) and full (B=1, 2 iterations)
    python -m scripts.bench.train --tiny --out t.json   # tiny only, 2 iterations (CI)

Prints one summary line and, with --out, writes the measurements as JSON."""

import argparse
import os
from pathlib import Path

import torch

from scripts.bench.common import bench_training
from utils.cli import run_cli
from utils.precision import resolve_device
from utils.utils import reuse_freed_memory, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sync.yaml")
    parser.add_argument("--segments", type=int, default=14)
    parser.add_argument("--full-batch-size", type=int, default=1)
    parser.add_argument("--full-iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", help="default: the accelerator if there is one, else the CPU")
    parser.add_argument("--tiny", action="store_true", help="only the tiny config, 2 iterations (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    reuse_freed_memory()

    torch.set_num_threads(args.threads)
    runs = [bench_training(args.config, True, 4, 2 if args.tiny else 10, args.segments, args.device)]
    if not args.tiny:
        runs.append(
            bench_training(args.config, False, args.full_batch_size, args.full_iterations, args.segments, args.device)
        )
    load = os.getloadavg()
    summary = " | ".join(f"{r['size']} B={r['batch_size']}: {r['iterations_per_second']:.3g} it/s" for r in runs)
    print(f"bench.train ({args.config}, S={args.segments}, {args.device}, {args.threads} threads, "
          f"load {load[0]:.2f}): {summary}")  # fmt: skip
    if args.out:
        result = {"config": args.config, "device": str(args.device), "threads": args.threads,
                  "torch": torch.__version__, "load_average": load, "runs": runs}  # fmt: skip
        write_json(args.out, result)


if __name__ == "__main__":
    run_cli(main)
