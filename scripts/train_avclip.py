"""Stage 1 (`train_avclip`): contrastive pre-training of the audio and visual feature extractors (AVCLIP).

    python main.py config=configs/segment_avclip.yaml data.vids_path=... data.dataset.target=...
    torchrun --nproc_per_node=8 main.py config=configs/segment_avclip.yaml ...   # DDP
    python main.py config=logs/avclip_models/<id>/cfg-<id>.yaml training.resume=latest
    python main.py config=<run cfg> training.run_test_only=True ckpt_path=<run>/checkpoints/epoch_best.pt

Validation (every `val_frequency` epochs) is the zero-shot offset accuracy of the original: in an in-sync
clip, each window of `run_shifted_win_val_winsize_valid` segments must be most similar to the window of
the other modality at the same position. Checkpoints go to `<run>/checkpoints/epoch_latest.pt` (every
epoch), `epoch_best.pt` (best validation) and `epoch_<n>.pt` (last epoch); stage 2 initialises its
extractors from `epoch_best.pt`."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from scripts.train_utils import Trainer, build_run
from utils.checkpoint import save_checkpoint, save_epoch
from utils.config import cfg_get
from utils.dist import DistEnv, all_gather_objects, barrier, cleanup
from utils.logger import save_similarity_matrices
from utils.metrics import shifted_window_accuracy


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases, norms and temperatures (as in open_clip)."""

    def no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def lock_towers(model: torch.nn.Module, training: DictConfig) -> None:
    """`lock_rgb` / `lock_audio`: the visual / audio extractor does not learn (a locked tower, as in LiT); the locked
    audio tower's LayerNorms still do unless `lock_audio_freeze_layer_norm`, as open_clip locks Hugging Face towers."""
    for flag, tower in (("lock_rgb", model.v_encoder), ("lock_audio", model.a_encoder)):
        if training.get(flag):
            tower.requires_grad_(False)
    if training.get("lock_audio") and not training.get("lock_audio_freeze_layer_norm"):
        for m in model.a_encoder.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.requires_grad_(True)


