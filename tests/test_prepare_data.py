"""Your own videos: `scripts/prepare_data.py` (format, clips, resume, shards; containment, unique ids,
one-line errors) and `dataset.folder.VideoFolder`
(splits, length filter, fixed offsets, a tiny stage 2 with its test-only run)."""

import csv
import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import main
from dataset.folder import VideoFolder, split_by_ratios
from dataset.io import decode_video, get_video_and_audio, reencode_video
from dataset.synthetic import ClipSpec, make_clip
from scripts import desync, prepare_data
from scripts.bench import prepare as bench_prepare
from tests.bad_media import write_brief_video
from tests.test_data import _audio_events, _merge_close, _video_events
from utils.cli import UserError
from utils.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
LAYOUT = "h264_video_25fps_256side_16000hz_aac"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def prepare(src: Path, dst: Path, *extra: str) -> int:
    return prepare_data.main(prepare_data.get_parser().parse_args([str(src), str(dst), *extra]))


@pytest.fixture(scope="module")
def raw_videos(tmp_path_factory) -> tuple[Path, dict]:
    """A 30 fps / 44.1 kHz stereo / 640x360 clip, a plain one in a subfolder, and a file that is no video."""
    src = tmp_path_factory.mktemp("raw")
    labels = {
        "odd": make_clip(src / "odd.mp4", ClipSpec(duration_sec=4, vfps=30, afps=44100, n_audio_channels=2,
                                                   height=360, width=640, min_gap_sec=0.5, max_gap_sec=0.8)),
        "sub/plain": make_clip(src / "sub" / "plain.mp4", ClipSpec(duration_sec=3, height=64, width=96, seed=1)),
    }  # fmt: skip
    for sidecar in src.rglob("*.json"):
        sidecar.unlink()
    (src / "bad.mp4").write_bytes(b"not a video" * 100)
    return src, labels


def check_layout(path: Path, visual_events: list[float], audio_events: list[float], src_fps: float) -> None:
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, a.codec_context.name, a.codec_context.channels) == ("h264", "aac", 1)
    rgb, audio, meta = get_video_and_audio(path, audio_priming_compat=False)
    assert meta == {"video": {"fps": [25.0]}, "audio": {"framerate": [16000]}}
    assert min(rgb.shape[-2:]) == 256 and all(s % 2 == 0 for s in rgb.shape[-2:])
    np.testing.assert_allclose(_video_events(rgb, 25), visual_events, atol=1 / src_fps + 1 / 25)
    np.testing.assert_allclose(_merge_close(_audio_events(audio, 16000)), audio_events, atol=0.01)


