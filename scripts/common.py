"""Command-line code that the commands share: choosing a model and recording which one ran, the
sliding-window options, listing videos (refusing those whose outputs would collide) and pairing them with
audio files."""

import argparse
import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from dataset.avbench import Pair
from model.pretrained import load_model, locate
from utils import dist
from utils.cli import UserError, number
from utils.precision import PRECISIONS, resolve_device, resolve_precision, set_tf32
from utils.resumable import ResultLog

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm"}
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".mp4", ".mkv", ".webm"}


def list_videos(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The videos directly in `folder`, sorted by name, and `(name, reason)` of those whose names are the
    same up to case and extension (`x.mp4`, `x.MP4`, `x.mkv`): none of them is taken, as their outputs, and
    the audio files paired with them by name, would be one."""
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    kept, refused = refuse_collisions(videos, key=lambda v: v.stem.casefold(), label=lambda v: v.name)
    return kept, [(v.name, reason) for v, reason in refused]


def refuse_collisions(items: list, key: Callable, label: Callable = str, reserved: Iterable[str] = ()) -> tuple:
    """`(kept, [(item, reason)])`: the `items` whose `key` (the name their outputs go under, e.g. a file's
    stem) is theirs alone, and the refused ones: those sharing a key (`x.mp4`, `x.MP4` and `x.mkv` all
    become `x`; none is picked, so no output mixes two inputs) or having a `reserved` one (the command's own
    output, e.g. `summary`). `label` names an item in the reasons."""
    groups, kept, refused = defaultdict(list), [], []
    for item in items:
        groups[key(item)].append(item)
    for item in items:
        name, others = key(item), ", ".join(label(o) for o in groups[key(item)] if o is not item)
        if name in reserved:
            refused.append((item, f"its output name {name!r} is the command's own: rename it"))
        elif others:
            refused.append((item, f"its output name {name!r} is also that of {others}: rename all but one"))
        else:
            kept.append(item)
    return kept, refused


def find_pairs(video_dir: Path, audio_dir: Path | None) -> tuple[list[Pair], list[tuple[str, str]]]:
    """The pairs to score, sorted by video name, and `(name, reason)` of the videos left out: names that
    collide, no audio file or several."""
    if not video_dir.is_dir():
        raise UserError(f"{video_dir}: not a folder of videos (pass the folder that holds the .mp4 files)")
    videos, clashes = list_videos(video_dir)
    if audio_dir is None:
        return [Pair(v.name, v) for v in videos], clashes
    if not audio_dir.is_dir():
        raise UserError(f"{audio_dir}: --audio_dir is not a folder")
    audio = defaultdict(list)
    for p in sorted(audio_dir.iterdir()):
        if p.suffix.lower() in AUDIO_SUFFIXES:
            audio[p.stem].append(p)
    pairs = [Pair(v.name, v, audio[v.stem][0]) for v in videos if len(audio.get(v.stem, ())) == 1]
    missing = [(v.name, f"no audio file {v.stem}.* in {audio_dir}") for v in videos if v.stem not in audio]
    several = [(v.name, f"several audio files {v.stem}.* in {audio_dir}") for v in videos if len(audio[v.stem]) > 1]
    return pairs, clashes + missing + several


def add_model_args(parser: argparse.ArgumentParser, default_exp: str | None) -> None:
    """The model-choosing arguments that every prediction CLI shares (read back with `load_model_from_args`)."""
    parser.add_argument(
        "--exp_name",
        default=default_exp,
        help="A published experiment (e.g. 24-01-04T16-39-21), a Hugging Face Hub model id, or a folder: a training "
        "run or the Hub layout (scripts/convert_to_hf.py)",
    )
    parser.add_argument(
        "--ckpt_path", help="A local checkpoint instead (published format or a bare state dict), or such a folder"
    )
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
    parser.add_argument("--tf32", action="store_true", help="let fp32 matmuls and convolutions use TF32 on GPUs")


def load_model_from_args(args: argparse.Namespace, logdir: str | Path = "./logs/sync_models", loader=load_model, **kw):
    """`loader` (`load_model`, or `load_feature_extractor` with its `audio=...`, `chunk_segments=...` in `kw`) for
    the arguments of `add_model_args`: int8 runs on the CPU, else CUDA when available. Sets `args.precision` to
    the precision that runs ('auto' decided)."""
    if args.exp_name is None and args.ckpt_path is None:
        raise UserError("Pass --exp_name (a published experiment) or --ckpt_path (a local checkpoint).")
    device = resolve_device(
        args.device or ("cuda:0" if torch.cuda.is_available() and args.precision != "int8" else "cpu")
    )
    args.precision = resolve_precision(args.precision, device)
    set_tf32(args.tf32)  # off: float32 means float32 on GPUs too (torch's default runs convolutions in TF32)
    return loader(args.exp_name, args.ckpt_path, args.cfg_path, device, logdir, args.precision, **kw)


def model_provenance(args: argparse.Namespace, logdir: str | Path = "./logs/sync_models") -> dict:
    """What makes a loaded model's numbers (for resumable outputs): its name, the sha256 of its checkpoint
    (and config file) and the precision that runs; call after `load_model_from_args`."""
    weights, own_cfg = locate(args.exp_name, args.ckpt_path, logdir)  # any source: published, run, Hub, file
    digest = hashlib.sha256()
    for path in [weights, *(Path(p) for p in (args.cfg_path, own_cfg) if p)]:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {
        "model": str(args.ckpt_path or args.exp_name),
        "model_sha256": digest.hexdigest(),
        "precision": args.precision,
        "tf32": args.tf32,
    }


def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    """The sliding windows' and the model's arguments (predict_offsets.py, resync.py)."""
    parser.add_argument(
        "--stride_sec",
        type=number(float, 0, above=True),
        default=1.28,
        help="Window step; multiples of 0.32 s share work",
    )
    parser.add_argument("--batch_segments", type=number(int, 1), default=14, help="Segments per feature-extractor call")
    parser.add_argument("--batch_windows", type=number(int, 1), default=32, help="Windows per head call")
    parser.add_argument("--progress", action="store_true", help="Show a progress bar over window batches")
    add_model_args(parser, default_exp="24-01-04T16-39-21")


def results_log_on_rank0(is_main: bool, path: Callable[[], Path], provenance: Callable[[], dict], option="--out"):
    """`(log, names done)`: rank 0 alone opens the results log at `path()` (refusing another `provenance()`), so
    resuming needs no shared file system; every rank learns from it what is done, or why the run cannot go on.
    `log` is None on the other ranks."""
    log, error = None, None
    if is_main:
        try:
            log = ResultLog(path(), provenance(), option)
        except UserError as e:
            error = str(e)
    done, error = dist.broadcast_object(([n for n, r in log.records.items() if "skip" not in r] if log else [], error))
    if error:
        raise UserError(error)
    return log, set(done)