class AVCLIPTrainer(Trainer):
    def __init__(self, cfg: DictConfig, env: DistEnv, loaders: dict, model: torch.nn.Module, run_dir: Path):
        lock_towers(model, cfg.training)  # before DDP and the optimiser see which parameters learn
        super().__init__(cfg, env, loaders, model, run_dir)
        training = cfg.training
        opt = training.optimizer
        self.optimizer = torch.optim.AdamW(
            param_groups(model, opt.weight_decay), lr=training.learning_rate, betas=tuple(opt.betas), eps=1e-8
        )
        # the warm-up is given in single-process steps
        self.scheduler = self.lr_scheduler(
            training.lr_scheduler.get("warmup", 0) // env.world_size, training.learning_rate
        )
        self.skip_scheduler = training.get("skip_scheduler", False)
        self.loss_weights = {
            "segment_contrastive_loss": training.segment_loss_weight,
            "global_contrastive_loss": training.global_loss_weight,
        }

    def state_dict(self, epoch: int, metrics: dict) -> dict:
        """The original's stage-1 format (`state_dict`, `epoch` = epochs completed); the same weights are
        also under `model`, which the project's loaders read (stored once: the tensors are shared)."""
        sd = self.model.state_dict()
        return {
            "state_dict": sd,
            "model": sd,
            "args": self.cfg,
            "name": self.cfg.start_time,
            "epoch": epoch + 1,
            "metrics": {"sync_w_shifts": metrics},
            **self.optimisation_state(),
        }

    @torch.no_grad()
    def evaluate_batch(self, vis, aud, phase: str, viz_path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted-window precision per clip (B,) and the segment loss of one batch (model in eval mode)."""
        B, S = vis.shape[:2]
        with self.autocast():
            out = self.model.forward_for_logging(vis, aud)
        D = out["segment_afeat"].shape[-1]
        win = self.cfg.training[f"run_shifted_win_val_winsize_{phase}"]
        precision = shifted_window_accuracy(
            out["segment_afeat"].float().view(B, S, D), out["segment_vfeat"].float().view(B, S, D), win
        )["precision"]
        if viz_path is not None:
            sims = {k.removeprefix("segment_sim_"): v for k, v in out.items() if k.startswith("segment_sim_")}
            save_similarity_matrices(sims, viz_path)
        return precision, self.loss_weights["segment_contrastive_loss"] * out["segment_contrastive_loss"]

    def viz_path(self, phase: str, epoch: int) -> Path | None:
        if not (self.env.is_main and cfg_get(self.cfg, "logging.vis_segment_sim")):
            return None
        return self.run_dir / "viz" / "sim_matrices" / f"{phase}_e{epoch:04d}.png"

    def train_epoch(self, epoch: int) -> dict:
        cfg, env = self.cfg, self.env
        loss_sum, n_items, precisions, n_bad = 0.0, 0, [], 0
        progress, batches = self.batches("train", epoch)
        for i, batch, vis, aud in batches:
            n_bad += int(batch["n_bad_samples"])
            self.model.train()
            with self.autocast():
                out = self.net(vis, aud)
            loss = sum(self.loss_weights[name] * value for name, value in out["losses"].items())
            if not self.step(loss, f"epoch {epoch}, it {i}", step_scheduler=not self.skip_scheduler):
                continue
            loss_sum += loss.item() * len(vis)
            n_items += len(vis)
            if i % cfg.logging.log_frequency == 0:
                # the zero-shot metric on this batch, as a cheap training curve
                self.model.eval()
                viz = self.viz_path("train", epoch) if i == 0 else None
                precisions.append(self.evaluate_batch(vis, aud, "train", viz)[0].cpu())
                if env.is_main:
                    scale = out["logit_scales"][0].item()
                    progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale:.3f}")
        shards = all_gather_objects((loss_sum, n_items, torch.cat(precisions) if precisions else None, n_bad))
        precision = torch.cat([s[2] for s in shards if s[2] is not None])
        n_all = max(1, sum(s[1] for s in shards))
        return {
            "loss": sum(s[0] for s in shards) / n_all,
            "precision": precision.mean().item(),
            "n_bad_samples": sum(s[3] for s in shards),
        }

    def validate(self, epoch: int) -> dict:
        """Shifted-window precision over the validation clips of all ranks."""
        self.model.eval()
        precisions, loss_sum, n_bad = [], 0.0, 0
        for i, batch, vis, aud in self.batches("valid", epoch)[1]:
            n_bad += int(batch["n_bad_samples"])
            precision, loss = self.evaluate_batch(vis, aud, "valid", self.viz_path("valid", epoch) if i == 0 else None)
            precisions.append(precision.cpu())
            loss_sum += loss.item() * len(vis)
        shards = all_gather_objects((torch.cat(precisions) if precisions else None, loss_sum, n_bad))
        precision = torch.cat([s[0] for s in shards if s[0] is not None])
        return {
            "precision": precision.mean().item(),
            "loss": sum(s[1] for s in shards) / len(precision),
            "n_bad_samples": sum(s[2] for s in shards),
        }


def train(cfg: DictConfig) -> None:
    env, run_dir, logger, model, loaders = build_run(cfg, ["train", "valid"])
    training = cfg.training
    trainer = AVCLIPTrainer(cfg, env, loaders, model, run_dir)

    ckpt_dir = run_dir / "checkpoints"
    start_epoch = 0
    if training.get("resume"):
        ckpt = trainer.resume(ckpt_dir / "epoch_latest.pt", [ckpt_dir / "epoch_best.pt"])
        start_epoch = ckpt["epoch"]
        logging.info(f"Resumed from {ckpt_dir / 'epoch_latest.pt'} after epoch {start_epoch - 1}")
    elif training.get("run_test_only"):
        # the zero-shot offset accuracy of a checkpoint (loaded in `build_run`) on the valid split, as in the original
        start_epoch = training.num_epochs
        logger.log_metrics("valid", -1, trainer.validate(epoch=0))

    val_every = training.val_frequency if training.get("run_shifted_win_val", True) else 0
    for epoch in range(start_epoch, training.num_epochs):
        if trainer.stopper.triggered:
            logging.info(f"Early stopping: no improvement for {training.patience} validations")
            break
        metrics = {"train": trainer.train_epoch(epoch)}
        if val_every > 0 and (epoch % val_every == 0 or epoch == training.num_epochs - 1):
            metrics["valid"] = trainer.validate(epoch)
        for phase, phase_metrics in metrics.items():
            logger.log_metrics(phase, epoch, phase_metrics)
        stop_metrics = metrics.get(training.early_stop_phase)
        improved = stop_metrics is not None and trainer.stopper.update(stop_metrics)
        if env.is_main:
            ckpt = trainer.state_dict(epoch, stop_metrics or {})
            save_epoch(ckpt, ckpt_dir / "epoch_latest.pt", [ckpt_dir / "epoch_best.pt"], improved)
            if epoch == training.num_epochs - 1:
                save_checkpoint(ckpt, ckpt_dir / f"epoch_{epoch + 1}.pt")
        barrier()
    logger.finish()
    cleanup()
