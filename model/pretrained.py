"""Trained Synchformers: a local checkpoint (published format or a bare state dict with its config) or a
published experiment, downloaded on first use, in the precision it will run in."""

from pathlib import Path

import torch
from omegaconf import DictConfig

from model.sync_model import Synchformer, load_synchformer
from utils.download import get_published_model
from utils.precision import for_precision, resolve_precision


def load_model(
    exp_name: str | None = None, ckpt_path: str | Path | None = None, cfg_path: str | Path | None = None,
    device: str | torch.device = "cpu", logdir: str | Path = "./logs/sync_models", precision: str = "fp32",
) -> tuple[Synchformer, DictConfig]:  # fmt: skip
    """A trained Synchformer in eval mode and its config: a local checkpoint if `ckpt_path` is given
    (a published-format file or a bare state dict with `cfg_path`), else the published `exp_name`,
    downloaded into `<logdir>/<exp_name>/` when missing. `precision` (see `utils.precision`): the model of
    `for_precision`; bf16/fp16 run under `utils.precision.autocast`, which the caller enters (as
    `WindowPredictor` does)."""
    precision = resolve_precision(precision, device)
    if ckpt_path is None:
        if exp_name is None:
            raise ValueError("Pass a published experiment name or a local checkpoint path.")
        exp_dir = Path(logdir) / exp_name
        cfg_path, ckpt_path = exp_dir / f"cfg-{exp_name}.yaml", exp_dir / f"{exp_name}.pt"
        if not (cfg_path.is_file() and ckpt_path.is_file()):
            cfg_path, ckpt_path = get_published_model(exp_name, logdir)
    model, cfg = load_synchformer(ckpt_path, cfg_path, map_location="cpu")
    model = for_precision(model if precision == "int8" else model.to(device), precision, keep=False)
    model.cfg = cfg  # what built it travels with it (the desync scorers and the hub entry points read it)
    return model, cfg
