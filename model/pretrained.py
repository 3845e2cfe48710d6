"""Trained Synchformers, whole or only their feature extractors, in the precision they will run in, from any
source: a published experiment (downloaded on first use), a local checkpoint (published format, or a bare
state dict with its config), one of our training runs, or the Hugging Face Hub layout (a folder of
`save_pretrained` / `scripts/convert_to_hf.py`, or a Hub model id)."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from model.feature_extractor import SegmentFeatures
from model.sync_model import Synchformer, load_synchformer
from utils.checkpoint import CheckpointError, config_of, load_checkpoint, load_weights_into
from utils.config import check_targets, read_yaml, resolved
from utils.download import PUBLISHED_MODELS, DownloadError, get_published_model, hub_weights
from utils.precision import for_precision, resolve_precision
from utils.utils import instantiate_from_config

# The published extractors: their classes' defaults (what MMAudio builds for `synchformer_state_dict.pth`)
PUBLISHED_EXTRACTORS = {
    "vfeat_extractor": {"target": "model.modules.feat_extractors.visual.motionformer.MotionFormer"},
    "afeat_extractor": {"target": "model.modules.feat_extractors.audio.ast.AST"},
}


def locate(exp_name: str | None, ckpt_path: str | Path | None, logdir: str | Path) -> tuple[Path, Path | None]:
    """The weights file of a model source and its own config file (None: the one the checkpoint holds), which is
    not the user's: it may build only trusted classes.

    `ckpt_path`: a checkpoint file or a folder; else `exp_name`: a published experiment (downloaded into
    `<logdir>/<exp_name>/` when missing, verified), a folder, a run under `logdir`, or a Hub model id. A folder
    in the Hub layout holds `config.json`; a training run holds `cfg-<name>.yaml` and `<name>.pt`."""
    if exp_name is None and ckpt_path is None:
        raise ValueError("Pass a published experiment name, a Hub model id or folder, or a local checkpoint path.")
    if ckpt_path is None and exp_name in PUBLISHED_MODELS:
        cfg, ckpt = get_published_model(exp_name, logdir)  # files already there are verified
        return ckpt, cfg
    folder = Path(ckpt_path if ckpt_path is not None else exp_name)
    if ckpt_path is None and not folder.is_dir():
        folder = Path(logdir) / exp_name
    if (folder / "config.json").is_file():
        return hub_weights(folder), None
    run = folder / f"{folder.name}.pt", folder / f"cfg-{folder.name}.yaml"
    if all(p.is_file() for p in run):
        return run
    if ckpt_path is not None:
        return Path(ckpt_path), None
    if "/" in str(exp_name):  # Hub model ids are `owner/name`; a published experiment id has no slash
        return hub_weights(exp_name), None
    raise DownloadError(
        f"Unknown model '{exp_name}': neither a published experiment ({', '.join(PUBLISHED_MODELS)}), a folder, "
        f"a run in {logdir}, nor a Hugging Face Hub model id (owner/name)."
    )


def load_model(
    exp_name: str | None = None, ckpt_path: str | Path | None = None, cfg_path: str | Path | None = None,
    device: str | torch.device = "cpu", logdir: str | Path = "./logs/sync_models", precision: str = "fp32",
) -> tuple[Synchformer, DictConfig]:  # fmt: skip
    """A trained Synchformer in eval mode and its config, from the source that `locate` finds, built with
    `cfg_path` (the user's config: any class) if given. `precision` (see `utils.precision`): the model of
    `for_precision`; bf16/fp16 run under `utils.precision.autocast`, which the caller enters (as
    `WindowPredictor` does)."""
    precision = resolve_precision(precision, device)
    weights, own_cfg = locate(exp_name, ckpt_path, logdir)
    model, cfg = load_synchformer(weights, cfg_path or own_cfg, map_location="cpu", trusted_cfg=cfg_path is not None)
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
    weights, own_cfg = locate(exp_name, ckpt_path, logdir)
    ckpt = load_checkpoint(weights)
    source = str(cfg_path or own_cfg or weights)
    cfg = read_yaml(cfg_path or own_cfg) if cfg_path or own_cfg else config_of(ckpt)
    cfg = OmegaConf.create({"model": {"params": PUBLISHED_EXTRACTORS}}) if cfg is None else resolved(cfg, source)
    names = ["vfeat_extractor", "afeat_extractor"] if audio else ["vfeat_extractor"]
    extractors = {}
    for name in names:
        part = OmegaConf.select(cfg, f"model.params.{name}")
        if not isinstance(part, DictConfig):
            raise CheckpointError(f"The config of {source} has no model.params.{name}: pass a stage-2 Synchformer.")
        if cfg_path is None:  # not the user's config: only trusted classes
            check_targets(OmegaConf.create({f"model.params.{name}": part}), source)
        part = OmegaConf.to_container(part)
        # random init: the weights come from the checkpoint, not the extractor's own `ckpt_path`
        extractors[name] = instantiate_from_config(part | {"params": (part.get("params") or {}) | {"ckpt_path": None}})
    model = SegmentFeatures(**extractors, chunk_segments=chunk_segments, precision=precision)
    prefixes = tuple(f"{name}." for name in names)
    kept = {k: v for k, v in ckpt["model"].items() if k.removeprefix("module.").startswith(prefixes)}
    load_weights_into(model, kept, weights)
    model.eval().requires_grad_(False)
    return for_precision(model if precision == "int8" else model.to(device), precision, keep=False)
