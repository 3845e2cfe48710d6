"""Reading and re-encoding audio-visual files with PyAV (no ffmpeg binary).

`get_video_and_audio` reproduces what the original got from `torchvision.io.read_video` on av 9.0.0, the
environment the published checkpoints were trained in, on any PyAV version:

- video: every frame with pts >= 0, sorted by pts (for equal pts the later-decoded one wins), converted
  with `to_ndarray(format='rgb24')`; fps is `float(stream.average_rate)`.
- audio, with `audio_priming_compat=True` (default): av 8.1-9.0.1 shipped FFmpeg 4.3, which re-applied
  the AAC encoder-delay skip after torchvision's seek to 0 in MP4 files whose first audio packet starts
  before 0 (pts -1024, the encoder priming). The audio the checkpoints saw therefore starts 1024 samples
  (64 ms at 16 kHz) *later in the file* than the video, i.e. the audio is that much ahead. We drop the
  same samples: `max(0, landed + start_pad)` where `start_pad = -pts` of the first audio packet and
  `landed` is the pts of the first packet demuxed after a backward seek to 0 (upstream issue #11).
  Files without priming (e.g. the LRS3 sample) lose nothing. Use `audio_priming_compat=False` for
  exact-sync decoding when training new models.

Windows (`start_sec`, `end_sec`) select video frames with `start <= t < end` and audio samples with
`round(start*sr) <= i < round(end*sr)`; a windowed read equals the full read cropped the same way. The
video is decoded from the last keyframe before the window (frames no other frame references are not
decoded before the window), the audio (cheap) from the file start.
(`read_video` also kept a frame exactly at `end`; the only caller with an end, LRS3 at 11 s, is trimmed
to 10 s by `EqualifyFromRight` anyway.) `decode_video_window` can stop decoding before the window's end
and only count the frames after that, from their packets' timestamps."""

import itertools
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from utils.cli import UserError

# a decoded frame counts as "inside" a window boundary up to this slack (float seconds vs exact pts)
# the input format of the published models: frames per second, audio samples per second, short side in pixels
VFPS, AFPS, SIDE = 25, 16000, 256
_EPS_SEC = 1e-6


class BadVideoError(ValueError, UserError):
    """A media file that cannot be used: missing, empty, corrupt, lacking a stream, or too short."""

    def __init__(self, path, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}" + (f" ({fix})" if fix else ""))


def _open(path) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise BadVideoError(path, "file does not exist", "check the path; in a dataset, `vids_dir` and the split files")
    if path.stat().st_size == 0:
        raise BadVideoError(path, "file is empty (0 bytes)", "re-download or re-encode it")
    try:
        return av.open(str(path))
    except av.FFmpegError as e:
        raise BadVideoError(path, f"cannot be opened as media: {e}", "the file is corrupt or not a video") from e


def _stream(container, kind: str, path):
    streams = getattr(container.streams, kind)
    if len(streams) == 0:
        raise BadVideoError(path, f"has no {kind} stream", "the datasets need both video and audio")
    return streams[0]


def decode_video(path, start_sec: float = 0.0, end_sec: float | None = None) -> tuple[torch.Tensor, float]:
    """Returns `(rgb, fps)`: rgb is (Tv, 3, H, W) uint8 with the frames whose time is in [start, end)."""
    rgb, fps, _ = decode_video_window(path, start_sec, end_sec)
    return rgb, fps


