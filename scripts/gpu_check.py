"""What only a GPU can show, in one command: every check records "ok" (true, false, or null when skipped) and its
numbers in one JSON file; a failing check records its error, and the others still run.

    python scripts/gpu_check.py --out gpu_check.json [--reference DIR]  # DIR holds the original's parity_sync.npz
    python scripts/gpu_check.py --device cpu --tiny --out dry_run.json    # the dry run: the same code, tiny sizes

environment (torch, CUDA or HIP, device, bf16, TF32); train_fp32/bf16/fp16: stage 2 (configs/sync.yaml) at its
published sizes and batch, two optimiser steps (fp16 with a GradScaler), peak memory; grad_checkpointing: a stage-1
forward and backward with and without, same loss, peak memory; parity (--reference: the original's outputs): float32
with TF32 off (<= 1e-4) and on; resume: a tiny training killed after epoch 0 and resumed, against one not killed;
collectives: all_reduce, all_gather, a DDP step (NCCL, gloo on a CPU); desync: scripts/desync.py with a tiny model on
generated clips, against the CPU's output; bench_precision: `python -m scripts.bench.precision`'s JSON."""

import argparse
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dataset.synthetic import ClipSpec, make_clip, make_vggsound_like
from scripts.bench.common import Precision, bench_training, cpu_description
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cli import run_cli
from utils.config import load_yaml, untrained_config
from utils.detfill import det_input, det_state_dict
from utils.precision import AUTOCAST_DTYPES, autocast, native_bf16, resolve_device, resolve_precision, set_tf32
from utils.utils import instantiate_from_config, write_json

REPO = Path(__file__).resolve().parents[1]


def peak_memory_gib(device: torch.device, reset: bool = False) -> float | None:
    if device.type == "cuda" and reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run(cmd: list, work: Path, name: str, wait: bool = True) -> subprocess.Popen:
    """A command of this repository (`python cmd...`), its output in `work/<name>.log`."""
    with open(work / f"{name}.log", "w") as log:
        env = os.environ | {"PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=REPO, env=env, stdout=log, stderr=log)
    if wait and proc.wait() != 0:
        raise RuntimeError(f"{name} failed: {(work / f'{name}.log').read_text()[-2000:]}")
    return proc


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device": props.name, "capability": f"{props.major}.{props.minor}", "gib": props.total_memory / 2**30}
    else:
        env["device"] = cpu_description()
    tf32 = [torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision]  # torch's defaults
    return {**env, "native_bf16": native_bf16(device), "fp32_precision_matmul_conv": tf32}


def train(device: torch.device, tiny: bool, precision: str) -> dict:
    cfg = load_yaml(REPO / "configs" / "sync.yaml")
    batch_size = 2 if tiny else cfg.training.base_batch_size
    peak_memory_gib(device, reset=True)
    # a warm-up step and a timed one; raises on a loss that is not finite
    result = bench_training(str(REPO / "configs" / "sync.yaml"), tiny, batch_size, 1, cfg.data.n_segments, device,
                            Precision(precision, AUTOCAST_DTYPES.get(precision)))  # fmt: skip
    return {**result, "peak_memory_gib": peak_memory_gib(device)}


def grad_checkpointing(device: torch.device, tiny: bool) -> dict:
    cfg = load_yaml(REPO / "configs" / ("tiny" if tiny else "") / "segment_avclip.yaml")
    for name in ("vfeat_extractor", "afeat_extractor"):
        cfg.model.params[name].params.ckpt_path = None
    B, S, precision = cfg.training.base_batch_size, cfg.data.n_segments_train, resolve_precision("auto", device)
    result = {"precision": precision, "batch_size": B, "segments": S}
    for on in ("off", "on"):
        cfg.training.grad_checkpointing = on == "on"
        torch.manual_seed(0)
        model = instantiate_from_config(cfg.model).to(device).train()
        vis = torch.randn(B, S, *model.v_encoder.segment_shape, device=device)
        aud = torch.randn(B, S, *model.a_encoder.segment_shape, device=device)
        peak_memory_gib(device, reset=True)
        torch.manual_seed(1)  # the same dropout
        with autocast(precision, device):
            loss = sum(model(vis, aud)["losses"].values())
        loss.backward()
        result[on] = {"loss": loss.item(), "peak_memory_gib": peak_memory_gib(device)}
        del model, vis, aud, loss
    off, on = result["off"], result["on"]
    less = device.type != "cuda" or on["peak_memory_gib"] < off["peak_memory_gib"]
    return {"ok": abs(on["loss"] - off["loss"]) <= 1e-5 * abs(off["loss"]) and less, **result}


def parity(device: torch.device, reference: Path | None) -> dict:
    if reference is None:
        return {"ok": None, "skipped": "no --reference: the folder of the original's outputs (parity_sync.npz)"}
    expected = np.load(reference / "parity_sync.npz")
    model = instantiate_from_config(untrained_config(REPO / "configs" / "sync.yaml").model)
    model.load_state_dict(det_state_dict(model.state_dict(), seed=0))
    model = model.to(device).eval()
    vis = torch.from_numpy(det_input((1, 14, 16, 3, 224, 224), seed=1)).to(device)
    aud = torch.from_numpy(det_input((1, 14, 1, 128, 66), seed=2)).to(device)
    result = {}
    for tf32 in (False, True):
        set_tf32(tf32)
        with torch.no_grad():
            vfeat, afeat = model.extract_features(vis, aud)
            out = {"vfeat": vfeat, "afeat": afeat, "logits": model.forward_head(vfeat, afeat)}
        diffs = {k: (v.cpu() - torch.from_numpy(expected[k])).abs().max().item() for k, v in out.items()}
        result[f"max_abs_diff_tf32_{'on' if tf32 else 'off'}"] = diffs
    set_tf32(False)  # float32, as training runs unless it asks for TF32
    return {"ok": max(result["max_abs_diff_tf32_off"].values()) <= 1e-4, **result}


def resume(device: torch.device, work: Path) -> dict:
    vids, splits = make_vggsound_like(work / "data", n_clips=20, duration_sec=10.0, side=32)
    args = [REPO / "main.py", f"config={REPO / 'configs' / 'tiny' / 'sync.yaml'}", f"logging.logdir={work}",
            f"data.vids_path={vids}", f"data.dataset.params.splits_path={splits}", f"training.device={device}",
            "training.num_epochs=2", "training.max_train_iters=2", "training.max_eval_iters=1",
            "training.skip_test=True", "training.base_batch_size=2", "training.num_workers=1"]  # fmt: skip
    run([*args, "start_time=straight"], work, "straight")
    proc, latest = run([*args, "start_time=killed"], work, "killed", wait=False), work / "killed" / "killed_latest.pt"
    while not latest.exists() and proc.poll() is None:  # the end of epoch 0
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    if proc.wait() != -signal.SIGKILL:
        raise RuntimeError(f"the run ended before it was killed: {(work / 'killed.log').read_text()[-2000:]}")
    killed_after = load_checkpoint(latest)["epoch"]
    run([REPO / "main.py", f"config={work / 'killed' / 'cfg-killed.yaml'}", "training.resume=True"], work, "resumed")
    straight, resumed = load_checkpoint(work / "straight" / "straight_latest.pt"), load_checkpoint(latest)
    diff = max((w.float() - resumed["model"][k].float()).abs().max().item() for k, w in straight["model"].items())
    ok = killed_after == 0 and resumed["epoch"] == straight["epoch"] == 1 and diff <= 1e-5
    return {"ok": ok, "killed_after_epoch": killed_after, "max_abs_weight_diff": diff}


def collectives(device: torch.device) -> dict:
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, device=device)
        summed, gathered = x.clone(), [torch.empty_like(x)]
        dist.all_reduce(summed)
        dist.all_gather(gathered, x)
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2).to(device)
        plain = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, None if device.index is None else [device.index])
        inputs = torch.randn(4, 8, device=device)
        for net in (plain, ddp):
            net(inputs).square().sum().backward()
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()  # the gradients are those of one process
        same = all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), model.parameters()))
        return {"ok": same and torch.equal(summed, x) and torch.equal(gathered[0], x), "backend": backend}
    finally:
        dist.destroy_process_group()


