"""Writes synthetic audio-visual clips with known event times (see `dataset/synthetic.py`).

# one clip whose audio runs 0.4 s ahead of the video, then 1.2 s ahead after the middle
python -m scripts.make_synthetic clip out/drift.mp4 --duration 20 --offset 0.4 --offset-after 1.2
# the re-encoding variants (30 fps, 44.1 kHz stereo, 640x360)
python -m scripts.make_synthetic clip out/odd.mp4 --vfps 30 --afps 44100 --channels 2 --size 360 640
# a VGGSound look-alike for the CPU training demo
python -m scripts.make_synthetic vggsound out/synthetic_vggsound --n-clips 300"""

import argparse

from dataset.io import AFPS, SIDE, VFPS
from dataset.synthetic import ClipSpec, make_clip, make_vggsound_like
from utils.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    clip = sub.add_parser("clip", help="one clip + its JSON label file")
    clip.add_argument("path")
    clip.add_argument("--duration", type=float, default=10.0)
    clip.add_argument("--vfps", type=float, default=VFPS)
    clip.add_argument("--afps", type=int, default=AFPS)
    clip.add_argument("--channels", type=int, default=1, choices=(1, 2))
    clip.add_argument("--size", type=int, nargs=2, default=(SIDE, SIDE), metavar=("H", "W"))
    clip.add_argument("--offset", type=float, default=0.0, help="audio events happen this much earlier (s)")
    clip.add_argument("--offset-after", type=float, default=None, help="offset in the second half (drift)")
    clip.add_argument("--gop", type=int, default=250)
    clip.add_argument("--seed", type=int, default=0)
    vgg = sub.add_parser("vggsound", help="a small dataset laid out like VGGSound")
    vgg.add_argument("root")
    vgg.add_argument("--n-clips", type=int, default=300)
    vgg.add_argument("--duration", type=float, default=8.0)
    vgg.add_argument("--side", type=int, default=64)
    vgg.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.what == "clip":
        spec = ClipSpec(
            duration_sec=args.duration, vfps=args.vfps, afps=args.afps, height=args.size[0], width=args.size[1],
            n_audio_channels=args.channels, offset_sec=args.offset, offset_after_sec=args.offset_after,
            gop=args.gop, seed=args.seed,
        )  # fmt: skip
        labels = make_clip(args.path, spec)
        print(f"wrote {args.path} with {len(labels['visual_events_sec'])} events")
    else:
        vids_dir, splits_path = make_vggsound_like(
            args.root, n_clips=args.n_clips, duration_sec=args.duration, side=args.side, seed=args.seed
        )
        print(f"vids_dir={vids_dir} splits_path={splits_path}")


if __name__ == "__main__":
    run_cli(main)
