"""The CPU demo end to end in its smoke mode: data, stage 1, stage 2 with a test, example.py with a plot."""

import json
import os

import pytest
from matplotlib import pyplot as plt

from dataset.synthetic import ClipSpec, make_clip
from scripts import demo, predict_offsets


def test_demo_quick_runs_every_stage(tmp_path, capsys):
    summary = demo.main(demo.get_parser().parse_args(["--quick", "--workdir", str(tmp_path)]))

    assert (tmp_path / "stage1" / "checkpoints" / "epoch_best.pt").is_file()
    assert (tmp_path / "stage2" / "stage2_best.pt").is_file()
    for key in ("held_out_accuracy_1", "held_out_accuracy_1_tol1"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["held_out_accuracy_1"] <= summary["held_out_accuracy_1_tol1"]
    # stage 2 learns its 16 fixed training items in 24 steps (chance level: ln 21 = 3.04)
    first, last = summary["stage2_train_loss_first_last"]
    assert first > 2.8 and last < first - 0.3
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == summary
    assert (tmp_path / "example_probs.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "Prediction Results" in out and "Held-out test: accuracy@1" in out
    # both stages' curves in one PNG (two panels), each run's own from main.py (logging.plot_curves)
    assert f"Learning curves of both stages: {tmp_path / 'learning_curves.png'}" in out
    assert (
        plt.imread(tmp_path / "learning_curves.png").shape[1] > plt.imread(tmp_path / "stage2" / "curves.png").shape[1]
    )
    assert (tmp_path / "stage1" / "curves.png").is_file()


LONG = pytest.mark.skipif(
    not os.environ.get("SYNCHFORMER_LONG_TESTS"),
    reason="each full demo takes about 5 minutes on 2 cores (4 of them here): run with SYNCHFORMER_LONG_TESTS=1",
)


@LONG
@pytest.mark.parametrize("seed", [1338, 1, 2])
def test_demo_learns_offsets_on_every_seed(tmp_path, seed):
    summary = demo.main(demo.get_parser().parse_args(["--workdir", str(tmp_path), "--seed", str(seed)]))
    # the demo's promise on any seed (chance: 1/21 and about 3/21)
    assert summary["held_out_accuracy_1"] >= 0.6 and summary["held_out_accuracy_1_tol1"] >= 0.95


@LONG
def test_demo_learns_offsets_and_tracks_drift(tmp_path):
    summary = demo.main(demo.get_parser().parse_args(["--workdir", str(tmp_path)]))
    # chance: 1/21 and about 3/21
    assert summary["held_out_accuracy_1_tol1"] >= 0.8
    assert summary["held_out_accuracy_1"] >= 0.3

    # a long clip of the demo's kind whose offset jumps from +0.8 s to -0.8 s halfway, one event per window
    clip = tmp_path / "drift.mp4"
    easy = {k: v for k, v in demo.EASY_CLIPS.items() if k not in ("events_span_sec", "duration_sec", "side")}
    easy |= {"min_gap_sec": 5.0, "max_gap_sec": 5.0}
    make_clip(clip, ClipSpec(**easy, height=32, width=32, duration_sec=30.0, offset_sec=0.8, offset_after_sec=-0.8))
    ckpt = tmp_path / "stage2" / "stage2_best.pt"
    argv = [str(clip), "--ckpt_path", str(ckpt), "--device", "cpu", "--out_dir", str(tmp_path / "track")]
    assert predict_offsets.main(predict_offsets.get_parser().parse_args(argv)) == 0
    track = json.loads((tmp_path / "track" / "drift.json").read_text())
    assert track["drift"]
    assert abs(track["offset_first_half_sec"] - 0.8) <= 0.2 + 1e-6
    assert abs(track["offset_second_half_sec"] + 0.8) <= 0.2 + 1e-6
