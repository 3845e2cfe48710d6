"""Stage 2 (`train_avsync_model`): the offset classifier on top of frozen stage-1 feature extractors, and
its fine-tuning for synchronizability (`ft_avsync_model_for_syncability`, a 2-class head).

    python main.py config=configs/sync.yaml data.vids_path=... data.dataset.target=...
    torchrun --nproc_per_node=8 main.py config=...                       # DDP
    python main.py config=logs/sync_models/<id>/cfg-<id>.yaml training.resume=True
    python main.py config=configs/ft_synchability.yaml training.finetune=True ckpt_path=<stage-2 .pt>
    python main.py config=<run cfg> training.run_test_only=True ckpt_path=<.pt> data.iter_times=25 \\
        data.dataset.params.load_fixed_offsets_on=[]

Each epoch trains, validates, saves `<run>/<start_time>_latest.pt` and, if the validation metric improved,
`<start_time>.pt` and `<start_time>_best.pt`. Early stopping after `patience` epochs without improvement;
the best checkpoint is tested at the end unless `training.skip_test`."""

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from scripts.train_utils import Trainer, build_optimizer, build_run, load_weights, training_precision
from utils.checkpoint import save_epoch
from utils.config import cfg_get
from utils.dist import DistEnv, all_gather_objects, barrier, cleanup
from utils.logger import save_similarity_matrices, segment_similarities
from utils.metrics import classification_metrics


class SyncTrainer(Trainer):
    """The state of a stage-2 run and the loop over one phase's data."""

    def __init__(self, cfg: DictConfig, env: DistEnv, loaders: dict, model: torch.nn.Module, run_dir: Path):
        super().__init__(cfg, env, loaders, model, run_dir)
        self.target_key = "sync_target" if cfg.action == "ft_avsync_model_for_syncability" else "offset_target"
        # the original's larger epsilon for half-precision runs, decided by the precision that runs
        eps = 1e-8 if training_precision(cfg, env.device) == "fp32" else 1e-7
        # lr scales with the number of processes (the global batch grows with it)
        lr = cfg.training.base_learning_rate * env.world_size
        self.optimizer = build_optimizer(self.params, cfg.training.optimizer, lr, eps=eps)
        self.scheduler = self.lr_scheduler(cfg.training.lr_scheduler.get("warmup", 0), lr)

    def state_dict(self, epoch: int, metrics: dict, loss: float) -> dict:
        """The checkpoint in the published format plus the early-stopping state."""
        return {
            "model": self.model.state_dict(),
            "args": self.cfg,
            "epoch": epoch,
            "metrics": metrics,
            "loss": loss,
            **self.optimisation_state(),
            "model_type": type(self.model).__name__,
        }

    @torch.no_grad()
    def draw_segment_similarity(self, vis: torch.Tensor, aud: torch.Tensor, phase: str, epoch: int) -> None:
        """How similar the (frozen) extractors find the segments of the batch (`segment_similarities`).
        Frozen extractors give the same picture every epoch, so then only the first one is drawn (the plot
        takes longer than a tiny model's epoch)."""
        extractors_learn = len(self.model.frozen_extractors) < 2
        if not (cfg_get(self.cfg, "logging.vis_segment_sim") and (epoch == 0 or extractors_learn)):
            return
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            vfeat, afeat = self.model.extract_features(vis, aud)  # (B, S, tv, D), (B, S, ta, D)
        self.model.train(was_training)
        path = self.run_dir / "viz" / "sim_matrices" / f"{phase}_e{epoch:04d}.png"
        # each segment's tokens averaged and L2-normalised
        v = torch.nn.functional.normalize(vfeat.float().mean(dim=2).flatten(0, 1), dim=-1)  # (B*S, D)
        a = torch.nn.functional.normalize(afeat.float().mean(dim=2).flatten(0, 1), dim=-1)  # (B*S, D)
        save_similarity_matrices(segment_similarities(v, a), path)

    def run_phase(self, phase: str, epoch: int) -> dict:
        """One pass over a phase's data (valid/test repeat `data.iter_times` times); returns its metrics."""
        cfg, env = self.cfg, self.env
        is_train = phase == "train"
        self.model.train(is_train)  # frozen extractors stay in eval mode
        # evaluation runs without DDP: ranks may hold different numbers of batches
        net = self.net if is_train else self.model
        # keep the outputs of every `stride`-th batch only, so that their memory stays bounded
        stride = max(1, math.ceil(len(self.loaders[phase].dataset) / cfg_get(cfg, "logging.log_max_items")))
        kept, loss_sum, n_items, n_bad = [], 0.0, 0, 0
        progress, batches = self.batches(phase, epoch)
        for i, batch, vis, aud in batches:
            n_bad += int(batch["n_bad_samples"])
            targets = batch["targets"][self.target_key].to(env.device, non_blocking=True)
            if i == 0 and phase != "test" and env.is_main:
                self.draw_segment_similarity(vis, aud, phase, epoch)
            with self.autocast(), torch.set_grad_enabled(is_train):
                loss, logits = net(vis, aud, targets=targets)
            if is_train and not self.step(loss, f"epoch {epoch}, iteration {i}"):
                continue
            loss_sum += loss.item() * len(targets)
            n_items += len(targets)
            if i % stride == 0:
                kept.append((batch["index"], logits.detach().float().cpu(), targets.cpu()))
            if env.is_main and i % cfg.logging.log_frequency == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        if n_bad:
            logging.warning(f"{phase} ({epoch}): skipped {n_bad} bad samples on rank {env.rank}")
        return gather_metrics(kept, loss_sum, n_items, n_bad)


