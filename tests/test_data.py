"""Data pipeline: decode parity with the original, windows, offsets, segments, datasets, re-encoding,
synthetic clips and bad inputs. Synthetic clips are written to tmp dirs; the tests of real samples skip
without them (see tests/reference_data.py)."""

import hashlib
import json
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

import dataset.io
from dataset import transforms as T
from dataset.audioset import AudioSet
from dataset.dataset_utils import collate_drop_bad, get_datasets, get_transforms, load_item
from dataset.io import (
    BadVideoError,
    audio_priming_drop,
    decode_audio,
    decode_skipping_nonref_before,
    decode_video,
    decode_video_window,
    get_video_and_audio,
    reencode_video,
)
from dataset.lrs import LRS3
from dataset.synthetic import (
    ClipSpec,
    make_clip,
    make_vggsound_like,
    render_audio,
    render_video,
    sample_events,
    write_mp4,
)
from dataset.vggsound import VGGSound, VGGSoundSparsePicked, VGGSoundSparsePickedCleanTestFixedOffsets
from scripts import download_metadata
from scripts.bench import data as bench_data
from tests.bad_media import write_bad_videos
from tests.reference_data import DATA, REPO, needs_samples, reference_file, reference_json
from utils.download import DownloadError

VGG_DIR = DATA / "vggsound" / "h264_video_25fps_256side_16000hz_aac"
REF_CLIP = VGG_DIR / "3qesirWAGt4_20000_30000.mp4"
LRS_DIR = DATA / "lrs3" / "h264_uncropped_25fps_256side_16000hz_aac"
LRS_CLIP = LRS_DIR / "pretrain" / "C8zY0oAdQrs" / "00018.mp4"
TEST_OFFSETS = "test_size21_crop5_min-2.00_max2.00.csv"
CFG = OmegaConf.load(REPO / "configs" / "sync.yaml")


@pytest.fixture(scope="module")
def drift_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "drift.mp4"
    return path, make_clip(path, ClipSpec(duration_sec=12, height=64, width=96, offset_sec=0.4, offset_after_sec=-0.6))


@pytest.fixture(scope="module")
def synced_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "synced.mp4"
    return path, make_clip(path, ClipSpec(duration_sec=10, height=64, width=64, gop=10, seed=3))


@pytest.fixture(scope="module")
def vgg_like(tmp_path_factory):
    return make_vggsound_like(tmp_path_factory.mktemp("vgg"), n_clips=20, duration_sec=8.0, side=32)


def _event_times(signal: np.ndarray, rate: float, threshold: float) -> np.ndarray:
    """Onsets (s) of the runs where `signal` exceeds `threshold`."""
    above = signal > threshold
    onsets = np.flatnonzero(above & ~np.concatenate([[False], above[:-1]]))
    return onsets / rate


def _video_events(rgb: torch.Tensor, fps: float) -> np.ndarray:
    return _event_times(rgb.float().amax(dim=(1, 2, 3)).numpy(), fps, 128)


def _audio_events(audio: torch.Tensor, sr: int) -> np.ndarray:
    return _event_times(np.abs(audio.numpy()), sr, 0.2)


def _merge_close(times: np.ndarray, gap: float = 0.1) -> np.ndarray:
    return times[np.concatenate([[True], np.diff(times) > gap])] if len(times) else times


# ---------------------------------------------------------------- decoding


@needs_samples
def test_decode_matches_original_av900():
    ref = reference_json("pipeline")["cases"]["3qesirWAGt4_O1.6_V0.0"]
    ref_audio = np.load(reference_file("pipeline_3qesirWAGt4_O1.6_V0.0.npz"))["raw_audio"]
    rgb, audio, meta = get_video_and_audio(REF_CLIP, get_meta=True)
    assert meta == {"video": {"fps": [25.0]}, "audio": {"framerate": [16000]}}
    assert list(rgb.shape) == ref["raw"]["rgb_shape"] and rgb.dtype == torch.uint8
    sha = [hashlib.sha256(f.contiguous().numpy().tobytes()).hexdigest() for f in rgb]
    assert sha == ref["raw"]["raw_rgb_frame_sha256"]
    assert audio.shape == ref_audio.shape and np.abs(audio.numpy() - ref_audio).max() < 1e-5


@needs_samples
def test_priming_compat_drops_1024_samples_only_for_primed_files():
    assert audio_priming_drop(REF_CLIP) == 1024
    assert audio_priming_drop(LRS_CLIP) == 0
    exact, _ = decode_audio(REF_CLIP, audio_priming_compat=False)
    compat, _ = decode_audio(REF_CLIP)
    assert torch.equal(exact[1024:], compat)


