"""End-to-end training on tiny configs and synthetic clips (CPU): every stage runs and writes what it
should, test-only reproduces a run's own test, 2 DDP processes match 1, a killed run resumes exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from dataset.synthetic import make_vggsound_like
from scripts import test_syncability
from scripts.train_utils import mixed_precision, training_precision
from utils.checkpoint import load_checkpoint
from utils.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
OFFSET_METRICS = {"accuracy_1", "accuracy_5", "accuracy_1_tol1", "accuracy_5_tol1", "mAP", "mROCAUC", "dprime", "loss"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """Overrides pointing the tiny configs at a fresh synthetic dataset (16 train, 2 valid, 2 test clips)."""
    vids_dir, splits_path = make_vggsound_like(tmp_path_factory.mktemp("synthetic"), n_clips=20, duration_sec=10.0,
                                               side=32)  # fmt: skip
    return [f"data.vids_path={vids_dir}", f"data.dataset.params.splits_path={splits_path}"]


def tiny_args(config: str, logdir: Path, name: str, data: list[str], *extra: str) -> list[str]:
    """A short run: 2 epochs of 2 batches of 2."""
    return [
        f"config={REPO / 'configs' / 'tiny' / config}", f"logging.logdir={logdir}", f"start_time={name}", *data,
        "training.base_batch_size=2", "training.num_epochs=2", "training.max_train_iters=2", *extra,
    ]  # fmt: skip


def run(args: list[str], launcher: tuple[str, ...] = (sys.executable,), cwd: Path = REPO, **popen) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, str(REPO / "main.py"), *args], cwd=cwd, env=env, **popen)


def run_to_end(args: list[str], launcher: tuple[str, ...] = (sys.executable,)) -> None:
    proc = run(args, launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, data) -> Path:
    """A finished tiny stage-2 run (trained in this process), with its test at the end."""
    logdir = tmp_path_factory.mktemp("sync_runs")
    main.main(tiny_args("sync.yaml", logdir, "s2", data))
    return logdir / "s2"


def test_stage2_writes_checkpoints_and_metrics(stage2_run):
    names = {p.name for p in stage2_run.iterdir()}
    assert {"cfg-s2.yaml", "train.log", "metrics.jsonl", "curves.png", "s2.pt", "s2_best.pt", "s2_latest.pt"} <= names
    # the extractors are frozen: their segment similarities are drawn for the first epoch only
    assert {p.name for p in (stage2_run / "viz" / "sim_matrices").iterdir()} == {"train_e0000.png", "valid_e0000.png"}
    for phase in ("train", "valid"):
        records = read_metrics(stage2_run, phase)
        assert [r["epoch"] for r in records] == [0, 1] and OFFSET_METRICS <= set(records[0])
    (test,) = read_metrics(stage2_run, "test")
    assert OFFSET_METRICS <= set(test) and 0.0 <= test["accuracy_1"] <= 1.0
    latest = load_checkpoint(stage2_run / "s2_latest.pt")
    assert latest["epoch"] == 1 and latest["args"].start_time == "s2"
    assert {"optimizer", "scaler", "lr_scheduler", "metrics", "early_stopper"} <= set(latest)
    assert latest["lr_scheduler"]["last_epoch"] == 4  # 2 epochs x 2 optimisation steps
    best = load_checkpoint(stage2_run / "s2_best.pt")
    assert best["metrics"]["accuracy_1"] == max(r["accuracy_1"] for r in read_metrics(stage2_run, "valid"))


def test_test_only_reproduces_the_run_test_in_one_and_two_processes(stage2_run, data, tmp_path):
    (expected,) = read_metrics(stage2_run, "test")
    test_only = [f"config={stage2_run / 'cfg-s2.yaml'}", f"ckpt_path={stage2_run / 's2_best.pt'}",
                 "training.run_test_only=True", f"logging.logdir={tmp_path}"]  # fmt: skip
    main.main([*test_only, "start_time=one"])
    run_to_end([*test_only, "start_time=two"], TORCHRUN)
    for name in ("one", "two"):
        (got,) = read_metrics(tmp_path / name, "test")
        assert got == pytest.approx(expected, abs=1e-5), name


def run_on_two_nodes(args: list[str], tmp_path: Path) -> Path:
    """Runs main.py as two simulated nodes of one process each: two torchrun launchers with a c10d rendezvous
    on loopback, each in its own working directory, so that with a relative `logging.logdir` no file system
    is shared. Returns the directory of the launcher whose process got rank 0 (the rendezvous decides)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in range(2):
        (tmp_path / f"node{node}").mkdir()
        launcher = (sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                    "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}")  # fmt: skip
        with open(tmp_path / f"node{node}.log", "w") as log:
            procs.append(
                run([*args, "logging.logdir=logs"], launcher, tmp_path / f"node{node}", stdout=log, stderr=log)
            )
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    (main_node,) = [tmp_path / f"node{n}" for n in range(2) if (tmp_path / f"node{n}" / "logs").exists()]
    return main_node / "logs"


