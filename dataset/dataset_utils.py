"""What every dataset shares: the base class, fixed offsets, subsampling, caching, bad-item handling and
the builders the trainers call (`get_transforms`, `get_datasets`, `collate_drop_bad`).

Items keep the original's layout:
`{'video', 'audio', 'meta': {'video': {'fps': [..]}, 'audio': {'framerate': [..]}}, 'path', 'split',
'targets': {...}}`; the dataset puts `offset_sec`, `v_start_i_sec` (and `offset_target` when the CSV has
`oos_target`) into the targets for fixed-offset splits, the transforms add `offset_label`,
`offset_target` (and `sync_target` for synchronizability).

Bad files raise `dataset.io.BadVideoError` naming the file. With `skip_bad_samples=True` a dataset logs
it and returns `None` instead; `collate_drop_bad` drops those and reports how many were dropped in the
batch under `'n_bad_samples'` (so the trainer can count them per epoch, across dataloader workers)."""

import copy
import csv
import logging
import math
import os
import random
import shutil
from glob import glob
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch.utils.data import default_collate

from dataset.io import BadVideoError, decode_audio, decode_video_window
from dataset.io import get_video_and_audio as get_video_and_audio  # the original's import path
from dataset.io import reencode_video as reencode_video  # the original's import path
from dataset.transforms import TemporalCropAndOffset, fuse_pixelwise
from utils.cli import UserError
from utils.config import cfg_get
from utils.utils import ConfigError, atomic_path, get_obj_from_str, instantiate_from_config

# decode this much more than the crop on each side of a fixed-offset window (covers the audio wiggle)
WINDOW_MARGIN_SEC = 0.2


class MissingDataError(FileNotFoundError, UserError):
    """A split, metadata or fixed-offset file that a dataset needs is not where the config points."""


def fixed_offsets_fname(transforms, split: str) -> str:
    """The original's fixed-offset CSV name for the offset transform in `transforms` (a Compose)."""
    for t in getattr(transforms, "transforms", []):
        crop = getattr(t, "crop_len_sec", None)
        if crop is None:
            continue
        crop = int(crop) if crop == int(crop) else crop
        if hasattr(t, "class_grid"):
            grid = t.class_grid
            return f"{split}_size{len(grid)}_crop{crop}_min{grid.min().item():.2f}_max{grid.max().item():.2f}.csv"
        if hasattr(t, "off_dist"):
            low, high = t.off_dist.low.item(), t.off_dist.high.item()
            return f"{split}_unifbin_crop{crop}_min{low:.2f}_max{high:.2f}.csv"
    raise ConfigError("No offset transform in the transforms: cannot tell which fixed offsets to load")


def get_fixed_offsets(transforms, split: str, splits_path, dataset_name: str) -> dict[str, dict]:
    """`{clip id: {'offset_sec', 'v_start_i_sec'[, 'oos_target']}}` from every split's CSV with the same
    parameters (valid and test may share clips; their offsets must then agree)."""
    fname = fixed_offsets_fname(transforms, split)
    pattern = os.path.join(splits_path, f"fixed_offsets_{dataset_name}", fname.replace(split, "*", 1))
    paths = sorted(glob(pattern))
    if not paths:
        raise MissingDataError(f"No fixed offsets match {pattern}: run scripts/download_metadata.py or make them")
    vid2params = {}
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                params = {"offset_sec": float(row["offset_sec"])}
                params["v_start_i_sec"] = float(row.get("vstart_sec", row.get("v_start_sec")))
                if "oos_target" in row:
                    params["oos_target"] = int(row["oos_target"])
                assert vid2params.get(row["path"], params) == params, f"{row['path']}: offsets differ across splits"
                vid2params[row["path"]] = params
    return vid2params


def read_id_lists(folder) -> set[str]:
    """Union of the ids listed (one per line) in every `*.txt` of `folder`."""
    ids = set()
    for path in sorted(Path(folder).glob("*.txt")):
        ids.update(path.read_text().splitlines())
    return ids


