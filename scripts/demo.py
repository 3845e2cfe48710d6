"""The whole framework on CPU in minutes: synthetic data, stage 1, stage 2, evaluation, example.py.

    python scripts/demo.py [--workdir ./logs/demo] [--n_clips 300] [--quick]

1. writes a VGGSound-like dataset of short synthetic clips with sparse flashes and tone bursts;
2. pre-trains tiny feature extractors with the segment-level contrastive loss (stage 1);
3. trains the synchronisation transformer on the frozen extractors (stage 2), which ends by testing the
   best checkpoint on held-out clips with fixed offsets;
4. runs `example.py` on a held-out clip with a chosen offset and saves its class-probability plot;
5. draws both stages' learning curves (train loss, valid accuracy per epoch) to one PNG.

It prints the held-out accuracy@1 and accuracy@1 within one class (chance: 1/21 and about 3/21). Each
step is the same command a user would type (`main.py config=... key=value`), shown before it runs.
`--quick` is a smoke run for CI: 20 clips whose training offsets, like the held-out ones, are drawn once,
so that the 24 steps of stage 2 show whether the model learns (its training loss falls)."""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dataset.synthetic import make_vggsound_like
from scripts.train_utils import run_action
from utils.cli import SettingError, run_cli
from utils.logger import plot_learning_curves, read_metrics
from utils.utils import write_json

REPO = Path(__file__).resolve().parents[1]
# One salient event per clip: a full-frame flash, and a loud broadband burst over silence, placed so that
# every shifted 5 s crop sees both. Tiny extractors that are (nearly) untrained barely tell subtler events
# from the background: their features then differ too little for the head to find them in a few minutes.
EASY_CLIPS = dict(
    duration_sec=7.2,  # 5 s crops shifted by up to 2 s, and a little for the AAC track's end
    side=32,
    flash_frames=4,
    flash_size=1.0,
    tone_sec=0.2,
    tone_decay=False,
    burst_noise_amp=0.2,
    noise_amp=0.0,
    min_gap_sec=2.0,
    max_gap_sec=2.0,
    events_span_sec=(2.5, 4.5),
)


def run_stage(config: str, workdir: Path, name: str, overrides: list[str]) -> Path:
    args = [
        f"config={REPO / 'configs' / 'tiny' / config}",
        f"logging.logdir={workdir}",
        f"start_time={name}",
        *overrides,
    ]
    print(f"\n$ python main.py {' '.join(args)}", flush=True)
    run_action(args)
    return workdir / name