def desync(device: torch.device, work: Path) -> dict:
    for i in range(2):
        make_clip(work / "videos" / f"clip{i}.mp4", ClipSpec(duration_sec=8.5, seed=100 + i))
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=True, tiny_inputs=False)
    torch.manual_seed(0)
    save_checkpoint({"model": instantiate_from_config(cfg.model).state_dict(), "args": cfg}, work / "tiny.pt")
    probs, desyncs = [], []
    for i, on in enumerate(("cpu", device)):
        out = work / f"desync{i}.json"
        run([REPO / "scripts" / "desync.py", work / "videos", "--ckpt_path", work / "tiny.pt", "--device", on,
             "--out", out, "--num_workers", "0"], work, f"desync{i}")  # fmt: skip
        videos = json.loads(out.read_text())["videos"]
        probs.append(torch.tensor([[w["probs"] for w in v["windows"]] for v in videos]))
        desyncs.append([v["desync"] for v in videos])
    diff = (probs[0] - probs[1]).abs().max().item()
    # random weights: near-equal class probabilities, so offsets may flip on differences far below 2e-4
    return {"ok": diff <= 2e-4, "max_prob_diff": diff, "desync_cpu_device": desyncs}


def bench_precision(device: torch.device, tiny: bool, work: Path) -> dict:
    out = work / "precision.json"
    run(["-m", "scripts.bench.precision", "--device", device, "--out", out, *["--tiny"] * tiny], work, "bench")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--device", help="default: the accelerator (device 0)")
    parser.add_argument("--reference", type=Path, help="the original's outputs (parity_sync.npz); else no parity")
    parser.add_argument("--tiny", action="store_true", help="tiny models and inputs: the dry run of the code")
    parser.add_argument("--skip", nargs="*", default=[], help="checks to leave out")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    device = torch.device("cuda", 0) if device == torch.device("cuda") else device
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        checks = {
            "environment": lambda: environment(device),
            **{f"train_{p}": lambda p=p: train(device, args.tiny, p) for p in ("fp32", "bf16", "fp16")},
            "grad_checkpointing": lambda: grad_checkpointing(device, args.tiny),
            "parity": lambda: parity(device, args.reference),
            "resume": lambda: resume(device, work),
            "collectives": lambda: collectives(device),
            "desync": lambda: desync(device, work),
            "bench_precision": lambda: bench_precision(device, args.tiny, work),
        }
        if set(args.skip) - set(checks):
            parser.error(f"--skip {' '.join(args.skip)}: the checks are {', '.join(checks)}")
        for name in [name for name in checks if name not in args.skip]:
            start = time.perf_counter()
            try:
                results[name] = {"ok": True, **checks[name]()}
            except Exception as e:  # recorded; the other checks still run
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - start
            print(f"{name}: {({True: 'ok', False: 'FAILED', None: 'skipped'})[results[name]['ok']]}", flush=True)
            write_json(args.out, results)  # what is done so far, should a later check hang
    failed = [name for name, r in results.items() if r["ok"] is False]
    print(f"gpu_check on {device}: {len(results) - len(failed)} of {len(results)} checks passed or skipped; failed: "
          f"{', '.join(failed) or 'none'}; details in {args.out}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
