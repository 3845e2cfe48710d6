"""Any folder prepared by `scripts/prepare_data.py` as a dataset: `data.dataset.target=dataset.folder.VideoFolder`
with `data.vids_path=DST/h264_video_25fps_256side_16000hz_aac`.

- Clips are the rows of the manifests (`manifest*.csv`, one per shard) next to the videos folder whose
  status is not `bad`.
- Splits: the ids listed in `split_files` (a path with `{split}` in it, e.g. `/data/mine_{split}.txt`:
  one id per line for each of train, valid and test), or deterministic ones:
  source videos are ordered by a hash of the seed and their name and cut by `split_ratios` (train,
  valid, test), so clips cut from one video stay in one split and the splits do not depend on the
  order of the files.
- Clips shorter than the crop plus the maximum offset (`min_len_sec`, by default read from the offset
  transform; twice the crop for synchronizability training) are left out.
- Fixed offsets on `load_fixed_offsets_on`: one offset class and visual start per clip, drawn from the
  seed and the clip's id, so every run (and every data-loader worker) sees the same ones."""

import csv
import hashlib
import logging
import math
import random
from pathlib import Path

from dataset.dataset_utils import AudioVisualDataset, offset_crop
from dataset.transforms import TemporalCropAndOffsetForSyncabilityTraining
from utils.utils import ConfigError

SPLITS = ("train", "valid", "test")


def read_manifests(manifest_dir: Path) -> dict[str, dict]:
    """`{id: manifest row}` of the usable clips in every `manifest*.csv` of `manifest_dir` (for an id in
    several, the newest file's row)."""
    paths = sorted(manifest_dir.glob("manifest*.csv"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not paths:
        raise FileNotFoundError(
            f"No manifest*.csv in {manifest_dir}: prepare the videos with `python scripts/prepare_data.py SRC DST` "
            "and pass data.vids_path=DST/h264_video_25fps_256side_16000hz_aac"
        )
    rows = {}
    for path in paths:
        with open(path, newline="") as f:
            rows.update({row["id"]: row for row in csv.DictReader(f)})
    return {clip_id: row for clip_id, row in rows.items() if row["status"] != "bad"}


def _hash(seed: int, name: str) -> str:
    return hashlib.md5(f"{seed}:{name}".encode()).hexdigest()


def split_by_ratios(rows: dict[str, dict], ratios, seed: int) -> dict[str, str]:
    """`{id: split}`: source videos in hash order, cut by `ratios` into consecutive runs of about
    `ratio * n_clips` clips each (the last split takes what is left)."""
    by_source = {}
    for clip_id, row in sorted(rows.items()):
        by_source.setdefault(row.get("source") or clip_id, []).append(clip_id)
    if len(ratios) != len(SPLITS) or min(ratios) < 0 or sum(ratios) <= 0:
        raise ConfigError(f"split_ratios must be 3 non-negative numbers (train, valid, test), got {ratios}")
    sources = sorted(by_source, key=lambda s: _hash(seed, s))
    bounds = [round(sum(ratios[: i + 1]) / sum(ratios) * len(rows)) for i in range(len(SPLITS))]
    clip2split, n_assigned = {}, 0
    for source in sources:
        split = next((s for s, bound in zip(SPLITS, bounds) if n_assigned < bound), SPLITS[-1])
        for clip_id in by_source[source]:
            clip2split[clip_id] = split
        n_assigned += len(by_source[source])
    return clip2split


class VideoFolder(AudioVisualDataset):
    def __init__(self, split, vids_dir, transforms=None, split_ratios=(0.8, 0.1, 0.1), split_files: str | None = None,
                 min_len_sec: float | None = None, manifest_dir=None, **kwargs):  # fmt: skip
        """`manifest_dir` defaults to the parent of `vids_dir` (prepare_data's DST); `splits_path` is unused
        (kept so that configs made for the other datasets work unchanged); `kwargs` go to `AudioVisualDataset`."""
        self.manifest_dir = Path(vids_dir).parent if manifest_dir is None else Path(manifest_dir)
        self.split_ratios, self.split_files, self.min_len_sec = list(split_ratios), split_files, min_len_sec
        super().__init__(split, vids_dir, transforms, **kwargs)

    def list_clips(self) -> list[str]:
        self.rows = read_manifests(self.manifest_dir)
        if self.split_files is not None:
            split_file = Path(str(self.split_files).format(split=self.split))
            if "{split}" not in str(self.split_files) or not split_file.is_file():
                raise FileNotFoundError(f"split_files={self.split_files}: expected a path with {{split}} that names "
                                        f"a file of ids for each split; {split_file} is not one")  # fmt: skip
            in_split = set(split_file.read_text().split())
            unknown = in_split - set(self.rows)
            if unknown:
                logging.warning(f"{len(unknown)} ids of {split_file} are not in the manifest")
            ids = sorted(in_split & set(self.rows))
        else:
            clip2split = split_by_ratios(self.rows, self.split_ratios, self.seed)
            ids = sorted(c for c, s in clip2split.items() if s == self.split)
        crop = offset_crop(self.transforms)
        min_len = self.min_len_sec
        if min_len is None and crop is not None:
            # synchronizability training also shifts the audio by a whole crop (out of sync)
            synchronizability = isinstance(crop, TemporalCropAndOffsetForSyncabilityTraining)
            max_shift = crop.crop_len_sec if synchronizability else crop.max_off_sec
            min_len = crop.crop_len_sec + (max_shift if crop.do_offset else 0.0)
        long_enough = [c for c in ids if float(self.rows[c]["duration_sec"]) >= (min_len or 0.0) - 1e-6]
        if len(long_enough) < len(ids):
            n_short = len(ids) - len(long_enough)
            logging.info(f"VideoFolder {self.split}: {n_short} clips shorter than {min_len} s left out")
        return [str(Path(self.vids_dir) / f"{c}.mp4") for c in long_enough]

    def clip_id(self, path: str) -> str:
        return Path(path).relative_to(self.vids_dir).with_suffix("").as_posix()

    def load_fixed_offsets(self) -> dict[str, dict]:
        """One offset (a grid class, or uniform in [-max, max]) and a visual start per clip, drawn from the
        seed and the clip id, with both crops inside the clip."""
        crop = offset_crop(self.transforms)
        if crop is None or not crop.do_offset:
            raise ConfigError(f"load_fixed_offsets_on={self.load_fixed_offsets_on} needs an offset transform")
        fps = crop.vfps or 25
        vid2params = {}
        for path in self.dataset:
            clip_id = self.clip_id(path)
            rng = random.Random(_hash(self.seed, clip_id))
            if hasattr(crop, "class_grid"):
                offset = round(rng.choice(crop.class_grid.tolist()), 2)
            else:
                offset = round(rng.uniform(-crop.max_off_sec, crop.max_off_sec), 2)
            v_start_max = float(self.rows[clip_id]["duration_sec"]) - crop.crop_len_sec - 1 / fps
            v_start = rng.uniform(max(0.0, -offset), max(0.0, min(v_start_max, v_start_max - offset)))
            vid2params[clip_id] = {"offset_sec": offset, "v_start_i_sec": math.floor(v_start * fps) / fps}
        return vid2params
