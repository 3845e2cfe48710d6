"""Transforms on dataset items, with the original's class names and parameters (see `configs/*.yaml`).

An item is `{'video': (Tv, C, H, W), 'audio': (Ta,), 'meta': {...}, 'path', 'split', 'targets': {...}}`.
After `GenerateMultipleSegments` the streams are stacks of segments: video (S, Tv, C, H, W), audio
(S, Ta) and later (S, F, Ta) spectrograms. Clip-wise augmentations subclass `ClipwiseTransform`, which
applies them to a single clip or to every segment of a stack (each segment draws its own randomness).

Offset convention: a positive `offset_sec` means the audio starts that much *earlier* than the video
(the audio crop starts at `v_start + offset_sec`, so the audio already has what the video shows later).

Index arithmetic follows the original exactly (`int()` truncation, rounding of `offset_sec` to 0.01,
video start snapped to the frame grid before the audio start is computed), so fixed offsets from the
original's CSVs select the same frames and samples. Crops respect an optional decode window: when the
dataset decoded only part of a file, `meta['video']['start_frame']` / `meta['audio']['start_sample']`
say where it starts (and `meta['video']['end_frame']` where the video ends when its last frames were
only counted, not decoded) and all indices stay absolute (file) indices."""

import logging
import math
import random

import einops
import numpy as np
import torch
import torchaudio
import torchvision
from torchvision.transforms import functional as TF

from dataset.io import BadVideoError


def sec2frames(sec: float, fps: float) -> int:
    return int(sec * fps)


def frames2sec(frames: int, fps: float) -> float:
    return frames / fps


