"""Agreement of the opt-in int8 CPU mode (`utils.inference.quantize_for_cpu`) with float32: the top-1
offset class and the largest logit difference on the real sample clips and a synthetic clip, each with
several audio offsets (one visual window per clip, so the video extractor runs once per clip and mode).

Without --ckpt_path the model gets the deterministic `tests/detfill.py` weights (no trained weights are
available offline): that measures how far quantisation moves the logits of a full-size model, not how
accurate a trained model stays.

    python -m scripts.int8_agreement --out agreement.json
    python -m scripts.int8_agreement --ckpt_path logs/sync_models/<exp>/<exp>.pt
"""

import argparse
import os
import tempfile
from pathlib import Path

import torch

from dataset.synthetic import ClipSpec, make_clip
from example import make_input
from scripts.bench_model import bench_config
from tests.detfill import det_state_dict
from utils.cli import run_cli
from utils.inference import load_model, quantize_for_cpu
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = [
    "vggsound/h264_video_25fps_256side_16000hz_aac/3qesirWAGt4_20000_30000.mp4",
    "vggsound/h264_video_25fps_256side_16000hz_aac/ZYc410CE4Rg_0_10000.mp4",
    "lrs3/h264_uncropped_25fps_256side_16000hz_aac/pretrain/C8zY0oAdQrs/00018.mp4",
]
OFFSETS = (-1.6, -0.8, 0.0, 0.8, 1.6)
V_START_SEC = 2.0  # leaves room for the audio window of every offset


@torch.inference_mode()
def offset_logits(model, vis: torch.Tensor, aud: torch.Tensor) -> torch.Tensor:
    """Logits (N, K) of one visual window vis (1, S, Tv, C, H, W) with N audio windows aud (N, S, 1, F, Ta)."""
    N, S, _, Fa, Ta = aud.shape
    vfeat, _ = model.extract_features(vis, aud[:1])  # (1, S, tv, D)
    afeat, _ = model.afeat_extractor(aud.view(N, S, Fa, Ta).transpose(2, 3))  # (N, S, ta, D), as extract_features
    return model.forward_head(vfeat.expand(N, -1, -1, -1), afeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", help="a trained checkpoint (default: deterministic detfill weights)")
    parser.add_argument("--cfg_path", help="the config of a bare state dict")
    parser.add_argument("--real-clips", type=int, default=len(CLIPS), help="how many of the sample clips to use")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    reuse_freed_memory()

    if args.ckpt_path:
        model, cfg = load_model(ckpt_path=args.ckpt_path, cfg_path=args.cfg_path)
    else:
        cfg = bench_config("configs/sync.yaml", tiny=False)
        model = instantiate_from_config(cfg.model).eval()
        model.load_state_dict(det_state_dict(model.state_dict(), seed=0))
    modes = {"float32": model, "int8": quantize_for_cpu(model)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = Path(tmp) / "synthetic.mp4"
        make_clip(synthetic, ClipSpec(duration_sec=10.0, offset_sec=0.4, seed=0))
        for path in [SHARED / c for c in CLIPS[: args.real_clips]] + [synthetic]:
            items = [make_input(cfg, str(path), off, V_START_SEC) for off in OFFSETS]
            vis = items[0]["video"][None].float()  # the same visual window for every offset
            aud = torch.stack([item["audio"] for item in items]).float()
            logits = {mode: offset_logits(m, vis, aud) for mode, m in modes.items()}
            top1 = {mode: lg.argmax(-1) for mode, lg in logits.items()}
            rows.append({
                "clip": path.name,
                "offsets_sec": OFFSETS,
                "top1_float32": top1["float32"].tolist(),
                "top1_int8": top1["int8"].tolist(),
                "max_abs_logit_diff": (logits["int8"] - logits["float32"]).abs().max().item(),
                "float32_logit_range": (logits["float32"].max() - logits["float32"].min()).item(),
            })  # fmt: skip
    agree = sum(a == b for r in rows for a, b in zip(r["top1_float32"], r["top1_int8"]))
    total = sum(len(r["offsets_sec"]) for r in rows)
    weights = args.ckpt_path or "detfill weights"
    diff = max(r["max_abs_logit_diff"] for r in rows)
    print(f"int8_agreement ({weights}, load {os.getloadavg()[0]:.2f}): top-1 agrees with float32 on {agree}/{total} "
          f"windows of {len(rows)} clips; max abs logit diff {diff:.3g}")  # fmt: skip
    if args.out:
        write_json(args.out, {"weights": weights, "agreement": agree / total, "clips": rows})


if __name__ == "__main__":
    run_cli(main)