def test_prepare_formats_records_bad_inputs_and_resumes(raw_videos, tmp_path):
    src, labels = raw_videos
    dst = tmp_path / "dst"
    assert prepare(src, dst, "--workers", "2") == 0
    rows = {r["id"]: r for r in read_csv(dst / "manifest.csv")}
    assert {k: r["status"] for k, r in rows.items()} == {"odd": "encoded", "sub/plain": "encoded", "bad": "bad"}
    assert rows["odd"] | {"duration_sec": None} == {
        "id": "odd", "source": "odd.mp4", "start_sec": "0.0", "end_sec": "", "duration_sec": None, "fps": "25.0",
        "sample_rate": "16000", "height": "256", "width": "454", "status": "encoded",
    }  # fmt: skip
    assert abs(float(rows["odd"]["duration_sec"]) - 4) < 0.05
    (bad,) = read_csv(dst / "bad_inputs.csv")
    assert bad["id"] == "bad" and "bad.mp4" in bad["reason"] and "cannot be opened" in bad["reason"]
    check_layout(dst / LAYOUT / "odd.mp4", labels["odd"]["visual_events_sec"], labels["odd"]["audio_events_sec"], 30)
    plain = labels["sub/plain"]
    check_layout(dst / LAYOUT / "sub" / "plain.mp4", plain["visual_events_sec"], plain["audio_events_sec"], 25)
    assert not list(dst.rglob("*.tmp-*"))

    # resume: checked files are kept as they are; a truncated one is redone
    outputs = {p: p.stat().st_mtime_ns for p in (dst / LAYOUT).rglob("*.mp4")}
    odd = dst / LAYOUT / "odd.mp4"
    odd.write_bytes(odd.read_bytes()[: odd.stat().st_size // 2])
    (dst / LAYOUT / "sub" / "plain.mp4.tmp-999.mp4").write_bytes(b"half-written by a killed run")
    assert prepare(src, dst) == 0
    rows = {r["id"]: r["status"] for r in read_csv(dst / "manifest.csv")}
    assert rows == {"odd": "encoded", "sub/plain": "done", "bad": "bad"}
    assert (dst / LAYOUT / "sub" / "plain.mp4").stat().st_mtime_ns == outputs[dst / LAYOUT / "sub" / "plain.mp4"]
    assert not list(dst.rglob("*.tmp-*"))
    check_layout(odd, labels["odd"]["visual_events_sec"], labels["odd"]["audio_events_sec"], 30)


def test_prepare_cuts_clips_from_a_csv(raw_videos, tmp_path):
    src, labels = raw_videos
    clips = tmp_path / "clips.csv"
    clips.write_text("video,start_sec,end_sec\nodd.mp4,1.0,3.0\nsub/plain.mp4,0.5,2.5\nmissing.mp4,0,1\nodd.mp4,x,2\n")
    dst = tmp_path / "dst"
    assert prepare(src, dst, "--clips", str(clips)) == 0
    rows = {r["id"]: r for r in read_csv(dst / "manifest.csv")}
    assert {k: r["status"] for k, r in rows.items()} == {
        "odd_1000_3000": "encoded", "sub/plain_500_2500": "encoded", "missing_0_1000": "bad"
    }  # fmt: skip
    assert float(rows["odd_1000_3000"]["duration_sec"]) == pytest.approx(2.0, abs=0.07)
    reasons = [r["reason"] for r in read_csv(dst / "bad_inputs.csv")]
    assert len(reasons) == 2 and any("does not exist" in r for r in reasons) and any("row 5" in r for r in reasons)

    def inside(times, lo, hi):
        return [t - lo for t in times if lo + 0.05 < t < hi - 0.15]

    cuts = [("odd_1000_3000", "odd", 1.0, 3.0, 30), ("sub/plain_500_2500", "sub/plain", 0.5, 2.5, 25)]
    for clip, name, lo, hi, fps in cuts:
        visual, audio = (inside(labels[name][k], lo, hi) for k in ("visual_events_sec", "audio_events_sec"))
        assert visual and audio, "the cut must keep some events"
        rgb, wave, _ = get_video_and_audio(dst / LAYOUT / f"{clip}.mp4", audio_priming_compat=False)
        assert rgb.shape[0] == 50
        np.testing.assert_allclose(_video_events(rgb, 25), visual, atol=1 / fps + 1 / 25)
        np.testing.assert_allclose(_merge_close(_audio_events(wave, 16000)), audio, atol=0.01)


def test_shards_split_the_work_and_slurm_arrays_pick_theirs(raw_videos, tmp_path):
    src, _ = raw_videos
    for i in range(2):
        assert prepare(src, tmp_path / "dst", "--shard", f"{i}/2") in (0, 1)  # a shard may hold only the bad file
    shards = [{r["id"] for r in read_csv(tmp_path / "dst" / f"manifest-{i}-of-2.csv")} for i in range(2)]
    assert shards[0] | shards[1] == {"odd", "sub/plain", "bad"} and not shards[0] & shards[1]
    assert all(shards)
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert prepare_data.parse_shard(None, env) == (2, 4)
    assert prepare_data.parse_shard("1/3", env) == (1, 3)  # the flag wins
    assert prepare_data.parse_shard(None, {}) == (0, 1)
    for bad in ("2/2", "a/b", "3"):
        with pytest.raises(ValueError, match="--shard"):
            prepare_data.parse_shard(bad)


def write_manifest(root: Path, durations: dict[str, float], sources: dict[str, str] | None = None) -> Path:
    rows = [{"id": c, "source": (sources or {}).get(c, f"{c}.mp4"), "duration_sec": d, "status": "encoded"}
            for c, d in durations.items()]  # fmt: skip
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / LAYOUT


def test_video_folder_splits_are_deterministic_and_keep_sources_together():
    rows = {f"c{i:03d}": {"source": f"v{i // 3}.mp4"} for i in range(90)}
    splits = split_by_ratios(rows, (0.8, 0.1, 0.1), seed=1)
    assert splits == split_by_ratios(dict(reversed(rows.items())), (0.8, 0.1, 0.1), seed=1)
    assert splits != split_by_ratios(rows, (0.8, 0.1, 0.1), seed=2)
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "valid", "test")}
    assert counts == {"train": 72, "valid": 9, "test": 9}
    for i in range(0, 90, 3):  # clips of one source video share a split
        assert len({splits[f"c{j:03d}"] for j in range(i, i + 3)}) == 1
    with pytest.raises(ValueError, match="split_ratios"):
        split_by_ratios(rows, (0.8, 0.2), seed=1)


