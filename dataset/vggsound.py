"""VGGSound and its sparse subsets (VGGSound-Sparse), with the original's class names and arguments.

Clips are `<vids_dir>/<11-char YouTube id>_<start ms>_<end ms>.mp4`; `vggsound.csv` rows are
`id, start_sec, label, split`. Filter lists, split files and fixed offsets are read from `splits_path`
(the original hard-coded `./data` for some of them; the default `splits_path='./data'` is the same)."""

import csv
import logging
from collections import Counter
from pathlib import Path

from dataset.dataset_utils import AudioVisualDataset, MissingDataError, read_id_lists


def _clip_id(row) -> str:
    """('zyTX_1BXKDE', '16') -> 'zyTX_1BXKDE_16000_26000'"""
    return f"{row[0]}_{int(row[1]) * 1000}_{(int(row[1]) + 10) * 1000}"


class VGGSound(AudioVisualDataset):
    fixed_offsets_name = "vggsound"
    filter_dirs = ("filtered_examples_vggsound",)
    default_meta_name = "vggsound.csv"

    def read_meta(self) -> list[list[str]]:
        with open(self.meta_path) as f:
            meta = list(csv.reader(f, quotechar='"'))
        if self.to_filter_bad_examples:
            bad = set().union(*[read_id_lists(self.splits_path / d) for d in self.filter_dirs])
            meta = [row for row in meta if _clip_id(row) not in bad]
        return meta

    def list_clips(self) -> list[str]:
        meta = self.read_meta()
        classes = sorted({row[2] for row in meta})
        self.label2target = {label: target for target, label in enumerate(classes)}
        self.target2label = {target: label for label, target in self.label2target.items()}
        self.video2target = {row[0]: self.label2target[row[2]] for row in meta}
        split_file = self.splits_path / f"vggsound_{self.split}.txt"
        if not split_file.is_file():
            raise MissingDataError(f"{split_file} is missing: run `python -m scripts.download_metadata`")
        in_split = set(split_file.read_text().splitlines())
        clip_ids = in_split.intersection(_clip_id(row) for row in meta)
        paths = sorted(str(Path(self.vids_dir) / f"{c}.mp4") for c in clip_ids)
        return self.keep_classes(paths)

    def keep_classes(self, paths: list[str]) -> list[str]:
        counts = Counter(self.video2target[Path(p).stem[:11]] for p in paths)
        assert all(counts[c] > 0 for c in self.target2label), f"Some classes have no clips: {dict(counts)}"
        return paths

    def targets_for(self, path: str) -> dict:
        target = self.video2target[Path(path).stem[:11]]
        return {"vggsound_target": target, "vggsound_label": self.target2label[target], **super().targets_for(path)}


class VGGSoundSparse(VGGSound):
    """VGGSound restricted to the classes marked sparse (`y`) in `sparse_meta_path` (tab-separated);
    targets are re-indexed over those classes."""

    def __init__(self, split, vids_dir, transforms=None, splits_path="./data", sparse_meta_path=None, **kwargs):
        """`sparse_meta_path` defaults to `<splits_path>/picked_sparse_classes.csv` (the original's default,
        `sparse_classes.csv`, was never published; its subclasses all used the picked list)."""
        default = Path(splits_path) / "picked_sparse_classes.csv"
        self.sparse_meta_path = default if sparse_meta_path is None else Path(sparse_meta_path)
        super().__init__(split, vids_dir, transforms, splits_path, **kwargs)

    def keep_classes(self, paths: list[str]) -> list[str]:
        with open(self.sparse_meta_path) as f:
            sparse = {row[0] for row in csv.reader(f, quotechar='"', delimiter="\t") if row[1] == "y"}
        vid2label = {Path(p).stem[:11]: self.target2label[self.video2target[Path(p).stem[:11]]] for p in paths}
        self.label2target = {label: target for target, label in enumerate(sorted(sparse))}
        self.target2label = {target: label for label, target in self.label2target.items()}
        kept = [p for p in paths if vid2label[Path(p).stem[:11]] in sparse]
        self.video2target = {vid: self.label2target[label] for vid, label in vid2label.items() if label in sparse}
        counts = Counter(self.video2target[Path(p).stem[:11]] for p in kept)
        assert len(kept) < 1000 or all(counts[c] > 0 for c in self.target2label), f"Empty classes: {dict(counts)}"
        return kept


class VGGSoundSparsePicked(VGGSoundSparse):
    """The sparse classes picked by hand (`picked_sparse_classes.csv`), the default of VGGSoundSparse."""


class VGGSoundSparsePickedCleanTest(VGGSoundSparse):
    """Also drops the clips that failed manual inspection (`filtered_examples_vggsound_extra`)."""

    filter_dirs = ("filtered_examples_vggsound", "filtered_examples_vggsound_extra")


class VGGSoundSparsePickedCleanTestFixedOffsets(VGGSoundSparse):
    """Only the manually checked clips of `vggsound_sparse_clean_fixed_offsets.csv` that are in sync,
    each with its annotated offset (evaluation only)."""

    def list_clips(self) -> list[str]:
        with open(self.splits_path / "vggsound_sparse_clean_fixed_offsets.csv") as f:
            rows = list(csv.DictReader(f))
        self.clean_offsets = {}
        for row in rows:
            assert row["video_id"] not in self.clean_offsets, f"{row['video_id']} has several fixed offsets"
            if row["is_sync"] == "1":
                params = {"offset_sec": float(row["offset_sec"]), "v_start_i_sec": float(row["vstart_sec"])}
                self.clean_offsets[row["video_id"]] = params
        return [p for p in super().list_clips() if Path(p).stem in self.clean_offsets]

    def load_fixed_offsets(self) -> dict[str, dict]:
        return self.clean_offsets

    def targets_for(self, path: str) -> dict:
        # the offsets are fixed on every split
        return {**super().targets_for(path), **self.clean_offsets[Path(path).stem]}


class LongerVGGSound(VGGSound):
    """Drops the clips shorter than 9.5 s as well (`filtered_examples_vggsound_shorter/less_than_9.5s.txt`)."""

    def list_clips(self) -> list[str]:
        paths = super().list_clips()
        if self.to_filter_bad_examples:
            short_list = self.splits_path / "filtered_examples_vggsound_shorter" / "less_than_9.5s.txt"
            short = set(short_list.read_text().split())
            paths = [p for p in paths if Path(p).stem not in short]
        logging.info(f"LongerVGGSound {self.split}: {len(paths)} clips of at least 9.5 s")
        return paths
