"""Times the stage-2 forward pass (feature extractors + transformer) in float32, bf16 autocast and int8
(`utils.precision.quantize_for_cpu`) in one run, against the physical limit: the model's FLOPs (counted
with `torch.utils.flop_counter`) over the seconds it takes, as a fraction of both the float32 and the
bfloat16 dense GEMM throughput that the same device reaches in the same run. The GEMMs are timed right
before and after every forward, so a machine shared with other jobs is compared with itself at the same
moment. Then how far bf16 and int8 move the outputs: top-1 agreement with float32 and the largest logit
difference on sample or generated clips at several audio offsets, with the deterministic `utils/detfill.py`
weights (no trained weights are available offline; with --ckpt_path, a trained model's).

    python -m scripts.bench.model                          # full size, 14 segments, B=1, fp32 bf16 int8
    python -m scripts.bench.model --batch-sizes 1 4 --precisions fp32 bf16
    python -m scripts.bench.model --tiny --out b.json      # reduced model, one repetition (CI)

Prints one summary line (with the CPU's name and its relevant instruction-set flags) and, with --out,
writes the measurements as JSON."""

import argparse
import copy
import os
import statistics
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from dataset.dataset_utils import get_transforms, load_item
from model.pretrained import load_model
from scripts.bench.common import clips_or_generated, cpu_description, random_inputs, resized_for_segments, timed
from utils.cli import run_cli
from utils.config import untrained_config
from utils.detfill import det_state_dict
from utils.precision import PRECISIONS, autocast, for_precision, resolve_device
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json

OFFSETS = (-1.6, -0.8, 0.0, 0.8, 1.6)
V_START_SEC = 2.0  # leaves room for the audio window of every offset
GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_gflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 2) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) matmul in `dtype`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * n**3 / seconds / 1e9


def gemm_peaks(device: torch.device, n: int) -> dict[str, float]:
    return {name: gemm_gflops(device, n, dtype) for name, dtype in GEMM_DTYPES.items()}