def test_stage2_on_two_nodes_without_shared_files_equals_one_process_at_the_same_global_batch(data, tmp_path):
    """2 steps of 2 clips on each of 2 nodes against 2 steps of 4 clips in one process (whose learning rate,
    scaled by the number of processes, is doubled by hand); rank 1 tests the best checkpoint that only rank 0
    has, which it gets from rank 0."""
    args = tiny_args("sync.yaml", tmp_path, "one", data, "training.num_epochs=1")
    main.main([*args, "training.base_batch_size=4", "training.base_learning_rate=2e-3"])
    logdir = run_on_two_nodes([a.replace("start_time=one", "start_time=two") for a in args], tmp_path)
    one, two = load_checkpoint(tmp_path / "one" / "one_latest.pt"), load_checkpoint(logdir / "two" / "two_latest.pt")
    assert two["lr_scheduler"]["last_epoch"] == 2 and not any(k.startswith("module.") for k in two["model"])
    for key, w in one["model"].items():
        assert (w.float() - two["model"][key].float()).abs().max() <= 1e-6, key
    for phase in ("train", "valid", "test"):
        ((got,), (expected,)) = read_metrics(logdir / "two", phase), read_metrics(tmp_path / "one", phase)
        assert got == pytest.approx(expected, abs=1e-5), phase


def test_stage1_on_two_nodes_with_a_bad_clip_on_one_rank_equals_one_process(tmp_path):
    """Stage 1 with negatives gathered from both ranks, one step over 4 training clips of which one is bad: the
    rank that drops it gathers fewer rows. It equals one process holding the 4 clips (with the same warm-up,
    which is counted in single-process steps), validation loss included."""
    vids_dir, splits_path = make_vggsound_like(tmp_path / "synthetic", n_clips=6, duration_sec=10.0, side=32,
                                               splits=(("train", 0.67), ("valid", 0.33)))  # fmt: skip
    (vids_dir / "syn00000000_0_10000.mp4").write_bytes(b"")  # a training clip that does not decode
    data = [f"data.vids_path={vids_dir}", f"data.dataset.params.splits_path={splits_path}"]
    args = tiny_args("segment_avclip.yaml", tmp_path, "one", data, "training.num_epochs=1",
                     "data.skip_bad_samples=True", "model.params.gather_for_loss=True")  # fmt: skip
    main.main([*args, "training.base_batch_size=4", "training.lr_scheduler.warmup=5"])
    logdir = run_on_two_nodes([a.replace("start_time=one", "start_time=two") for a in args], tmp_path)
    one, two = (
        load_checkpoint(d / "checkpoints" / "epoch_latest.pt")["model"] for d in (tmp_path / "one", logdir / "two")
    )
    for key, w in one.items():
        assert (w - two[key]).abs().max() <= 1e-6, key
    for phase in ("train", "valid"):
        ((got,), (expected,)) = read_metrics(logdir / "two", phase), read_metrics(tmp_path / "one", phase)
        assert got == pytest.approx(expected, abs=1e-5), phase
    assert got["n_bad_samples"] == 0 and read_metrics(logdir / "two", "train")[0]["n_bad_samples"] == 1


