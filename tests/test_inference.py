"""example.py, sliding-window tracking with feature reuse, and DeSync, on a tiny model saved in the
published checkpoint format."""

import copy
import csv
import importlib.util
import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from torchao.quantization import Int8Tensor

import dataset.io
import example
from dataset.io import BadVideoError, get_video_and_audio, probe_video
from dataset.segment_pipeline import SegmentPipeline
from dataset.synthetic import ClipSpec, make_clip
from model.pretrained import load_model
from model.tracking import WindowPredictor, predict_track
from scripts import predict_offsets
from scripts.common import load_model_from_args
from tests.reference_data import DATA, REPO, needs_samples
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cli import SettingError
from utils.config import untrained_config
from utils.download import DownloadError
from utils.precision import for_precision, resolve_precision
from utils.utils import instantiate_from_config

REAL_CLIP = DATA / "vggsound/h264_video_25fps_256side_16000hz_aac/3qesirWAGt4_20000_30000.mp4"
PREDICTION = re.compile(r'^p=(\d\.\d{4}) \((-?\d+\.\d{4})\), "(-?\d\.\d\d)" \((\d+)\)$')


def tiny_sync_cfg():
    """configs/sync.yaml with 1-layer, 32-wide extractors at the published input sizes."""
    return untrained_config(REPO / "configs" / "sync.yaml", tiny=True, tiny_inputs=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    cfg = tiny_sync_cfg()
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "args": cfg, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 12 s model-format clip with a known offset, and an 8 s 30 fps / 44.1 kHz stereo / 640x360 one."""
    root = tmp_path_factory.mktemp("clips")
    make_clip(root / "long.mp4", ClipSpec(duration_sec=12.0, offset_sec=0.4, seed=3))
    make_clip(root / "odd.mp4", ClipSpec(duration_sec=8.0, vfps=30, afps=44100, n_audio_channels=2, height=360,
                                         width=640, seed=4))  # fmt: skip
    return root


def run_example(capsys, *argv):
    example.main(example.get_parser().parse_args(list(argv)))
    return capsys.readouterr().out.splitlines()


@needs_samples
def test_example_on_a_real_clip(tiny_ckpt, tmp_path, capsys):
    plot = tmp_path / "probs.png"
    lines = run_example(capsys, "--ckpt_path", str(tiny_ckpt), "--vid_path", str(REAL_CLIP), "--offset_sec", "1.6",
                        "--device", "cpu", "--plot", str(plot))  # fmt: skip
    assert lines[0] == f"Using video: {REAL_CLIP}"
    assert lines[1].startswith("Skipping reencoding. vfps: 25.0; afps: 16000; min(H, W)=256")
    assert "Ground Truth offset (sec): 1.60 (18)" in lines
    preds = [PREDICTION.match(line) for line in lines[lines.index("Prediction Results:") + 1 :]]
    preds = [m for m in preds if m]
    assert len(preds) == 5
    probs = [float(m[1]) for m in preds]
    assert probs == sorted(probs, reverse=True) and sum(probs) < 1
    grid = torch.linspace(-2, 2, 21)
    for m in preds:  # the printed offset is the class's grid value
        assert float(m[3]) == pytest.approx(float(grid[int(m[4])]), abs=5e-3)
    assert plot.stat().st_size > 0


@pytest.mark.parametrize(
    "flags, ran",
    [([], "fp32"), (["--quantize"], "int8"), (["--precision", "int8"], "int8"), (["--precision", "bf16"], "bf16")],
)
def test_example_precision_is_opt_in_and_printed(tiny_ckpt, clips, capsys, flags, ran):
    video = str(clips / "long.mp4")
    lines = run_example(capsys, "--ckpt_path", str(tiny_ckpt), "--vid_path", video, "--device", "cpu", *flags)
    assert f"Precision: {ran} on cpu" in lines
    preds = [m for m in map(PREDICTION.match, lines) if m]
    assert len(preds) == 5 and sum(float(m[1]) for m in preds) < 1


def test_load_model_precisions(tiny_ckpt):
    model, _ = load_model(ckpt_path=tiny_ckpt)
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # float32 unless asked
    int8, _ = load_model(ckpt_path=tiny_ckpt, precision="int8")
    assert isinstance(int8.transformer.blocks[0].mlp[0].weight, Int8Tensor)  # torchao's int8 weights
    bf16, _ = load_model(ckpt_path=tiny_ckpt, precision="bf16")
    assert bf16.transformer.blocks[0].mlp[0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--device cpu"):
        load_model(ckpt_path=tiny_ckpt, device="meta", precision="int8")
    with pytest.raises(ValueError, match="choose one of fp32, bf16"):
        load_model(ckpt_path=tiny_ckpt, precision="fp8")


def test_int8_without_torchao_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(SettingError, match=r"^--precision int8 needs torchao: pip install -e '\.\[int8\]'"):
        resolve_precision("int8", "cpu")


def test_model_args_resolve_auto_and_keep_quantize_as_an_alias(tiny_ckpt, monkeypatch):
    parser = example.get_parser()
    base = ["--ckpt_path", str(tiny_ckpt), "--vid_path", "x.mp4", "--device", "cpu"]
    assert parser.parse_args(base).precision == "fp32"
    assert parser.parse_args([*base, "--quantize"]).precision == "int8"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr("utils.precision.native_bf16", lambda device, native=native: native)
        args = parser.parse_args([*base, "--precision", "auto"])
        load_model_from_args(args)
        assert args.precision == expected


def test_example_takes_a_bare_state_dict_with_its_config(tiny_ckpt, clips, tmp_path, capsys):
    bare = tmp_path / "bare.pt"
    torch.save(load_checkpoint(tiny_ckpt)["model"], bare)
    cfg_path = tmp_path / "cfg.yaml"
    OmegaConf.save(tiny_sync_cfg(), cfg_path)
    video = str(clips / "long.mp4")
    lines = run_example(capsys, "--ckpt_path", str(bare), "--cfg_path", str(cfg_path), "--vid_path", video,
                        "--offset_sec", "-2.0", "--v_start_i_sec", "2.0", "--device", "cpu")  # fmt: skip
    assert "Ground Truth offset (sec): -2.00 (0)" in lines
    assert sum(bool(PREDICTION.match(line)) for line in lines) == 5


def test_example_reencodes_other_formats(tiny_ckpt, clips, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = run_example(capsys, "--ckpt_path", str(tiny_ckpt), "--vid_path", str(clips / "odd.mp4"), "--device", "cpu")
    assert lines[1] == "Reencoding. vfps: 30.0 -> 25; afps: 44100 -> 16000; (360, 640) -> min(H, W)=256"
    (reencoded,) = (tmp_path / "vis").glob("odd_*.mp4")
    info = probe_video(reencoded)
    assert (info["fps"], info["sample_rate"], info["height"], info["width"]) == (25.0, 16000, 256, 454)
    assert "Ground Truth offset (sec): 0.00 (10)" in lines


def test_example_explains_a_window_outside_the_video(tiny_ckpt, clips):
    video = str(clips / "long.mp4")
    args = ["--ckpt_path", str(tiny_ckpt), "--vid_path", video, "--offset_sec", "-2.0", "--device", "cpu"]
    with pytest.raises(BadVideoError, match="before the file start.*--v_start_i_sec 2.0"):
        example.main(example.get_parser().parse_args(args))


def test_example_offline_names_the_url_and_the_path(clips, tmp_path, monkeypatch):
    monkeypatch.setattr("utils.download.PARENT_URL", "http://127.0.0.1:9/sync_models")
    args = example.get_parser().parse_args(
        ["--exp_name", "24-01-04T16-39-21", "--vid_path", str(clips / "long.mp4"), "--logdir", str(tmp_path)]
    )
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1:9/sync_models/24-01-04T16-39-21/cfg-24-01-04T16-39-21"):
        example.main(args)


@pytest.fixture(scope="module")
def predictor(tiny_ckpt):
    return WindowPredictor(*load_model(ckpt_path=tiny_ckpt), batch_segments=8, batch_windows=4)


def test_windows_and_their_segments(predictor, clips):
    item = predictor.pipeline.prepare(*get_video_and_audio(clips / "long.mp4", get_meta=True), "long.mp4")
    starts = predictor.window_starts(item, stride_sec=1.28)
    assert starts == pytest.approx([0.0, 1.28, 2.56, 3.84, 5.12, 6.4])  # 12 s clip, 5 s windows
    for start in starts:
        keys = predictor.pipeline.window_segments(item, start)
        first_frame = round(start * 25) + 2  # 14 segments (4.8 s) centred in the 5 s crop
        assert [v for v, _ in keys] == [first_frame + 8 * j for j in range(14)]
        assert [a for _, a in keys] == [640 * v for v, _ in keys]  # audio starts with its frame
    base = predictor.pipeline.window_segments(item, 2.56)
    shifted = predictor.pipeline.window_segments(item, 2.56, offset_sec=0.4)
    assert [v for v, _ in shifted] == [v for v, _ in base]
    # a positive offset takes the audio 0.4 s later in the file, so its events come earlier in the crop
    assert [a for _, a in shifted] == [a + 6400 for _, a in base]


def test_feature_reuse_equals_per_window_computation(predictor, clips):
    rgb, audio, meta = get_video_and_audio(clips / "long.mp4", get_meta=True)
    item = predictor.pipeline.prepare(rgb, audio, copy.deepcopy(meta), "long.mp4")
    starts = predictor.window_starts(item, stride_sec=0.64)
    windows = [predictor.pipeline.window_segments(item, s) for s in starts]
    before = predictor.segments_computed
    shared = predictor.predict(item, windows)
    n_distinct = predictor.segments_computed - before
    assert n_distinct == 14 + 2 * (len(starts) - 1) < 14 * len(starts)

    # the plain way: the whole test-time pipeline and model for each window on its own
    transforms = SegmentPipeline.from_config(predictor.cfg)
    for start, logits in zip(starts, shared):
        one = {"video": rgb, "audio": audio, "meta": copy.deepcopy(meta), "path": "long.mp4",
               "split": "test", "targets": {"v_start_i_sec": start, "offset_sec": 0.0}}  # fmt: skip
        for t in transforms.whole + transforms.crop + transforms.per_segment:
            one = t(one)
        with torch.inference_mode():
            _, expected = predictor.model(one["video"][None].float(), one["audio"][None].float())
        assert (logits - expected[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("name, offset_sec", [("long.mp4", 0.0), ("odd.mp4", 0.4)])  # odd.mp4: re-encoded first
def test_tracking_decodes_a_batch_of_segments_at_a_time_with_the_same_results(predictor, clips, name, offset_sec,
                                                                                tmp_path, monkeypatch):  # fmt: skip
    """predict_track never holds more frames than one batch of segments spans (8 segments, 8 frames apart:
    72 frames), and its logits equal those of the whole decoded video."""
    decoded = []
    to_rgb24 = dataset.io._to_rgb24
    monkeypatch.setattr(dataset.io, "_to_rgb24", lambda frames: decoded.append(len(frames)) or to_rgb24(frames))
    rows, summary = predict_track(predictor, clips / name, tmp_path, stride_sec=1.28, offset_sec=offset_sec)
    assert len(rows) == summary["n_windows"] >= 2 and max(decoded) <= 72
    path = next(tmp_path.glob("*.mp4")) if name == "odd.mp4" else clips / name
    item = predictor.pipeline.prepare(*get_video_and_audio(path, get_meta=True), str(path))
    windows = [predictor.pipeline.window_segments(item, s, offset_sec) for s in predictor.window_starts(item, 1.28)]
    probs = torch.softmax(predictor.predict(item, windows), -1)
    assert [r["prob"] for r in rows] == [round(float(p.max()), 4) for p in probs]
    assert [r["class"] for r in rows] == probs.argmax(-1).tolist()


def test_bf16_windows_stay_close_to_float32(predictor, clips):
    item = predictor.pipeline.prepare(*get_video_and_audio(clips / "long.mp4", get_meta=True), "long.mp4")
    windows = [predictor.pipeline.window_segments(item, s) for s in predictor.window_starts(item, stride_sec=2.56)]
    bf16 = WindowPredictor(predictor.model, predictor.cfg, "bf16", batch_segments=8, batch_windows=4)
    fp32_logits, bf16_logits = predictor.predict(item, windows), bf16.predict(item, windows)
    assert bf16_logits.dtype == torch.float32 and not torch.equal(bf16_logits, fp32_logits)  # autocast ran
    assert (bf16_logits - fp32_logits).abs().max() < 0.05
    # weights stored in bf16 once (as load_model does) give exactly what autocast's casts at every call give
    stored = for_precision(predictor.model, "bf16")
    assert stored.transformer.blocks[0].mlp[0].weight.dtype == torch.bfloat16
    assert next(predictor.model.parameters()).dtype == torch.float32  # a copy
    stored_logits = WindowPredictor(stored, predictor.cfg, "bf16", batch_segments=8, batch_windows=4).predict(
        item, windows
    )
    assert torch.equal(stored_logits, bf16_logits)


def run_predict_offsets(*argv) -> int:
    return predict_offsets.main(predict_offsets.get_parser().parse_args([str(a) for a in argv]))


def test_predict_offsets_cli_writes_results_and_resumes(tiny_ckpt, clips, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "long.mp4").symlink_to(clips / "long.mp4")
    argv = [folder, "--ckpt_path", tiny_ckpt, "--out_dir", tmp_path / "out", "--device", "cpu"]
    assert run_predict_offsets(*argv) == 0
    result = json.loads((tmp_path / "out" / "long.mp4.json").read_text())
    assert result["n_windows"] == 6 and len(result["windows"]) == 6
    with open(tmp_path / "out" / "long.mp4.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["start_sec"]) for r in rows] == pytest.approx([0.0, 1.28, 2.56, 3.84, 5.12, 6.4])
    assert all(0 < float(r["prob"]) <= 1 and float(r["entropy"]) >= 0 for r in rows)
    assert (tmp_path / "out" / "long.mp4.png").stat().st_size > 0
    assert "segments computed: 34" in capsys.readouterr().out  # 6 windows, stride 4 segments: 14 + 5 * 4
    assert run_predict_offsets(*argv) == 0
    assert "segments computed: 0" in capsys.readouterr().out  # resumed: nothing left to do


def test_predict_offsets_refuses_colliding_names_and_keeps_a_video_named_summary(tiny_ckpt, clips, tmp_path, capsys):
    """x.mp4, x.MP4 and x.mkv are listed and left out, never merged; summary.mp4 keeps its per-window CSV
    beside the folder's summary.csv; a 250-byte name gets its results too."""
    folder, out = tmp_path / "videos", tmp_path / "out"
    folder.mkdir()
    for name in ("x.mp4", "x.MP4", "x.mkv", "summary.mp4", "l" * 246 + ".mp4"):
        (folder / name).symlink_to(clips / "long.mp4")
    assert run_predict_offsets(folder, "--ckpt_path", tiny_ckpt, "--out_dir", out, "--device", "cpu") == 0
    captured = capsys.readouterr()
    assert "2 videos done, 3 skipped" in captured.out and (out / ("l" * 246 + ".mp4.json")).is_file()
    assert "x.MP4: its output name 'x' is also that of x.mkv, x.mp4" in captured.err
    with open(out / "summary.mp4.csv") as f:
        assert len(list(csv.DictReader(f))) == 6  # the video's windows
    with open(out / "summary.csv") as f:
        assert [r["video"] for r in csv.DictReader(f)] == [
            str(folder / ("l" * 246 + ".mp4")),
            str(folder / "summary.mp4"),
        ]
    assert not list(out.glob("x.*"))


def test_predict_offsets_refuses_another_setting_and_redoes_a_torn_record(tiny_ckpt, clips, tmp_path, capsys):
    from utils.cli import UserError

    folder, out = tmp_path / "videos", tmp_path / "out"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (folder / name).symlink_to(clips / "long.mp4")
    argv = [folder, "--ckpt_path", tiny_ckpt, "--out_dir", out, "--device", "cpu"]
    assert run_predict_offsets(*argv) == 0
    log = out / "offsets.progress.jsonl"
    header, first, second = log.read_text().splitlines(keepends=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"stride_sec=1.28.*another --out_dir"):
        run_predict_offsets(*argv, "--stride_sec", "2.56")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    log.write_text(header + first + second[:-9])  # killed while writing b.mp4's record
    capsys.readouterr()
    assert run_predict_offsets(*argv) == 0
    assert "segments computed: 34" in capsys.readouterr().out  # b.mp4 again, a.mp4 kept
    assert log.read_text() == header + first + second


def test_fp32_means_float32_on_gpus_unless_tf32_is_asked_for(tiny_ckpt):
    parser, before = (
        example.get_parser(),
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision),
    )
    try:
        for flags, expected in (([], "ieee"), (["--tf32"], "tf32")):
            args = parser.parse_args(["--vid_path", "v.mp4", "--ckpt_path", str(tiny_ckpt), "--device", "cpu", *flags])
            load_model_from_args(args)
            assert torch.backends.cuda.matmul.fp32_precision == expected
            assert torch.backends.cudnn.conv.fp32_precision == expected
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