@pytest.mark.parametrize("time_base", [Fraction(1, 12800), Fraction(1, 16000), Fraction(1001, 30000)])
def test_pts_to_seconds_equals_the_exact_conversion(time_base):
    seconds = dataset.io._pts_to_seconds(time_base)
    pts = np.random.default_rng(0).integers(-(10**6), 10**10, 10_000).tolist() + [0, 25600, 12800 * 3]
    assert [seconds(p) for p in pts] == [float(p * time_base) for p in pts]


@needs_samples
def test_windowed_audio_when_the_priming_drop_exceeds_its_bound(monkeypatch):
    """A demuxer whose seek to 0 lands later than expected makes the drop larger than the samples decoded
    ahead: the windowed read then decodes the whole stream and still equals the full read cropped."""
    monkeypatch.setattr(dataset.io, "_priming_drop", lambda container, stream, first_pts: abs(first_pts) + 500)
    full, sr = decode_audio(REF_CLIP)
    windowed, _ = decode_audio(REF_CLIP, 1.0, 3.0)
    assert torch.equal(windowed, full[sr : 3 * sr])


# B-frames, one keyframe / no B-frames, a keyframe every 10
@pytest.mark.parametrize("clip", [pytest.param("real", marks=needs_samples), "synced"])
@pytest.mark.parametrize("start, end, pixels_end", [(0.0, 3.0, 2.0), (1.64, 6.2, None), (4.0, None, 5.52)])
def test_windowed_decode_equals_full_decode_cropped(clip, synced_clip, start, end, pixels_end):
    path = REF_CLIP if clip == "real" else synced_clip[0]
    rgb, audio, meta = get_video_and_audio(path)
    fps, sr = meta["video"]["fps"][0], meta["audio"]["framerate"][0]
    w_rgb, w_audio, _ = get_video_and_audio(path, start_sec=start, end_sec=end)
    v0, a0 = int(np.ceil(start * fps - 1e-6)), round(start * sr)
    v1 = None if end is None else int(np.ceil(end * fps - 1e-6))
    a1 = None if end is None else round(end * sr)
    assert torch.equal(w_rgb, rgb[v0:v1]) and torch.equal(w_audio, audio[a0:a1])
    # decoding stops early, the frames up to the end are still counted
    p_rgb, _, n_frames = decode_video_window(path, start, end, pixels_end)
    v2 = v1 if pixels_end is None else int(np.ceil(pixels_end * fps - 1e-6))
    assert torch.equal(p_rgb, rgb[v0:v2]) and n_frames == len(rgb[v0:v1])


@needs_samples
@pytest.mark.parametrize("path", [REF_CLIP, LRS_CLIP])  # one keyframe / a second one at 10 s (seeks)
def test_decode_video_window_counts_like_a_full_decode(path):
    rgb, fps = decode_video(path)
    duration = len(rgb) / fps
    rng = np.random.default_rng(0)
    for _ in range(8):
        start, pixels_end, end = np.sort(rng.uniform(0, duration, 3)).round(2).tolist()
        window, _, n_frames = decode_video_window(path, start, end, pixels_end)
        first, stop, last = (int(np.ceil(t * fps - 1e-6)) for t in (start, pixels_end, end))
        assert n_frames == last - first and torch.equal(window, rgb[first:stop])


@pytest.fixture(scope="module")
def short_video_clip(tmp_path_factory):
    """10 s of audio but only 7.3 s of video."""
    spec = sample_events(ClipSpec(duration_sec=10, height=32, width=32, gop=10, seed=5))
    path = tmp_path_factory.mktemp("syn") / "short_video.mp4"
    write_mp4(path, render_video(spec)[: int(7.3 * spec.vfps)], render_audio(spec), spec.vfps, spec.afps, spec.gop)
    return path


GRID = [(offset, v_start) for offset in (-2.0, -0.6, 0.0, 1.6, 2.0) for v_start in (0.0, 2.0, 3.04, 5.0)]


