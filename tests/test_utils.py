"""utils: the allocator setting that keeps large CPU activations from page-faulting; learning curves."""

import json
import resource
import sys

import pytest
import torch
from matplotlib import pyplot as plt

from utils.logger import plot_learning_curves
from utils.utils import reuse_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_reused_memory_is_not_faulted_in_again():
    def minor_faults_of_large_tensors() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB: above glibc's default mmap threshold
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert reuse_freed_memory()
    # Without the setting every fill faults in all 16,384 of its 4 KiB pages, every time. With it the heap
    # grows once; the kernel may still reclaim some of it in the first rounds (seen here), so take the best.
    assert min(minor_faults_of_large_tensors() for _ in range(6)) < 1000


def test_learning_curves_from_metrics(tmp_path):
    offsets, avclip, untrained = tmp_path / "s2", tmp_path / "s1", tmp_path / "test_only"
    for run, phase_keys in [(offsets, {"train": "loss", "valid": "accuracy_1_tol1"}), (avclip, {"valid": "precision"})]:
        run.mkdir()
        records = [{"phase": "valid", "epoch": -1, "precision": 0.1}] if run is avclip else []
        for epoch in range(3):
            records += [{"phase": "train", "epoch": epoch, "loss": 3.0 - epoch}]
            records += [{"phase": "valid", "epoch": epoch, "loss": 3.1, "accuracy_1": 0.1 * epoch} | {
                phase_keys["valid"]: 0.2 * epoch}]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    untrained.mkdir()
    (untrained / "metrics.jsonl").write_text(json.dumps({"phase": "test", "epoch": 0, "accuracy_1": 0.5}) + "\n")

    one = plot_learning_curves({"s2": offsets}, tmp_path / "one.png")
    both = plot_learning_curves({"s1": avclip, "s2": offsets, "t": untrained, "none": tmp_path}, tmp_path / "c.png")
    assert one == tmp_path / "one.png" and both == tmp_path / "c.png"
    assert plt.imread(both).shape[1] > 1.8 * plt.imread(one).shape[1]  # two panels: the untrained run has none
    assert plot_learning_curves({"t": untrained}, tmp_path / "t.png") is None and not (tmp_path / "t.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["c.png", "one.png"]  # no temp files
