"""Pieces shared by the trainers: seeding, data loading, optimisation, mixed precision, early stopping and
checkpoint state.

Reproducibility: all randomness of an epoch is derived from (seed, epoch): the sampler's shuffle, the
model's dropout (torch's generator is reseeded per epoch and rank), and the data augmentation, which is
seeded per item from (seed, epoch, item index). A run resumed from the checkpoint of epoch e therefore
draws exactly the numbers an uninterrupted run draws, whatever `num_workers` or the number of ranks."""

import importlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from dataset.dataset_utils import collate_drop_bad, get_datasets
from utils.checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from utils.config import ConfigError, cfg_get, load_config, set_env_from_slurm
from utils.dist import DistEnv, all_ranks_agree, broadcast_object, init_distributed, read_on_rank0
from utils.logger import RunLogger, setup_logging
from utils.precision import AUTOCAST_DTYPES, autocast, resolve_device, resolve_precision, set_tf32
from utils.utils import instantiate_from_config, reuse_freed_memory

# `action` in the config -> the module whose `train` runs it, imported only when asked for.
ACTIONS = {
    "train_avclip": "scripts.train_avclip",
    "train_avsync_model": "scripts.train_sync",
    "ft_avsync_model_for_syncability": "scripts.train_sync",
}


def run_action(argv: list[str]) -> None:
    """`python main.py config=... key=value ...`: the config's `action` with the command line's overrides."""
    cfg = load_config(argv)
    set_env_from_slurm()
    reuse_freed_memory()
    if cfg.action not in ACTIONS:
        raise ConfigError(f"Unknown action '{cfg.action}'; expected one of {sorted(ACTIONS)}.")
    importlib.import_module(ACTIONS[cfg.action]).train(cfg)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from a tuple of integers (e.g. seed, epoch, item), well mixed."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


