"""Reading a run's configuration: the YAML named by `config=...` merged with command-line overrides.

A YAML may be an overlay: a top-level `defaults: [base.yaml, ...]` list (paths relative to the file,
as in Hydra's defaults list) names the files merged left to right first, the file itself last, so
`configs/tiny/sync.yaml` holds only what differs from `configs/sync.yaml`. Lists are replaced whole
(OmegaConf's merge), and an overlay may only set keys its defaults have, by the rules below.

Overrides follow OmegaConf's dotlist syntax (`training.base_batch_size=8 data.vids_path=/x`) and win
over the YAML. An override may only change a key that the YAML already has, so a typo such as
`trainig.lr=1` fails loudly instead of silently creating a key nobody reads. Three kinds of new keys
are allowed, because the documented commands add them:

1. the run-time keys in `RUNTIME_KEYS` (`ckpt_path`, `start_time`, ...);
2. the optional keys in `OPTIONAL_KEYS`, which the code reads with a default (e.g. `data.iter_times`);
3. a new entry in a `params` block next to a `target`, when the target's constructor accepts it
   (e.g. `model.params.vfeat_extractor.params.for_loop=True`).

The user's YAML and command line may name any callable as a `target`, as in Hydra; a config that the user did
not write (stored in a checkpoint, downloaded) may build only trusted classes (`check_targets`)."""

import difflib
import inspect
import os
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from utils.utils import ConfigError, get_obj_from_str

RUNTIME_KEYS = {"config", "ckpt_path", "start_time", "ckpt_path_sync", "config_sync", "config_off", "ckpt_path_off"}
# Keys the YAML may omit: the code reads them through `cfg_get`, with these defaults.
OPTIONAL_KEYS = {
    "data.iter_times": 1,
    "data.skip_bad_samples": False,
    "data.audio_priming_compat": True,
    "training.max_bad_loss_steps": 5,
    "training.device": None,
    "training.dist_timeout_min": 10,
    "training.allow_tf32": False,
    "training.precision": None,
    "training.max_train_iters": None,
    "training.max_eval_iters": None,
    "training.epochs_cooldown": None,
    "logging.use_wandb": False,
    "logging.wandb_mode": "offline",
    "logging.log_max_items": 500000,
    "logging.vis_segment_sim": False,
    "logging.plot_curves": True,
    "logging.log_code_state": False,
}


# Type and smallest value of the settings the trainers read, checked when the config is read (not after an
# epoch); null (or absent) passes: it means "off" or "the default".
SETTINGS = {
    **dict.fromkeys(["training.num_epochs", "training.patience", "training.num_workers", "training.val_frequency",
                     "training.max_bad_loss_steps", "training.lr_scheduler.warmup"], (int, 0)),
    **dict.fromkeys(["training.base_batch_size", "training.max_train_iters", "training.max_eval_iters",
                     "data.iter_times", "data.n_segments", "data.segment_size_vframes", "data.input_size", "data.afps",
                     "logging.log_frequency"], (int, 1)),
    **dict.fromkeys(["training.base_learning_rate", "training.learning_rate", "training.max_clip_norm", "data.vfps",
                     "data.crop_len_sec", "data.max_off_sec"], (float, 0)),
    **dict.fromkeys(["training.finetune", "training.run_test_only", "training.skip_test"], (bool, None)),
    "training.seed": (int, None),
}  # fmt: skip
# What a config that the user did not write may build: the classes of these packages of this project, and
# the library classes that the published configs name.
TRUSTED_PACKAGES = ("model.", "dataset.")
TRUSTED_LIBRARY_CLASSES = ("torch.nn.Identity", "torch.nn.Linear")


