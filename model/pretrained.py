"""Trained Synchformers, whole or only their feature extractors, in the precision they will run in, from any
source: a published experiment (downloaded on first use), a local checkpoint (published format, or a bare
state dict with its config), one of our training runs, or the Hugging Face Hub layout (a folder of
`save_pretrained` / `scripts/convert_to_hf.py`, or a Hub model id)."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from model.feature_extractor import SegmentFeatures
from model.sync_model import Synchformer, load_synchformer
from utils.checkpoint import CheckpointError, config_of, load_checkpoint, load_state_dict_strictly
from utils.config import read_yaml
from utils.download import get_published_model, hub_weights
from utils.precision import for_precision, resolve_precision
from utils.utils import instantiate_from_config

# The published extractors: their classes' defaults (what MMAudio builds for `synchformer_state_dict.pth`)
PUBLISHED_EXTRACTORS = {
    "vfeat_extractor": {"target": "model.modules.feat_extractors.visual.motionformer.MotionFormer"},
    "afeat_extractor": {"target": "model.modules.feat_extractors.audio.ast.AST"},
}


def locate(
    exp_name: str | None, ckpt_path: str | Path | None, cfg_path: str | Path | None, logdir: str | Path
) -> tuple[Path, str | Path | None]:
    """The weights file of a model source and the config file to build it with (None: the checkpoint's own).

    `ckpt_path`: a checkpoint file or a folder; else `exp_name`: a folder, a run under `logdir`, a published
    experiment or a Hub model id. A folder in the Hub layout holds `config.json`; a training run (and a
    published experiment once downloaded) holds `cfg-<name>.yaml` and `<name>.pt`."""
    if exp_name is None and ckpt_path is None:
        raise ValueError("Pass a published experiment name, a Hub model id or folder, or a local checkpoint path.")
    folder = Path(ckpt_path if ckpt_path is not None else exp_name)
    if ckpt_path is None and not folder.is_dir():
        folder = Path(logdir) / exp_name
    if (folder / "config.json").is_file():
        return hub_weights(folder), cfg_path
    run = folder / f"{folder.name}.pt", folder / f"cfg-{folder.name}.yaml"
    if all(p.is_file() for p in run):
        return run[0], cfg_path or run[1]
    if ckpt_path is not None:
        return Path(ckpt_path), cfg_path
    if "/" in str(exp_name):  # Hub model ids are `owner/name`; a published experiment id has no slash
        return hub_weights(exp_name), cfg_path
    cfg, ckpt = get_published_model(exp_name, logdir)
    return ckpt, cfg_path or cfg


def load_model(
    exp_name: str | None = None, ckpt_path: str | Path | None = None, cfg_path: str | Path | None = None,
    device: str | torch.device = "cpu", logdir: str | Path = "./logs/sync_models", precision: str = "fp32",
) -> tuple[Synchformer, DictConfig]:  # fmt: skip
    """A trained Synchformer in eval mode and its config, from the source that `locate` finds. `precision` (see
    `utils.precision`): the model of `for_precision`; bf16/fp16 run under `utils.precision.autocast`, which
    the caller enters (as `WindowPredictor` does)."""
    precision = resolve_precision(precision, device)
    model, cfg = load_synchformer(*locate(exp_name, ckpt_path, cfg_path, logdir), map_location="cpu")
    model = for_precision(model if precision == "int8" else model.to(device), precision, keep=False)
    model.cfg = cfg  # what built it travels with it (the desync scorers and the hub entry points read it)
    return model, cfg


def load_feature_extractor(
    exp_name: str | None = None, ckpt_path: str | Path | None = None, cfg_path: str | Path | None = None,
    device: str | torch.device = "cpu", logdir: str | Path = "./logs/sync_models", precision: str = "fp32",
    audio: bool = False, chunk_segments: int = 64,
) -> SegmentFeatures:  # fmt: skip
    """The visual feature extractor of a trained Synchformer (and the audio one if `audio`) alone, frozen, from
    any source of `load_model` or a bare state dict such as MMAudio's `synchformer_state_dict.pth` (without a
    config: the published extractors). Only the extractors' weights are read, and all of theirs must be there."""
    precision = resolve_precision(precision, device)
    weights, cfg_path = locate(exp_name, ckpt_path, cfg_path, logdir)
    ckpt = load_checkpoint(weights)
    cfg = read_yaml(cfg_path) if cfg_path is not None else config_of(ckpt)
    names = ["vfeat_extractor", "afeat_extractor"] if audio else ["vfeat_extractor"]
    configs = PUBLISHED_EXTRACTORS if cfg is None else OmegaConf.to_container(cfg.model.params, resolve=True)
    extractors = {}
    for name in names:
        if name not in configs:
            raise CheckpointError(f"The config of {weights} has no model.params.{name}: pass a stage-2 Synchformer.")
        params = configs[name].get("params") or {}
        # the one place a config of this kind is built; the weights come from the checkpoint, not `ckpt_path`
        extractors[name] = instantiate_from_config({**configs[name], "params": {**params, "ckpt_path": None}})
    model = SegmentFeatures(**extractors, chunk_segments=chunk_segments, precision=precision)
    prefixes = tuple(f"{name}." for name in names)
    state_dict = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    load_state_dict_strictly(model, state_dict, weights, "Pass the config it was trained with (--cfg_path).")
    model.eval().requires_grad_(False)
    return for_precision(model if precision == "int8" else model.to(device), precision, keep=False)