def run_command(script: str, argv: list[str], threads: int) -> None:
    """Runs `python <script> <argv>` as a user would and prints its output here (in a notebook too)."""
    print(f"\n$ python {script} {' '.join(argv)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, env=env)
    print(done.stdout + done.stderr, end="", flush=True)
    if done.returncode:
        sys.exit(done.returncode)


def main(args) -> dict:
    if not -2.0 <= args.offset_sec <= 2.0:
        raise SettingError(f"--offset_sec {args.offset_sec}: the model predicts offsets in [-2, 2] s; pick one there.")
    # two threads on a busy 2-core machine spin against each other: one is ~10x faster there
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir).resolve()
    started = time.time()
    n_clips = 20 if args.quick else args.n_clips
    data_root = workdir / f"synthetic_{n_clips}"
    if not (data_root / "data" / "vggsound_test.txt").is_file():
        print(f"Writing {n_clips} synthetic clips to {data_root} ...", flush=True)
        fixed = ("train", "valid", "test") if args.quick else ("valid", "test")
        make_vggsound_like(data_root, n_clips=n_clips, seed=args.seed, fixed_offset_splits=fixed, **EASY_CLIPS)
    vids_dir = data_root / "h264_video_25fps_256side_16000hz_aac"
    dataset = [f"data.dataset.params.splits_path={data_root / 'data'}"]
    if args.folder:  # the same clips and splits as a folder of your own videos
        prepared = workdir / f"prepared_{n_clips}"
        run_command(
            "scripts/prepare_data.py", [str(vids_dir), str(prepared), "--size", "32", "--workers", "2"], args.threads
        )
        vids_dir = prepared / "h264_video_25fps_32side_16000hz_aac"
        split_files = data_root / "data" / "vggsound_{split}.txt"
        dataset = ["data.dataset.target=dataset.folder.VideoFolder", f"data.dataset.params.split_files={split_files}"]
    data = [
        f"data.vids_path={vids_dir}",
        *dataset,
        # the clips are muxed in exact sync: no need to imitate the published models' 64 ms audio lead
        "data.audio_priming_compat=False",
        # a few hundred small clips fit in memory: decode each once, not once per epoch
        "data.dataset.params.cache_decoded=True",
        f"training.seed={args.seed}",
    ]
    # --quick: one held-out batch, one 2-step epoch of stage 1, 12 epochs of stage 2 on fixed training items
    quick1 = ["training.max_eval_iters=1", "training.num_epochs=1", "training.max_train_iters=2"]
    quick2 = ["training.max_eval_iters=1", "data.dataset.params.load_fixed_offsets_on=[train,valid,test]"]
    epochs2 = 12 if args.quick else args.epochs2

    stage1 = run_stage(
        "segment_avclip.yaml",
        workdir,
        "stage1",
        [*data, *(quick1 if args.quick else [f"training.num_epochs={args.epochs1}"])],
    )
    s1_ckpt = stage1 / "checkpoints" / "epoch_best.pt"
    stage2 = run_stage(
        "sync.yaml",
        workdir,
        "stage2",
        [
            *data,
            *(quick2 if args.quick else []),
            f"training.num_epochs={epochs2}",
            # the rate stays constant while the head leaves its plateau and learns, and decays to 0 over the last
            # fifth: at a constant rate the accuracy of the last epochs swings by +-0.2 around its level
            "training.lr_scheduler.name=const-cooldown",
            f"training.epochs_cooldown={epochs2 // 5}",
            # the head sits on a plateau for its first ~1,000 steps: early stopping would end it there
            f"training.patience={args.epochs2}",
            f"model.params.vfeat_extractor.params.ckpt_path={s1_ckpt}",
            f"model.params.afeat_extractor.params.ckpt_path={s1_ckpt}",
        ],
    )
    test, train = read_metrics(stage2, "test")[-1], read_metrics(stage2, "train")

    held_out = sorted((data_root / "data" / "vggsound_test.txt").read_text().split())[0]
    plot = workdir / "example_probs.png"
    argv = [
        "--ckpt_path", str(stage2 / "stage2_best.pt"), "--vid_path", str(vids_dir / f"{held_out}.mp4"),
        "--offset_sec", str(args.offset_sec), "--v_start_i_sec", str(max(0.0, -args.offset_sec)),  # both windows fit
        "--device", "cpu", "--plot", str(plot),
    ]  # fmt: skip
    run_command("example.py", argv, args.threads)

    curves = plot_learning_curves(
        {"stage 1: AVCLIP (extractors)": stage1, "stage 2: offsets (frozen extractors)": stage2},
        workdir / "learning_curves.png",
    )
    print(f"\nLearning curves of both stages: {curves}")

    summary = {
        "held_out_accuracy_1": test["accuracy_1"],
        "held_out_accuracy_1_tol1": test["accuracy_1_tol1"],
        "stage2_train_loss_first_last": [train[0]["loss"], train[-1]["loss"]],
        "n_clips": n_clips,
        "minutes": round((time.time() - started) / 60, 1),
        "stage2_run": str(stage2),
        "learning_curves": str(curves),
    }
    write_json(workdir / "demo_summary.json", summary)
    print(
        f"\nHeld-out test: accuracy@1 {summary['held_out_accuracy_1']:.3f}, within one class "
        f"{summary['held_out_accuracy_1_tol1']:.3f} (chance 0.048 / 0.14); {summary['minutes']} min in all. "
        f"Runs and plots: {workdir}"
    )
    return summary


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./logs/demo")
    parser.add_argument("--n_clips", type=int, default=300)
    parser.add_argument("--epochs1", type=int, default=2)
    parser.add_argument("--epochs2", type=int, default=60)
    parser.add_argument("--offset_sec", type=float, default=1.2, help="The shift example.py applies")
    parser.add_argument("--seed", type=int, default=1338)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="A smoke run: few clips, few iterations")
    parser.add_argument(
        "--folder", action="store_true", help="Prepare the clips with prepare_data.py and train on a VideoFolder"
    )
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_parser().parse_args()) and None)  # the summary is for the tests, not the exit status