def test_resume_after_sigkill_matches_an_uninterrupted_run(stage2_run, data, tmp_path):
    # the same run as `stage2_run` but with a loader worker: killed after epoch 0, then resumed
    proc = run(tiny_args("sync.yaml", tmp_path, "killed", data, "training.skip_test=True", "training.num_workers=1"),
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest = tmp_path / "killed" / "killed_latest.pt"
    deadline = time.time() + 300
    while not latest.exists():  # the end of epoch 0
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(latest)["epoch"] == 0, "the run finished epoch 1 before it could be killed"
    run_to_end([f"config={tmp_path / 'killed' / 'cfg-killed.yaml'}", "training.resume=True"])
    straight, resumed = load_checkpoint(stage2_run / "s2_latest.pt"), load_checkpoint(latest)
    assert resumed["epoch"] == straight["epoch"] == 1
    for key, w in straight["model"].items():
        assert (w.float() - resumed["model"][key].float()).abs().max() <= 1e-6, key
    assert read_metrics(tmp_path / "killed", "valid") == pytest.approx(read_metrics(stage2_run, "valid"))


def test_syncability_finetuning_and_its_test(stage2_run, data, tmp_path):
    main.main(tiny_args("ft_synchability.yaml", tmp_path, "ft", data, "training.finetune=True", "training.num_epochs=1",
                        f"ckpt_path={stage2_run / 's2_best.pt'}", "logging.plot_curves=False"))  # fmt: skip
    assert not (tmp_path / "ft" / "curves.png").exists()
    (test,) = read_metrics(tmp_path / "ft", "test")
    assert {"accuracy_1", "mROCAUC", "loss"} <= set(test) and "accuracy_5" not in test
    ft = load_checkpoint(tmp_path / "ft" / "ft_best.pt")["model"]
    s2 = load_checkpoint(stage2_run / "s2_best.pt")["model"]
    assert "transformer.sync_head.weight" in ft and "transformer.off_head.weight" not in ft
    assert torch.equal(ft["vfeat_extractor.patch_embed.proj.weight"], s2["vfeat_extractor.patch_embed.proj.weight"])

    ft_run = tmp_path / "ft"
    test_syncability.main([f"config_sync={ft_run / 'cfg-ft.yaml'}", f"ckpt_path_sync={ft_run / 'ft_best.pt'}",
                      f"config_off={stage2_run / 'cfg-s2.yaml'}", f"ckpt_path_off={stage2_run / 's2_best.pt'}",
                      f"logging.logdir={tmp_path}", "start_time=sync_test"])  # fmt: skip
    report = json.loads((tmp_path / "sync_test" / "synchronizability_test.json").read_text())
    assert set(report) == {"sync", "roc_curve", "offset_by_threshold"} and "mROCAUC" in report["sync"]
    assert set(report["offset_by_threshold"]) == {"0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.99"}


def test_avclip_trains_validates_resumes_and_initialises_stage2(data, tmp_path):
    main.main(tiny_args("segment_avclip.yaml", tmp_path, "s1", data))
    run_dir = tmp_path / "s1"
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"epoch_latest.pt", "epoch_best.pt", "epoch_2.pt"} <= ckpts
    valid = read_metrics(run_dir, "valid")
    assert [r["epoch"] for r in valid] == [0, 1] and all(0 <= r["precision"] <= 1 for r in valid)
    assert list((run_dir / "viz" / "sim_matrices").glob("valid_e0000.png"))
    latest = load_checkpoint(run_dir / "checkpoints" / "epoch_latest.pt")
    assert latest["epoch"] == 2 and any(k.startswith("v_encoder.") for k in latest["state_dict"])
    # resume for one more epoch
    main.main([f"config={run_dir / 'cfg-s1.yaml'}", "training.resume=latest", "training.num_epochs=3"])
    assert [r["epoch"] for r in read_metrics(run_dir, "train")] == [0, 1, 2]
    assert load_checkpoint(run_dir / "checkpoints" / "epoch_latest.pt")["epoch"] == 3
    # test-only: the validation of the best checkpoint again
    s1_best = run_dir / "checkpoints" / "epoch_best.pt"
    best_valid = max(read_metrics(run_dir, "valid"), key=lambda r: r["precision"])
    main.main([f"config={run_dir / 'cfg-s1.yaml'}", "training.run_test_only=True", f"ckpt_path={s1_best}"])
    assert read_metrics(run_dir, "valid")[-1] == pytest.approx(best_valid | {"epoch": -1})
    # stage 2 starts from the stage-1 extractors
    main.main(tiny_args("sync.yaml", tmp_path, "s2", data, "training.num_epochs=1", "training.skip_test=True",
                        f"model.params.vfeat_extractor.params.ckpt_path={s1_best}",
                        f"model.params.afeat_extractor.params.ckpt_path={s1_best}"))  # fmt: skip
    s1, s2 = load_checkpoint(s1_best)["model"], load_checkpoint(tmp_path / "s2" / "s2_latest.pt")["model"]
    for s1_key, s2_key in [("v_encoder.patch_embed_3d.proj.weight", "vfeat_extractor.patch_embed_3d.proj.weight"),
                           ("a_encoder.ast.encoder.layer.0.attention.attention.query.weight",
                            "afeat_extractor.ast.encoder.layer.0.attention.attention.query.weight")]:  # fmt: skip
        assert torch.equal(s1[s1_key], s2[s2_key]) and s1[s1_key].abs().sum() > 0, s1_key