class SeededItems(Dataset):
    """Wraps a dataset so that the random augmentation of item i in epoch e depends only on (seed, e, i);
    adds the item's index to the item (to put gathered predictions back in dataset order)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        # the global generators are borrowed for the item and restored afterwards, so that a loader
        # without workers leaves the training randomness (dropout) untouched; torch.manual_seed also reseeds
        # CUDA's, forked too where this process uses CUDA (never in a loader worker, which must not start it)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
            seed_everything(derive_seed(self.seed, self.epoch, index))
            try:
                item = self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        if item is not None:  # None: a bad sample, skipped by the collate function
            item["index"] = index
        return item


def build_loader(cfg: DictConfig, dataset: Dataset, phase: str, env: DistEnv) -> DataLoader:
    """A loader of `dataset` seeded per item (see `SeededItems`); bad samples are dropped by the collate."""
    dataset = SeededItems(dataset, cfg.training.seed)
    if phase == "train":
        # shuffled by (seed, epoch) through `set_epoch`; every rank gets the same number of batches
        sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=cfg.training.seed)
    else:
        # rank r takes the single-process batches r, r + world, ... whole, without padding: the gathered
        # predictions of all ranks are exactly the dataset, and a batch's loss (stage 1's contrastive loss
        # over its clips) does not depend on the number of ranks
        b, n = cfg.training.base_batch_size, len(dataset)
        sampler = [i for start in range(env.rank * b, n, env.world_size * b) for i in range(start, min(start + b, n))]
    return DataLoader(
        dataset,
        batch_size=cfg.training.base_batch_size,
        sampler=sampler,
        num_workers=cfg.training.num_workers,
        collate_fn=collate_drop_bad,
        pin_memory=env.device.type == "cuda",
    )


def build_optimizer(params, opt_cfg: DictConfig, lr: float, eps: float) -> torch.optim.Optimizer:
    name = opt_cfg.name
    if name in ("adam", "adamw"):
        adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return adam(params, lr, betas=tuple(opt_cfg.betas), eps=eps, weight_decay=opt_cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    raise ConfigError(f"Unknown optimizer '{name}' (training.optimizer.name): expected adam, adamw or sgd.")


def lr_factor_fn(
    name: str, warmup: int, total_steps: int, cooldown_steps: int = 0, cooldown_power: float = 1.0,
    cooldown_end: float = 0.0,
) -> Callable[[int], float]:  # fmt: skip
    """The learning-rate multiplier at optimisation step `step` for each schedule of the original.

    - constant_with_warmup (stage 2): linear from 1/100 to 1 over `warmup` steps, then 1;
    - constant: 1;
    - cosine / const / const-cooldown (stage 1): linear warm-up (step+1)/warmup, then a half cosine to 0
      over the remaining steps / 1 / 1 until the last `cooldown_steps`, which decay polynomially to
      `cooldown_end` (a multiplier of the base rate here)."""

    def factor(step: int) -> float:
        if name == "constant_with_warmup":
            return 1 / 100 + (1 - 1 / 100) * min(step, warmup) / warmup if warmup > 0 else 1.0
        if name == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
        if name == "const":
            return 1.0
        if name == "const-cooldown":
            start = total_steps - cooldown_steps
            if step < start:
                return 1.0
            decay = (1 - (step - start) / max(1, total_steps - start)) ** cooldown_power
            return decay * (1 - cooldown_end) + cooldown_end
        raise ConfigError(
            f"Unknown lr schedule '{name}': expected constant_with_warmup, constant, cosine, const, const-cooldown."
        )

    factor(0)  # fail early on an unknown name
    return factor


def training_precision(cfg: DictConfig, device: torch.device) -> str:
    """The concrete precision of a run (the names of `utils.precision`): `training.precision` if set (fp32,
    bf16, fp16, auto, or stage 1's '32' and 'amp'), else the published stage-2 configs'
    `training.use_half_precision`. 'amp' and `use_half_precision: True` keep the original's meaning, half
    precision on accelerators (bf16 where supported, else fp16) and float32 on the CPU; bf16 on the CPU is
    asked for by name (`training.precision=bf16`, or `auto` where the CPU has native bf16)."""
    name = cfg_get(cfg, "training.precision")
    if name is None:
        name = "amp" if cfg_get(cfg, "training.use_half_precision") else "fp32"
    name = {"32": "fp32"}.get(str(name), str(name))
    if name == "amp":
        if device.type == "cpu":
            return "fp32"
        return "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"
    if name not in AUTOCAST_DTYPES and name not in ("fp32", "auto"):
        raise ValueError(f"training.precision={name} is none of fp32, bf16, fp16, auto, amp, 32.")
    return resolve_precision(name, device)


def mixed_precision(cfg: DictConfig, device: torch.device):
    """(autocast context factory, GradScaler) of the run's `training_precision`; the loss scaler is on for
    fp16 only (bf16 has float32's range)."""
    precision = training_precision(cfg, device)
    logging.info(f"Precision: {precision} on {device}")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return (lambda: autocast(precision, device)), scaler


class BadLossGuard:
    """Counts consecutive non-finite losses; stops the run after `max_steps` of them in a row."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.n_in_a_row = 0

    def check(self, is_finite: bool, where: str) -> bool:
        """Returns whether to take the optimisation step."""
        if is_finite:
            self.n_in_a_row = 0
            return True
        self.n_in_a_row += 1
        logging.warning(f"Non-finite loss at {where} ({self.n_in_a_row} in a row): step skipped")
        if self.n_in_a_row >= self.max_steps:
            raise FloatingPointError(
                f"The loss was NaN/inf for {self.n_in_a_row} steps in a row (last at {where}). Lower the "
                "learning rate, check the inputs, or switch off half precision (training.use_half_precision=False)."
            )
        return False


class EarlyStopper:
    """Tracks the best value of a metric and how many evaluations passed without improving it."""

    def __init__(self, patience: int, to_max: bool, metric_name: str):
        self.patience = patience
        self.to_max = to_max
        self.metric_name = metric_name
        self.best_metrics = {metric_name: -math.inf if to_max else math.inf}
        self.n_without_improvement = 0

    @property
    def best(self) -> float:
        return self.best_metrics[self.metric_name]

    @property
    def triggered(self) -> bool:
        return self.n_without_improvement >= self.patience

    def update(self, metrics: dict) -> bool:
        """Records an evaluation; returns True if it is the best so far."""
        value = metrics[self.metric_name]
        improved = value > self.best if self.to_max else value < self.best
        if improved:
            self.best_metrics = dict(metrics)
            self.n_without_improvement = 0
            logging.info(f"New best {self.metric_name}: {value:.5f}")
        else:
            self.n_without_improvement += 1
            logging.info(
                f"{self.metric_name} has not improved on {self.best:.5f} for {self.n_without_improvement} "
                f"evaluations (patience {self.patience})"
            )
        return improved

    def state_dict(self) -> dict:
        return {"best_metrics": self.best_metrics, "n_without_improvement": self.n_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best_metrics = dict(state["best_metrics"])
        self.n_without_improvement = state["n_without_improvement"]


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool) -> dict:
    """Loads a checkpoint's weights into `model` (read on rank 0 only, see `read_on_rank0`); reports mismatching
    keys when not `strict`."""
    ckpt = read_on_rank0(lambda: load_checkpoint(path))
    status = load_weights_into(model, ckpt["model"], path, strict)
    if not strict and (status.missing_keys or status.unexpected_keys):
        logging.warning(
            f"Loaded {path} with missing keys {status.missing_keys} and unexpected keys {status.unexpected_keys}: "
            "expected when only the heads differ (e.g. fine-tuning); otherwise check the checkpoint."
        )
    return ckpt


# Options of the original's stage 1 (from open_clip) that do nothing at these values and are not implemented here:
# a run that sets another value stops instead of ignoring it.
NOT_IMPLEMENTED = {
    "training.queue_size": 0, "training.alpha": 0.0, "training.trace": False, "training.force_image_size": None,
    "training.distill_model": None, "training.distill_pretrained": None, "training.remote_sync": None,
    "training.dist_url": "env://", "training.lock_rgb_unlocked_groups": 0, "training.lock_audio_unlocked_layers": 0,
    "training.lock_rgb_freeze_bn_stats": False, "logging.log_local": False, "logging.save_frequency": 0,
    "logging.delete_previous_checkpoint": False, "logging.save_most_recent": True, "logging.use_tboard": False,
}  # fmt: skip


def setup_run(cfg: DictConfig) -> tuple[DistEnv, Path, RunLogger]:
    """Checks the run mode and options, joins the process group (`training.device`, `dist_timeout_min`), sets
    TF32 (`training.allow_tf32`, see `set_tf32`), and sets up logging in `<logdir>/<start_time>/`."""
    training = cfg.training
    modes = [m for m in ("resume", "finetune", "run_test_only") if training.get(m)]
    if len(modes) > 1:
        raise ConfigError(f"training.{' and training.'.join(modes)} are set: a run does only one of them.")
    if modes and modes[0] in ("finetune", "run_test_only") and not cfg.get("ckpt_path"):
        raise ConfigError(f"training.{modes[0]}=True needs the checkpoint to start from: add ckpt_path=<file.pt>.")
    if modes and modes[0] in ("resume", "run_test_only"):
        # the feature extractors' weights come with the checkpoint
        for name in ("afeat_extractor", "vfeat_extractor"):
            if "ckpt_path" in cfg.model.params[name].get("params", {}):
                cfg.model.params[name].params.ckpt_path = None
    for key, inert in NOT_IMPLEMENTED.items():
        if OmegaConf.select(cfg, key, default=inert) != inert:
            raise ConfigError(f"{key}: an option of the original not implemented here; set {key}={json.dumps(inert)}.")
    device = cfg_get(cfg, "training.device")
    if device is None and training.get("no_set_device_rank"):  # the original's: device 0 in every process
        device = f"{resolve_device(None).type}:0"
    env = init_distributed(training.get("dist_backend"), device, cfg_get(cfg, "training.dist_timeout_min"))
    set_tf32(cfg_get(cfg, "training.allow_tf32"))
    cfg.start_time = broadcast_object(cfg.start_time)  # each process drew its own
    run_dir = Path(cfg.logging.logdir) / cfg.start_time
    setup_logging(run_dir, env.rank)
    logger = RunLogger(cfg, run_dir, env.is_main, resume=bool(training.get("resume")))
    logging.info(f"Config:\n{OmegaConf.to_yaml(cfg)}")
    logging.info(f"Rank {env.rank} of {env.world_size} on {env.device}; logging to {run_dir}")
    return env, run_dir, logger


def build_run(cfg: DictConfig, phases: list[str]) -> tuple[DistEnv, Path, RunLogger, torch.nn.Module, dict]:
    """`setup_run`, then the model, on every rank with the same initial weights, and the phases' loaders."""
    env, run_dir, logger = setup_run(cfg)
    seed_everything(cfg.training.seed)
    model = instantiate_from_config(cfg.model).to(env.device)
    if cfg.training.get("run_test_only"):  # a checkpoint that does not fit fails before any data is read
        load_weights(model, cfg.ckpt_path, strict=True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logging.info(f"{n_train / 1e6:.3f}M trainable of {n_all / 1e6:.3f}M parameters")
    datasets = get_datasets(cfg, phases)
    return env, run_dir, logger, model, {phase: build_loader(cfg, datasets[phase], phase, env) for phase in phases}


class Trainer:
    """What the trainers of both stages share: the run, mixed precision, early stopping, the guard against
    non-finite losses, and the optimisation step. A subclass sets `optimizer` and `scheduler`."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def __init__(self, cfg: DictConfig, env: DistEnv, loaders: dict, model: torch.nn.Module, run_dir: Path):
        self.cfg, self.env, self.loaders, self.model, self.run_dir = cfg, env, loaders, model, run_dir
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast, self.scaler = mixed_precision(cfg, env.device)
        self.stopper = EarlyStopper(cfg.training.patience, cfg.training.to_max_metric, cfg.training.metric_name)
        self.guard = BadLossGuard(cfg_get(cfg, "training.max_bad_loss_steps"))
        self.net = model
        training = cfg.training
        if env.world_size > 1:
            if training.get("use_bn_sync"):  # batch statistics over all ranks (the model's layers, converted in place)
                if env.device.type == "cpu":
                    raise ConfigError("training.use_bn_sync=True needs GPUs: set it to False on the CPU.")
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = None if env.device.type == "cpu" else [env.device.index]
            static_graph = bool(training.get("ddp_static_graph"))  # the same parameters used at every step
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids, static_graph=static_graph)
        if training.get("compile"):
            self.net = torch.compile(self.net)

    def lr_scheduler(self, warmup: int, lr: float) -> torch.optim.lr_scheduler.LambdaLR:
        """`training.lr_scheduler` (see `lr_factor_fn`) over the run's `training.num_epochs` epochs, the last
        `training.epochs_cooldown` of them decaying towards `training.lr_cooldown_end` (`lr`: the base rate)."""
        training, n_batches = self.cfg.training, len(self.loaders.get("train", ()))
        max_iters = cfg_get(self.cfg, "training.max_train_iters")
        steps_per_epoch = n_batches if max_iters is None else min(n_batches, max_iters)
        factor = lr_factor_fn(
            training.lr_scheduler.name, warmup, total_steps=steps_per_epoch * training.num_epochs,
            cooldown_steps=steps_per_epoch * (cfg_get(self.cfg, "training.epochs_cooldown") or 0),
            cooldown_power=training.get("lr_cooldown_power", 1.0),
            cooldown_end=training.get("lr_cooldown_end", 0.0) / lr,
        )  # fmt: skip
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def checkpointed(self) -> dict:
        """What a checkpoint keeps besides the weights, by its names there."""
        return dict(
            optimizer=self.optimizer, scaler=self.scaler, lr_scheduler=self.scheduler, early_stopper=self.stopper
        )

    def optimisation_state(self) -> dict:
        return {name: part.state_dict() for name, part in self.checkpointed().items()}

    def resume(self, path: Path, bests: Sequence[Path]) -> dict:
        """Restores the state saved in the latest checkpoint `path` of an interrupted run (and the `bests`, see
        `utils.checkpoint.save_epoch`); returns the checkpoint. Rank 0 wrote it: read there, see `read_on_rank0`."""
        ckpt = read_on_rank0(lambda: load_checkpoint(path) if path.is_file() else None)
        if ckpt is None:
            raise ConfigError(
                f"Nothing to resume: {path} does not exist. Resume a run with the config saved in its folder: "
                "config=<logdir>/<start_time>/cfg-<start_time>.yaml training.resume=True"
            )
        load_weights_into(self.model, ckpt["model"], path)
        for name, part in self.checkpointed().items():
            part.load_state_dict(ckpt[name])
        if ckpt.pop("is_best", False) and self.env.is_main:  # the bests' writing may have been cut short
            for best in bests:
                save_checkpoint(ckpt, best)
        return ckpt

    def batches(self, phase: str, epoch: int) -> tuple[tqdm, Iterator]:
        """A progress bar over the phase's loader, with `epoch`'s randomness set (shuffling, per-item
        augmentation, dropout), and the `(i, batch, vis, aud)` of its first `training.max_{train,eval}_iters` batches
        that hold a good sample."""
        is_train, loader, device = phase == "train", self.loaders[phase], self.env.device
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        max_iters = cfg_get(self.cfg, f"training.max_{'train' if is_train else 'eval'}_iters")
        seed_everything(derive_seed(self.cfg.training.seed, self.env.rank, epoch))
        progress = tqdm(loader, desc=f"{phase} ({epoch})", disable=not self.env.is_main, leave=False)

        def good_batches() -> Iterator:
            for i, batch in enumerate(progress):
                if max_iters is not None and i >= max_iters:
                    break
                good = batch is not None
                if is_train:  # DDP steps together: a batch with nothing on one rank is skipped on all
                    good = all_ranks_agree(good, device)
                if good:
                    vis = batch["video"].to(device, non_blocking=True).float()  # frames may come as fp16
                    yield i, batch, vis, batch["audio"].to(device, non_blocking=True).float()

        return progress, good_batches()

    def step(self, loss: torch.Tensor, where: str, step_scheduler: bool = True) -> bool:
        """Optimises `loss` unless it is non-finite on some rank (then every rank skips the step, see
        `BadLossGuard`); returns whether the step was taken."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self.guard.check(all_ranks_agree(bool(torch.isfinite(loss)), self.env.device), where):
            return False
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.training.max_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.max_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if step_scheduler:
            self.scheduler.step()
        return True