def make_class_grid(
    leftmost_val: float, rightmost_val: float, grid_size: int, add_extreme_offset: bool = False,
    seg_size_vframes: int | None = None, nseg: int | None = None, step_size_seg: float | None = None,
    vfps: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """`grid_size` offsets evenly spaced in [left, right] (float32); optionally one extra class for an
    offset as long as the whole segment sequence ("extreme", i.e. no overlap at all)."""
    assert grid_size >= 3, f"grid_size={grid_size} makes no sense as a class grid"
    grid = torch.from_numpy(np.linspace(leftmost_val, rightmost_val, grid_size)).float()
    if add_extreme_offset:
        seg_size_sec = seg_size_vframes / vfps
        seq_len_in_segs = nseg - (1 - step_size_seg) * (nseg - 1)
        grid = torch.cat([grid, torch.tensor([seq_len_in_segs * seg_size_sec])])
    return grid


def quantize_offset(grid: torch.Tensor, off_sec: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Snaps an offset onto the closest grid value; returns `(grid value, class index)` as tensors."""
    closest = (grid - off_sec).abs().argmin()
    return grid[closest], closest


def _fps(item) -> tuple[int, int]:
    return int(item["meta"]["video"]["fps"][0]), int(item["meta"]["audio"]["framerate"][0])


def _file_lengths(item, v_start: int, a_start: int) -> tuple[int, int]:
    """Frames / samples of the file up to the end of the decoded window; the window's last video frames
    may have been counted but not decoded (`meta['video']['end_frame']`)."""
    v_len = item["meta"]["video"].get("end_frame", v_start + item["video"].shape[0])
    return v_len, a_start + item["audio"].shape[0]


class ClipwiseTransform(torch.nn.Module):
    """Applies `apply_to_clip` to `item[stream]`: a single clip, or each segment of a stack of them."""

    stream = "video"
    clip_ndim = 4  # video clip (T, C, H, W); audio subclasses set 1 for a waveform (Ta,)

    def apply_to_clip(self, clip: torch.Tensor, item: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, item: dict) -> dict:
        x = item[self.stream]
        if x.ndim == self.clip_ndim:
            item[self.stream] = self.apply_to_clip(x, item)
        else:
            item[self.stream] = torch.stack([self.apply_to_clip(clip, item) for clip in x])
        return item


class AudioClipwiseTransform(ClipwiseTransform):
    stream = "audio"
    clip_ndim = 1


class EqualifyFromRight(torch.nn.Module):
    """Trims the ends of both streams to the same duration (at most `clip_max_len_sec`), assuming they
    start together; the audio length is a whole number of video frames."""

    def __init__(self, clip_max_len_sec: float = 10):
        super().__init__()
        self.clip_max_len_sec = clip_max_len_sec

    def forward(self, item: dict) -> dict:
        v_fps, a_fps = item["meta"]["video"]["fps"][0], item["meta"]["audio"]["framerate"][0]
        v_start, a_start = item["meta"]["video"].get("start_frame", 0), item["meta"]["audio"].get("start_sample", 0)
        Tv, Ta = _file_lengths(item, v_start, a_start)
        min_len_sec = min(self.clip_max_len_sec, Ta / a_fps, Tv / v_fps)
        v_len_frames = int(v_fps * min_len_sec)
        a_len_frames = int(a_fps // v_fps * v_len_frames)
        assert a_len_frames <= Ta and v_len_frames <= Tv
        item["audio"] = item["audio"][: max(0, a_len_frames - a_start)]
        item["video"] = item["video"][: max(0, v_len_frames - v_start)]
        if "end_frame" in item["meta"]["video"]:
            item["meta"]["video"]["end_frame"] = v_len_frames
        return item


class RGBSpatialCrop(torch.nn.Module):
    def __init__(self, input_size, is_random: bool):
        super().__init__()
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.is_random = is_random

    def crop_box(self, h: int, w: int) -> tuple[int, int]:
        th, tw = self.input_size
        if not self.is_random:
            return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        if (h, w) == (th, tw):
            return 0, 0
        return random.randint(0, h - th), random.randint(0, w - tw)

    def forward(self, item: dict) -> dict:
        top, left = self.crop_box(*item["video"].shape[-2:])
        th, tw = self.input_size
        item["video"] = item["video"][..., top : top + th, left : left + tw]
        return item


class Resize(torchvision.transforms.Resize):
    def forward(self, item: dict) -> dict:
        item["video"] = super().forward(item["video"])
        return item


class RGBSpatialCropSometimesUpscale(torch.nn.Module):
    """Crops to `target_input_size`; with probability `sometimes_p` crops a smaller `smaller_input_size`
    region instead and upscales it to the target size (a zoom-in augmentation). Resizing is bilinear
    without antialiasing, what `antialias=None` meant for tensors in the original's torchvision."""

    def __init__(self, sometimes_p, target_input_size, is_random, smaller_input_size=None):
        super().__init__()
        self.sometimes_p = sometimes_p or 0.0
        self.crop_only = RGBSpatialCrop(target_input_size, is_random)
        self.crop_and_upscale = None
        if self.sometimes_p > 0:
            smaller, upscale = RGBSpatialCrop(smaller_input_size, is_random), Resize(target_input_size, antialias=False)
            self.crop_and_upscale = torchvision.transforms.Compose([smaller, upscale])

    def forward(self, item: dict) -> dict:
        assert item["video"].ndim == 4, "apply spatial crops before GenerateMultipleSegments"
        if self.sometimes_p > 0 and self.sometimes_p > torch.rand(1):
            return self.crop_and_upscale(item)
        return self.crop_only(item)


class RandomApplyColorDistortion(ClipwiseTransform):
    """SimCLR colour distortion: jitter with probability `p_color_jitter`, grayscale with `p_gray_scale`."""

    def __init__(self, p_gray_scale: float = 0.0, p_color_jitter: float = 0.0, s: float = 1.0):
        super().__init__()
        assert 0 <= p_color_jitter <= 1 and 0 <= p_gray_scale <= 1, (p_color_jitter, p_gray_scale)
        jitter = torchvision.transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        maybe_jitter = torchvision.transforms.RandomApply([jitter], p_color_jitter)
        maybe_gray = torchvision.transforms.RandomGrayscale(p_gray_scale)
        self.transforms = torchvision.transforms.Compose([maybe_jitter, maybe_gray])

    def apply_to_clip(self, clip, item):
        return self.transforms(clip)


class RandomHorizontalFlip(ClipwiseTransform):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def apply_to_clip(self, clip, item):
        return TF.hflip(clip) if torch.rand(1) < self.p else clip


class TemporalCropAndOffset(torch.nn.Module):
    """Cuts a `crop_len_sec` crop of the video and an audio crop shifted by an offset.

    The offset and the video start come from `item['targets']` (fixed offsets at valid/test) or are
    sampled: `grid` picks one of `grid_size` classes in [-max_off_sec, max_off_sec]; `uniform` draws
    U(-max, max); `uniform_binary` is in sync (U(-0.125, 0.045), ITU-T) with prob 1 - `prob_oos` and
    out of sync (U(-max, max) outside that range) otherwise. `max_wiggle_sec` jitters the audio start
    within half a class. Writes `offset_sec`, `v_start_i_sec`, `offset_label`, `offset_target` targets."""

    ITU_T_RANGE = (-0.125, 0.045)

    def __init__(
        self, crop_len_sec: float, max_off_sec: float, offset_type: str = "grid", do_offset: bool = True,
        grid_size: int | None = None, max_wiggle_sec: float | None = None, add_doubt_cls: bool = False,
        segment_size_vframes: int | None = None, n_segments: int | None = None, step_size_seg: float | None = None,
        vfps: float | None = None, prob_oos: float | None = None,
    ):  # fmt: skip
        super().__init__()
        self.crop_len_sec = crop_len_sec
        self.max_off_sec = max_off_sec
        self.offset_type = offset_type
        self.do_offset = do_offset
        self.max_a_jitter_sec = max_wiggle_sec
        self.prob_oos = prob_oos
        self.vfps = vfps
        if do_offset and offset_type == "grid":
            self.class_grid = make_class_grid(
                -max_off_sec, max_off_sec, grid_size, add_doubt_cls, segment_size_vframes, n_segments,
                step_size_seg, vfps,
            )  # fmt: skip
            if max_wiggle_sec:
                assert max_wiggle_sec - 1e-6 <= (self.class_grid[1] - self.class_grid[0]) / 2, self.class_grid
        elif do_offset and offset_type in ("uniform", "uniform_binary"):
            self.off_dist = torch.distributions.Uniform(-max_off_sec, max_off_sec)
        elif do_offset:
            raise NotImplementedError(f"Unknown offset_type: {offset_type}")

    def sample_offset(self) -> tuple[float, bool | None]:
        """Returns `(offset_sec, is_out_of_sync)`; the latter only for `uniform_binary`."""
        if self.offset_type == "grid":
            return random.choice(self.class_grid.tolist()), None
        if self.offset_type == "uniform":
            return self.off_dist.sample().item(), None
        is_oos = (torch.rand(1) < self.prob_oos).item()
        if not is_oos:
            return torch.distributions.Uniform(*self.ITU_T_RANGE).sample().item(), False
        offset = self.off_dist.sample().item()
        while self.ITU_T_RANGE[0] <= offset <= self.ITU_T_RANGE[1]:
            offset = self.off_dist.sample().item()
        return offset, True

    def choose_crop(self, item, v_len: int, v_crop_len: int, v_fps: int, a_fps: int):
        """Returns `(offset_sec, v_start_i_sec, v_start_i, a_start_i, is_oos)` in file indices."""
        targets = item["targets"]
        offset_sec, v_start_i_sec = targets.get("offset_sec"), targets.get("v_start_i_sec")
        is_oos = targets.get("offset_target", {}).get("oos")
        if offset_sec is None and v_start_i_sec is None:
            offset_sec, is_oos = self.sample_offset()
            offset_sec = round(offset_sec, 2)
            v_start_max_sec = frames2sec(v_len - v_crop_len, v_fps)
            if v_start_max_sec <= 0:
                raise BadVideoError(item["path"], f"too short for a {self.crop_len_sec} s crop")
            # the start is continuous, then snapped to the frame grid; the audio follows the snapped one
            v_start_sec = random.uniform(max(0, -offset_sec), min(v_start_max_sec, v_start_max_sec - offset_sec))
            v_start_i = sec2frames(v_start_sec, v_fps)
            v_start_i_sec = frames2sec(v_start_i, v_fps)
        else:
            offset_sec = round(offset_sec, 2)
            v_start_i = sec2frames(v_start_i_sec, v_fps)
        return offset_sec, v_start_i_sec, v_start_i, sec2frames(v_start_i_sec + offset_sec, a_fps), is_oos

    def forward(self, item: dict) -> dict:
        v_fps, a_fps = _fps(item)
        if self.vfps is not None and v_fps != int(self.vfps):
            raise BadVideoError(item["path"], f"has {v_fps} fps, expected {self.vfps}", "re-encode with reencode_video")
        # first frame / sample of the decoded window in file indices (0 when the whole file was read)
        v_start, a_start = item["meta"]["video"].pop("start_frame", 0), item["meta"]["audio"].pop("start_sample", 0)
        v_len, a_len = _file_lengths(item, v_start, a_start)
        item["meta"]["video"].pop("end_frame", None)
        v_crop_len, a_crop_len = sec2frames(self.crop_len_sec, v_fps), sec2frames(self.crop_len_sec, a_fps)

        if self.do_offset:
            offset_sec, v_start_i_sec, v_start_i, a_start_i, is_oos = self.choose_crop(
                item, v_len, v_crop_len, v_fps, a_fps
            )
        else:
            offset_sec = 0.0
            v_start_i = _centre_or_random_start(v_len, v_crop_len, is_random=item["split"] == "train")
            v_start_i_sec = frames2sec(v_start_i, v_fps)
            a_start_i = sec2frames(v_start_i_sec, a_fps)
        a_start_i = _fix_rounding_below_zero(a_start_i, a_fps, v_fps, item["path"])
        if self.max_a_jitter_sec:
            # U[-j, j] samples, clamped so that the crop stays inside the audio
            max_jitter = sec2frames(self.max_a_jitter_sec, a_fps)
            jitter = random.randint(-min(a_start_i, max_jitter), min(a_len - a_crop_len - a_start_i, max_jitter))
            a_start_i, item["meta"]["a_jitter_i"] = a_start_i + jitter, jitter

        v_end_i, a_end_i = v_start_i + v_crop_len, a_start_i + a_crop_len
        if v_end_i > v_len or a_end_i > a_len or v_start_i < v_start or a_start_i < a_start:
            raise BadVideoError(
                item["path"],
                f"crop video [{v_start_i}, {v_end_i}) of {v_len} frames / audio [{a_start_i}, {a_end_i}) of {a_len} "
                "samples does not fit",
                "the clip is shorter than the crop plus the offset",
            )
        # the decode window covers every crop that fits (a shortfall here is a bug in `decode_window`)
        assert v_end_i - v_start <= item["video"].shape[0], (item["path"], v_end_i, v_start, item["video"].shape)
        item["video"] = item["video"][v_start_i - v_start : v_end_i - v_start]
        item["audio"] = item["audio"][a_start_i - a_start : a_end_i - a_start]

        if self.do_offset:
            if self.offset_type == "grid":
                offset_label, offset_target = quantize_offset(self.class_grid, offset_sec)
            elif self.offset_type == "uniform":
                offset_label = offset_target = offset_sec
            else:
                offset_label, offset_target = offset_sec, {"oos": is_oos, "offset": offset_sec}
            item["targets"].update(
                offset_sec=offset_sec, v_start_i_sec=v_start_i_sec, offset_label=offset_label,
                offset_target=offset_target,
            )  # fmt: skip
        return item


class TemporalCropAndOffsetForSyncabilityTraining(TemporalCropAndOffset):
    """Crops as long as the segment sequence; with prob. 0.5 the offset is a grid class (synchronisable,
    `sync_target=1`), otherwise ± the whole crop length (no overlap, `sync_target=0`). Fixed offsets
    from the targets are in sync only if they lie within the grid."""

    prob_syncable = 0.5

    def __init__(
        self, max_off_sec: float, do_offset: bool = True, grid_size: int | None = None,
        max_wiggle_sec: float | None = None, segment_size_vframes: int | None = None, n_segments: int | None = None,
        step_size_seg: float | None = None, vfps: float | None = None,
    ):  # fmt: skip
        seq_len_in_segs = n_segments - (1 - step_size_seg) * (n_segments - 1)
        crop_len_sec = round(seq_len_in_segs * segment_size_vframes / vfps, 2)
        super().__init__(crop_len_sec, max_off_sec, "grid", do_offset, grid_size, max_wiggle_sec, vfps=vfps)

    def sample_offset(self) -> tuple[float, bool | None]:
        if random.random() < self.prob_syncable:
            return random.choice(self.class_grid.tolist()), False
        return random.choice([-self.crop_len_sec, self.crop_len_sec]), True

    def forward(self, item: dict) -> dict:
        item = super().forward(item)
        if self.do_offset:
            item["targets"]["sync_target"] = int(abs(item["targets"]["offset_sec"]) <= self.max_off_sec + 1e-6)
        return item


def _centre_or_random_start(len_frames: int, crop_len_frames: int, is_random: bool) -> int:
    if len_frames == crop_len_frames:
        return 0
    if is_random:
        return random.randint(0, len_frames - crop_len_frames)
    return int(round((len_frames - crop_len_frames) / 2.0))


def _fix_rounding_below_zero(a_start_i: int, a_fps: int, v_fps: int, path) -> int:
    """`int()` of a start snapped to the frame grid plus a negative offset can land a few samples
    before 0 (at most one video frame's worth); those are clamped, anything larger is a bad crop."""
    if a_start_i >= 0:
        return a_start_i
    if -a_start_i <= a_fps / v_fps:
        return 0
    raise BadVideoError(path, f"audio crop starts {a_start_i} samples before the file start")


class GenerateMultipleSegments(torch.nn.Module):
    """Cuts `n_segments` segments of `segment_size_vframes` frames (and the matching audio) with a stride
    of `step_size_seg` segments: video (S, T, C, H, W), audio (S, Ta). The sequence is centred, or starts
    at random with `is_start_random`; `audio_jitter_sec` shifts all audio segments by one random amount."""

    def __init__(
        self, segment_size_vframes: int, n_segments: int | None = None, is_start_random: bool = False,
        audio_jitter_sec: float = 0.0, step_size_seg: float = 1,
    ):  # fmt: skip
        super().__init__()
        self.segment_size_vframes = segment_size_vframes
        self.n_segments = n_segments
        self.is_start_random = is_start_random
        self.audio_jitter_sec = audio_jitter_sec
        self.step_size_seg = step_size_seg

    def segment_ranges(self, v_len: int, a_len: int, v_fps: int, a_fps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, 2) [start, end) ranges of the video and the audio segments."""
        seg_v = self.segment_size_vframes
        seg_a = sec2frames(frames2sec(seg_v, v_fps), a_fps)
        stride_v, stride_a = int(self.step_size_seg * seg_v), int(self.step_size_seg * seg_a)
        n_max = min(math.floor((v_len - seg_v) / stride_v) + 1, math.floor((a_len - seg_a) / stride_a) + 1)
        n_seg = n_max if self.n_segments is None else self.n_segments
        assert n_seg <= n_max, f"can't make {n_seg} segments of {seg_v} frames from {v_len} frames"

        seq_len_in_segs = n_seg * self.step_size_seg + (1 - self.step_size_seg)
        seq_len_v, seq_len_a = int(seq_len_in_segs * seg_v), int(seq_len_in_segs * seg_a)
        max_v_start = v_len - seq_len_v
        v_start = random.randint(0, max_v_start) if self.is_start_random else max_v_start // 2
        a_start = sec2frames(frames2sec(v_start, v_fps), a_fps)
        v_starts = v_start + stride_v * torch.arange(n_seg)
        a_starts = a_start + stride_a * torch.arange(n_seg)
        if self.audio_jitter_sec > 0:
            jitter = min(sec2frames(self.audio_jitter_sec, a_fps), a_start, a_len - a_start - seq_len_a)
            a_starts = a_starts + random.randint(-jitter, jitter)
        v_ranges = torch.stack([v_starts, v_starts + seg_v], dim=1)  # (S, 2)
        a_ranges = torch.stack([a_starts, a_starts + seg_a], dim=1)  # (S, 2)
        assert (a_ranges >= 0).all() and (a_ranges <= a_len).all(), f"{a_ranges} out of {a_len}"
        assert (v_ranges <= v_len).all(), f"{v_ranges} out of {v_len}"
        return v_ranges, a_ranges

    def forward(self, item: dict) -> dict:
        v_fps, a_fps = _fps(item)
        v_ranges, a_ranges = self.segment_ranges(item["video"].shape[0], item["audio"].shape[0], v_fps, a_fps)
        item["video"] = _segments(item["video"], v_ranges)  # (S, T, C, H, W)
        item["audio"] = _segments(item["audio"], a_ranges)  # (S, Ta)
        return item


def _segments(x: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """Stacks `x[start:end]` for each range along a new first dim. Evenly spaced equal-length ranges
    become a strided *view* (no copy; the next op materialises it); do not modify it in place."""
    starts, length = ranges[:, 0], int(ranges[0, 1] - ranges[0, 0])
    step = int(starts[1] - starts[0]) if len(starts) > 1 else 1
    if step > 0 and torch.equal(starts, starts[0] + step * torch.arange(len(starts))):
        # (S, *, length) -> (S, length, *)
        return x[int(starts[0]) :].unfold(0, length, step)[: len(starts)].movedim(-1, 1)
    return torch.stack([x[s:e] for s, e in ranges.tolist()])


class PixelwiseLookup(torch.nn.Module):
    """Runs a chain of deterministic pixel-wise transforms (`pixelwise = True`: each output value depends
    only on its input value and channel) on uint8 video as a table lookup: the chain runs once on the 256
    values of each channel, then every pixel reads its result. The same ops on the same values give
    bit-identical outputs, in one pass that also materialises a strided input (the segments' view) instead
    of one pass per op. Video of another dtype (e.g. after a colour augmentation) runs the chain as is."""

    pixelwise = True
    # numpy has no bfloat16: look up the tables' bits as integers of the same width
    _BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    PIXELS_PER_LOOKUP = 256 * 256

    def __init__(self, transforms: list):
        super().__init__()
        self.chain = torchvision.transforms.Compose(transforms)

    def forward(self, item: dict) -> dict:
        video = item["video"]
        if video.dtype != torch.uint8:
            return self.chain(item)
        C = video.shape[-3]
        values = torch.arange(256, dtype=torch.uint8).expand(C, 1, 256)  # one (C, H=1, W=256) frame
        # a shallow copy of the item: bookkeeping the chain writes into 'meta' (norm stats) lands in the item
        tables = self.chain({**item, "video": values})["video"].reshape(C, 256)  # (C, 256)
        tables_bits = tables.contiguous().view(self._BITS[tables.element_size()]).numpy()
        frames, step = covered_frames(video)
        pixels = frames.numpy()  # (..., T, C, H, W), possibly a strided view (a crop)
        out = np.empty(pixels.shape, dtype=tables_bits.dtype)
        T, H, W = pixels.shape[-4], *pixels.shape[-2:]
        # channel by channel over a few frames at a time: lookups of ~64k pixels are the fastest numpy path
        # (one 256 px frame; many small frames per call, so that Python overhead does not dominate)
        n = max(1, self.PIXELS_PER_LOOKUP // (H * W))
        for outer in np.ndindex(pixels.shape[:-4]):
            for first in range(0, T, n):
                for c in range(C):
                    index = (*outer, slice(first, first + n), c)
                    np.take(tables_bits[c], pixels[index], out=out[index], mode="wrap")
        out = torch.from_numpy(out).view(tables.dtype)  # (..., T, C, H, W)
        # overlapping segments again, as a view of the frames looked up once
        item["video"] = out if step is None else out.as_strided(video.shape, (step * out.stride(0), *out.stride()))
        return item


def covered_frames(video: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """For (S, T, C, H, W) segments that are overlapping windows over one run of frames, `step` frames
    apart (the view `GenerateMultipleSegments` makes), the (N, C, H, W) frames they cover, as a view, and
    the step; otherwise `(video, None)`. A pixel-wise op on the frames then does each frame once, not
    about twice."""
    if video.dim() != 5 or video.shape[0] < 2 or video.stride(1) == 0:
        return video, None
    S, T = video.shape[:2]
    step, rest = divmod(video.stride(0), video.stride(1))
    if rest or not 0 < step < T:
        return video, None
    frames = video.as_strided(((S - 1) * step + T, *video.shape[2:]), video.stride()[1:])
    return frames, step


def fuse_pixelwise(transforms: list) -> list:
    """Replaces each run of consecutive pixel-wise video transforms by one `PixelwiseLookup`."""
    fused = []
    for t in transforms:
        if getattr(t, "pixelwise", False) and fused and isinstance(fused[-1], PixelwiseLookup):
            fused[-1].chain.transforms.append(t)
        elif getattr(t, "pixelwise", False):
            fused.append(PixelwiseLookup([t]))
        else:
            fused.append(t)
    return fused


class RGBToFloatToZeroOne(torch.nn.Module):
    pixelwise = True
    dtype = torch.float32

    def forward(self, item: dict) -> dict:
        item["video"] = item["video"].to(self.dtype).div(255.0)
        return item


class RGBToHalfToZeroOne(RGBToFloatToZeroOne):
    dtype = torch.float16


class RGBNormalize(torchvision.transforms.Normalize):
    """torchvision's Normalize on (..., C, H, W); records the stats in `meta['video']['norm_stats']`."""

    pixelwise = True

    def forward(self, item: dict) -> dict:
        item["video"] = super().forward(item["video"])
        item["meta"]["video"]["norm_stats"] = {"mean": torch.as_tensor(self.mean), "std": torch.as_tensor(self.std)}
        return item


class AudioRandomVolume(AudioClipwiseTransform):
    def __init__(self, p: float, **kwargs):
        super().__init__()
        self.transform = torchvision.transforms.RandomApply([torchaudio.transforms.Vol(**kwargs)], p)

    def apply_to_clip(self, clip, item):
        return self.transform(clip)


class _RandomAudioEffect(AudioClipwiseTransform):
    """Applies `effect(wave, sample_rate)` with probability `p`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def effect(self, wave: torch.Tensor, sr: int) -> torch.Tensor:
        raise NotImplementedError

    def apply_to_clip(self, clip, item):
        if self.p > torch.rand(1):
            return self.effect(clip, int(item["meta"]["audio"]["framerate"][0]))
        return clip


class AudioRandomLowpassFilter(_RandomAudioEffect):
    def __init__(self, p: float, cutoff_freq: float, Q: float = 0.707):
        super().__init__(p)
        self.cutoff_freq, self.Q = cutoff_freq, Q

    def effect(self, wave, sr):
        return torchaudio.functional.lowpass_biquad(wave, sr, self.cutoff_freq, self.Q)


class AudioRandomPitchShift(_RandomAudioEffect):
    """Shifts the pitch by `shift` cents keeping the duration (the original used sox `pitch` + `rate`;
    sox is gone from torchaudio): a phase-vocoder time stretch by 2^(shift/1200) followed by linear
    resampling back to the original length. Statistics close to sox, not bit-exact (training only)."""

    n_fft, hop_length = 512, 128

    def __init__(self, p: float, shift: int):
        super().__init__(p)
        self.shift = shift

    def effect(self, wave, sr):
        ratio = 2 ** (self.shift / 1200)
        (Ta,) = wave.shape
        window = torch.hann_window(self.n_fft, dtype=wave.dtype)
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=window, return_complex=True)  # (F, t)
        phase_advance = torch.linspace(0, math.pi * self.hop_length, spec.shape[0])[:, None]
        stretched = torchaudio.functional.phase_vocoder(spec, 1 / ratio, phase_advance)  # (F, t*ratio)
        longer = torch.istft(stretched, self.n_fft, self.hop_length, window=window, length=round(Ta * ratio))
        # (1, 1, Ta*ratio) -> (1, 1, Ta): playing it faster raises the pitch by `ratio`
        return torch.nn.functional.interpolate(longer[None, None], size=Ta, mode="linear")[0, 0]


class AudioRandomReverb(_RandomAudioEffect):
    """Wet-only reverb (the original used sox `reverb -w`: reverberance 50 %, room scale 100 %).
    Replacement: convolution with a synthetic impulse response, white noise under an exponential decay
    with RT60 = 0.5 s (60 dB down after 0.5 s), scaled to unit energy so the loudness stays similar."""

    rt60_sec = 0.5

    def effect(self, wave, sr):
        n_taps = int(self.rt60_sec * sr)
        t = torch.arange(n_taps, dtype=wave.dtype) / sr
        impulse_response = torch.randn(n_taps, dtype=wave.dtype) * torch.exp(-6.9078 * t / self.rt60_sec)
        impulse_response = impulse_response / impulse_response.norm()
        return torchaudio.functional.fftconvolve(wave, impulse_response)[: wave.shape[-1]]


class AudioRandomGaussNoise(_RandomAudioEffect):
    def __init__(self, p: float, amplitude: float = 0.01):
        super().__init__(p)
        self.amplitude = amplitude

    def effect(self, wave, sr):
        return wave + self.amplitude * torch.randn_like(wave)


class AudioMelSpectrogram(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.spec = torchaudio.transforms.MelSpectrogram(**kwargs)

    def forward(self, item: dict) -> dict:
        sr = int(item["meta"]["audio"]["framerate"][0])
        if sr != self.spec.sample_rate:
            raise BadVideoError(item["path"], f"audio at {sr} Hz, expected {self.spec.sample_rate}", "resample it")
        item["audio"] = self.spec(item["audio"])  # (..., Ta) -> (..., F, T)
        return item


class AudioLog(torch.nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, item: dict) -> dict:
        item["audio"] = torch.log(item["audio"] + self.eps)
        return item


class PadOrTruncate(torch.nn.Module):
    """Pads (with `pad_value`) or truncates the last (time) dim of the audio to `max_spec_t`."""

    def __init__(self, max_spec_t: int, pad_mode: str = "constant", pad_value: float = 0.0):
        super().__init__()
        self.max_spec_t, self.pad_mode, self.pad_value = max_spec_t, pad_mode, pad_value

    def forward(self, item: dict) -> dict:
        audio = item["audio"]
        missing = self.max_spec_t - audio.shape[-1]
        if missing > 0:
            audio = torch.nn.functional.pad(audio, (0, missing), self.pad_mode, self.pad_value)
        elif missing < 0:
            logging.warning(f"Truncating spec ({tuple(audio.shape)}) to max_spec_t ({self.max_spec_t}).")
            audio = audio[..., : self.max_spec_t]
        item["audio"] = audio
        return item


class AudioNormalizeAST(torch.nn.Module):
    """AST's normalisation: (x - mean) / (2 * std)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, item: dict) -> dict:
        item["audio"] = (item["audio"] - self.mean) / (2 * self.std)
        item["meta"]["audio"]["norm_stats"] = {"mean": self.mean, "std": self.std}
        return item


class PermuteStreams(torch.nn.Module):
    """einops rearrangements, e.g. audio `"S F T -> S 1 F T"`, video `"S T C H W -> S C T H W"`. The results
    are views: collating a batch copies them once anyway (the segments of a clip overlap in memory, so a
    contiguous copy here would also double the video's size for nothing)."""

    def __init__(self, einops_order_audio: str | None, einops_order_rgb: str | None):
        super().__init__()
        self.einops_order_audio, self.einops_order_rgb = einops_order_audio, einops_order_rgb

    def forward(self, item: dict) -> dict:
        if self.einops_order_audio is not None:
            item["audio"] = einops.rearrange(item["audio"], self.einops_order_audio)
        if self.einops_order_rgb is not None:
            item["video"] = einops.rearrange(item["video"], self.einops_order_rgb)
        return item


class ResizeAndLetterboxPad(torch.nn.Module):
    """Resizes (T, C, H, W) to fit into (new_h, new_w) keeping the aspect ratio, pads the rest with 0."""

    def __init__(self, new_h: int, new_w: int):
        super().__init__()
        self.new_h, self.new_w = new_h, new_w

    def forward(self, item: dict) -> dict:
        rgb = item["video"]
        height, width = rgb.shape[-2:]
        aspect, target_aspect = width / height, self.new_w / self.new_h
        if aspect != target_aspect:  # wider: full width, pad top and bottom; taller: full height, pad the sides
            wider = aspect > target_aspect
            h, w = (round(self.new_w / aspect), self.new_w) if wider else (self.new_h, round(self.new_h * aspect))
            rgb = TF.resize(rgb, [h, w], antialias=False)
            top, left = (self.new_h - h) // 2, (self.new_w - w) // 2
            rgb = torch.nn.functional.pad(rgb, (left, self.new_w - w - left, top, self.new_h - h - top))
        item["video"] = rgb
        return item