@pytest.mark.parametrize(
    "training, expected",
    [
        ({"use_half_precision": True}, "fp32"),  # the published stage-2 configs: half precision on accelerators only
        ({"use_half_precision": False}, "fp32"),
        ({"precision": "amp"}, "fp32"),  # stage 1's strings
        ({"precision": "32"}, "fp32"),
        ({"precision": "bf16", "use_half_precision": False}, "bf16"),
        ({"precision": "fp16"}, "fp16"),
    ],
)
def test_training_precision_on_the_cpu(training, expected):
    cfg = OmegaConf.create({"training": training})
    assert training_precision(cfg, torch.device("cpu")) == expected
    autocast, scaler = mixed_precision(cfg, torch.device("cpu"))
    assert scaler.is_enabled() == (expected == "fp16")  # bf16 needs no loss scaling
    with autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 or expected != "bf16"
        assert torch.is_autocast_enabled("cpu") == (expected != "fp32")
    with pytest.raises(ValueError, match="none of fp32"):
        training_precision(OmegaConf.create({"training": {"precision": "int8"}}), torch.device("cpu"))


def test_bf16_training_and_test_only_on_the_cpu(stage2_run, data, tmp_path):
    main.main(tiny_args("sync.yaml", tmp_path, "bf16", data, "training.precision=bf16", "training.num_epochs=1",
                        "training.skip_test=True"))  # fmt: skip
    assert "Precision: bf16 on cpu" in (tmp_path / "bf16" / "train.log").read_text()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path / "bf16", "train"))
    # Adam's epsilon follows the precision that runs (the config's use_half_precision is False)
    latest = load_checkpoint(tmp_path / "bf16" / "bf16_latest.pt")
    assert {g["eps"] for g in latest["optimizer"]["param_groups"]} == {1e-7}
    # the float32 run's checkpoint tested in bf16: the same metrics up to rounding
    (expected,) = read_metrics(stage2_run, "test")
    main.main([f"config={stage2_run / 'cfg-s2.yaml'}", f"ckpt_path={stage2_run / 's2_best.pt'}", "start_time=t",
               "training.run_test_only=True", "training.precision=bf16", f"logging.logdir={tmp_path}"])  # fmt: skip
    (got,) = read_metrics(tmp_path / "t", "test")
    assert got["loss"] == pytest.approx(expected["loss"], abs=0.05) and got["accuracy_1"] == expected["accuracy_1"]