def decode_video_window(
    path, start_sec: float = 0.0, end_sec: float | None = None, pixels_end_sec: float | None = None
) -> tuple[torch.Tensor, float, int]:
    """`decode_video` that stops decoding at `pixels_end_sec` (before `end_sec`): the frames after it are
    only counted, from their packets' timestamps. Returns `(rgb, fps, n_frames)`: rgb holds the frames in
    [start, pixels_end), n_frames counts those in [start, end), as a full decode would."""
    end_sec = math.inf if end_sec is None else end_sec
    pixels_end_sec = end_sec if pixels_end_sec is None else min(pixels_end_sec, end_sec)
    seek_sec = start_sec
    while True:
        frames, counted, fps, keyframe_t = _decode_frames_from(path, seek_sec, start_sec, pixels_end_sec, end_sec)
        # a seek lands on a keyframe by its dts, whose pts may lie after the window start: seek earlier
        if seek_sec <= 0 or keyframe_t <= start_sec + _EPS_SEC:
            break
        seek_sec = max(0.0, seek_sec - 1.0)
    if not frames:
        raise BadVideoError(path, f"no video frames in [{start_sec}, {end_sec}) s", "the clip is too short")
    if counted is None:  # a packet without a timestamp: the frames cannot be counted without decoding them
        return decode_video_window(path, start_sec, end_sec)
    # equal pts: the later-decoded frame wins (as in torchvision's dict of frames)
    by_pts = dict(frames)
    rgb = _to_rgb24([by_pts[pts] for pts in sorted(by_pts)])  # (Tv, H, W, 3)
    return torch.from_numpy(rgb).permute(0, 3, 1, 2), fps, len(by_pts) + counted  # (Tv, 3, H, W)


