"""The CPU demo end to end in its smoke mode: data, stage 1, stage 2 with a test, example.py with a plot."""

import json

from scripts import demo


def test_demo_quick_runs_every_stage(tmp_path, capsys):
    summary = demo.main(demo.get_parser().parse_args(["--quick", "--workdir", str(tmp_path)]))

    assert (tmp_path / "stage1" / "checkpoints" / "epoch_best.pt").is_file()
    assert (tmp_path / "stage2" / "stage2_best.pt").is_file()
    for key in ("held_out_accuracy_1", "held_out_accuracy_1_tol1"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["held_out_accuracy_1"] <= summary["held_out_accuracy_1_tol1"]
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == summary
    assert (tmp_path / "example_probs.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "Prediction Results" in out and "Held-out test: accuracy@1" in out