def count_flops(model: torch.nn.Module, vis: torch.Tensor, aud: torch.Tensor) -> int:
    """FLOPs of one forward (a multiply-add counts 2), counted on a meta-device copy: shapes only, no
    compute. There attention runs as its two matmuls, which `torch.utils.flop_counter` counts; it has no
    formula for the fused CPU attention kernel and would miss them."""
    meta = copy.deepcopy(model).to("meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        meta(vis.to("meta"), aud.to("meta"))
    return counter.get_total_flops()


def warm_up(model: torch.nn.Module, vis: torch.Tensor, aud: torch.Tensor, precision: str, device) -> None:
    """One segment through the extractors: kernel selection and allocations happen before the timing."""
    with torch.inference_mode(), autocast(precision, device):
        model.extract_features(vis[:1, :1], aud[:1, :1])


def bench_forward(model, vis, aud, precision, flops_per_clip, repeats, gemm_n, device) -> tuple[dict, torch.Tensor]:
    """Seconds per clip (median of `repeats` forwards) and achieved GFLOP/s, as fractions of the float32 and
    bf16 GEMM throughputs measured around each forward; and the logits."""
    seconds, gemm = [], [gemm_peaks(device, gemm_n)]
    with torch.inference_mode(), autocast(precision, device):
        for _ in range(repeats):
            forward_seconds, (_, logits) = timed(lambda: model(vis, aud), device)
            seconds.append(forward_seconds)
            gemm.append(gemm_peaks(device, gemm_n))
    B = vis.shape[0]
    per_clip = statistics.median(seconds) / B
    # each forward against the mean of the GEMM runs right before and after it
    fractions = {
        f"fraction_of_{name}_gemm": statistics.median(
            flops_per_clip * B / s / 1e9 / ((g0[name] + g1[name]) / 2) for s, g0, g1 in zip(seconds, gemm, gemm[1:])
        )
        for name in GEMM_DTYPES
    }
    return {
        "precision": precision,
        "batch_size": B,
        "seconds_per_clip": per_clip,
        "seconds_per_forward": seconds,
        "gflops": flops_per_clip / per_clip / 1e9,
        "gemm_gflops": gemm,
        **fractions,
    }, logits.float()


@torch.inference_mode()
def offset_logits(model, vis: torch.Tensor, aud: torch.Tensor, precision: str) -> torch.Tensor:
    """Logits (N, K) of one visual window vis (1, S, Tv, C, H, W) with N audio windows aud (N, S, 1, F, Ta)."""
    N, S, _, Fa, Ta = aud.shape
    with autocast(precision, vis.device):
        vfeat, _ = model.extract_features(vis, aud[:1])  # (1, S, tv, D)
        afeat, _ = model.afeat_extractor(aud.view(N, S, Fa, Ta).transpose(2, 3))  # (N, S, ta, D), as extract_features
        return model.forward_head(vfeat.expand(N, -1, -1, -1), afeat).float()


def agreement(models: dict, cfg: DictConfig, clips: list[Path], offsets: list[float], device) -> list[dict]:
    """Per clip: the top-1 class of every precision at each audio offset (one visual window, so the video
    extractor runs once per clip and precision) and each precision's largest logit difference from fp32."""
    rows, transforms = [], get_transforms(cfg, "test")
    for path in clips:
        targets = [{"v_start_i_sec": V_START_SEC, "offset_sec": off} for off in offsets]
        items = [load_item(str(path), "test", target, transforms) for target in targets]
        vis = items[0]["video"][None].float().to(device)  # the same visual window for every offset
        aud = torch.stack([item["audio"] for item in items]).float().to(device)
        logits = {p: offset_logits(m, vis, aud, p) for p, m in models.items()}
        rows.append({
            "clip": path.name,
            "offsets_sec": offsets,
            **{f"top1_{p}": lg.argmax(-1).tolist() for p, lg in logits.items()},
            **{f"max_abs_logit_diff_{p}": (lg - logits["fp32"]).abs().max().item() for p, lg in logits.items()},
            "fp32_logit_range": (logits["fp32"].max() - logits["fp32"].min()).item(),
        })  # fmt: skip
    return rows


def agreement_summary(rows: list[dict], precision: str) -> str:
    agree = sum(a == b for r in rows for a, b in zip(r["top1_fp32"], r[f"top1_{precision}"]))
    total = sum(len(r["offsets_sec"]) for r in rows)
    diff = max(r[f"max_abs_logit_diff_{precision}"] for r in rows)
    return f"{precision} top-1 = fp32 on {agree}/{total}, max logit diff {diff:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sync.yaml")
    parser.add_argument("--ckpt_path", help="a trained checkpoint (default: deterministic detfill weights)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--segments", type=int, default=14)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS[:-1], default=["fp32", "bf16", "int8"])
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per batch size and precision")
    parser.add_argument("--clips", type=int, default=3, help="how many clips to check agreement on")
    parser.add_argument("--clips_dir", type=Path, help="real videos for the agreement check, e.g. the sample clips "
                        "(scripts/download_metadata.py --samples); default: generated clips")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", help="default: the accelerator if there is one, else the CPU")
    parser.add_argument("--tiny", action="store_true", help="reduced model, one repetition, one clip (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--default-malloc", action="store_true", help="time without `reuse_freed_memory` (the page-fault baseline)"
    )
    args = parser.parse_args()
    reuses_memory = not args.default_malloc and reuse_freed_memory()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, S = resolve_device(args.device), args.segments
    repeats, gemm_n, clips, offsets = (
        (1, 512, 1, OFFSETS[1:4:2]) if args.tiny else (args.repeats, 4096, args.clips, OFFSETS)
    )
    precisions = ["fp32", *(p for p in args.precisions if p != "fp32")]  # fp32: the reference
    if args.ckpt_path:
        model, cfg = load_model(ckpt_path=args.ckpt_path, device=device)
    else:
        # the real clips need the real input sizes, also in the tiny mode
        cfg = untrained_config(args.config, args.tiny, tiny_inputs=False)
        model = instantiate_from_config(cfg.model).eval()
        model.load_state_dict(det_state_dict(model.state_dict(), seed=0))
        model.to(device)
    timed_model = resized_for_segments(model, cfg, S)
    flops_per_clip = count_flops(timed_model, *random_inputs(timed_model, 1, S, device))
    # each precision's model as the commands run it (copies: the float32 one stays)
    models = {p: for_precision(model, p) for p in precisions}
    timed_models = models if timed_model is model else {p: for_precision(timed_model, p) for p in precisions}
    for p, m in timed_models.items():
        warm_up(m, *random_inputs(timed_model, 1, S, device), p, device)
    runs = []
    for B in args.batch_sizes:
        vis, aud = random_inputs(timed_model, B, S, device)
        for p, m in timed_models.items():
            runs.append(bench_forward(m, vis, aud, p, flops_per_clip, repeats, gemm_n, device)[0])
    del timed_models, timed_model  # the full model's copies add up: free what the agreement does not use
    with tempfile.TemporaryDirectory() as tmp:
        rows = agreement(models, cfg, clips_or_generated(args.clips_dir, clips, Path(tmp)), list(offsets), device)
    load = os.getloadavg()
    result = {
        "config": args.config,
        "weights": args.ckpt_path or "detfill",
        "tiny": args.tiny,
        "segments": S,
        "device": str(device),
        "cpu": cpu_description(),
        "threads": args.threads,
        "reuse_freed_memory": reuses_memory,
        "torch": torch.__version__,
        "gflop_per_clip": flops_per_clip / 1e9,
        "load_average": load,
        "runs": runs,
        "agreement": rows,
    }

    def peaks(r: dict) -> str:
        mean = {n: statistics.mean(g[n] for g in r["gemm_gflops"]) for n in GEMM_DTYPES}
        return ", ".join(f"{r[f'fraction_of_{n}_gemm']:.0%} of {n} GEMM {mean[n]:.0f}" for n in GEMM_DTYPES)

    fp32_seconds = {r["batch_size"]: r["seconds_per_clip"] for r in runs if r["precision"] == "fp32"}
    summary = " | ".join(
        f"{r['precision']} B={r['batch_size']}: {r['seconds_per_clip']:.3f} s/clip "
        f"({fp32_seconds[r['batch_size']] / r['seconds_per_clip']:.2f}x fp32), {r['gflops']:.1f} GFLOP/s = {peaks(r)}"
        for r in runs
    )
    agreements = "; ".join(agreement_summary(rows, p) for p in precisions[1:])
    malloc = "" if reuses_memory else ", default malloc"
    print(f"bench.model ({args.config}{' tiny' if args.tiny else ''}, S={S}, {flops_per_clip / 1e9:.4g} GFLOP/clip, "
          f"{device}, {cpu_description()}, {args.threads} threads{malloc}, load {load[0]:.2f}): {summary}; "
          f"on {len(rows)} clips x {len(offsets)} offsets: {agreements or 'fp32 only'}")  # fmt: skip
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    run_cli(main)