@pytest.mark.parametrize("clip, cases", [
    pytest.param("real", [(1.6, 0.0), (0.4, 2.0), (2.0, 3.04), (-2.0, 5.0), (2.0, 5.0)], marks=needs_samples),
    ("short_video", GRID),
])  # fmt: skip
def test_windowed_items_equal_full_reads(clip, cases, short_video_clip):
    """Every fixed offset gives the full read's item or the same error: with a positive offset the video is
    decoded only up to its crop and its remaining frames are counted."""
    path = REF_CLIP if clip == "real" else short_video_clip
    transforms = get_transforms(OmegaConf.merge(CFG, {"data": {"input_size": 32}}), "test")
    n_items = 0
    for offset, v_start in cases:
        outcome = []
        for windowed in (True, False):
            targets = {"offset_sec": offset, "v_start_i_sec": v_start}
            try:
                outcome.append(load_item(path, "test", targets, transforms, windowed_decode=windowed))
            except BadVideoError as e:
                outcome.append(str(e))
        windowed, full = outcome
        if isinstance(full, str):
            assert windowed == full
            continue
        n_items += 1
        assert torch.equal(windowed["video"], full["video"]) and torch.equal(windowed["audio"], full["audio"])
        assert repr(windowed["targets"]) == repr(full["targets"]) and repr(windowed["meta"]) == repr(full["meta"])
    assert 0 < n_items < len(cases)  # some crops fit, some do not


@needs_samples
def test_unreferenced_frames_before_the_window_are_not_decoded():
    def decoded_times(start_sec):
        with av.open(str(REF_CLIP)) as container:
            stream = container.streams.video[0]
            frames = decode_skipping_nonref_before(container.demux(stream), stream, start_sec)
            return [float(f.pts * stream.time_base) for f in frames]

    every, skipping = decoded_times(0.0), decoded_times(2.0)
    assert len(every) == 250
    # the B-frames nobody references (about half of them) are skipped before 2 s, nothing after
    assert 0.3 * 50 < len([t for t in skipping if t < 2.0]) < 0.7 * 50
    assert [t for t in skipping if t >= 2.0] == [t for t in every if t >= 2.0]


def test_synthetic_clip_decodes_with_expected_format_and_event_times(drift_clip):
    path, labels = drift_clip
    rgb, audio, meta = get_video_and_audio(path, audio_priming_compat=False)
    assert meta == {"video": {"fps": [25.0]}, "audio": {"framerate": [16000]}}
    assert rgb.shape == (300, 3, 64, 96) and abs(len(audio) / 16000 - 12) < 0.13  # AAC pads its last 1024-sample frame
    np.testing.assert_allclose(_video_events(rgb, 25), labels["visual_events_sec"], atol=1 / 25 + 1e-6)
    centre = _event_times(rgb[:, :, 32, 48].float().amax(dim=1).numpy(), 25, 128)  # every flash covers it
    np.testing.assert_allclose(centre, labels["visual_events_sec"], atol=1 / 25 + 1e-6)
    np.testing.assert_allclose(_merge_close(_audio_events(audio, 16000)), labels["audio_events_sec"], atol=0.01)
    # drift: the first half runs 0.4 s ahead, the second 0.6 s behind
    shifts = np.array(labels["visual_events_sec"]) - np.array(labels["audio_events_sec"])
    assert set(np.round(shifts, 6)) == {0.4, -0.6}


def test_events_span_confines_events():
    # one event per clip, always where any 5 s crop shifted by up to 2 s sees it in both streams
    for seed in range(20):
        spec = ClipSpec(duration_sec=7, events_span_sec=(2.5, 4.5), min_gap_sec=2, max_gap_sec=2, seed=seed)
        spec = sample_events(spec)
        assert len(spec.visual_events_sec) == 1 and 2.5 - 0.02 <= spec.visual_events_sec[0] < 4.5 + 0.02
    default = sample_events(ClipSpec(duration_sec=7, seed=0))
    assert len(default.visual_events_sec) > 1


@pytest.mark.parametrize("vfps, afps, channels, hw", [(30, 44100, 2, (360, 640)), (25, 16000, 1, (256, 256))])
def test_reencode_variants(tmp_path, vfps, afps, channels, hw):
    src = tmp_path / "src.mp4"
    spec = ClipSpec(duration_sec=3, vfps=vfps, afps=afps, n_audio_channels=channels, height=hw[0], width=hw[1])
    labels = make_clip(src, spec)
    out = reencode_video(src, out_dir=tmp_path / "out")
    rgb, audio, meta = get_video_and_audio(out, audio_priming_compat=False)
    assert meta == {"video": {"fps": [25.0]}, "audio": {"framerate": [16000]}}
    assert min(rgb.shape[-2:]) == 256 and all(s % 2 == 0 for s in rgb.shape[-2:])
    assert abs(rgb.shape[-1] / rgb.shape[-2] - hw[1] / hw[0]) < 0.01 and rgb.shape[0] == 75
    assert abs(len(audio) / 16000 - 3) < 0.13  # AAC pads its last 1024-sample frame
    np.testing.assert_allclose(_video_events(rgb, 25), labels["visual_events_sec"], atol=1 / vfps + 1 / 25)
    np.testing.assert_allclose(_merge_close(_audio_events(audio, 16000)), labels["audio_events_sec"], atol=0.01)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_bad_video_error_naming_the_file(tmp_path):
    for name, problem in write_bad_videos(tmp_path).items():
        if name == "short.mp4":  # decodes: too short only for a window
            continue
        with pytest.raises(BadVideoError, match=problem) as e:
            get_video_and_audio(tmp_path / name)
        assert name in str(e.value)


