"""Fetches the data folder of the original Synchformer repository from GitHub into `./data/` (or `--out`):
the dataset metadata (split lists, filter lists, fixed offsets, class lists) and three sample clips.

    python -m scripts.download_metadata            # everything
    python -m scripts.download_metadata --samples  # what the tests read: all but the largest files (20 MB)
    python -m scripts.download_metadata --only vggsound_test.txt lrs3_test.txt

Files already present with the expected md5 are skipped; partial downloads resume (HTTP Range)."""

import argparse
from pathlib import Path

from utils.cli import run_cli
from utils.download import download, md5sum

BASE_URL = "https://raw.githubusercontent.com/v-iashin/Synchformer/main/data/"
# as `md5sum` prints them; "-": too large for the sample set, only checked to be non-empty
MD5SUMS = """
-                                 vggsound.csv
c55f62eeed481642347005de7e2ffdfe  vggsound_train.txt
2aec08077f608c1c7cb46589e70c204d  vggsound_valid.txt
f17a61fc9e4c25242b6fb781f5155f45  vggsound_test.txt
e276e7bd7d6645dba3032c9ffb542a32  vggsound_sparse_clean.csv
e57718ab59ca930e083ca583e4138cfa  vggsound_sparse_clean_fixed_offsets.csv
65903094dfd1d72eea03a4eb6233875b  picked_sparse_classes.csv
92e4c825652e53afe328eefb276e96d7  lrs3_train.txt
960fadc0a6ddaed3b67fb649c20e3552  lrs3_valid.txt
dd4b11784b7efc0296a27ba92da90a4a  lrs3_test.txt
-                                 audioset.csv
59914992c580db25113b3f1968f91c4c  audioset_labels.csv
-                                 fixed_offsets_vggsound/train_size21_crop5_min-2.00_max2.00.csv
b772ab5a76e3b8d10810afa5f9a49ab1  fixed_offsets_vggsound/valid_size21_crop5_min-2.00_max2.00.csv
690cb39a0f87204cfac51c6ba95b0b29  fixed_offsets_vggsound/test_size21_crop5_min-2.00_max2.00.csv
006d1733cb78459a9ab64f425a768fc4  fixed_offsets_lrs3/train_size21_crop5_min-2.00_max2.00.csv
bed33cc011649bc6360cefd25e0d4e51  fixed_offsets_lrs3/valid_size21_crop5_min-2.00_max2.00.csv
8154207e571e5a16614b03830ddd4d7c  fixed_offsets_lrs3/test_size21_crop5_min-2.00_max2.00.csv
-                                 fixed_offsets_audioset/train_size21_crop5_min-2.00_max2.00.csv
f4286b4117e2cdfec43720c6f4ba1d67  fixed_offsets_audioset/valid_size21_crop5_min-2.00_max2.00.csv
96435a192945e997bbbf146272632e3a  fixed_offsets_audioset/test_size21_crop5_min-2.00_max2.00.csv
02bcf2b02bb959d9a62a1e15e38c2c91  filtered_examples_audioset/less_than_9s_in_frames.txt
-                                 filtered_examples_audioset/missings.txt
-                                 filtered_examples_audioset/mostly_stills.txt
de0b89fd56eb4ca7c66e14ad29e33869  filtered_examples_lrs/less_than_9s.txt
f38149a49b53a7298b3dc2b4de179156  filtered_examples_lrs/less_than_9s_corr_names.txt
6cb727615e85d6ffb280be24ac82d8f7  filtered_examples_lrs_extra/less_than_9.5s.txt
9eb9face07f5ad355ba84ca65b38cb9d  filtered_examples_vggsound/145.txt
be5f4c1ea6045587d547728cf2aa44e5  filtered_examples_vggsound/190.txt
0c791a17fe0855e6d938887044783223  filtered_examples_vggsound/299.txt
616de553de870ed680c615620a5c6559  filtered_examples_vggsound/filtered_80_video_has_still_frames.txt
d58e5ad2d5668608677d0ed4a6125e21  filtered_examples_vggsound/filtered_audio_has_0_std.txt
146feddba8947179194a8a470ff56439  filtered_examples_vggsound/filtered_broken.txt
17ab92b09198790cd56804d26c2c3915  filtered_examples_vggsound/filtered_in_0_dists_group.txt
aea30b66d0ebef10353fccca2363aa81  filtered_examples_vggsound/filtered_manually_found.txt
4a865b8d4255a3f610593bfb58eca103  filtered_examples_vggsound/less_than_9s_frames_segments.txt
f449e9f76eb8052215faccd0a2eebf18  filtered_examples_vggsound/region_app.txt
d4087609b215941df1d0a93b1e39f87b  filtered_examples_vggsound/region_babies.txt
cc2746013b73c270ab7d2bedc15e44b8  filtered_examples_vggsound/region_bird.txt
731b6005731d47bd8c07dad90a74e085  filtered_examples_vggsound/region_blue_circle.txt
0ff5b66111775b7536c3891bcbc726cf  filtered_examples_vggsound/region_flipped.txt
7ba7216cb267917452b052a37cca896b  filtered_examples_vggsound/region_footsteps.txt
3e1f770f9747143ba064cc0a931ce9f6  filtered_examples_vggsound/region_tube.txt
ce785ed00688f5da90c780f648b1f0e5  filtered_examples_vggsound_extra/test_failed_manual_inspection.txt
2b4ed22a666b7518cecb41809b0b665d  filtered_examples_vggsound_shorter/less_than_9.5s.txt
ebbc07cddfdf10a3a041cdfb9bf45b09  lrs3/h264_uncropped_25fps_256side_16000hz_aac/pretrain/C8zY0oAdQrs/00018.mp4
b946cc9f2af917805303c08aa7425116  lrs3/h264_uncropped_25fps_256side_16000hz_aac/pretrain/C8zY0oAdQrs/00018.txt
950c4afed5c5a3847bebe129828aaec8  vggsound/h264_video_25fps_256side_16000hz_aac/3qesirWAGt4_20000_30000.mp4
837ec2058de49a8da782886e466ac7a4  vggsound/h264_video_25fps_256side_16000hz_aac/ZYc410CE4Rg_0_10000.mp4
"""
FILES = {rel: None if md5 == "-" else md5 for md5, rel in map(str.split, MD5SUMS.strip().splitlines())}
SAMPLES = [rel for rel, md5 in FILES.items() if md5]  # what the tests read: all but the largest files


def fetch(rel_path: str, out_dir: Path, base_url: str = BASE_URL) -> str:
    """Downloads one file unless it is already complete; returns 'skipped' or 'downloaded'."""
    md5, path = FILES.get(rel_path), out_dir / rel_path
    if path.is_file() and (md5sum(path) == md5 if md5 else path.stat().st_size > 0):
        return "skipped"
    path.unlink(missing_ok=True)  # damaged: `download` fetches only a missing file
    download(base_url + rel_path, path, md5_prefix=md5)
    return "downloaded"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./data")
    parser.add_argument("--samples", action="store_true", help="what the tests read: all but the largest files")
    parser.add_argument("--only", nargs="*", default=None, help="relative paths to fetch (default: all)")
    parser.add_argument("--base-url", default=BASE_URL)
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    for rel_path in args.only or (SAMPLES if args.samples else FILES):
        print(f"{fetch(rel_path, out_dir, args.base_url)}: {rel_path}")


if __name__ == "__main__":
    run_cli(main)
