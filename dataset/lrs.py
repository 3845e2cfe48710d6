"""LRS3 (uncropped, 25 fps, 256 px, 16 kHz): clips `<vids_dir>/<id>.mp4` with ids like
`pretrain/C8zY0oAdQrs/00018` listed in `lrs3_<split>.txt`. At most 11 s of each clip are read."""

from pathlib import Path

from dataset.dataset_utils import AudioVisualDataset, MissingDataError, read_id_lists


class LRS3(AudioVisualDataset):
    fixed_offsets_name = "lrs3"
    max_clip_len_sec = 11

    def list_clips(self) -> list[str]:
        # the split files were made from the clips left after `filtered_examples_lrs` (the original
        # filtered only when it had to create them), so they need no filtering here
        split_file = self.splits_path / f"lrs3_{self.split}.txt"
        if not split_file.is_file():
            raise MissingDataError(f"{split_file} is missing: run `python -m scripts.download_metadata`")
        return [str(Path(self.vids_dir) / f"{v}.mp4") for v in sorted(split_file.read_text().splitlines())]

    def clip_id(self, path: str) -> str:
        return Path(path).relative_to(self.vids_dir).with_suffix("").as_posix()


class LongerLRS3(LRS3):
    """Also drops the clips shorter than 9.5 s (`filtered_examples_lrs_extra`)."""

    def list_clips(self) -> list[str]:
        paths = super().list_clips()
        if self.to_filter_bad_examples:
            short = read_id_lists(self.splits_path / "filtered_examples_lrs_extra")
            paths = [p for p in paths if f"{self.clip_id(p)}.mp4" not in short]
        return paths
