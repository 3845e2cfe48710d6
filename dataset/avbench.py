"""The model inputs of DeSync as `hkchengrex/av-benchmark` computes it: the number MMAudio and the
video-to-audio papers after it report, with the AudioSet model 24-01-04T16-39-21.

It differs from Synchformer's own test pipeline (256 px, centre crop 224, half-precision pixels):
- video: the first `duration` seconds at 25 fps, frames picked by FFmpeg's `fps` filter; each uint8
  frame resized to 224 px on its short side (bicubic, antialiased), centre-cropped to 224, scaled to
  [0, 1] in float32 and normalised with mean = std = 0.5; segments of 16 frames every 8 frames;
- audio: the mean of the channels, resampled to 16 kHz by `torchaudio.transforms.Resample` with its
  defaults, the first `duration` seconds; segments of 10,240 samples every 5,120; each a log-mel
  spectrogram (the stage-2 configs' parameters) of 65 frames, zero-padded to 66 after the log, then
  AST-normalised.
A video shorter than `duration` or an audio shorter than `duration` cannot be scored (av-benchmark drops
the video, and in place of the audio takes the next file in the folder; we list both as skipped)."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torchaudio
from torchvision.transforms import v2

from dataset.io import AFPS, VFPS, BadVideoError, decode_audio, decode_video_at_fps
from dataset.transforms import AudioLog, AudioMelSpectrogram, AudioNormalizeAST, PadOrTruncate

SIZE = 224  # av-benchmark's crop (its frames are resized to 224 on the short side, then centre-cropped)
SEGMENT_FRAMES, STEP_FRAMES = 16, 8  # 0.64 s segments every 0.32 s
SEGMENT_SAMPLES, STEP_SAMPLES = 10240, 5120
WINDOW_SEGMENTS = 14  # a window of the model: 4.8 s
# the log-mel spectrogram of the stage-2 configs (`configs/sync.yaml`), which av-benchmark hard-codes
MEL = dict(sample_rate=AFPS, win_length=400, hop_length=160, n_fft=1024, n_mels=128)
SPEC_FRAMES, SPEC_MEAN, SPEC_STD = 66, -4.2677393, 4.5689974


def segments(x: torch.Tensor, size: int, step: int, dim: int = 0) -> torch.Tensor:
    """(..., T, ...) -> (..., S, size, ...): the overlapping windows along `dim`, as a view."""
    return x.unfold(dim, size, step).movedim(-1, dim + 1)


def n_segments(n: int, size: int, step: int) -> int:
    return (n - size) // step + 1


def window_slices(n_segments: int) -> list[slice]:
    """The two windows DeSync averages: the first and the last 14 segments (0-4.8 s and 3.2-8.0 s of 8 s)."""
    return [slice(0, WINDOW_SEGMENTS), slice(n_segments - WINDOW_SEGMENTS, n_segments)]


def window_times(n_segments: int) -> list[tuple[float, float]]:
    """(start, end) seconds of the two windows' visual segments."""
    span = SEGMENT_FRAMES + STEP_FRAMES * (WINDOW_SEGMENTS - 1)
    return [(w.start * STEP_FRAMES / VFPS, (w.start * STEP_FRAMES + span) / VFPS) for w in window_slices(n_segments)]


def video_frames(path, duration_sec: float) -> torch.Tensor:
    """(T, 3, 224, 224) uint8: the first `duration_sec` seconds at 25 fps (0: the whole video, at least one
    segment), resized and centre-cropped."""
    n_frames = int(VFPS * duration_sec) or None
    frames = decode_video_at_fps(path, VFPS, n_frames)  # (T, 3, H, W)
    need = n_frames or SEGMENT_FRAMES
    if len(frames) < need:
        raise BadVideoError(path, f"video is shorter than {need / VFPS:g} s ({len(frames)} of {need} frames)")
    frames = v2.functional.resize(frames, [SIZE], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.functional.center_crop(frames, [SIZE])


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float32 in [-1, 1] (ToDtype(scale=True), then Normalize(0.5, 0.5))."""
    frames = v2.functional.to_dtype(frames, torch.float32, scale=True)
    return v2.functional.normalize(frames, mean=[0.5] * 3, std=[0.5] * 3)


class AudioSegments:
    """Waveform files -> (S, 1, 128, 66) log-mel segments of the first `duration_sec` seconds (0: all, at
    least one segment); keeps one resampler per input rate."""

    def __init__(self, duration_sec: float):
        self.n_samples = int(AFPS * duration_sec) or None
        self.resamplers: dict[int, torchaudio.transforms.Resample] = {}
        log_mel = [AudioMelSpectrogram(**MEL), AudioLog(), PadOrTruncate(SPEC_FRAMES)]
        self.spec = v2.Compose([*log_mel, AudioNormalizeAST(SPEC_MEAN, SPEC_STD)])

    def __call__(self, path) -> torch.Tensor:
        # the priming samples of AAC tracks are dropped as current FFmpeg (and torchaudio.load) does
        wave, sr = decode_audio(path, audio_priming_compat=False)  # (Ta,), the mean of the channels
        if sr != AFPS:
            if sr not in self.resamplers:
                self.resamplers[sr] = torchaudio.transforms.Resample(sr, AFPS)
            wave = self.resamplers[sr](wave)
        need = self.n_samples or SEGMENT_SAMPLES
        if len(wave) < need:
            raise BadVideoError(
                path, f"audio is shorter than {need / AFPS:g} s ({len(wave) / AFPS:.2f} s at {AFPS} Hz)"
            )
        wave = segments(wave[: self.n_samples], SEGMENT_SAMPLES, STEP_SAMPLES)  # (S, 10240)
        item = self.spec({"audio": wave, "meta": {"audio": {"framerate": [AFPS]}}, "path": str(path)})
        return item["audio"].unsqueeze(1)  # (S, 1, 128, 66)


@dataclass(frozen=True)
class Pair:
    """A video and the audio to score against it (None: the video's own audio track)."""

    name: str
    video: Path
    audio: Path | None = None


class DesyncInputs(torch.utils.data.Dataset):
    """Model inputs of each pair: {'name', 'frames': (T, 3, 224, 224) uint8, 'audio': (S, 1, 128, 66)},
    or {'name', 'skip': reason} for a pair that cannot be scored (decoding runs in DataLoader workers).
    `audio=False` gives the frames alone (visual feature caches)."""

    def __init__(self, pairs: list[Pair], duration_sec: float = 8.0, audio: bool = True):
        self.pairs, self.duration_sec = pairs, duration_sec
        self.audio_segments = AudioSegments(duration_sec) if audio else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        try:
            item = {"name": pair.name, "frames": video_frames(pair.video, self.duration_sec)}
            if self.audio_segments is not None:
                item["audio"] = self.audio_segments(pair.audio or pair.video)
        except BadVideoError as e:
            return {"name": pair.name, "skip": str(e)}
        return item


def collate(items: list[dict]) -> dict:
    """Stacks the scoreable items; the skipped ones travel as (name, reason) pairs."""
    ok = [it for it in items if "skip" not in it]
    return {
        "names": [it["name"] for it in ok],
        "frames": torch.stack([it["frames"] for it in ok]) if ok else None,  # (B, T, 3, 224, 224)
        "audio": torch.stack([it["audio"] for it in ok]) if ok else None,  # (B, S, 1, 128, 66)
        "skipped": [(it["name"], it["skip"]) for it in items if "skip" in it],
    }