def test_too_short_clip_for_crop_and_offset(synced_clip):
    rgb, audio, meta = get_video_and_audio(synced_clip[0], end_sec=5.5)
    item = {"video": rgb, "audio": audio, "meta": meta, "path": "short.mp4", "split": "test"}
    crop = T.TemporalCropAndOffset(crop_len_sec=5, max_off_sec=2, grid_size=21)
    with pytest.raises(BadVideoError, match="short.mp4"):
        crop({**item, "targets": {"offset_sec": 2.0, "v_start_i_sec": 0.0}})


def test_dataset_skips_bad_samples_and_collate_counts_them(vgg_like, tmp_path):
    vids_dir, splits_path = vgg_like
    ds = VGGSound("train", vids_dir, splits_path=splits_path, skip_bad_samples=True, load_fixed_offsets_on=[])
    ds.dataset = [ds.dataset[0], str(tmp_path / Path(ds.dataset[0]).name)]  # a known id, but no file
    batch = collate_drop_bad([ds[0], ds[1]])
    assert batch["n_bad_samples"] == 1 and batch["video"].shape[0] == 1
    assert collate_drop_bad([None]) is None
    ds.skip_bad_samples = False
    with pytest.raises(BadVideoError, match="does not exist"):
        ds[1]


# ---------------------------------------------------------------- transforms


@needs_samples
def test_test_pipeline_matches_original_and_is_deterministic():
    ref = reference_json("pipeline")["cases"]["3qesirWAGt4_O1.6_V0.0"]
    ref_npz = np.load(reference_file("pipeline_3qesirWAGt4_O1.6_V0.0.npz"))
    rgb, audio, meta = get_video_and_audio(REF_CLIP)
    outs = []
    for _ in range(2):
        item = {"video": rgb, "audio": audio, "meta": json.loads(json.dumps(meta)), "path": str(REF_CLIP)}
        item |= {"split": "test", "targets": {"v_start_i_sec": 0.0, "offset_sec": 1.6}}
        outs.append(get_transforms(CFG, "test")(item))
    item = outs[0]
    assert item["video"].shape == (14, 16, 3, 224, 224) and item["video"].dtype == torch.float16
    assert hashlib.sha256(item["video"].numpy().tobytes()).hexdigest() == ref["video"]["sha256"]
    assert item["audio"].shape == (14, 1, 128, 66)
    assert np.abs(item["audio"].numpy() - ref_npz["audio"]).max() < 1e-4
    assert item["targets"]["offset_target"].item() == 18 and item["targets"]["offset_label"].item() == pytest.approx(
        1.6
    )
    assert torch.equal(outs[0]["video"], outs[1]["video"]) and torch.equal(outs[0]["audio"], outs[1]["audio"])
    assert sorted(item) == ref["item_keys"]


def test_segment_ranges_and_overlap():
    gen = T.GenerateMultipleSegments(segment_size_vframes=16, n_segments=14, step_size_seg=0.5)
    v_ranges, a_ranges = gen.segment_ranges(125, 80000, 25, 16000)
    ref = reference_json("pipeline")["cases"]["3qesirWAGt4_O1.6_V0.0"]
    seg_ref = ref["index_arithmetic"]["GenerateMultipleSegments"]
    assert v_ranges[:, 0].tolist() == seg_ref["v_seg_starts"] and a_ranges[:, 0].tolist() == seg_ref["a_seg_starts"]
    assert ((v_ranges[:, 1] - v_ranges[:, 0]) == 16).all() and ((a_ranges[:, 1] - a_ranges[:, 0]) == 10240).all()
    assert (v_ranges[1:, 0] - v_ranges[:-1, 1] == -8).all()  # half-overlapping


