"""AudioSet clips `<vids_dir>/<segments dir>/<id>_<start ms>_<end ms>.mp4`. Splits map to the official
parts: train = unbalanced, valid = balanced, test = eval. Items carry no class targets (multi-label
tags do not collate), only offsets."""

import csv
from pathlib import Path

from dataset.dataset_utils import AudioVisualDataset, read_id_lists

SPLIT2SHORT = {"train": "unbalanced", "valid": "balanced", "test": "eval"}
SHORT2LONG = {"unbalanced": "unbalanced_train_segments", "balanced": "balanced_train_segments", "eval": "eval_segments"}


class AudioSet(AudioVisualDataset):
    fixed_offsets_name = "audioset"
    default_meta_name = "audioset.csv"  # rows `dir/id, start, end, tags, phase`

    def list_clips(self) -> list[str]:
        rows = []
        with open(self.meta_path) as f:
            for short_vid, start, end, tags, _ in csv.reader(f, quotechar='"'):
                short, vid = short_vid.split("/")
                if short == SPLIT2SHORT[self.split]:
                    rows.append(
                        (f"{SHORT2LONG[short]}/{vid}_{int(float(start) * 1000)}_{int(float(end) * 1000)}", tags)
                    )
        if self.to_filter_bad_examples:
            bad = read_id_lists(self.splits_path / "filtered_examples_audioset")
            rows = [r for r in rows if r[0] not in bad]
        with open(self.splits_path / "audioset_labels.csv") as f:
            self.label2target = {label: int(target) for target, _, label in csv.reader(f)}
        self.target2label = {t: label for label, t in self.label2target.items()}
        self.video2target = {clip: list(map(int, tags.split(","))) for clip, tags in rows}
        return sorted(str(Path(self.vids_dir) / f"{clip}.mp4") for clip, _ in rows)

    def clip_id(self, path: str) -> str:
        return f"{SPLIT2SHORT[self.split]}/{Path(path).stem}"


class AudioSetBalanced737k(AudioSet):
    default_meta_name = "audioset_balanced_737k.csv"


class AudioSetBalanced540k(AudioSet):
    """MBT's balanced 500k (from the unbalanced part) + 20k balanced + 20k eval."""

    default_meta_name = "audioset_balanced_540k.csv"
