"""A video as the model sees it at test time: decoded at the model's frame rate, sample rate and size,
and the config's test transforms split around the temporal crop, so that the segments of any window
are cut from one decoded copy.

The segments of a window are found by the config's own test-time crop transforms run on index
tensors (frame and sample numbers instead of pixels), so the windows are exactly those that
`example.py` and the test-time pipeline would make."""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from dataset.dataset_utils import get_transforms
from dataset.io import BadVideoError, decode_audio, decode_video_window, probe_video, reencode_video
from dataset.transforms import EqualifyFromRight, GenerateMultipleSegments, RGBSpatialCrop, TemporalCropAndOffset
from utils.config import cfg_get


def in_model_format(path: str | Path, cfg: DictConfig, work_dir: str | Path, report=logging.info) -> Path:
    """`path` if the video is at the model's fps, sample rate and short side (`cfg.data`), else a copy
    re-encoded to them in `work_dir`; `report` gets one line saying which."""
    info = probe_video(path)
    vfps, afps, size = cfg.data.vfps, cfg.data.afps, cfg.data.size_before_crop
    fps, sr, H, W = info["fps"], info["sample_rate"], info["height"], info["width"]
    if (fps, sr, min(H, W)) == (vfps, afps, size):
        report(f"Skipping reencoding. vfps: {fps}; afps: {sr}; min(H, W)={size}")
        return Path(path)
    report(f"Reencoding. vfps: {fps} -> {vfps}; afps: {sr} -> {afps}; {(H, W)} -> min(H, W)={size}")
    return reencode_video(path, vfps, afps, size, out_dir=work_dir)


def load_for_model(path: Path, cfg, work_dir: Path, pipeline: "SegmentPipeline") -> dict:
    """The test item (`SegmentPipeline.prepare`'s) of a video at the model's fps / sample rate / size,
    re-encoded into `work_dir` when needed, with the audio decoded as the model was trained
    (`data.audio_priming_compat`, default True as published). Its frames stay in the file:
    `segment_inputs` decodes them a batch of segments at a time, so memory does not grow with the length."""
    path = in_model_format(path, cfg, work_dir)
    # the first frame alone is decoded (for its size); the others are counted from their timestamps
    first, fps, n_frames = decode_video_window(path, 0.0, None, pixels_end_sec=0.5 / cfg.data.vfps)
    audio, sr = decode_audio(path, audio_priming_compat=cfg_get(cfg, "data.audio_priming_compat"))
    meta = {"video": {"fps": [fps], "end_frame": n_frames}, "audio": {"framerate": [sr]}}
    return pipeline.prepare(first, audio, meta, str(path)) | {"streamed": True}


def n_frames(item: dict) -> int:
    """The frames of an item's video, also of one whose frames stay in the file (`load_for_model`)."""
    return item["meta"]["video"].get("end_frame", item["video"].shape[0])


def make_test_item(video: torch.Tensor, audio: torch.Tensor, meta: dict, path: str, targets: dict | None = None):
    """An item in the datasets' layout for the test transforms, with its own copy of `meta` (transforms write
    bookkeeping into it)."""
    meta = {stream: dict(values) for stream, values in meta.items()}
    return {"video": video, "audio": audio, "meta": meta, "path": path, "split": "test", "targets": targets or {}}


@dataclass
class SegmentPipeline:
    """The config's test transforms split around the temporal crop: `whole` runs once on the whole
    video, `crop` picks a window's segments, `per_segment` turns a stack of segments into model input."""

    whole: list
    crop: list
    per_segment: list

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "SegmentPipeline":
        transforms = list(get_transforms(cfg, "test").transforms)
        crop_types = (TemporalCropAndOffset, GenerateMultipleSegments)
        first = next(i for i, t in enumerate(transforms) if isinstance(t, TemporalCropAndOffset))
        last = next(i for i, t in enumerate(transforms) if isinstance(t, GenerateMultipleSegments))
        head = transforms[: last + 1]
        # the pixel-wise ops that `get_transforms` moved in front of the segmentation commute with the
        # crop: they run once on the whole video. A long video is not trimmed to the training clip length.
        assert all(isinstance(t, crop_types) or getattr(t, "pixelwise", False) for t in head[first:]), head
        whole = [EqualifyFromRight(math.inf) if isinstance(t, EqualifyFromRight) else t for t in head]
        whole = [t for t in whole if not isinstance(t, crop_types)]
        crop = [t for t in head if isinstance(t, crop_types)]
        return cls(whole, crop, transforms[last + 1 :])

    def prepare(self, rgb: torch.Tensor, audio: torch.Tensor, meta: dict, path: str) -> dict:
        item = make_test_item(rgb, audio, meta, path)
        for t in self.whole:
            item = t(item)
        return item

    def window_segments(self, item: dict, v_start_sec: float, offset_sec: float = 0.0) -> list[tuple[int, int]]:
        """(first frame, first sample) of each segment of the window starting at `v_start_sec`, with the
        audio window `offset_sec` later in the file (its events earlier); found by running the crop
        transforms on frame/sample indices."""
        frames, samples = torch.arange(n_frames(item)), torch.arange(item["audio"].shape[0])
        targets = {"v_start_i_sec": v_start_sec, "offset_sec": offset_sec}
        probe = make_test_item(frames, samples, item["meta"], item["path"], targets)
        for t in self.crop:
            probe = t(probe)
        return list(zip(probe["video"][:, 0].tolist(), probe["audio"][:, 0].tolist()))

    def segment_inputs(self, item: dict, keys: Sequence[tuple[int, int]], seg_v: int, seg_a: int):
        """Model inputs for the segments starting at `keys`: video (N, Tv, C, H, W), audio (N, 1, F, Ta)."""
        first, stop = min(v for v, _ in keys), max(v for v, _ in keys) + seg_v
        frames = self.decode_frames(item, first, stop) if item.get("streamed") else item["video"][first:stop]
        video = torch.stack([frames[v - first : v - first + seg_v] for v, _ in keys])  # (N, Tv, C, H, W)
        audio = torch.stack([item["audio"][a : a + seg_a] for _, a in keys])  # (N, Ta)
        seg = make_test_item(video, audio, item["meta"], item["path"])
        for t in self.per_segment:
            seg = t(seg)
        return seg["video"], seg["audio"]

    def decode_frames(self, item: dict, first: int, stop: int) -> torch.Tensor:
        """Frames [first, stop) of a streamed item's file, through the frame-wise ops of `whole`: the same
        frames as a whole decode (the file is at a constant frame rate: the model's)."""
        fps = item["meta"]["video"]["fps"][0]
        rgb, _, _ = decode_video_window(item["path"], first / fps, stop / fps)
        if rgb.shape[0] != stop - first:
            raise BadVideoError(item["path"], f"frames {first}-{stop} decode as {rgb.shape[0]}", "re-encode it")
        frames = make_test_item(rgb, torch.zeros(0), item["meta"], item["path"])
        for t in self.whole:
            assert isinstance(t, EqualifyFromRight | RGBSpatialCrop) or getattr(t, "pixelwise", False), t
            frames = frames if isinstance(t, EqualifyFromRight) else t(frames)
        return frames["video"]
