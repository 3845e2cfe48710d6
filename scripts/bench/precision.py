"""Mixed precision and attention kernels, in one run on one device (named in the output): stage-2
inference (clips/s) and training (iterations/s) with this code's accelerator setting, bfloat16 autocast
with the fused attention kernels (optionally also `torch.compile`d), against float16 autocast with
unfused attention (softmax(QK^T)V as separate ops, with a loss scaler), the original's setting. Also
how far each setting's logits are from float32 on the same inputs.

    python -m scripts.bench.precision                     # full size, on the accelerator
    python -m scripts.bench.precision --compile           # also bf16 + fused attention + torch.compile
    python -m scripts.bench.precision --tiny --device cpu --out p.json   # tiny model, one repetition (CI)

Prints one summary line and, with --out, writes the measurements as JSON."""

import argparse
import os
import statistics
from pathlib import Path

import torch

from scripts.bench.common import FLOAT32, Precision, bench_training, build_model, cpu_description, random_inputs, timed
from utils.cli import run_cli
from utils.precision import resolve_device
from utils.utils import reuse_freed_memory, write_json

ORIGINAL = Precision("fp16 + unfused attention", torch.float16, fused_attention=False)
OURS = Precision("bf16 + fused attention", torch.bfloat16)
OURS_COMPILED = Precision("bf16 + fused attention + compile", torch.bfloat16, compile=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({cpu_description()}, {torch.get_num_threads()} threads)"


def bench_inference(model, vis, aud, precision: Precision, repeats: int, device, reference: torch.Tensor) -> dict:
    """Clips per second (median of `repeats` forwards after a warm-up one) and the logits' distance from
    the float32 `reference`."""
    run = torch.compile(model) if precision.compile else model

    def forward() -> torch.Tensor:
        with torch.inference_mode(), precision.context(device):
            return run(vis, aud)[1].float()

    forward()  # kernel selection, allocations (and compilation)
    seconds, logits = zip(*(timed(forward, device) for _ in range(repeats)))
    return {
        "precision": precision.name,
        "batch_size": vis.shape[0],
        "clips_per_second": vis.shape[0] / statistics.median(seconds),
        "seconds_per_forward": list(seconds),
        "max_abs_logit_diff_vs_float32": (logits[-1] - reference).abs().max().item(),
        "top1_agreement_with_float32": (logits[-1].argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sync.yaml")
    parser.add_argument("--segments", type=int, default=14)
    parser.add_argument("--infer-batch-size", type=int, default=8)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards / training steps per setting")
    parser.add_argument("--compile", action="store_true", help="also bf16 + fused attention + torch.compile")
    parser.add_argument("--device", help="default: the accelerator if there is one, else the CPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiny", action="store_true", help="reduced model and input size, one repetition (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    reuse_freed_memory()

    torch.set_num_threads(args.threads)
    device, S = resolve_device(args.device), args.segments
    repeats = 1 if args.tiny else args.repeats
    settings = [ORIGINAL, OURS] + ([OURS_COMPILED] if args.compile else [])
    torch.manual_seed(0)
    model = build_model(args.config, S, args.tiny).to(device)
    vis, aud = random_inputs(model, args.infer_batch_size, S, device)
    with torch.inference_mode(), FLOAT32.context(device):
        reference = model(vis, aud)[1].float()
    inference = [bench_inference(model, vis, aud, p, repeats, device, reference) for p in settings]
    del model, vis, aud
    training = [
        bench_training(args.config, args.tiny, args.train_batch_size, repeats, S, device, precision=p) for p in settings
    ]
    result = {
        "config": args.config,
        "tiny": args.tiny,
        "segments": S,
        "device": device_name(device),
        "torch": torch.__version__,
        "inference": inference,
        "training": training,
    }
    summary = " | ".join(
        f"{i['precision']}: {i['clips_per_second']:.3g} clips/s (B={i['batch_size']}, top-1 = float32 on "
        f"{i['top1_agreement_with_float32']:.0%}), train {t['iterations_per_second']:.3g} it/s (B={t['batch_size']})"
        for i, t in zip(inference, training)
    )
    print(f"bench.precision ({args.config}{' tiny' if args.tiny else ''}, S={S}, {result['device']}): {summary}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    run_cli(main)
