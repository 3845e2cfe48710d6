"""A process killed while writing a checkpoint leaves the previous file intact."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
# rewrites the checkpoint with new values as fast as it can (4M floats: each write takes a while)
WRITER = """
import sys, torch
from utils.checkpoint import save_checkpoint
i = 1
while True:
    save_checkpoint({'model': {'w': torch.full((4_000_000,), float(i))}, 'epoch': i}, sys.argv[1])
    i += 1
"""


def test_kill_during_write_keeps_a_whole_checkpoint(tmp_path):
    path = tmp_path / "run_latest.pt"
    save_checkpoint({"model": {"w": torch.full((4_000_000,), 0.0)}, "epoch": 0}, path)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO)
        try:
            # wait until a write is under way (its temporary file exists), then kill without warning
            deadline = time.time() + 60
            while not list(tmp_path.glob(".run_latest.pt.*.tmp")):
                assert time.time() < deadline and proc.poll() is None, "the writer never started a write"
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = load_checkpoint(path)
        w = ckpt["model"]["w"]
        assert w.shape == (4_000_000,) and torch.all(w == ckpt["epoch"])  # one whole, consistent version