def test_video_folder_filters_short_clips_and_fixes_offsets(tmp_path):
    from dataset.dataset_utils import get_transforms
    from utils.config import load_config

    durations = {f"c{i:02d}": 7.2 for i in range(20)} | {"short": 6.5, "bad": 9.0}
    vids_dir = write_manifest(tmp_path, durations)
    with open(tmp_path / "manifest.csv", "a") as f:
        f.write("bad,bad.mp4,9.0,bad\n")  # a bad row of an earlier shard run is not a clip
    cfg = load_config([f"config={REPO / 'configs' / 'tiny' / 'sync.yaml'}"])
    ratios, splits = (0.5, 0.25, 0.25), ("train", "valid", "test")
    sets = {s: VideoFolder(s, vids_dir, get_transforms(cfg, s), split_ratios=ratios) for s in splits}
    ids = {s: {Path(p).stem for p in ds.dataset} for s, ds in sets.items()}
    assert set().union(*ids.values()) == {f"c{i:02d}" for i in range(20)}  # 6.5 s < 5 s crop + 2 s offset
    assert sum(map(len, ids.values())) == 20
    assert not sets["train"].vid2offset_params and set(sets["test"].vid2offset_params) == ids["test"]
    again = VideoFolder("test", vids_dir, get_transforms(cfg, "test"), split_ratios=(0.5, 0.25, 0.25))
    assert again.vid2offset_params == sets["test"].vid2offset_params
    grid = np.linspace(-2, 2, 21).round(2).tolist()
    for params in sets["test"].vid2offset_params.values():
        assert params["offset_sec"] in grid
        for start in (params["v_start_i_sec"], params["v_start_i_sec"] + params["offset_sec"]):
            assert 0 <= start and start + 5 <= 7.2
    assert len(VideoFolder("train", vids_dir, split_ratios=(0.5, 0.25, 0.25), size_ratio=0.5)) == 5
    # given split files instead of ratios, and a repeated test set
    (tmp_path / "test.txt").write_text("c00\nc01\nshort\nunknown\n")
    ds = VideoFolder("test", vids_dir, get_transforms(cfg, "test"), split_files=f"{tmp_path}/{{split}}.txt",
                     iter_times=3)  # fmt: skip
    assert [Path(p).stem for p in ds.dataset] == ["c00", "c01"] and len(ds) == 6
    with pytest.raises(FileNotFoundError, match="valid.txt"):
        VideoFolder("valid", vids_dir, split_files=f"{tmp_path}/{{split}}.txt")


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> list[str]:
    """Overrides pointing the tiny configs at 8 synthetic clips prepared by prepare_data, split 4/2/2."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(8):  # 9.8 s: synchronizability training shifts the audio by up to a whole 4.8 s crop
        make_clip(root / "raw" / f"clip{i:02d}.mp4", ClipSpec(duration_sec=9.8, height=48, width=64, seed=i))
    assert prepare(root / "raw", root / "dst", "--size", "32") == 0
    return [
        f"data.vids_path={root / 'dst' / 'h264_video_25fps_32side_16000hz_aac'}",
        "data.dataset.target=dataset.folder.VideoFolder",
        "data.dataset.params.split_ratios=[0.5,0.25,0.25]",
        "data.audio_priming_compat=False",
        "training.base_batch_size=2",
        "training.max_train_iters=2",
        "training.max_eval_iters=1",
    ]


def tiny(config: str) -> str:
    return f"config={REPO / 'configs' / 'tiny' / config}"


def test_tiny_stage2_and_test_only_on_a_prepared_folder(folder_data, tmp_path):
    main.main([tiny("sync.yaml"), f"logging.logdir={tmp_path}", "start_time=s2", "training.num_epochs=1", *folder_data])
    (test,) = read_metrics(tmp_path / "s2", "test")
    assert [r["epoch"] for r in read_metrics(tmp_path / "s2", "train")] == [0] and 0 <= test["accuracy_1"] <= 1
    main.main([f"config={tmp_path / 's2' / 'cfg-s2.yaml'}", f"ckpt_path={tmp_path / 's2' / 's2_best.pt'}",
               "training.run_test_only=True", f"logging.logdir={tmp_path}", "start_time=again"])  # fmt: skip
    assert read_metrics(tmp_path / "again", "test")[0] == pytest.approx(test, abs=1e-5)


@pytest.mark.skipif(not os.environ.get("SYNCHFORMER_LONG_TESTS"), reason="about a minute: SYNCHFORMER_LONG_TESTS=1")
def test_stage1_stage2_and_synchronizability_on_a_prepared_folder(folder_data, tmp_path):
    common = [f"logging.logdir={tmp_path}", "training.num_epochs=1", *folder_data]
    main.main([tiny("segment_avclip.yaml"), "start_time=s1", *common])
    s1 = tmp_path / "s1" / "checkpoints" / "epoch_best.pt"
    main.main([tiny("sync.yaml"), "start_time=s2", *common, f"model.params.vfeat_extractor.params.ckpt_path={s1}",
               f"model.params.afeat_extractor.params.ckpt_path={s1}"])  # fmt: skip
    assert read_metrics(tmp_path / "s2", "test")
    main.main([tiny("ft_synchability.yaml"), "start_time=ft", "training.finetune=True",
               f"ckpt_path={tmp_path / 's2' / 's2_best.pt'}", *common])  # fmt: skip
    assert "mROCAUC" in read_metrics(tmp_path / "ft", "test")[0]


def test_bench_prepare_quick(monkeypatch, capsys, tmp_path):
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["bench_prepare", "--quick", "--out", str(out)])
    bench_prepare.main()
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["runs"]] == [1, 2] and result["clips"] == 2
    assert all(r["clips_per_second"] > 0 for r in result["runs"]) and "2 worker(s)" in line


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "clip.mp4"
    make_clip(path, ClipSpec(duration_sec=1.2, height=32, width=32, seed=3))
    return path


def test_csv_rows_and_links_cannot_lead_out_of_dst(small_clip, tmp_path):
    src, outside, dst = tmp_path / "s1" / "s2", tmp_path / "outside", tmp_path / "dst"
    for folder in (src / "link", outside):
        folder.mkdir(parents=True)
        (folder / "v.mp4").write_bytes(small_clip.read_bytes())
    (src / "ok.mp4").write_bytes(small_clip.read_bytes())
    precious = {outside / "v_0_1000.mp4": b"someone's file", outside / "v_0_1000.mp4.tmp-1.mp4": b"another one"}
    for path, data in precious.items():
        path.write_bytes(data)
    (dst / LAYOUT).mkdir(parents=True)
    (dst / LAYOUT / "link").symlink_to(outside, target_is_directory=True)
    clips = tmp_path / "clips.csv"
    rows = [f"{outside / 'v.mp4'},0,1", "../../outside/v.mp4,0,1", "link/v.mp4,0,1", "ok.mp4,0,1", "ok.mp4,0.2,1"]
    clips.write_text("\n".join([*rows, "ok.mp4,0.2,1.0004"]) + "\n")
    assert prepare(src, dst, "--clips", str(clips)) == 0
    assert {p: p.read_bytes() for p in precious} == precious and sorted(outside.iterdir()) == sorted([
        outside / "v.mp4", *precious
    ])  # fmt: skip
    assert {r["id"]: r["status"] for r in read_csv(dst / "manifest.csv")} == {"ok_0_1000": "encoded"}
    reasons = {r["source"]: r["reason"] for r in read_csv(dst / "bad_inputs.csv")}
    assert "absolute" in reasons[str(outside / "v.mp4")] and "'..'" in reasons["../../outside/v.mp4"]
    assert "symlink" in reasons["link/v.mp4"]
    assert "'ok_200_1000' is also that of ok.mp4" in reasons["ok.mp4"]  # two rows, one clip: neither is picked
    (dst / LAYOUT / "raw.mp4").write_bytes(small_clip.read_bytes())  # not in the format: it would be replaced
    for overlapping_src, overlapping_dst in [(src, src / "prepared"), (dst / LAYOUT, dst)]:
        with pytest.raises(UserError, match="overlap"):
            prepare(overlapping_src, overlapping_dst)
    assert not (src / "prepared").exists() and (dst / LAYOUT / "raw.mp4").read_bytes() == small_clip.read_bytes()


def test_colliding_ids_are_refused_not_merged(small_clip, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("x.mp4", "x.MP4", "x.mkv", "y.mp4"):
        (src / name).write_bytes(small_clip.read_bytes())
    assert prepare(src, tmp_path / "dst") == 0
    assert [r["id"] for r in read_csv(tmp_path / "dst" / "manifest.csv")] == ["y"]
    reasons = {r["source"]: r["reason"] for r in read_csv(tmp_path / "dst" / "bad_inputs.csv")}
    assert sorted(reasons) == ["x.MP4", "x.mkv", "x.mp4"] and "x.MP4, x.mkv" in reasons["x.mp4"]
    assert sorted(p.name for p in (tmp_path / "dst" / LAYOUT).iterdir()) == ["y.mp4"]


def test_output_problems_stop_the_run_in_one_line(small_clip, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.mp4", "b.mp4", "c" * 246 + ".mp4"):  # a 250-byte name: its temporary name is cut short
        (src / name).write_bytes(small_clip.read_bytes())
    (tmp_path / "file").write_text("a file where DST's folder should be")
    with pytest.raises(UserError, match=r"cannot write .*file/h264.*: Not a directory \(.*choose another DST"):
        prepare(src, tmp_path / "file")

    # a full disk: the first write fails and the run stops there instead of blaming every input
    calls = []
    (tmp_path / "full.mp4").symlink_to("/dev/full")

    def reencode_onto_a_full_disk(*args, out_path, **kwargs):
        calls.append(args[0])
        return reencode_video(*args, out_path=tmp_path / "full.mp4", **kwargs)

    monkeypatch.setattr(prepare_data, "reencode_video", reencode_onto_a_full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        prepare(src, tmp_path / "dst")
    assert len(calls) == 1
    monkeypatch.undo()

    assert prepare(src, tmp_path / "dst") == 0
    assert [r["status"] for r in read_csv(tmp_path / "dst" / "manifest.csv")] == ["encoded"] * 3
    assert (tmp_path / "dst" / "h264_video_25fps_256side_16000hz_aac" / ("c" * 246 + ".mp4")).is_file()


def test_a_read_only_dst_stops_the_run_in_one_line(small_clip, tmp_path):
    (tmp_path / "src").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "src" / name).write_bytes(small_clip.read_bytes())
    (tmp_path / "dst").mkdir(mode=0o555)
    try:
        (tmp_path / "dst" / "probe").touch()
        pytest.skip("this user writes into read-only folders (root, unless its capabilities are dropped)")
    except PermissionError:
        pass
    with pytest.raises(UserError, match="cannot write .*dst.*Permission denied"):
        prepare(tmp_path / "src", tmp_path / "dst")


def test_bad_numbers_and_still_images_are_refused(small_clip, tmp_path, capsys):
    for args in (["--workers", "0"], ["--workers", "-1"], ["--size", "1"], ["--afps", "0"]):
        with pytest.raises(SystemExit) as e:
            prepare_data.get_parser().parse_args(["src", "dst", *args])
        assert e.value.code == 2 and f"argument {args[0]}: expected a finite int" in capsys.readouterr().err
    for args in (["--duration", "0"], ["--duration", "nan"], ["--duration", "inf"], ["--num_workers", "-1"]):
        with pytest.raises(SystemExit):
            desync.get_parser().parse_args(["videos", *args])
        assert f"argument {args[0]}: expected a finite" in capsys.readouterr().err

    src = tmp_path / "src"
    src.mkdir()
    (src / "clip.mp4").write_bytes(small_clip.read_bytes())
    write_brief_video(src / "still.mp4")
    clips = tmp_path / "clips.csv"
    clips.write_text("clip.mp4,0,inf\nclip.mp4,nan,1\nclip.mp4,0,nan\nstill.mp4,0,1\nclip.mp4,0,1\n")
    assert prepare(src, tmp_path / "dst", "--clips", str(clips)) == 0
    assert [r["id"] for r in read_csv(tmp_path / "dst" / "manifest.csv") if r["status"] != "bad"] == ["clip_0_1000"]
    reasons = [r["reason"] for r in read_csv(tmp_path / "dst" / "bad_inputs.csv")]
    assert [f"row {i}" in r for i, r in zip((1, 2, 3), reasons)] == [True] * 3
    assert "still.mp4: has 1 video frame(s): a still image" in reasons[3]
    write_brief_video(tmp_path / "brief.mp4", n_frames=10, audio_sec=2)
    brief = reencode_video(tmp_path / "brief.mp4", in_size=32, out_dir=tmp_path)
    assert decode_video(brief)[0].shape[0] == 10  # the last frame lasts its own 40 ms, not up to the audio's end
    for bad in ([str(tmp_path / "missing.csv")], []):
        with pytest.raises(UserError, match="missing"):
            prepare(tmp_path / "missing" if not bad else src, tmp_path / "dst", *(["--clips", *bad] if bad else []))