def subsample_dataset(dataset: list, size_ratio: float | None, shuffle: bool = False) -> list:
    """Keeps the first `size_ratio` share (at least one item), shuffled first if asked."""
    if size_ratio is None or not 0.0 < size_ratio < 1.0:
        return dataset
    if shuffle:
        random.shuffle(dataset)
    return dataset[: max(1, int(len(dataset) * size_ratio))]


def maybe_cache_file(path) -> str:
    """With `LOCAL_SCRATCH` set (cluster nodes), copies the file there once and reads the copy, so that
    many jobs do not hammer a shared disk. The full source path is kept under the cache dir."""
    cache_dir = os.environ.get("LOCAL_SCRATCH")
    if not cache_dir:
        return str(path)
    cache_path = Path(cache_dir) / Path(path).resolve().relative_to("/")
    if not cache_path.exists():
        with atomic_path(cache_path) as tmp:  # parallel workers never read a half-copied file
            shutil.copyfile(path, tmp)
    return str(cache_path)


class DecodeWindow(NamedTuple):
    """What to read of a file (seconds): video frames from `video_start`, decoded up to `video_pixels_end`
    and only counted from there to `end`; audio from `audio_start` to `end`."""

    video_start: float
    audio_start: float
    video_pixels_end: float | None
    end: float | None


def offset_crop(transforms) -> TemporalCropAndOffset | None:
    return next((t for t in getattr(transforms, "transforms", []) if isinstance(t, TemporalCropAndOffset)), None)


def decode_window(transforms, targets: dict, max_clip_len_sec: float | None) -> DecodeWindow:
    """Around each stream's crop when `targets` fix it (offset and video start), otherwise the whole clip
    (up to `max_clip_len_sec`). Both streams span the same time, as in a full read, so that
    `EqualifyFromRight` and the crop's bounds check see the file's lengths; but the video frames after
    its crop (with a positive offset, the audio crop ends later) are counted, not decoded."""
    crop = offset_crop(transforms)
    if crop is None or not crop.do_offset or "offset_sec" not in targets or "v_start_i_sec" not in targets:
        return DecodeWindow(0.0, 0.0, max_clip_len_sec, max_clip_len_sec)
    v_start, a_start = targets["v_start_i_sec"], targets["v_start_i_sec"] + round(targets["offset_sec"], 2)
    v_end, end = (start + crop.crop_len_sec + WINDOW_MARGIN_SEC for start in (v_start, max(v_start, a_start)))
    if max_clip_len_sec is not None:
        v_end, end = min(max_clip_len_sec, v_end), min(max_clip_len_sec, end)
    return DecodeWindow(max(0.0, v_start - WINDOW_MARGIN_SEC), max(0.0, a_start - WINDOW_MARGIN_SEC), v_end, end)


def load_item(
    path, split: str, targets: dict, transforms=None, max_clip_len_sec: float | None = None,
    windowed_decode: bool = True, audio_priming_compat: bool = True,
) -> dict:  # fmt: skip
    """Decodes a clip into an item and applies `transforms`. With `windowed_decode` only the part a
    fixed-offset crop needs is read; the transforms then index the file through `start_frame` /
    `start_sample` / `end_frame` in the meta, so the output is identical to a full read."""
    # without `windowed_decode` no transform can narrow the window
    window = decode_window(transforms if windowed_decode else None, targets, max_clip_len_sec)
    path_to_read = maybe_cache_file(path)
    rgb, fps, n_frames = decode_video_window(path_to_read, window.video_start, window.end, window.video_pixels_end)
    audio, sr = decode_audio(path_to_read, window.audio_start, window.end, audio_priming_compat)
    meta = {"video": {"fps": [fps]}, "audio": {"framerate": [sr]}}
    # where the windows start and end, in file indices (assumes a constant frame rate, as in these datasets)
    start_frame = math.ceil(window.video_start * fps - 1e-6)
    if start_frame > 0:
        meta["video"]["start_frame"] = start_frame
    if n_frames > rgb.shape[0]:
        meta["video"]["end_frame"] = start_frame + n_frames
    if window.audio_start > 0:
        meta["audio"]["start_sample"] = round(window.audio_start * sr)
    item = {"video": rgb, "audio": audio, "meta": meta, "path": str(path), "targets": dict(targets), "split": split}
    return item if transforms is None else transforms(item)