@pytest.mark.parametrize("offset", [1.2, 0.4, 0.0, -0.8, -2.0])
def test_offset_semantics_on_synthetic_clip(synced_clip, offset):
    """After the crop, the audio event of each flash sits `offset` s earlier than the flash."""
    path, labels = synced_clip
    rgb, audio, meta = get_video_and_audio(path, audio_priming_compat=False)
    item = {"video": rgb, "audio": audio, "meta": meta, "path": str(path), "split": "test"}
    item["targets"] = {"offset_sec": offset, "v_start_i_sec": 2.0}
    item = T.TemporalCropAndOffset(crop_len_sec=5, max_off_sec=2, grid_size=21, max_wiggle_sec=0.0)(item)
    v_events = _video_events(item["video"], 25)
    a_events = _merge_close(_audio_events(item["audio"], 16000))
    expected_a = [t - offset for t in v_events if 0 <= t - offset < 4.9]
    assert len(expected_a) >= 2
    for t in expected_a:
        assert np.abs(a_events - t).min() < 0.01
    assert item["targets"]["offset_target"].item() == round((offset + 2) / 0.2)


def test_offset_with_wiggle_stays_within_half_a_class(synced_clip):
    path, _ = synced_clip
    rgb, audio, meta = get_video_and_audio(path, audio_priming_compat=False)
    crop = T.TemporalCropAndOffset(crop_len_sec=5, max_off_sec=2, grid_size=21, max_wiggle_sec=0.05)
    base = T.TemporalCropAndOffset(crop_len_sec=5, max_off_sec=2, grid_size=21)
    for _ in range(5):
        targets = {"offset_sec": 0.6, "v_start_i_sec": 1.0}

        def make():
            return {"video": rgb, "audio": audio, "meta": json.loads(json.dumps(meta)), "path": "x", "split": "train"}

        jittered, exact = crop(make() | {"targets": dict(targets)}), base(make() | {"targets": dict(targets)})
        shift = jittered["meta"]["a_jitter_i"]
        assert abs(shift) <= 800 and torch.equal(jittered["audio"], audio[int(1.6 * 16000) + shift :][:80000])
        assert torch.equal(jittered["video"], exact["video"])


def test_random_offsets_cover_the_grid_and_train_pipeline_shapes(synced_clip):
    path, _ = synced_clip
    rgb, audio, meta = get_video_and_audio(path)
    train = get_transforms(OmegaConf.merge(CFG, {"data": {"input_size": 48}}), "train")
    seen = set()
    for _ in range(25):
        item = {"video": rgb, "audio": audio, "meta": json.loads(json.dumps(meta)), "path": str(path)}
        item = train(item | {"split": "train", "targets": {}})
        seen.add(item["targets"]["offset_target"].item())
    assert item["video"].shape == (14, 16, 3, 48, 48) and item["audio"].shape == (14, 1, 128, 66)
    assert len(seen) > 10


def test_syncability_targets(synced_clip):
    path, _ = synced_clip
    rgb, audio, meta = get_video_and_audio(path)
    crop = T.TemporalCropAndOffsetForSyncabilityTraining(
        max_off_sec=2, grid_size=21, segment_size_vframes=16, n_segments=13, step_size_seg=0.5, vfps=25
    )
    assert crop.crop_len_sec == 4.48
    for _ in range(20):
        item = {"video": rgb, "audio": audio, "meta": json.loads(json.dumps(meta)), "path": "x", "split": "train"}
        item = crop(item | {"targets": {}})
        assert item["targets"]["sync_target"] == int(abs(item["targets"]["offset_sec"]) <= 2)
        assert item["video"].shape[0] == 112 and item["audio"].shape[0] == 71680