def decode_video_at_fps(path, fps: float, max_frames: int | None = None) -> torch.Tensor:
    """The first `max_frames` frames (all if None) at `fps`, picked by FFmpeg's `fps` filter (the frame
    shown at each output time, duplicating or dropping input frames), as (T, 3, H, W) uint8 RGB. This is
    what torchaudio's StreamingMediaDecoder gives for `frame_rate=fps, format='rgb24'` (av-benchmark's
    video reader): the same filter graph, `fps=<fps>,format=rgb24`, fed the decoded frames in order."""
    frames = []
    with _open(path) as container:
        stream = _stream(container, "video", path)
        stream.thread_type = "AUTO"
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream), graph.add("fps", str(fps)), graph.add("format", "rgb24")]
        graph.link_nodes(*chain, graph.add("buffersink")).configure()

        def pull_ready() -> bool:  # moves the filtered frames out; False once `max_frames` are out
            while max_frames is None or len(frames) < max_frames:
                try:
                    frames.append(graph.pull())
                except (av.error.BlockingIOError, av.error.EOFError):  # needs more input / no more output
                    return True
            return False

        try:
            for frame in container.decode(stream):
                graph.push(frame)
                if not pull_ready():
                    break
            else:
                graph.push(None)  # end of stream: the filter emits the frames it still holds
                pull_ready()
        except av.FFmpegError as e:
            raise BadVideoError(path, f"video stream is corrupt: {e}", "re-encode or drop the file") from e
    if not frames:
        raise BadVideoError(path, "no video frames could be decoded", "the video stream is empty")
    return torch.from_numpy(_to_rgb24(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)


def _to_rgb24(frames: list) -> np.ndarray:
    """(T, H, W, 3) uint8, what `frame.to_ndarray(format='rgb24')` gives for each frame (the same swscale
    conversion), at a third of its cost: one single-threaded converter is reused and each frame is copied
    once, straight into the stacked array."""
    H, W = frames[0].height, frames[0].width
    rgb = np.empty((len(frames), H, W, 3), dtype=np.uint8)
    reformatter = VideoReformatter()
    for i, frame in enumerate(frames):
        plane = reformatter.reformat(frame, format="rgb24", threads=1).planes[0]
        rows = np.frombuffer(plane, dtype=np.uint8).reshape(H, plane.line_size)  # rows may be padded
        rgb[i] = rows[:, : W * 3].reshape(H, W, 3)
    return rgb


def _decode_frames_from(path, seek_sec: float, start_sec: float, pixels_end_sec: float, end_sec: float):
    """Decodes from the keyframe before `seek_sec` (from the file start if `seek_sec <= 0`); returns
    `([(pts, frame)] in [start, pixels_end), number of frames in [pixels_end, end) or None if unknown,
    fps, time of the first keyframe decoded)`."""
    with _open(path) as container:
        stream = _stream(container, "video", path)
        if not stream.average_rate:
            raise BadVideoError(path, "video stream has no frame rate", "re-encode it with a constant fps")
        stream.thread_type = "AUTO"
        time_base, seconds = stream.time_base, _pts_to_seconds(stream.time_base)
        if seek_sec > 0:
            container.seek(int(seek_sec / time_base), stream=stream, backward=True, any_frame=False)
        packets_pts = []  # of every packet demuxed, also those still inside the decoder when it stops
        packets = (_record_pts(packet, packets_pts) for packet in container.demux(stream))
        frames, keyframe_t = [], None if seek_sec > 0 else 0.0
        try:
            for frame in decode_skipping_nonref_before(packets, stream, start_sec - _EPS_SEC):
                if frame.pts is None:
                    continue
                t = seconds(frame.pts)
                if keyframe_t is None:
                    if not frame.key_frame:
                        continue  # frames before the first keyframe after a seek may reference missing ones
                    keyframe_t = t
                if t >= pixels_end_sec - _EPS_SEC:
                    break
                if frame.pts >= 0 and t >= start_sec - _EPS_SEC:
                    frames.append((frame.pts, frame))
            if pixels_end_sec < end_sec:
                # packets come in decoding order and dts <= pts: none after the first with dts >= end is in
                for packet in container.demux(stream):
                    if packet.dts is not None and seconds(packet.dts) >= end_sec - _EPS_SEC:
                        break
                    _record_pts(packet, packets_pts)
        except av.FFmpegError as e:
            raise BadVideoError(path, f"video stream is corrupt: {e}", "re-encode or drop the file") from e
        counted = 0
        if pixels_end_sec < end_sec:  # the distinct non-negative timestamps in [pixels_end, end)
            lo, hi = pixels_end_sec - _EPS_SEC, end_sec - _EPS_SEC
            counted = None if None in packets_pts else len({p for p in packets_pts if p >= 0 and lo <= seconds(p) < hi})
        return frames, counted, float(stream.average_rate), math.inf if keyframe_t is None else keyframe_t


def _record_pts(packet: av.Packet, seen: list) -> av.Packet:
    if packet.size:  # not the empty packet that ends the stream
        seen.append(packet.pts)
    return packet


def _pts_to_seconds(time_base: Fraction):
    """`pts -> float(pts * time_base)`, bit for bit (one correctly rounded division of the same rational),
    without building a Fraction for every timestamp."""
    num, den = time_base.numerator, time_base.denominator
    return lambda pts: pts * num / den


def decode_skipping_nonref_before(packets, stream, start_sec: float):
    """Decodes `stream`'s `packets`, but frames that no other frame references (e.g. most B-frames) are not
    decoded while their packet lies before `start_sec`: they cannot change any later frame. The decoder
    setting travels with each packet (also to frame-threading workers), so it switches exactly there."""
    codec, seconds = stream.codec_context, _pts_to_seconds(stream.time_base)
    for packet in packets:
        before = packet.pts is not None and seconds(packet.pts) < start_sec
        codec.skip_frame = "NONREF" if before else "DEFAULT"
        yield from packet.decode()


def audio_priming_drop(path) -> int:
    """Samples that av 9.0.0 + torchvision dropped from the start of the audio (1024 for AAC in MP4 made
    by FFmpeg, 0 for files without encoder priming). See the module docstring."""
    with _open(path) as container:
        stream = _stream(container, "audio", path)
        _, first_pts = _packets_to_first_pts(container, stream, path)
        return _priming_drop(container, stream, first_pts)


def _packets_to_first_pts(container, stream, path) -> tuple[list, int]:
    """Demuxes up to the first packet with a timestamp; returns `(those packets, its pts in samples)`."""
    head = []
    for packet in container.demux(stream):
        head.append(packet)
        if packet.pts is not None:
            return head, int(packet.pts * stream.time_base * stream.sample_rate)
    raise BadVideoError(path, "audio stream has no packets", "re-encode it")


def _priming_drop(container, stream, first_pts: int) -> int:
    """The drop for a stream whose first packet starts at `first_pts` samples (the encoder delay if < 0):
    where a backward seek to 0 lands, plus that delay. Seeks: call it after decoding."""
    start_pad = max(0, -first_pts)
    container.seek(0, stream=stream, backward=True, any_frame=False)
    landed = next((p for p in container.demux(stream) if p.pts is not None), None)
    landed_pts = first_pts if landed is None else int(landed.pts * stream.time_base * stream.sample_rate)
    return max(0, landed_pts + start_pad)


def decode_audio(
    path, start_sec: float = 0.0, end_sec: float | None = None, audio_priming_compat: bool = True
) -> tuple[torch.Tensor, int]:
    """Returns `(audio, sample_rate)`: audio is (Ta,) float32, the mean over channels."""
    with _open(path) as container:
        stream = _stream(container, "audio", path)
        sr = stream.sample_rate
        if not sr:
            raise BadVideoError(path, "audio stream has no sample rate", "re-encode it")
        head, first_pts = _packets_to_first_pts(container, stream, path)
        # a backward seek to 0 lands at or before the first packet or 0, so the drop is at most |first_pts|:
        # decode that much more and find the drop afterwards (it seeks), all in one opening of the file
        max_drop = abs(first_pts) if audio_priming_compat else 0
        n_samples = math.inf if end_sec is None else max_drop + round(end_sec * sr)
        wave = decode_planar(itertools.chain(head, container.demux(stream)), path, n_samples).mean(axis=0)  # (Ta,)
        drop = _priming_drop(container, stream, first_pts) if audio_priming_compat else 0
    if drop > max_drop and end_sec is not None:  # a demuxer that seeks past 0: decode all of it
        wave, _ = decode_audio(path, audio_priming_compat=audio_priming_compat)
        return wave[round(start_sec * sr) : round(end_sec * sr)], sr
    stop = None if end_sec is None else drop + round(end_sec * sr)
    return torch.from_numpy(np.ascontiguousarray(wave[drop + round(start_sec * sr) : stop], dtype=np.float32)), sr


def decode_planar(packets, path, n_samples: float = math.inf) -> np.ndarray:
    """(C, Ta) float32: decodes audio `packets` until `n_samples` samples with pts >= 0 are out, in pts order
    (for equal pts the later-decoded frame wins)."""
    to_fltp = av.AudioResampler(format="fltp")
    chunks = []
    decoded_until = 0
    try:
        for packet in packets:
            for frame in packet.decode():
                if frame.pts is None or frame.pts < 0:
                    continue
                if frame.format.name != "fltp":
                    frame = to_fltp.resample(frame)[0]
                chunks.append((frame.pts, frame.to_ndarray()))  # (C, n)
                decoded_until += frame.samples
            if decoded_until >= n_samples:
                break
    except av.FFmpegError as e:
        raise BadVideoError(path, f"audio stream is corrupt: {e}", "re-encode or drop the file") from e
    if not chunks:
        raise BadVideoError(path, "no audio could be decoded", "the audio stream is empty")
    by_pts = dict(chunks)
    return np.concatenate([by_pts[pts] for pts in sorted(by_pts)], axis=1)  # (C, Ta)


def get_video_and_audio(
    path, get_meta: bool = False, start_sec: float = 0.0, end_sec: float | None = None, audio_priming_compat=True
):  # fmt: skip
    """`(rgb (Tv, 3, H, W) uint8, audio (Ta,) float32, meta)` with the original's legacy meta layout
    `{'video': {'fps': [fps]}, 'audio': {'framerate': [sr]}}` (returned regardless of `get_meta`)."""
    rgb, fps = decode_video(path, start_sec, end_sec)
    audio, sr = decode_audio(path, start_sec, end_sec, audio_priming_compat)
    meta = {"video": {"fps": [fps]}, "audio": {"framerate": [sr]}}
    return rgb, audio, meta


def reencode_video(
    path, vfps: float = VFPS, afps: int = AFPS, in_size: int = SIDE, out_dir=None,
    start_sec: float = 0.0, end_sec: float | None = None, out_path=None,
) -> Path:  # fmt: skip
    """Re-encodes `path` to what the models expect: `vfps` fps, the shorter side `in_size` (aspect kept,
    both sides even), mono `afps` Hz AAC. Mirrors the original's ffmpeg call
    (`fps=`, `scale=iw*S/min(iw,ih):ih*S/min(iw,ih)`, `crop=trunc(iw/2)*2:trunc(ih/2)*2`, `-ar`):

    - fps conversion like ffmpeg's `fps` filter: output frame n (time n/vfps) repeats the latest input
      frame that starts at or before that time (rounded to the nearest output tick);
    - bicubic resize (swscale, ffmpeg's default), then a centred crop to even sides;
    - audio resampled with libswresample to `afps` and down-mixed to mono (the original kept the
      channels in the mp4 but every reader here averages them).

    `start_sec` / `end_sec` cut a clip: output frame n shows time `start_sec + n/vfps` of the input, the
    audio keeps the resampled samples from `round(start_sec*afps)` to `round(end_sec*afps)`.
    Returns the new path: `out_path`, else `<out_dir>/<stem>_<vfps>fps_<in_size>side_<afps>hz.mp4`
    (`out_dir` defaults to `./vis`, as in the original's `example.py`)."""
    if out_path is None:
        out_dir = Path("vis") if out_dir is None else Path(out_dir)
        out_path = out_dir / f"{Path(path).stem}_{vfps}fps_{in_size}side_{afps}hz.mp4"
    new_path = Path(out_path)
    new_path.parent.mkdir(parents=True, exist_ok=True)
    n_ticks = math.inf if end_sec is None else round((end_sec - start_sec) * vfps)  # output frames of a cut
    first_sample, stop_sample = round(start_sec * afps), math.inf if end_sec is None else round(end_sec * afps)
    with _open(path) as src:
        v_in, a_in = _stream(src, "video", path), _stream(src, "audio", path)
        h, w = v_in.codec_context.height, v_in.codec_context.width
        scale = in_size / min(h, w)
        scaled_h, scaled_w = int(h * scale), int(w * scale)
        out_h, out_w = scaled_h // 2 * 2, scaled_w // 2 * 2
        top, left = (scaled_h - out_h) // 2, (scaled_w - out_w) // 2

        def to_rgb(frame) -> np.ndarray:
            scaled = frame.reformat(width=scaled_w, height=scaled_h, format="rgb24", interpolation="BICUBIC")
            return scaled.to_ndarray()[top : top + out_h, left : left + out_w]

        with av.open(str(new_path), "w") as dst:
            v_out = dst.add_stream("libx264", rate=Fraction(vfps).limit_denominator(1001))
            v_out.height, v_out.width, v_out.pix_fmt = out_h, out_w, "yuv420p"
            a_out = add_audio_stream(dst, afps)
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=afps)
            samples_in, samples_out = 0, 0  # resampled samples seen / encoded

            def encode_audio(frames) -> None:
                nonlocal samples_in, samples_out
                for resampled in frames:
                    n, lo = resampled.samples, samples_in
                    samples_in += n
                    keep = slice(max(0, first_sample - lo), min(n, stop_sample - lo))
                    if keep.stop <= keep.start:
                        continue
                    if keep != slice(0, n):  # a cut's boundary: keep part of the frame
                        resampled = audio_frame(resampled.to_ndarray()[:, keep], "mono", afps)
                    resampled.pts = samples_out
                    samples_out += resampled.samples
                    dst.mux(a_out.encode(resampled))

            next_out_i, last, last_rgb, n_in = 0, None, None, 0  # the latest input frame, its pixels; frames in
            v_time_base, v_start = v_in.time_base, v_in.start_time or 0
            for frame in _decode_or_fail(src, (v_in, a_in), path):
                if isinstance(frame, av.AudioFrame):
                    encode_audio(resampler.resample(frame))
                    continue
                t = float((frame.pts - v_start) * v_time_base) - start_sec
                # emit every output tick up to this frame's start with the previous frame
                while last is not None and next_out_i / vfps < t - 0.5 / vfps and next_out_i < n_ticks:
                    last_rgb = to_rgb(last) if last_rgb is None else last_rgb
                    dst.mux(v_out.encode(rgb_frame(last_rgb, next_out_i)))
                    next_out_i += 1
                last, last_rgb, n_in = frame, None, n_in + 1
                if next_out_i >= n_ticks and samples_in >= stop_sample:
                    break  # the cut is complete
            if n_in < 2:  # held for the audio's length it would pass for a video
                raise BadVideoError(path, f"has {n_in} video frame(s): a still image, not a video", "drop it")
            # the last frame lasts one input frame (FFmpeg's fps filter), not up to the end of a longer audio
            video_end = t + 1 / float(v_in.average_rate or vfps)
            while next_out_i < min(round(video_end * vfps), n_ticks):
                last_rgb = to_rgb(last) if last_rgb is None else last_rgb
                dst.mux(v_out.encode(rgb_frame(last_rgb, next_out_i)))
                next_out_i += 1
            encode_audio(resampler.resample(None))
            dst.mux(v_out.encode())
            dst.mux(a_out.encode())
    return new_path


