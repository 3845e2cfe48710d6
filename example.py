"""Predicts the audio-visual offset of one video with a trained Synchformer.

    python example.py --exp_name 24-01-04T16-39-21 --vid_path VIDEO --offset_sec 1.6 [--v_start_i_sec 0.0]

The audio is shifted by `--offset_sec` and the model is asked to find the shift again (positive: the
audio window starts that much later in the file, so its events come that much earlier than the video's).
With the synchronizability model (24-01-22T20-34-52) it prints the probability that the clip can be
synchronised at all."""

import argparse

import torch
from omegaconf import DictConfig

from dataset.dataset_utils import get_transforms, load_item
from dataset.io import BadVideoError, probe_video
from dataset.segment_pipeline import in_model_format
from dataset.transforms import quantize_offset
from model.sync_model import Synchformer
from model.tracking import offset_grid
from scripts.common import add_model_args, load_model_from_args
from utils.cli import run_cli
from utils.precision import autocast
from utils.utils import reuse_freed_memory


def make_input(cfg: DictConfig, vid_path: str, offset_sec: float, v_start_i_sec: float) -> dict:
    """The test-time item of the config's transforms: the visual window starts at `v_start_i_sec`, the
    audio window at `v_start_i_sec + offset_sec`."""
    targets = {"v_start_i_sec": v_start_i_sec, "offset_sec": offset_sec}
    return load_item(vid_path, "test", targets, get_transforms(cfg, "test"))


@torch.inference_mode()
def predict(model: Synchformer, item: dict, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Logits (num_classes,) of one transformed item, run in a concrete `precision` of `utils.precision`."""
    vid = item["video"].unsqueeze(0).to(device, torch.float32)  # (1, S, Tv, C, H, W)
    aud = item["audio"].unsqueeze(0).to(device, torch.float32)  # (1, S, 1, F, Ta)
    with autocast(precision, device):
        _, logits = model(vid, aud)
    return logits[0].float().cpu()


def save_plot(probs: torch.Tensor, grid: torch.Tensor, offset_sec: float, path: str) -> None:
    from matplotlib.figure import Figure  # not pyplot: no backend or global figure state to set up

    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    ax.bar(range(len(probs)), probs.numpy(), color="tab:blue")
    gt = quantize_offset(grid, offset_sec)[-1].item()
    ax.bar([gt], [probs[gt].item()], color="tab:orange", label=f"ground truth {offset_sec:+.2f} s")
    ax.set_xticks(range(len(grid)), [f"{g:.1f}" for g in grid.tolist()], rotation=90)
    ax.set_xlabel("offset class (s; positive: audio earlier)")
    ax.set_ylabel("probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"Saved the class probabilities to {path}")


def main(args) -> None:
    reuse_freed_memory()
    print(f"Using video: {args.vid_path}")
    probe_video(args.vid_path)  # a bad file fails here, before the model loads
    model, cfg = load_model_from_args(args, args.logdir)
    vid_path = str(in_model_format(args.vid_path, cfg, args.reencode_dir, report=print))
    device = next(model.parameters()).device
    try:
        item = make_input(cfg, vid_path, args.offset_sec, args.v_start_i_sec)
    except BadVideoError as e:
        window = (
            f"the {cfg.data.crop_len_sec} s visual window starts at --v_start_i_sec and the audio window is shifted "
            "by --offset_sec: both must lie inside the video; for a negative offset, start the visual window at "
            "least |offset| seconds in, e.g. --v_start_i_sec 2.0"
        )
        raise BadVideoError(e.path, e.problem, f"{e.fix}; {window}" if e.fix else window) from e
    logits = predict(model, item, device, args.precision)
    print(f"Precision: {args.precision} on {device}")

    if len(logits) == 2:  # the synchronizability head: class 1 means "can be synchronised"
        print(f"Synchronizability: p={torch.softmax(logits, -1)[1]:.4f} (offset applied: {args.offset_sec:.2f} s)")
        return
    grid = offset_grid(cfg, len(logits))
    if not grid.min() <= args.offset_sec <= grid.max():
        print(f"WARNING: offset_sec={args.offset_sec} is outside the trained grid: {grid}")
    # the ground truth (the offset snapped to the class grid) and the top-5 classes in the original's format
    label = float(item["targets"]["offset_label"])
    print("Ground Truth offset (sec):", f"{label:.2f} ({quantize_offset(grid, label)[-1].item()})")
    print("\nPrediction Results:")
    probs = torch.softmax(logits, dim=-1)
    for k in torch.topk(logits, min(5, len(logits))).indices.tolist():
        print(f'p={probs[k]:.4f} ({logits[k]:.4f}), "{grid[k]:.2f}" ({k})')
    if args.plot:
        save_plot(probs, grid, args.offset_sec, args.plot)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vid_path", required=True, help="A path to an .mp4 video")
    parser.add_argument("--offset_sec", type=float, default=0.0)
    parser.add_argument("--v_start_i_sec", type=float, default=0.0)
    parser.add_argument("--logdir", default="./logs/sync_models", help="Where published experiments are kept")
    parser.add_argument("--reencode_dir", default="./vis", help="Where re-encoded videos are written")
    parser.add_argument("--plot", help="Save a bar chart of the class probabilities to this PNG")
    add_model_args(parser, default_exp=None)
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_parser().parse_args()))