def test_clipwise_augmentations_apply_per_segment():
    torch.manual_seed(0)
    meta = {"video": {"fps": [25]}, "audio": {"framerate": [16000]}}
    video = torch.randint(0, 256, (6, 4, 3, 16, 16), dtype=torch.uint8)
    flipped = T.RandomHorizontalFlip(p=0.5)({"video": video.clone(), "meta": meta})["video"]
    is_flipped = [torch.equal(f, v.flip(-1)) for f, v in zip(flipped, video)]
    assert any(is_flipped) and not all(is_flipped)
    audio = torch.randn(3, 16000) * 0.1
    for aug in (
        T.AudioRandomPitchShift(p=1.0, shift=300),
        T.AudioRandomReverb(p=1.0),
        T.AudioRandomLowpassFilter(p=1.0, cutoff_freq=100),
        T.AudioRandomGaussNoise(p=1.0),
        T.AudioRandomVolume(p=1.0, gain=2.0, gain_type="amplitude"),
    ):
        out = aug({"audio": audio.clone(), "meta": meta})["audio"]
        assert out.shape == audio.shape and torch.isfinite(out).all() and not torch.equal(out, audio)
    # an octave up moves a 440 Hz tone to 880 Hz, keeping the duration
    tone = torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000)
    shifted = T.AudioRandomPitchShift(p=1.0, shift=1200).effect(tone, 16000)
    assert shifted.shape == tone.shape and torch.fft.rfft(shifted).abs().argmax().item() == 880
    rgb = torch.rand(4, 3, 32, 32)
    assert T.RandomApplyColorDistortion(p_gray_scale=1.0)({"video": rgb.clone()})["video"].std(dim=1).max() < 1e-6
    assert T.ResizeAndLetterboxPad(32, 64)({"video": rgb})["video"].shape == (4, 3, 32, 64)
    zoom = T.RGBSpatialCropSometimesUpscale(1.0, target_input_size=24, is_random=True, smaller_input_size=16)
    assert zoom({"video": rgb})["video"].shape == (4, 3, 24, 24)


# ---------------------------------------------------------------- datasets


def test_vggsound_like_dataset_with_fixed_offsets_and_iter_times(vgg_like):
    vids_dir, splits_path = vgg_like
    cfg = OmegaConf.merge(CFG, {"data": {"vids_path": str(vids_dir), "iter_times": 3, "input_size": 32}})
    cfg.data.dataset.target = "dataset.vggsound.VGGSoundSparsePicked"
    cfg.data.dataset.params.splits_path = str(splits_path)
    datasets = get_datasets(cfg, phases=("train", "test"))
    test, train = datasets["test"], datasets["train"]
    assert len(test) == 3 * len(test.dataset) and len(train) == len(train.dataset) == 16
    rows = (splits_path / "fixed_offsets_vggsound" / "test_size21_crop5_min-2.00_max2.00.csv").read_text()
    first = rows.splitlines()[1].split(",")
    item = test[0]
    assert item["targets"]["offset_sec"] == float(first[1]) and item["targets"]["v_start_i_sec"] == float(first[2])
    assert set(item["targets"]) >= {"offset_sec", "v_start_i_sec", "offset_label", "offset_target", "vggsound_target"}
    assert torch.equal(test[len(test.dataset)]["video"], item["video"])  # repeated pass, same fixed offset
    # the windowed read gives exactly the full read's output
    test.windowed_decode = False
    full = test[0]
    assert torch.equal(full["video"], item["video"]) and torch.equal(full["audio"], item["audio"])
    assert item["video"].shape == (14, 16, 3, 32, 32)
    # the decode-once cache gives the same items, and its copy survives the transforms unchanged
    test.decoded = {}
    cached, again = test[0], test[0]
    assert len(test.decoded) == 1
    for key in ("video", "audio"):
        assert torch.equal(cached[key], item[key]) and torch.equal(again[key], item[key])


@pytest.fixture
def real_splits(tmp_path):
    """The sample metadata plus a two-row `vggsound.csv` (the real one is not in the samples) for the clips."""
    splits_path = tmp_path / "data"
    splits_path.mkdir()
    for entry in DATA.iterdir():
        (splits_path / entry.name).symlink_to(entry)
    rows = [f"{p.stem[:11]},{int(p.stem.split('_')[-2]) // 1000},dog barking,test\n" for p in VGG_DIR.glob("*.mp4")]
    (splits_path / "vggsound.csv").write_text("".join(rows))
    return splits_path


def _fixed_offset_row(csv_path: Path, clip_id: str) -> tuple[float, float]:
    row = next(line for line in csv_path.read_text().splitlines() if line.startswith(clip_id + ","))
    return float(row.split(",")[-2]), float(row.split(",")[-1])


@needs_samples
def test_vggsound_real_samples_with_original_fixed_offsets(real_splits):
    ds = VGGSound("test", VGG_DIR, get_transforms(CFG, "test"), splits_path=real_splits)
    assert [Path(p).name for p in ds.dataset] == [REF_CLIP.name]
    offset, v_start = _fixed_offset_row(
        real_splits / "fixed_offsets_vggsound" / "test_size21_crop5_min-2.00_max2.00.csv", REF_CLIP.stem
    )
    windowed = ds[0]
    assert (windowed["targets"]["offset_sec"], windowed["targets"]["v_start_i_sec"]) == (offset, v_start)
    ds.windowed_decode = False
    full = ds[0]
    assert torch.equal(windowed["video"], full["video"]) and torch.equal(windowed["audio"], full["audio"])
    assert windowed["video"].shape == (14, 16, 3, 224, 224) and windowed["audio"].shape == (14, 1, 128, 66)


