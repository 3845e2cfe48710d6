"""Synthetic audio-visual clips with known event times, written as real MP4 files (H.264 + AAC, PyAV only).

A clip shows a dark frame where a bright square flashes at the *visual* event times and plays a short
decaying tone burst at the *audio* event times. A built-in offset follows the datasets' convention:
with `offset_sec = O > 0` every audio event happens `O` seconds *earlier* than its visual event, so a
perfect model that sees the clip without extra shifting predicts `O`. `offset_after_sec` switches the
offset for the events in the second half of the clip (drift tests on long videos).

Events are sparse and irregular (random gaps), so the offset is identifiable from a 5 s crop; they are
deterministic given the seed. Each clip gets a JSON sidecar with its event times.

`make_vggsound_like` lays out a small dataset the way `dataset.vggsound.VGGSound*` expects it."""

import csv
import json
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from dataset.io import AFPS, SIDE, VFPS, audio_frame, rgb_frame

VGGSOUND_VIDS_DIRNAME = "h264_video_25fps_256side_16000hz_aac"
# two classes that differ by the pitch of the tone burst, so `vggsound_target` is learnable too
TONE_CLASSES = {"low tone": 440.0, "high tone": 1320.0}


@dataclass
class ClipSpec:
    duration_sec: float = 10.0
    vfps: float = VFPS
    afps: int = AFPS
    height: int = SIDE
    width: int = SIDE
    n_audio_channels: int = 1
    offset_sec: float = 0.0
    offset_after_sec: float | None = None
    min_gap_sec: float = 0.6
    max_gap_sec: float = 1.8
    flash_frames: int = 2
    flash_size: float = 0.5  # side of the flashing square over the frame's short side; 1.0 flashes the whole frame
    tone_hz: float = 880.0
    tone_sec: float = 0.06
    tone_decay: bool = True  # the burst fades out; False keeps it at full level for `tone_sec`
    burst_noise_amp: float = 0.0  # white noise added to the burst: energy in every mel bin, not just one
    noise_amp: float = 0.005  # background noise; 0 gives silence between bursts
    events_span_sec: tuple[float, float] | None = None  # events only start inside this span (default: anywhere)
    gop: int = 250  # libx264 default keyint, as ffmpeg's; a smaller one creates more seek points
    seed: int = 0
    visual_events_sec: list[float] = field(default_factory=list)
    audio_events_sec: list[float] = field(default_factory=list)


def sample_events(spec: ClipSpec) -> ClipSpec:
    """Fills `visual_events_sec` (on the video frame grid) and `audio_events_sec` (shifted by the offset).

    Events are placed so that the shifted audio event and the flash both stay inside the clip."""
    rng = np.random.default_rng(spec.seed)
    offsets = [spec.offset_sec] + ([] if spec.offset_after_sec is None else [spec.offset_after_sec])
    margin = max(0.2, *[abs(o) for o in offsets]) + spec.tone_sec
    first, last = spec.events_span_sec or (margin, spec.duration_sec - margin - spec.flash_frames / spec.vfps)
    t = first + rng.uniform(0, spec.max_gap_sec)
    visual, audio = [], []
    while t < last:
        t_v = round(t * spec.vfps) / spec.vfps  # a flash starts on a frame
        in_second_half = spec.offset_after_sec is not None and t_v >= spec.duration_sec / 2
        offset = spec.offset_after_sec if in_second_half else spec.offset_sec
        visual.append(round(t_v, 6))
        audio.append(round(t_v - offset, 6))
        t += rng.uniform(spec.min_gap_sec, spec.max_gap_sec)
    spec.visual_events_sec, spec.audio_events_sec = visual, audio
    return spec