class AudioVisualDataset(torch.utils.data.Dataset):
    """Base of every dataset: subclasses implement `list_clips()` (paths of the split) and may extend
    `targets_for(path)`; set `fixed_offsets_name` and `clip_id(path)` for fixed offsets, and
    `default_meta_name` for a dataset listed in a metadata CSV (`meta_path`, by default in `splits_path`).

    `iter_times` repeats the dataset (fresh random offsets each pass when no fixed offsets are loaded).
    `windowed_decode` reads only the part of the file a fixed-offset crop needs (same output, faster).
    `cache_decoded` keeps every decoded clip in memory (per data-loader worker) and decodes it only once:
    for small datasets of small clips (the CPU demo), where decoding costs more than the model."""

    fixed_offsets_name = ""
    max_clip_len_sec = None
    default_meta_name = None

    # `vis_load_backend` and the two `attr` arguments are ignored (PyAV reads every file)
    def __init__(
        self, split: str, vids_dir, transforms=None, splits_path="./data", seed: int = 1337,
        load_fixed_offsets_on=("valid", "test"), vis_load_backend: str = "read_video", size_ratio: float | None = None,
        attr_annot_path=None, max_attr_per_vid=None, to_filter_bad_examples: bool = True, iter_times: int = 1,
        skip_bad_samples: bool = False, audio_priming_compat: bool = True, windowed_decode: bool = True,
        cache_decoded: bool = False, meta_path=None,
    ):  # fmt: skip
        super().__init__()
        self.split = split
        self.vids_dir = str(vids_dir)
        self.transforms = transforms
        self.splits_path = Path(splits_path)
        default_meta = None if self.default_meta_name is None else self.splits_path / self.default_meta_name
        self.meta_path = default_meta if meta_path is None else Path(meta_path)
        if self.meta_path is not None and not self.meta_path.is_file():
            raise MissingDataError(f"{self.meta_path} is missing: run `python -m scripts.download_metadata`")
        self.seed = seed
        self.load_fixed_offsets_on = list(load_fixed_offsets_on or [])
        self.to_filter_bad_examples = to_filter_bad_examples
        self.iter_times = iter_times
        self.skip_bad_samples = skip_bad_samples
        self.audio_priming_compat = audio_priming_compat
        self.windowed_decode = windowed_decode
        self.decoded = {} if cache_decoded else None  # path -> the whole clip's decoded item
        # fixed offsets name the file of the offset transform's parameters, so they need the transforms
        self.use_fixed_offsets = split in self.load_fixed_offsets_on and transforms is not None
        self.dataset = self.list_clips()
        self.vid2offset_params = self.load_fixed_offsets() if self.use_fixed_offsets else {}
        self.dataset = subsample_dataset(self.dataset, size_ratio, shuffle=split == "train")
        logging.info(f"{type(self).__name__} {split}: {len(self.dataset)} clips x {iter_times}")

    def list_clips(self) -> list[str]:
        raise NotImplementedError

    def load_fixed_offsets(self) -> dict[str, dict]:
        return get_fixed_offsets(self.transforms, self.split, self.splits_path, self.fixed_offsets_name)

    def clip_id(self, path: str) -> str:
        """The key of the clip in the fixed-offset files."""
        return Path(path).stem

    def targets_for(self, path: str) -> dict:
        targets = {}
        if self.use_fixed_offsets:
            params = self.vid2offset_params.get(self.clip_id(path))
            if params is None:
                raise KeyError(f"{path}: no fixed offset for clip id '{self.clip_id(path)}'")
            targets["offset_sec"], targets["v_start_i_sec"] = params["offset_sec"], params["v_start_i_sec"]
            if "oos_target" in params:
                targets["offset_target"] = {"oos": params["oos_target"], "offset": params["offset_sec"]}
        return targets

    def load_item(self, path: str) -> dict:
        if self.decoded is None:
            return load_item(
                path, self.split, self.targets_for(path), self.transforms, self.max_clip_len_sec,
                self.windowed_decode, self.audio_priming_compat,
            )  # fmt: skip
        if path not in self.decoded:
            self.decoded[path] = load_item(
                path, self.split, {}, None, self.max_clip_len_sec, False, self.audio_priming_compat
            )
        # the transforms may modify the item in place: they get a copy
        item = {**copy.deepcopy(self.decoded[path]), "targets": self.targets_for(path)}
        return item if self.transforms is None else self.transforms(item)

    def __getitem__(self, index: int) -> dict | None:
        path = self.dataset[index % len(self.dataset)]
        try:
            return self.load_item(path)
        except BadVideoError as e:
            if not self.skip_bad_samples:
                raise
            logging.warning(f"Skipping a bad sample: {e}")
            return None

    def __len__(self) -> int:
        return len(self.dataset) * self.iter_times