@needs_samples
def test_vggsound_sparse_clean_fixed_offsets(real_splits):
    ds = VGGSoundSparsePickedCleanTestFixedOffsets(
        "test", VGG_DIR, get_transforms(CFG, "test"), splits_path=real_splits
    )
    assert [Path(p).name for p in ds.dataset] == [REF_CLIP.name]
    targets = ds[0]["targets"]
    # vggsound_sparse_clean_fixed_offsets.csv: vggsound_sparse,3qesirWAGt4_20000_30000,2.8,1.4,1
    assert (targets["v_start_i_sec"], targets["offset_sec"], targets["offset_target"].item()) == (2.8, 1.4, 17)
    assert targets["vggsound_label"] == "dog barking"


@needs_samples
def test_lrs3_real_sample_with_fixed_offsets():
    ds = LRS3("test", LRS_DIR, get_transforms(CFG, "test"), splits_path=DATA)
    assert str(LRS_CLIP) in ds.dataset
    ds.dataset = [str(LRS_CLIP)]
    offset, v_start = _fixed_offset_row(
        DATA / "fixed_offsets_lrs3" / "test_size21_crop5_min-2.00_max2.00.csv", "pretrain/C8zY0oAdQrs/00018"
    )
    item = ds[0]
    assert (item["targets"]["offset_sec"], item["targets"]["v_start_i_sec"]) == (offset, v_start)
    assert item["video"].shape == (14, 16, 3, 224, 224)


@needs_samples
def test_audioset_layout_and_fixed_offsets(tmp_path):
    vids_dir, splits_path = tmp_path / "vids", tmp_path / "data"
    make_clip(vids_dir / "eval_segments" / "abcdefghijk_0_10000.mp4", ClipSpec(duration_sec=8, height=32, width=32))
    (splits_path / "filtered_examples_audioset").mkdir(parents=True)
    (splits_path / "fixed_offsets_audioset").mkdir()
    (splits_path / "audioset.csv").write_text(
        'eval/abcdefghijk,0.0,10.0,"0,1",eval\nbalanced/zzzzzzzzzzz,0.0,10.0,2,x\n'
    )
    (splits_path / "audioset_labels.csv").symlink_to(DATA / "audioset_labels.csv")
    fixed = "path,offset_sec,vstart_sec\neval/abcdefghijk_0_10000,-0.4,1.2\n"
    (splits_path / "fixed_offsets_audioset" / "test_size21_crop5_min-2.00_max2.00.csv").write_text(fixed)
    transforms = get_transforms(OmegaConf.merge(CFG, {"data": {"input_size": 32}}), "test")
    ds = AudioSet("test", vids_dir, transforms, splits_path=splits_path)
    item = ds[0]
    assert len(ds) == 1 and ds.video2target == {"eval_segments/abcdefghijk_0_10000": [0, 1]}
    assert (item["targets"]["offset_sec"], item["targets"]["v_start_i_sec"]) == (-0.4, 1.2)


@pytest.mark.parametrize("vfps, afps, problem", [(30, 16000, "30 fps, expected 25"), (25, 22050, "22050 Hz")])
def test_unexpected_fps_or_sample_rate(tmp_path, vfps, afps, problem):
    path = tmp_path / "odd.mp4"
    make_clip(path, ClipSpec(duration_sec=8, vfps=vfps, afps=afps, height=32, width=32))
    rgb, audio, meta = get_video_and_audio(path)
    item = {"video": rgb, "audio": audio, "meta": meta, "path": str(path), "split": "test"}
    item["targets"] = {"offset_sec": 0.0, "v_start_i_sec": 1.0}
    with pytest.raises(BadVideoError, match=problem):
        get_transforms(OmegaConf.merge(CFG, {"data": {"input_size": 32}}), "test")(item)


def test_sparse_dataset_relabels_to_sparse_classes(vgg_like):
    vids_dir, splits_path = vgg_like
    ds = VGGSoundSparsePicked("train", vids_dir, splits_path=splits_path, load_fixed_offsets_on=[])
    assert ds.label2target == {"high tone": 0, "low tone": 1}
    assert {ds[i]["targets"]["vggsound_target"] for i in range(2)} == {0, 1}


# ---------------------------------------------------------------- metadata download