def read_yaml(path: str | os.PathLike) -> DictConfig:
    """The mapping in the YAML file `path`; ConfigError naming the file when it is missing or malformed."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"Malformed config file {path}: {' '.join(str(e).split())}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    return cfg


def curr_time_with_random_shift() -> str:
    """A timestamp shifted back by up to a minute, so that jobs started together get distinct log dirs."""
    now = datetime.now() - timedelta(seconds=random.randint(0, 59))
    return now.strftime("%y-%m-%dT%H-%M-%S")


def _all_key_paths(node, prefix: str = "") -> list[str]:
    paths = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}{k}"
            paths.append(path)
            paths += _all_key_paths(node._get_node(k), f"{path}.")
    return paths


def _target_accepts(cfg: DictConfig, key_path: str) -> bool:
    """True if `key_path` is `<...>.params.<name>` and the sibling `target` takes `name` as an argument."""
    parts = key_path.split(".")
    if len(parts) < 2 or parts[-2] != "params":
        return False
    parent = OmegaConf.select(cfg, ".".join(parts[:-2])) if len(parts) > 2 else cfg
    if not isinstance(parent, DictConfig) or not isinstance(parent.get("target"), str):
        return False
    try:
        target = get_obj_from_str(parent.target)
        params = inspect.signature(target).parameters
    except (ImportError, ValueError, TypeError):
        return False
    return parts[-1] in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_overrides(cfg_yml: DictConfig, cfg_cli: DictConfig, yaml_path: str, source: str = "the command line") -> None:
    """Raises ConfigError for an override (or an overlay) that would create a key the YAML does not have;
    `source` names where the override comes from."""
    known = set(_all_key_paths(cfg_yml))
    allowed = RUNTIME_KEYS | set(OPTIONAL_KEYS)
    merged = OmegaConf.merge(cfg_yml, cfg_cli)
    for path in _all_key_paths(cfg_cli):  # parents come before their children
        if path in known or path in allowed or _target_accepts(merged, path):
            continue
        node = OmegaConf.select(cfg_cli, path)
        if isinstance(node, DictConfig) and any(k.startswith(f"{path}.") for k in allowed):
            continue  # a new parent of an allowed key, e.g. `data` for `data.iter_times`
        # name a full key (`trainig.lr`, not `trainig`) so the suggestion is a full key too
        leaf = next(iter(_all_key_paths(node, f"{path}.")), path)
        close = difflib.get_close_matches(leaf, sorted(known | allowed), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"Unknown config key '{leaf}' in {source}: it is neither in {yaml_path} nor one of the run-time keys."
            f"{hint} See utils/config.py for the keys that may be added from the command line."
        )


def load_yaml(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> DictConfig:
    """One config file, merged onto the files of its `defaults` list (recursively), unresolved."""
    path = os.path.normpath(path)
    if path in _seen:
        raise ConfigError(f"Config file {path} lists itself among its defaults (via {' -> '.join(_seen)}).")
    cfg = read_yaml(path)
    defaults = cfg.pop("defaults", [])
    if isinstance(defaults, str) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"`defaults` in {path} must be a list of config paths, e.g. `defaults: [../sync.yaml]`.")
    if not defaults:
        return cfg
    base = OmegaConf.create()
    for i, name in enumerate(defaults):
        default_path = os.path.join(os.path.dirname(path), name)
        default = load_yaml(default_path, (*_seen, path))
        if i > 0:
            check_overrides(base, default, " + ".join(defaults[:i]), default_path)
        base = OmegaConf.merge(base, default)
    check_overrides(base, cfg, " + ".join(defaults), path)
    return OmegaConf.merge(base, cfg)


def load_config(argv: list[str]) -> DictConfig:
    """Builds the run's config from `config=path.yaml` and dotlist overrides in `argv`."""
    if not OmegaConf.has_resolver("add"):
        OmegaConf.register_resolver("add", lambda *args: sum(args))  # `${add:1,2,3}` -> 6
    try:
        cfg_cli = OmegaConf.from_dotlist(argv)
    except Exception as e:
        raise ConfigError(f"Could not parse the command-line overrides {argv}: {e}") from e
    if "config" not in cfg_cli:
        raise ConfigError("Pass the config file as `config=configs/<name>.yaml`.")
    yaml_path = cfg_cli.config
    cfg_yml = load_yaml(yaml_path)
    check_overrides(cfg_yml, cfg_cli, yaml_path)
    cfg = OmegaConf.merge(cfg_yml, cfg_cli)  # the latter wins
    if cfg.get("start_time") is None:
        cfg.start_time = curr_time_with_random_shift()
    cfg = resolved(cfg, yaml_path)
    check_settings(cfg, f"{yaml_path} or the command line")
    return cfg