def render_video(spec: ClipSpec) -> np.ndarray:
    """(Tv, H, W, 3) uint8: dark background, a bright square during each flash. The square (`flash_size` of
    the short side) moves around but always covers the frame centre, so any spatial crop sees it."""
    rng = np.random.default_rng(spec.seed + 1)
    n_frames = int(round(spec.duration_sec * spec.vfps))
    frames = np.full((n_frames, spec.height, spec.width, 3), 24, dtype=np.uint8)
    side = max(2, int(min(spec.height, spec.width) * spec.flash_size))
    for t_v in spec.visual_events_sec:
        first = int(round(t_v * spec.vfps))
        top = max(0, spec.height // 2 - int(rng.integers(side // 4, 3 * side // 4 + 1)))
        left = max(0, spec.width // 2 - int(rng.integers(side // 4, 3 * side // 4 + 1)))
        frames[first : first + spec.flash_frames, top : top + side, left : left + side] = 235
    return frames


def render_audio(spec: ClipSpec) -> np.ndarray:
    """(C, Ta) float32: faint noise plus a tone burst (by default exponentially decaying) at each audio event."""
    rng = np.random.default_rng(spec.seed + 2)
    n_samples = int(round(spec.duration_sec * spec.afps))
    wave = spec.noise_amp * rng.standard_normal(n_samples).astype(np.float32)
    burst_t = np.arange(int(spec.tone_sec * spec.afps)) / spec.afps
    envelope = np.exp(-burst_t / (spec.tone_sec / 4)) if spec.tone_decay else 1.0
    burst = 0.6 * np.sin(2 * np.pi * spec.tone_hz * burst_t) * envelope
    burst = burst + spec.burst_noise_amp * rng.standard_normal(len(burst_t))
    for t_a in spec.audio_events_sec:
        start = int(round(t_a * spec.afps))
        wave[start : start + len(burst)] += burst[: n_samples - start].astype(np.float32)
    return np.repeat(wave[None], spec.n_audio_channels, axis=0)


def write_mp4(path, frames: np.ndarray, wave: np.ndarray, vfps: float, afps: int, gop: int = 250) -> None:
    """Encodes `frames` (T, H, W, 3) uint8 and `wave` (C, Ta) float32 as H.264 (yuv420p) + AAC in MP4."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n_channels = wave.shape[0]
    layout = {1: "mono", 2: "stereo"}[n_channels]
    with av.open(str(path), "w") as container:
        v_stream = container.add_stream("libx264", rate=Fraction(vfps).limit_denominator(1001))
        v_stream.height, v_stream.width = frames.shape[1:3]
        v_stream.pix_fmt = "yuv420p"
        v_stream.options = {"preset": "ultrafast", "crf": "18", "g": str(gop)}
        a_stream = container.add_stream("aac", rate=afps)
        a_stream.layout = layout
        for i, rgb in enumerate(frames):
            container.mux(v_stream.encode(rgb_frame(rgb, i)))
        container.mux(v_stream.encode())
        chunk = 1024  # AAC frame size
        for start in range(0, wave.shape[1], chunk):
            container.mux(a_stream.encode(audio_frame(wave[:, start : start + chunk], layout, afps, start)))
        container.mux(a_stream.encode())


def make_clip(path, spec: ClipSpec) -> dict:
    """Writes the clip and its JSON sidecar (`<path>.json`); returns the label dict."""
    spec = sample_events(spec)
    write_mp4(path, render_video(spec), render_audio(spec), spec.vfps, spec.afps, spec.gop)
    labels = {"path": str(path), **asdict(spec)}
    Path(path).with_suffix(".json").write_text(json.dumps(labels, indent=1))
    return labels


def make_vggsound_like(
    root, n_clips: int = 300, splits=(("train", 0.8), ("valid", 0.1), ("test", 0.1)), duration_sec: float = 8.0,
    side: int = 64, seed: int = 0, fixed_offset_splits=("valid", "test"), max_off_sec: float = 2.0,
    grid_size: int = 21, crop_len_sec: float = 5.0, **clip_kwargs,
) -> tuple[Path, Path]:  # fmt: skip
    """A tiny in-sync VGGSound look-alike under `root`; returns `(vids_dir, splits_path)`.

    Writes `vids_dir/<11-char id>_0_<ms>.mp4`, and in `splits_path`: `vggsound.csv` (id, start, label,
    split), `vggsound_<split>.txt`, `picked_sparse_classes.csv` (both classes sparse), an empty
    `filtered_examples_vggsound/` list, and grid fixed offsets for `fixed_offset_splits` named like the
    original's (`<split>_size21_crop5_min-2.00_max2.00.csv`). Clips are in sync; the transforms add offsets.
    `clip_kwargs` go to every `ClipSpec` (e.g. `flash_frames`, `tone_sec` for stronger events)."""
    root = Path(root)
    vids_dir, splits_path = root / VGGSOUND_VIDS_DIRNAME, root / "data"
    for sub in ("filtered_examples_vggsound", "fixed_offsets_vggsound"):
        (splits_path / sub).mkdir(parents=True, exist_ok=True)
    (splits_path / "filtered_examples_vggsound" / "none.txt").write_text("")
    rng = np.random.default_rng(seed)
    labels = list(TONE_CLASSES)
    grid = np.linspace(-max_off_sec, max_off_sec, grid_size)
    meta_rows, split_ids, offset_rows = [], {s: [] for s, _ in splits}, {s: [] for s in fixed_offset_splits}
    assert duration_sec >= crop_len_sec + max_off_sec, "clips must fit a crop shifted by the largest offset"
    bounds = np.cumsum([0] + [int(round(frac * n_clips)) for _, frac in splits])
    bounds[-1] = n_clips  # rounding must not leave clips without a split
    for i in range(n_clips):
        split = next(s for (s, _), hi in zip(splits, bounds[1:]) if i < hi)
        label = labels[i % len(labels)]
        vid = f"syn{i:08d}"  # 11 chars like a YouTube id
        clip_id = f"{vid}_0_10000"  # VGGSound names always span 10 s, whatever the actual length
        spec = ClipSpec(
            duration_sec=duration_sec,
            height=side,
            width=side,
            tone_hz=TONE_CLASSES[label],
            seed=seed + i,
            **clip_kwargs,
        )
        make_clip(vids_dir / f"{clip_id}.mp4", spec)
        meta_rows.append([vid, 0, label, "test" if split == "test" else "train"])
        split_ids[split].append(clip_id)
        if split in offset_rows:
            offset = float(rng.choice(grid))
            v_start_max = duration_sec - crop_len_sec
            v_start = rng.uniform(max(0.0, -offset), min(v_start_max, v_start_max - offset))
            offset_rows[split].append([clip_id, round(offset, 2), int(v_start * spec.vfps) / spec.vfps])
    with open(splits_path / "vggsound.csv", "w", newline="") as f:
        csv.writer(f).writerows(meta_rows)
    for split, ids in split_ids.items():
        (splits_path / f"vggsound_{split}.txt").write_text("".join(f"{c}\n" for c in ids))
    with open(splits_path / "picked_sparse_classes.csv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["class", "is_sparse"], *[[c, "y"] for c in labels]])
    crop = int(crop_len_sec) if crop_len_sec == int(crop_len_sec) else crop_len_sec
    for split, rows in offset_rows.items():
        name = f"{split}_size{grid_size}_crop{crop}_min{-max_off_sec:.2f}_max{max_off_sec:.2f}.csv"
        with open(splits_path / "fixed_offsets_vggsound" / name, "w", newline="") as f:
            csv.writer(f).writerows([["path", "offset_sec", "vstart_sec"], *rows])
    return vids_dir, splits_path
