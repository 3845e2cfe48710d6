"""Offset prediction over many windows of one video, with every segment's features computed once.

Synchformer cuts a window into overlapping segments and runs the feature extractors on each segment
independently; only the small synchronisation transformer sees the whole window. Windows whose starts
differ by a multiple of the segment step (0.32 s) therefore share segments exactly, so a long video is
tracked by extracting features for each distinct segment once and running only the head per window.

The segments of a window are found by the config's own test-time crop transforms run on index
tensors (frame and sample numbers instead of pixels), so the windows are exactly those that
`example.py` and the test-time pipeline would make."""

import argparse
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dataset.dataset_utils import get_transforms
from dataset.transforms import EqualifyFromRight, GenerateMultipleSegments, TemporalCropAndOffset, make_class_grid
from model.sync_model import Synchformer, load_synchformer
from utils.cli import UserError
from utils.download import get_published_model
from utils.precision import AUTOCAST_DTYPES, PRECISIONS, autocast, resolve_device, resolve_precision


def load_model(
    exp_name: str | None = None, ckpt_path: str | Path | None = None, cfg_path: str | Path | None = None,
    device: str | torch.device = "cpu", logdir: str | Path = "./logs/sync_models", precision: str = "fp32",
) -> tuple[Synchformer, DictConfig]:  # fmt: skip
    """A trained Synchformer in eval mode and its config: a local checkpoint if `ckpt_path` is given
    (a published-format file or a bare state dict with `cfg_path`), else the published `exp_name`,
    downloaded into `<logdir>/<exp_name>/` when missing. `precision` (see `utils.precision`): the model of
    `for_precision`; bf16/fp16 run under `utils.precision.autocast`, which the caller enters (as
    `WindowPredictor` does)."""
    precision = resolve_precision(precision, device)
    if ckpt_path is None:
        if exp_name is None:
            raise ValueError("Pass a published experiment name or a local checkpoint path.")
        exp_dir = Path(logdir) / exp_name
        cfg_path, ckpt_path = exp_dir / f"cfg-{exp_name}.yaml", exp_dir / f"{exp_name}.pt"
        if not (cfg_path.is_file() and ckpt_path.is_file()):
            cfg_path, ckpt_path = get_published_model(exp_name, logdir)
    model, cfg = load_synchformer(ckpt_path, cfg_path, map_location="cpu")
    return for_precision(model if precision == "int8" else model.to(device), precision, keep=False), cfg