def check_settings(cfg: DictConfig, source: str) -> None:
    """ConfigError naming the first setting of `SETTINGS` whose value has the wrong type or is too small."""
    for key, (kind, low) in SETTINGS.items():
        value = OmegaConf.select(cfg, key)
        # a YAML integer is a fine float; a YAML boolean is not a number
        fits = isinstance(value, int | float if kind is float else kind) and isinstance(value, bool) == (kind is bool)
        if value is not None and (not fits or low is not None and value < low):
            want = {int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise ConfigError(f"{key}={value!r} (in {source}) must be {want}{'' if low is None else f' >= {low}'}.")


def resolved(cfg: DictConfig, source: str) -> DictConfig:
    """A copy of `cfg` with its interpolations resolved; ConfigError naming `source` when they cannot be, or
    when a value is missing (`???`)."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except Exception as e:  # e.g. a key that refers to itself
        raise ConfigError(f"Could not resolve the values in {source}: {' '.join(str(e).split())}") from e


def targets_of(node, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(key path, node) of every mapping with a `target` in a config, at any depth (the model and its parts,
    the transforms, nested params)."""
    if isinstance(node, DictConfig) and "target" in node:
        yield path, node
    children = node.items() if isinstance(node, DictConfig) else enumerate(node) if isinstance(node, ListConfig) else ()
    for key, child in children:
        yield from targets_of(child, f"{path}.{key}".lstrip(".") if isinstance(key, str) else f"{path}[{key}]")


def check_targets(cfg: DictConfig, source: str) -> None:
    """ConfigError naming the first `target` in the config from `source` that is not trusted, before anything
    it names is built. Names are checked before anything is imported; only this project's own modules are
    imported, to see that a name is a class defined there. A name without a module part (the templates'
    'PLACEHOLDER') names nothing that can be imported."""
    for path, node in targets_of(cfg):
        name = node.target
        trusted = isinstance(name, str) and (name in TRUSTED_LIBRARY_CLASSES or "." not in name)
        if not trusted and isinstance(name, str) and name.startswith(TRUSTED_PACKAGES):
            try:
                obj = get_obj_from_str(name)
                trusted = inspect.isclass(obj) and obj.__module__.startswith(TRUSTED_PACKAGES)
            except ImportError:  # nothing of this project: refused
                pass
        if not trusted:
            raise ConfigError(
                f"The config of {source} names {name!r} at {path}: a config that comes with a checkpoint or a "
                f"download may build only this project's classes and {', '.join(TRUSTED_LIBRARY_CLASSES)}. If you "
                "trust it, save it as a YAML file and pass it as your own config (--cfg_path)."
            )


def set_env_from_slurm(environ: dict = os.environ) -> None:
    """Maps SLURM's task variables to the ones torch.distributed reads, unless torchrun set them."""
    if "SLURM_JOB_ID" in environ and not ("RANK" in environ and "WORLD_SIZE" in environ):
        environ["LOCAL_RANK"] = environ["SLURM_LOCALID"]
        environ["RANK"] = environ["SLURM_PROCID"]
        environ["WORLD_SIZE"] = environ["SLURM_NPROCS"]


def cfg_get(cfg: DictConfig, path: str):
    """Reads an optional key with its registered default."""
    value = OmegaConf.select(cfg, path, default=None)
    return OPTIONAL_KEYS[path] if value is None else value


# Small extractors and transformer (32 wide, one layer each): checks that a benchmark runs end to end,
# says nothing about real speed. TINY_INPUTS also shrinks the inputs (not for real videos).
TINY_WIDTHS = {
    "model.params.vfeat_extractor.params": dict(embed_dim=32, depth=1, num_heads=2),
    "model.params.afeat_extractor.params": dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ),
    "model.params.vproj.params": dict(in_features=32),
    "model.params.aproj.params": dict(in_features=32),
    "model.params.transformer.params": dict(n_layer=1, n_head=2, n_embd=32),
}
TINY_INPUTS = {
    "model.params.vfeat_extractor.params": dict(img_size=32, num_frames=4),
    "model.params.afeat_extractor.params": dict(max_spec_t=26, num_mel_bins=32),
}


def untrained_config(config: str | Path, tiny: bool = False, tiny_inputs: bool = True) -> DictConfig:
    """A model config (resolved) with random extractor weights, so nothing is downloaded: what benchmarks
    and tests build; `tiny`: shrunk by TINY_WIDTHS (and TINY_INPUTS)."""
    cfg = read_yaml(config)
    for sizes in (TINY_WIDTHS, TINY_INPUTS if tiny_inputs else {}) if tiny else ():
        for path, values in sizes.items():
            OmegaConf.select(cfg, path).update(values)
    for extractor in ("afeat_extractor", "vfeat_extractor"):
        cfg.model.params[extractor].params.ckpt_path = None  # random weights time the same
    return resolved(cfg, str(config))