def _decode_or_fail(container, streams, path):
    """The frames of `streams`; BadVideoError when the data in the middle of the file are corrupt."""
    try:
        yield from container.decode(*streams)
    except av.FFmpegError as e:
        raise BadVideoError(path, f"is corrupt: {e}", "re-encode or drop the file") from e


def add_audio_stream(container, rate: int, layout: str = "mono", bit_rate: int | None = None) -> av.AudioStream:
    """An audio stream of output `container`: AAC, else the container's own codec (Opus in WebM), at `rate`
    or the nearest one the codec takes (the encoder converts the frames it is given)."""
    codec = "aac" if "aac" in container.supported_codecs else container.default_audio_codec
    rates = av.Codec(codec, "w").audio_rates or [rate]
    stream = container.add_stream(codec, rate=min(rates, key=lambda r: abs(r - rate)), layout=layout)
    if bit_rate:  # unknown in Matroska: the codec's default
        stream.bit_rate = bit_rate
    return stream


def rgb_frame(rgb: np.ndarray, pts: int) -> av.VideoFrame:
    """A frame to encode from (H, W, 3) uint8 pixels."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    frame.pts = pts
    return frame


def audio_frame(wave: np.ndarray, layout: str, sample_rate: int, pts: int | None = None) -> av.AudioFrame:
    """A frame to encode from (C, n) float32 samples."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = sample_rate, pts
    return frame


def probe_video(path) -> dict:
    """What a file holds, without decoding it: `fps`, `sample_rate`, `height`, `width`, `duration_sec`."""
    with _open(path) as container:
        video, audio = _stream(container, "video", path), _stream(container, "audio", path)
        if not video.average_rate or not audio.codec_context.sample_rate:
            raise BadVideoError(path, "has no frame rate or sample rate", "re-encode it with a constant fps")
        duration = container.duration / av.time_base if container.duration else None
        return {
            "fps": float(video.average_rate),
            "sample_rate": audio.codec_context.sample_rate,
            "height": video.codec_context.height,
            "width": video.codec_context.width,
            "duration_sec": duration,
        }