def linears_outside_pooling(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The `nn.Linear` layers that a precision stores in its own dtype: all but those of the extractors'
    pooling layers, whose multi-head attention reads its projection weights directly (and which run on
    one token per sequence, so they cost little in float32)."""
    pooling = [name for name, m in model.named_modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(name.startswith(f"{p}.") for p in pooling)
    ]


def for_precision(model: torch.nn.Module, precision: str, keep: bool = True) -> torch.nn.Module:
    """`model` as it runs in a concrete `precision`: fp32 the model itself; int8 the copy of
    `quantize_for_cpu`; bf16/fp16 the model with its Linear weights stored in that dtype (a copy if
    `keep`), which autocast uses as they are instead of casting every weight again at every call (the
    same numbers, half the memory); run it under `utils.precision.autocast(precision, device)`."""
    if precision == "int8":
        return quantize_for_cpu(model)
    if precision not in AUTOCAST_DTYPES:
        return model
    low = copy.deepcopy(model) if keep else model
    for linear in linears_outside_pooling(low):
        linear.to(AUTOCAST_DTYPES[precision])
    return low


def quantize_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 copy of `model` (`--precision int8`; float32 stays the default): its `nn.Linear` layers
    (see `linears_outside_pooling`) get int8 weights (per output channel) and dynamically quantised int8
    activations (per token), through torchao's `quantize_` (the successor of the deprecated
    `torch.ao.quantization.quantize_dynamic`). Outputs differ from float32 by quantisation noise, so
    predictions may differ where the top classes are close. CPU only; the float32 `model` is left
    unchanged. See the README for its speed."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(
            "quantize_for_cpu needs a model on the CPU: call it before moving the model, or use another --precision."
        )
    int8 = copy.deepcopy(model)
    chosen = {id(m) for m in linears_outside_pooling(int8)}
    quantize_(int8, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, name: id(m) in chosen)
    return int8.eval()


def add_model_args(parser: argparse.ArgumentParser, default_exp: str | None) -> None:
    """The model-choosing arguments that every prediction CLI shares (read back with `load_model_from_args`)."""
    parser.add_argument("--exp_name", default=default_exp, help="A published experiment, e.g. 24-01-04T16-39-21")
    parser.add_argument("--ckpt_path", help="A local checkpoint instead (published format or a bare state dict)")
    parser.add_argument("--cfg_path", help="The config of a bare state dict (e.g. configs/sync.yaml)")
    parser.add_argument("--device", default=None, help="cpu, cuda:0, ... (default: CUDA if available)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (exact, the default), bf16/fp16 autocast, int8 Linear layers (CPU), or auto: bf16 where the "
        "device has it natively, else fp32",
    )
    parser.add_argument(
        "--quantize", dest="precision", action="store_const", const="int8", help="the same as --precision int8"
    )


def load_model_from_args(args: argparse.Namespace, logdir: str | Path = "./logs/sync_models"):
    """`load_model` for the arguments of `add_model_args`: int8 runs on the CPU, else CUDA when available.
    Sets `args.precision` to the precision that runs ('auto' decided)."""
    if args.exp_name is None and args.ckpt_path is None:
        raise UserError("Pass --exp_name (a published experiment) or --ckpt_path (a local checkpoint).")
    device = resolve_device(
        args.device or ("cuda:0" if torch.cuda.is_available() and args.precision != "int8" else "cpu")
    )
    args.precision = resolve_precision(args.precision, device)
    return load_model(args.exp_name, args.ckpt_path, args.cfg_path, device, logdir, args.precision)


def offset_grid(cfg: DictConfig, num_classes: int) -> torch.Tensor:
    return make_class_grid(-cfg.data.max_off_sec, cfg.data.max_off_sec, num_classes)


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
        frames, samples = torch.arange(item["video"].shape[0]), torch.arange(item["audio"].shape[0])
        targets = {"v_start_i_sec": v_start_sec, "offset_sec": offset_sec}
        probe = make_test_item(frames, samples, item["meta"], item["path"], targets)
        for t in self.crop:
            probe = t(probe)
        return list(zip(probe["video"][:, 0].tolist(), probe["audio"][:, 0].tolist()))

    def segment_inputs(self, item: dict, keys: Sequence[tuple[int, int]], seg_v: int, seg_a: int):
        """Model inputs for the segments starting at `keys`: video (N, Tv, C, H, W), audio (N, 1, F, Ta)."""
        video = torch.stack([item["video"][v : v + seg_v] for v, _ in keys])  # (N, Tv, C, H, W)
        audio = torch.stack([item["audio"][a : a + seg_a] for _, a in keys])  # (N, Ta)
        seg = make_test_item(video, audio, item["meta"], item["path"])
        for t in self.per_segment:
            seg = t(seg)
        return seg["video"], seg["audio"]


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
    def features(self, item: dict, keys: Sequence[tuple[int, int]], progress: bool = False) -> dict:
        """{segment key: (visual features (tv, D), audio features (ta, D))} for the distinct `keys`."""
        keys = list(dict.fromkeys(keys))
        feats = {}
        chunks = range(0, len(keys), self.batch_segments)
        for i in tqdm(chunks, desc="segments", unit="batch", disable=not progress):
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
        """Logits (W, num_classes) of windows given as lists of segment keys."""
        feats = self.features(item, [k for w in windows for k in w], progress)
        logits = []
        for i in range(0, len(windows), self.batch_windows):
            chunk = windows[i : i + self.batch_windows]
            vfeat = torch.stack([torch.stack([feats[k][0] for k in w]) for w in chunk])  # (W, S, tv, D)
            afeat = torch.stack([torch.stack([feats[k][1] for k in w]) for w in chunk])  # (W, S, ta, D)
            with autocast(self.precision, self.device):
                logits.append(self.model.forward_head(vfeat, afeat).float().cpu())
        return torch.cat(logits)

    def window_starts(self, item: dict, stride_sec: float, crop_len_sec: float | None = None) -> list[float]:
        """Visual window starts every `stride_sec` seconds (snapped to frames) that fit in the video."""
        fps = item["meta"]["video"]["fps"][0]
        crop_len_sec = self.cfg.data.crop_len_sec if crop_len_sec is None else crop_len_sec
        duration = min(item["video"].shape[0] / fps, item["audio"].shape[0] / item["meta"]["audio"]["framerate"][0])
        n = math.floor((duration - crop_len_sec) / stride_sec + 1e-6) + 1
        return [round(i * stride_sec * fps) / fps for i in range(max(n, 0))]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
