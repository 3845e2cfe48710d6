"""The bad files a new user tries first, written with PyAV: each name maps to a part of the error it must get
(among them a file whose middle is corrupt and which needs re-encoding). Also media that are unusual but
must work, or must be refused with a reason: Opus audio in WebM and Matroska, a video of a single frame."""

from pathlib import Path

import av
import numpy as np

from dataset.io import audio_frame, rgb_frame
from dataset.synthetic import ClipSpec, make_clip, render_audio, render_video, sample_events, write_mp4


def _write_one_stream(path: Path, kind: str) -> None:
    with av.open(str(path), "w") as container:
        if kind == "video":
            stream = container.add_stream("libx264", rate=25)
            stream.width = stream.height = 32
            for i in range(10):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
        else:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_bad_videos(folder: Path) -> dict[str, str]:
    """Writes the bad files into `folder` (`missing.mp4` is not written); returns {name: expected problem}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.mp4").write_bytes(b"")
    truncated = folder / "truncated.mp4"
    write_mp4(truncated, np.zeros((10, 32, 32, 3), np.uint8), np.zeros((1, 4000), np.float32), 25, 16000)
    truncated.write_bytes(truncated.read_bytes()[:600])  # cut in the media data: the index at the end is lost
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "text.mp4").write_text("This is a text file with a video's name.\n" * 50)
    _write_one_stream(folder / "no_audio.mp4", "video")
    _write_one_stream(folder / "no_video.mp4", "audio")
    make_clip(folder / "short.mp4", ClipSpec(duration_sec=2.0, seed=0))  # decodes, but is shorter than a window
    # not in the model's format (re-encoded first), with random bytes over the first half of its media data
    corrupt = folder / "corrupt_30fps.mp4"
    make_clip(corrupt, ClipSpec(duration_sec=3.0, vfps=30, height=64, width=64, seed=2))
    data = bytearray(corrupt.read_bytes())
    data[1000 : len(data) // 2] = np.random.default_rng(0).integers(0, 256, len(data) // 2 - 1000, np.uint8).tobytes()
    corrupt.write_bytes(bytes(data))
    for sidecar in folder.glob("*.json"):  # the clips' labels: not videos
        sidecar.unlink()
    return {
        "empty.mp4": "empty",
        "truncated.mp4": "cannot be opened",
        "random.mp4": "cannot be opened",
        "text.mp4": "cannot be opened",
        "no_audio.mp4": "no audio stream",
        "no_video.mp4": "no video stream",
        "short.mp4": "",
        "corrupt_30fps.mp4": "corrupt",
        "missing.mp4": "does not exist",
    }


def write_opus_clip(path: Path, spec: ClipSpec) -> ClipSpec:
    """`make_clip`'s clip with Opus audio at 48 kHz: VP8 in WebM, or H.264 in Matroska (by `path`'s suffix)."""
    spec = sample_events(ClipSpec(**{**spec.__dict__, "afps": 48000}))
    layout = {1: "mono", 2: "stereo"}[spec.n_audio_channels]
    with av.open(str(path), "w") as container:
        video = container.add_stream("libvpx" if path.suffix == ".webm" else "libx264", rate=int(spec.vfps))
        video.height, video.width, video.pix_fmt = spec.height, spec.width, "yuv420p"
        audio = container.add_stream("libopus", rate=48000, layout=layout)
        for i, rgb in enumerate(render_video(spec)):
            container.mux(video.encode(rgb_frame(rgb, i)))
        wave = render_audio(spec)  # (C, Ta)
        for start in range(0, wave.shape[1], 960):  # Opus's 20 ms frames
            container.mux(audio.encode(audio_frame(wave[:, start : start + 960], layout, 48000, start)))
        container.mux(video.encode())
        container.mux(audio.encode())
    return spec


def write_brief_video(path: Path, n_frames: int = 1, audio_sec: float = 8.0) -> None:
    """`n_frames` at 25 fps and `audio_sec` of audio: with one frame, a still image rather than a video."""
    frames, wave = np.zeros((n_frames, 32, 32, 3), np.uint8), np.zeros((1, round(audio_sec * 16000)), np.float32)
    write_mp4(path, frames, wave, 25, 16000)
