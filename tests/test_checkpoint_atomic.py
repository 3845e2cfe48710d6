"""A process killed while writing a checkpoint leaves the previous file intact; a run stopped between
writing its latest and its best checkpoint resumes with the two in step."""

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from scripts import train_sync
from tests.test_training import data, tiny_args  # noqa: F401 (a fixture)
from utils import checkpoint
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.logger import read_metrics

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
            while not list(tmp_path.glob("run_latest.pt.tmp-*")):
                assert time.time() < deadline and proc.poll() is None, "the writer never started a write"
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = load_checkpoint(path)
        w = ckpt["model"]["w"]
        assert w.shape == (4_000_000,) and torch.all(w == ckpt["epoch"])  # one whole, consistent version


def test_a_stop_between_the_latest_and_the_best_checkpoint(data, tmp_path, monkeypatch):  # noqa: F811
    """The disk fills up after the latest checkpoint of epoch 0 (the best so far) is written, before the best:
    the resumed run tests that epoch's weights, not a missing or an older best."""
    args = tiny_args("sync.yaml", tmp_path, "full", data, "training.num_epochs=1", "training.max_train_iters=1")

    def disk_full_after_the_latest(obj, path):
        if not str(path).endswith("_latest.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save_checkpoint(obj, path)

    for module in (checkpoint, train_sync):  # wherever the trainer's writes go through
        monkeypatch.setattr(module, "save_checkpoint", disk_full_after_the_latest, raising=False)
    with pytest.raises(OSError, match="No space"):
        main.main(args)
    monkeypatch.undo()
    main.main([f"config={tmp_path / 'full' / 'cfg-full.yaml'}", "training.resume=True"])
    latest, best = (load_checkpoint(tmp_path / "full" / f"full_{name}.pt") for name in ("latest", "best"))
    assert best["epoch"] == latest["epoch"] == 0
    assert all(torch.equal(w, best["model"][k]) for k, w in latest["model"].items())
    assert [r["epoch"] for r in read_metrics(tmp_path / "full", "test")] == [0]
