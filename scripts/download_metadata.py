"""Fetches the dataset metadata (split lists, filter lists, fixed offsets, class lists) of the original
Synchformer repository from GitHub into `./data/` (or `--out`).

    python -m scripts.download_metadata            # everything
    python -m scripts.download_metadata --only vggsound_test.txt lrs3_test.txt

Files already present with the expected size are skipped; partial downloads resume (HTTP Range)."""

import argparse
from pathlib import Path

from utils.cli import run_cli
from utils.download import download

BASE_URL = "https://raw.githubusercontent.com/v-iashin/Synchformer/main/data/"
# relative path -> size in bytes (None: size unknown upstream, only checked to be non-empty)
FILES = {
    "vggsound.csv": None,
    "vggsound_train.txt": 3825803,
    "vggsound_valid.txt": 460259,
    "vggsound_test.txt": 354417,
    "vggsound_sparse_clean.csv": 23047,
    "vggsound_sparse_clean_fixed_offsets.csv": 33546,
    "picked_sparse_classes.csv": 6020,
    "lrs3_train.txt": 1252449,
    "lrs3_valid.txt": 152037,
    "lrs3_test.txt": 161082,
    "audioset.csv": None,
    "audioset_labels.csv": 14652,
    "fixed_offsets_vggsound/train_size21_crop5_min-2.00_max2.00.csv": None,
    "fixed_offsets_vggsound/valid_size21_crop5_min-2.00_max2.00.csv": 637695,
    "fixed_offsets_vggsound/test_size21_crop5_min-2.00_max2.00.csv": 487284,
    "fixed_offsets_lrs3/train_size21_crop5_min-2.00_max2.00.csv": 1729093,
    "fixed_offsets_lrs3/valid_size21_crop5_min-2.00_max2.00.csv": 209990,
    "fixed_offsets_lrs3/test_size21_crop5_min-2.00_max2.00.csv": 222349,
    "fixed_offsets_audioset/train_size21_crop5_min-2.00_max2.00.csv": None,
    "fixed_offsets_audioset/valid_size21_crop5_min-2.00_max2.00.csv": 752691,
    "fixed_offsets_audioset/test_size21_crop5_min-2.00_max2.00.csv": 623176,
    "filtered_examples_audioset/less_than_9s_in_frames.txt": 1166748,
    "filtered_examples_audioset/missings.txt": None,
    "filtered_examples_audioset/mostly_stills.txt": None,
    "filtered_examples_lrs/less_than_9s.txt": 1842857,
    "filtered_examples_lrs/less_than_9s_corr_names.txt": 1842857,
    "filtered_examples_lrs_extra/less_than_9.5s.txt": 124620,
    "filtered_examples_vggsound_extra/test_failed_manual_inspection.txt": 2503,
    "filtered_examples_vggsound_shorter/less_than_9.5s.txt": 83478,
    **{
        f"filtered_examples_vggsound/{name}.txt": size
        for name, size in {
            "145": 10098, "190": 8695, "299": 13311, "filtered_80_video_has_still_frames": 1661,
            "filtered_audio_has_0_std": 24361, "filtered_broken": 444, "filtered_in_0_dists_group": 9543,
            "filtered_manually_found": 589, "less_than_9s_frames_segments": 16204, "region_app": 52,
            "region_babies": 290, "region_bird": 300, "region_blue_circle": 192, "region_flipped": 461,
            "region_footsteps": 552, "region_tube": 48,
        }.items()
    },
}  # fmt: skip


def fetch(rel_path: str, out_dir: Path, base_url: str = BASE_URL) -> str:
    """Downloads one file unless it is already complete; returns 'skipped' or 'downloaded'."""
    size, path = FILES.get(rel_path), out_dir / rel_path
    if path.is_file() and (path.stat().st_size == size if size is not None else path.stat().st_size > 0):
        return "skipped"
    path.unlink(missing_ok=True)  # of the wrong size: `download` fetches only a missing file
    download(base_url + rel_path, path, size=size)
    return "downloaded"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./data")
    parser.add_argument("--only", nargs="*", default=None, help="relative paths to fetch (default: all)")
    parser.add_argument("--base-url", default=BASE_URL)
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    for rel_path in args.only or list(FILES):
        print(f"{fetch(rel_path, out_dir, args.base_url)}: {rel_path}")


if __name__ == "__main__":
    run_cli(main)