def collate_drop_bad(batch: list[dict | None]) -> dict | None:
    """`default_collate` without the `None`s of skipped bad samples; `'n_bad_samples'` says how many were
    dropped. Returns None when the whole batch was bad."""
    good = [item for item in batch if item is not None]
    if not good:
        return None
    collated = default_collate(good)
    collated["n_bad_samples"] = len(batch) - len(good)
    return collated


def get_transforms(cfg, phase: str, fuse: bool = True) -> torchvision.transforms.Compose:
    """The `transform_sequence_train` (phase 'train') or `transform_sequence_test` (else) of the config;
    `fuse` runs consecutive pixel-wise ops as one table lookup (identical output, see
    `dataset.transforms.PixelwiseLookup`)."""
    seq = cfg.get("transform_sequence_train" if phase == "train" else "transform_sequence_test")
    transforms = [instantiate_from_config(c) for c in seq] if seq else []
    return torchvision.transforms.Compose(fuse_pixelwise(transforms) if fuse else transforms)


def get_datasets(cfg, phases=("train", "valid", "test")) -> dict[str, AudioVisualDataset]:
    """Datasets of `cfg.data.dataset.target` for `phases`, built like the original's trainer: train uses
    the train transforms, valid/test the test ones; `data.dataset.params` are passed through
    (`size_ratios: {phase: r}` overrides `size_ratio`). Valid/test are repeated `data.iter_times` times;
    `data.skip_bad_samples` and `data.audio_priming_compat` are forwarded."""
    dataset_cls = get_obj_from_str(cfg.data.dataset.target)
    params = dict(cfg.data.dataset.get("params") or {})
    size_ratios = params.pop("size_ratios", None)
    datasets = {}
    for phase in phases:
        kwargs = dict(params)
        if size_ratios is not None:
            kwargs["size_ratio"] = size_ratios[phase]
        if phase != "train" and "iter_times" not in kwargs:
            kwargs["iter_times"] = cfg_get(cfg, "data.iter_times")
        kwargs.setdefault("skip_bad_samples", cfg_get(cfg, "data.skip_bad_samples"))
        kwargs.setdefault("audio_priming_compat", cfg_get(cfg, "data.audio_priming_compat"))
        datasets[phase] = dataset_cls(
            split=phase, vids_dir=cfg.data.vids_path, transforms=get_transforms(cfg, phase), **kwargs
        )
    return datasets