def gather_metrics(kept: list, loss_sum: float, n_items: int, n_bad: int) -> dict:
    """Metrics over the items of all ranks; every rank computes the same numbers.

    `kept`: this rank's `(indices, logits, targets)` per batch; items are put in dataset order, so the
    result does not depend on the number of ranks."""
    local = tuple(torch.cat(x) for x in zip(*kept)) if kept else None
    shards = all_gather_objects((local, loss_sum, n_items, n_bad))
    order, logits, targets = (torch.cat(x) for x in zip(*[s[0] for s in shards if s[0] is not None]))
    sort = order.argsort(stable=True)
    metrics = classification_metrics(targets[sort], logits[sort])
    metrics["loss"] = sum(s[1] for s in shards) / max(1, sum(s[2] for s in shards))
    metrics["n_bad_samples"] = sum(s[3] for s in shards)
    return metrics


def train(cfg: DictConfig) -> None:
    training = cfg.training
    phases = ["test"] if training.run_test_only else ["train", "valid"] + ([] if training.skip_test else ["test"])
    env, run_dir, logger, model, loaders = build_run(cfg, phases)
    trainer = SyncTrainer(cfg, env, loaders, model, run_dir)

    latest, best_path = run_dir / f"{cfg.start_time}_latest.pt", run_dir / f"{cfg.start_time}_best.pt"
    bests = [run_dir / f"{cfg.start_time}.pt", best_path]
    start_epoch = 0
    if training.resume:
        ckpt = trainer.resume(latest, bests)
        start_epoch = ckpt["epoch"] + 1
        logging.info(f"Resumed from {latest} (epoch {ckpt['epoch']}, best {trainer.stopper.best_metrics})")
    elif training.finetune:
        load_weights(model, cfg.ckpt_path, strict=False)
        logging.info(f"Fine-tuning from the weights of {cfg.ckpt_path}")

    num_epochs = 0 if training.run_test_only else training.num_epochs
    for epoch in range(start_epoch, num_epochs):
        if trainer.stopper.triggered:
            break
        metrics = {phase: trainer.run_phase(phase, epoch) for phase in ("train", "valid")}
        for phase, phase_metrics in metrics.items():
            logger.log_metrics(phase, epoch, phase_metrics)
        improved = trainer.stopper.update(metrics[training.early_stop_phase])
        if env.is_main:
            ckpt = trainer.state_dict(epoch, metrics[training.early_stop_phase], metrics["train"]["loss"])
            save_epoch(ckpt, latest, bests, improved)
        barrier()
    if trainer.stopper.triggered:
        logging.info(f"Early stopping: no improvement for {training.patience} epochs")

    if training.run_test_only or not training.skip_test:
        ckpt_path = Path(cfg.ckpt_path) if training.run_test_only else best_path
        ckpt = load_weights(model, ckpt_path, strict=True)
        logging.info(f"Testing {ckpt_path} (epoch {ckpt.get('epoch')})")
        metrics = trainer.run_phase("test", epoch=0)
        logger.log_metrics("test", ckpt.get("epoch", -1), metrics)
    logger.finish()
    cleanup()
