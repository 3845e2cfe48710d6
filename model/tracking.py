"""Offset prediction over many windows of one video, with every segment's features computed once.

Synchformer cuts a window into overlapping segments and runs the feature extractors on each segment
independently; only the small synchronisation transformer sees the whole window. Windows whose starts
differ by a multiple of the segment step (0.32 s) therefore share segments exactly, so a long video is
tracked by extracting features for each distinct segment once and running only the head per window."""

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dataset.io import BadVideoError
from dataset.segment_pipeline import SegmentPipeline, load_for_model, n_frames
from dataset.transforms import make_class_grid
from model.sync_model import Synchformer
from utils.precision import autocast


def offset_grid(cfg: DictConfig, num_classes: int) -> torch.Tensor:
    return make_class_grid(-cfg.data.max_off_sec, cfg.data.max_off_sec, num_classes)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


class WindowPredictor:
    """Predicts offsets for many windows of one video, computing each distinct segment's features once."""

    def __init__(
        self, model: Synchformer, cfg: DictConfig, precision: str = "fp32", batch_segments: int = 14,
        batch_windows: int = 16,
    ):  # fmt: skip
        """`precision`: a concrete one of `utils.precision` (int8: `model` is already quantised)."""
        self.model, self.cfg, self.precision = model.eval(), cfg, precision
        self.pipeline = SegmentPipeline.from_config(cfg)
        self.device = next(model.parameters()).device
        self.batch_segments, self.batch_windows = batch_segments, batch_windows
        self.seg_v = cfg.data.segment_size_vframes
        self.seg_a = round(self.seg_v / cfg.data.vfps * cfg.data.afps)
        self.segments_computed = 0  # features extracted so far: the cost that reuse saves

    @torch.inference_mode()
    def features(self, item: dict, keys: Sequence[tuple[int, int]]) -> dict:
        """{segment key: (visual features (tv, D), audio features (ta, D))} for the distinct `keys`."""
        keys = list(dict.fromkeys(keys))
        feats = {}
        for i in range(0, len(keys), self.batch_segments):
            chunk = keys[i : i + self.batch_segments]
            vid, aud = self.pipeline.segment_inputs(item, chunk, self.seg_v, self.seg_a)
            # the chunk goes in as one clip of N segments: the extractors treat segments independently
            vid = vid.unsqueeze(0).to(self.device, torch.float32)  # (1, N, Tv, C, H, W)
            aud = aud.unsqueeze(0).to(self.device, torch.float32)  # (1, N, 1, F, Ta)
            with autocast(self.precision, self.device):
                vfeat, afeat = self.model.extract_features(vid, aud)  # (1, N, tv, D), (1, N, ta, D)
            for j, key in enumerate(chunk):
                feats[key] = (vfeat[0, j], afeat[0, j])
        self.segments_computed += len(keys)
        return feats

    @torch.inference_mode()
    def predict(self, item: dict, windows: Sequence[Sequence[tuple[int, int]]], progress: bool = False):
        """Logits (W, num_classes) of windows given as lists of segment keys. A batch of windows gets the
        features it lacks just before its head call, and features are dropped after their last window, so
        memory does not grow with the number of windows."""
        last_use = {k: i for i, w in enumerate(windows) for k in w}
        feats, logits = {}, []
        for i in tqdm(range(0, len(windows), self.batch_windows), "windows", unit="batch", disable=not progress):
            chunk = windows[i : i + self.batch_windows]
            feats |= self.features(item, [k for w in chunk for k in w if k not in feats])
            vfeat = torch.stack([torch.stack([feats[k][0] for k in w]) for w in chunk])  # (W, S, tv, D)
            afeat = torch.stack([torch.stack([feats[k][1] for k in w]) for w in chunk])  # (W, S, ta, D)
            with autocast(self.precision, self.device):
                logits.append(self.model.forward_head(vfeat, afeat).float().cpu())
            feats = {k: f for k, f in feats.items() if last_use[k] >= i + self.batch_windows}
        return torch.cat(logits)

    def window_starts(self, item: dict, stride_sec: float, crop_len_sec: float | None = None) -> list[float]:
        """Visual window starts every `stride_sec` seconds (snapped to frames) that fit in the video."""
        fps = item["meta"]["video"]["fps"][0]
        crop_len_sec = self.cfg.data.crop_len_sec if crop_len_sec is None else crop_len_sec
        duration = min(n_frames(item) / fps, item["audio"].shape[0] / item["meta"]["audio"]["framerate"][0])
        n = math.floor((duration - crop_len_sec) / stride_sec + 1e-6) + 1
        return [round(i * stride_sec * fps) / fps for i in range(max(n, 0))]


def summarise(starts: list[float], probs: torch.Tensor, grid: torch.Tensor) -> dict:
    """Overall offset (confidence-weighted mode), its share of the probability mass, and drift."""
    step = float(grid[1] - grid[0])
    overall = int(probs.sum(0).argmax())
    half = len(starts) // 2
    first, second = (int(p.sum(0).argmax()) for p in (probs[: max(half, 1)], probs[half:]))
    drift = abs(float(grid[second] - grid[first]))
    return {
        "n_windows": len(starts),
        "offset_sec": float(grid[overall]),
        "confidence": float(probs.sum(0)[overall] / len(starts)),
        "offset_first_half_sec": float(grid[first]),
        "offset_second_half_sec": float(grid[second]),
        "drift": drift >= 2 * step - 1e-6,
    }


def predict_track(
    predictor: WindowPredictor, path: Path, work_dir: Path, stride_sec: float, offset_sec: float = 0.0,
    progress: bool = False,
) -> tuple[list[dict], dict]:  # fmt: skip
    """`(one row per window, the summary)` of the windows every `stride_sec` over the video, with the
    audio shifted earlier by `offset_sec` first; `work_dir` takes re-encoded copies."""
    item = load_for_model(path, predictor.cfg, work_dir, predictor.pipeline)
    starts = predictor.window_starts(item, stride_sec)
    if not starts:
        crop = predictor.cfg.data.crop_len_sec
        raise BadVideoError(path, f"shorter than one {crop} s window", f"the model needs a video of at least {crop} s")
    windows = [predictor.pipeline.window_segments(item, s, offset_sec) for s in starts]
    logits = predictor.predict(item, windows, progress=progress)
    grid = offset_grid(predictor.cfg, logits.shape[-1])
    probs = torch.softmax(logits, -1)
    top = probs.argmax(-1)
    rows = [
        {
            "start_sec": round(s, 3),
            "end_sec": round(s + predictor.cfg.data.crop_len_sec, 3),
            "offset_sec": round(float(grid[k]), 2),
            "class": int(k),
            "prob": round(float(p[k]), 4),
            "entropy": round(float(h), 4),
        }
        for s, k, p, h in zip(starts, top, probs, entropy(probs))
    ]
    return rows, {"video": str(path), "precision": predictor.precision, **summarise(starts, probs, grid)}