def test_download_metadata_skips_files_with_their_md5_and_fails_clearly_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(download_metadata.FILES, "x.txt", hashlib.md5(b"ids\n").hexdigest())
    (tmp_path / "x.txt").write_bytes(b"ids\n")
    offline = ["--out", str(tmp_path), "--only", "x.txt", "--base-url", "http://127.0.0.1:9/"]
    download_metadata.main(offline)
    assert capsys.readouterr().out == "skipped: x.txt\n"
    (tmp_path / "x.txt").write_bytes(b"idz\n")  # damaged: fetched again
    with pytest.raises(DownloadError, match="Could not download http://127.0.0.1:9/x.txt"):
        download_metadata.main(offline)
    assert not (tmp_path / "x.txt").exists()


@needs_samples
def test_sample_files_match_their_published_md5s(capsys):
    download_metadata.main(["--out", str(DATA), "--samples"])  # everything there: nothing is written
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"skipped: {rel}" for rel in download_metadata.SAMPLES] and len(lines) == 43


def test_consecutive_pixelwise_ops_fuse_into_one_lookup():
    fused = get_transforms(CFG, "test").transforms
    plain = get_transforms(CFG, "test", fuse=False).transforms
    lookups = [t for t in fused if isinstance(t, T.PixelwiseLookup)]
    assert len(lookups) == 1 and len(fused) == len(plain) - 1
    assert [type(t).__name__ for t in lookups[0].chain.transforms] == ["RGBToHalfToZeroOne", "RGBNormalize"]


@pytest.mark.parametrize("to_float", [T.RGBToHalfToZeroOne, T.RGBToFloatToZeroOne])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_pixelwise_lookup_equals_running_the_ops(to_float, dtype):
    video = torch.randint(0, 256, (6, 3, 9, 10), dtype=torch.uint8)[::2, :, 1:8, 2:9].to(dtype)  # strided (3, 3, 7, 7)

    def run(transform):
        item = {"video": video, "meta": {"video": {}}}
        return transform(item)

    ops = [to_float(), T.RGBNormalize(mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])]
    fused, plain = run(T.PixelwiseLookup(ops)), run(torchvision.transforms.Compose(ops))
    assert fused["video"].dtype == plain["video"].dtype and torch.equal(fused["video"], plain["video"])
    assert fused["meta"]["video"]["norm_stats"]["std"].tolist() == pytest.approx([0.2, 0.3, 0.25])


def test_pixelwise_lookup_reads_overlapping_segments_once():
    frames = torch.randint(0, 256, (11, 3, 9, 10), dtype=torch.uint8)[:, :, 1:8, 2:9]  # (11, 3, 7, 7) crop view
    segments = frames.unfold(0, 4, 2).permute(0, 4, 1, 2, 3)  # (4, 4, 3, 7, 7): windows of 4 frames, 2 apart
    covered, step = T.covered_frames(segments)
    assert step == 2 and covered.shape == (10, 3, 7, 7) and covered.data_ptr() == frames.data_ptr()
    assert T.covered_frames(segments.contiguous())[1] is None  # nothing shared: as is

    ops = [T.RGBToHalfToZeroOne(), T.RGBNormalize(mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])]
    fused = T.PixelwiseLookup(ops)({"video": segments, "meta": {"video": {}}})["video"]
    plain = torchvision.transforms.Compose(ops)({"video": segments, "meta": {"video": {}}})["video"]
    assert torch.equal(fused, plain) and fused.untyped_storage().nbytes() == 10 * 3 * 7 * 7 * 2  # float16


def test_bench_data_quick_runs_and_outputs_match(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_data", "--quick", "--json", str(out)])
    bench_data.main()
    result = json.loads(out.read_text())
    assert result["identical_outputs"] and result["clips"] == 1 and result["ours_sec_per_clip"] > 0


def test_size_ratio_and_local_scratch_cache(vgg_like, tmp_path, monkeypatch):
    vids_dir, splits_path = vgg_like
    kwargs = {"splits_path": splits_path, "load_fixed_offsets_on": []}
    assert len(VGGSound("train", vids_dir, size_ratio=0.25, **kwargs)) == 4
    monkeypatch.setenv("LOCAL_SCRATCH", str(tmp_path / "scratch"))
    ds = VGGSound("train", vids_dir, **kwargs)
    item = ds[0]
    cached = tmp_path / "scratch" / Path(ds.dataset[0]).resolve().relative_to("/")
    assert cached.read_bytes() == Path(ds.dataset[0]).read_bytes() and item["path"] == ds.dataset[0]
