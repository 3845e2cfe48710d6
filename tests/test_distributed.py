"""Training on GPU clusters, shown on the CPU: each process's device (on pretended GPUs), TF32 off unless asked
for, CUDA's generator kept out of the data's seeding, evaluation batches that do not depend on the number of
processes, locked towers, reads by rank 0 for all ranks, and the original's options that are not implemented."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from scripts.train_avclip import lock_towers
from scripts.train_utils import SeededItems, Trainer, build_loader, setup_run
from utils.cli import SettingError, UserError
from utils.config import ConfigError, load_config
from utils.dist import DistEnv, init_distributed, read_on_rank0
from utils.utils import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "n_gpus, local_rank, local_world_size, device, expected",
    [
        (2, 1, "2", None, "cuda:1"),  # torchrun --nproc-per-node 2 on two GPUs
        (4, 3, None, "cuda", "cuda:3"),  # srun, four tasks on a four-GPU node
        (1, 1, None, None, "cuda:0"),  # srun binding one GPU to each task: the only one it sees
        (1, 1, None, "cuda:0", "cuda:0"),
        (
            1,
            1,
            "2",
            None,
            "2 processes on this node would share 1 cuda device",
        ),  # torchrun --nproc-per-node 2 on one GPU
        (2, 2, None, None, "3 processes on this node would share 2 cuda device"),  # srun: more tasks than GPUs
        (2, 0, "2", "cuda:0", "2 processes on this node would share one cuda device"),
        (2, 1, None, "cuda:0", "2 processes on this node would share one cuda device"),
    ],
)
def test_device_of_each_process(monkeypatch, n_gpus, local_rank, local_world_size, device, expected):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: n_gpus)
    chosen = []
    monkeypatch.setattr(torch.accelerator, "set_device_index", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # no process group: the device choice alone
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    if expected.startswith("cuda"):
        assert init_distributed(device=device).device == torch.device(expected)
        assert chosen == [torch.device(expected).index]
    else:
        with pytest.raises(SettingError, match=expected):
            init_distributed(device=device)


@pytest.fixture
def tiny_stage2(tmp_path) -> list[str]:
    return [f"config={REPO / 'configs' / 'tiny' / 'sync.yaml'}", f"logging.logdir={tmp_path}", "start_time=t"]


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.parametrize("allow, expected", [(None, "ieee"), (True, "tf32")])
def test_tf32_only_when_the_run_asks(tiny_stage2, restore_tf32, allow, expected):
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's default for convolutions
    setup_run(load_config(tiny_stage2 + ([] if allow is None else [f"training.allow_tf32={allow}"])))
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == expected


@pytest.mark.parametrize(
    "option", ["training.queue_size=4096", "training.remote_sync=s3://bucket", "logging.save_frequency=5"]
)
def test_options_of_the_original_not_implemented_are_refused(tmp_path, option):
    cfg = load_config(
        [f"config={REPO / 'configs' / 'tiny' / 'segment_avclip.yaml'}", f"logging.logdir={tmp_path}", option]
    )
    with pytest.raises(ConfigError, match=f"{option.split('=')[0]}: an option of the original not implemented"):
        setup_run(cfg)


class Items(Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.rand(1)}  # draws from the global generator, as the transforms do


def test_item_seeding_leaves_cuda_generator_alone(monkeypatch):
    """With CUDA in use, torch.manual_seed reseeds its generator too: the item's seeding must not leave dropout
    on the GPU seeded by the last item loaded (a pretended CUDA generator stands in for the real one)."""
    cuda = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda.get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": cuda.set_state(state))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda.manual_seed)
    before = cuda.get_state()
    first = SeededItems(Items(), seed=0)[3]["x"]
    assert torch.equal(cuda.get_state(), before)
    assert torch.equal(SeededItems(Items(), seed=0)[3]["x"], first)  # the item's own numbers stay seeded


def test_evaluation_batches_are_the_single_process_batches_for_any_number_of_ranks():
    """Rank r gets whole single-process batches, so a batch's loss over its clips (stage 1's validation loss)
    is the same on 1, 2 or 3 processes."""
    cfg = OmegaConf.create({"training": {"seed": 0, "base_batch_size": 4, "num_workers": 0}})

    def batches(world_size: int) -> set[tuple[int, ...]]:
        envs = [DistEnv(rank, world_size, torch.device("cpu")) for rank in range(world_size)]
        loaders = [build_loader(cfg, Items(), "valid", env) for env in envs]
        return {tuple(batch["index"].tolist()) for loader in loaders for batch in loader}

    assert batches(1) == {(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10)}
    assert batches(2) == batches(3) == batches(1)


@pytest.mark.parametrize("freeze_layer_norm", [False, True])
def test_locked_towers_do_not_learn(freeze_layer_norm):
    model = instantiate_from_config(load_config([f"config={REPO / 'configs' / 'tiny' / 'segment_avclip.yaml'}"]).model)
    training = OmegaConf.create(
        {"lock_rgb": True, "lock_audio": True, "lock_audio_freeze_layer_norm": freeze_layer_norm}
    )
    lock_towers(model, training)
    assert not any(p.requires_grad for p in model.v_encoder.parameters())
    for m in model.a_encoder.modules():  # a locked Hugging Face tower's LayerNorms may learn
        for p in m.parameters(recurse=False):
            assert p.requires_grad == (isinstance(m, torch.nn.LayerNorm) and not freeze_layer_norm)
    assert model.logit_scale.requires_grad


def _read_on(rank: int, port: int, folder: Path, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mine = folder / f"rank{rank}.txt"  # only rank 0 has its file, as on a node without a shared file system
    got = read_on_rank0(mine.read_text)
    try:
        read_on_rank0(lambda: (_ for _ in ()).throw(ConfigError("checkpoint x.pt is broken: make it again")))
        error = None
    except UserError as e:
        error = str(e)
    queue.put((rank, got, error))
    dist.destroy_process_group()


def test_read_on_rank0_serves_every_rank_and_stops_all_on_its_error(tmp_path):
    (tmp_path / "rank0.txt").write_text("written by rank 0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_on, args=(r, port, tmp_path, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = sorted(queue.get(timeout=10) for _ in procs)
    assert [r[1] for r in results] == ["written by rank 0"] * 2
    assert results[0][2] == "checkpoint x.pt is broken: make it again"
    assert results[1][2] == "on rank 0: checkpoint x.pt is broken: make it again"


def test_ddp_options_of_the_original_reach_ddp(tmp_path):
    """`ddp_static_graph` and `compile` shape the network a run trains, `use_bn_sync` is refused on the CPU (no step
    is taken: the process group has one member, the trainer is told of two so that it wraps the model in DDP)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    training = {"patience": 1, "to_max_metric": True, "metric_name": "accuracy_1", "precision": "fp32"}
    training |= {"ddp_static_graph": True, "compile": True}
    env, model = DistEnv(0, 2, torch.device("cpu")), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    try:
        trainer = Trainer(OmegaConf.create({"training": training}), env, {}, model, tmp_path)
        with pytest.raises(ConfigError, match="training.use_bn_sync=True needs GPUs"):
            Trainer(OmegaConf.create({"training": training | {"use_bn_sync": True}}), env, {}, model, tmp_path)
    finally:
        dist.destroy_process_group()
    ddp = trainer.net._orig_mod  # under torch.compile's wrapper
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.static_graph
