"""Reading and writing checkpoints safely.

Published Synchformer checkpoints are dicts `{'model': state_dict, 'args': <OmegaConf config>, 'epoch',
'optimizer', ...}`; downstream projects often redistribute the bare state dict. Both are read with
`torch.load(weights_only=True)`: no arbitrary code runs, only the config classes listed below are
rebuilt; the config stored in a checkpoint is not the user's, so what it may build is limited
(`utils.config.check_targets`). Writes go to a temporary file that replaces the target in one rename, so a
crash mid-write never leaves a truncated checkpoint behind."""

import collections
import os
import pickle
import typing
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import omegaconf
import safetensors.torch
import torch
from omegaconf import DictConfig, OmegaConf

from utils.cli import UserError
from utils.config import read_yaml
from utils.utils import atomic_path

# Classes that an OmegaConf config (any 2.x release) and numpy scalars pickle into.
SAFE_GLOBALS = [
    *(omegaconf.DictConfig, omegaconf.ListConfig, omegaconf.base.Node),
    *(omegaconf.base.ContainerMetadata, omegaconf.base.Metadata),
    *(getattr(omegaconf.nodes, name) for name in dir(omegaconf.nodes) if name.endswith("Node")),
    typing.Any,
    *(collections.defaultdict, collections.OrderedDict),
    *(dict, list, tuple, set, int, float, bool, str, bytes),
    *(np.dtype, np._core.multiarray.scalar),
    *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
]

# Where other formats keep the state dict: stage-1 AVCLIP checkpoints, Motionformer '.pyth' files.
STATE_DICT_ALIASES = ("state_dict", "model_state")


class CheckpointError(RuntimeError, UserError):
    """A checkpoint that is missing, unreadable or not in a format we know."""


def _gist(error: Exception) -> str:
    """The first line of a `torch.load` error; for a weights-only unpickling error, the line that names
    what was refused (its advice to load without `weights_only` is not for us)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Loads a checkpoint safely; always returns a dict with a 'model' state dict.

    A bare state dict (all values tensors) is wrapped as `{'model': sd}`; the state dict of a stage-1
    (AVCLIP, 'state_dict') or Motionformer ('.pyth', 'model_state') checkpoint is moved to 'model'. A stored
    config under 'args' is returned as a DictConfig. A `.safetensors` file is a state dict; the `config.json`
    beside it (the Hub layout) is its config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}. Check the path or download the checkpoint.")
    if path.suffix == ".safetensors":
        try:
            ckpt = {"model": safetensors.torch.load_file(path, device=str(map_location))}
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"Could not read {path} ({e}): the file may be truncated; download it again.") from e
        config = path.with_name("config.json")
        return ckpt | ({"args": read_yaml(config)} if config.is_file() else {})  # JSON is YAML
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"Could not read the checkpoint {path} ({type(e).__name__}: {_gist(e)}). The file may be truncated "
            "or not a torch checkpoint: download it again."
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(ckpt).__name__}, expected a dict.")
    for alias in STATE_DICT_ALIASES:
        if "model" not in ckpt and isinstance(ckpt.get(alias), dict):
            ckpt["model"] = ckpt.pop(alias)
    if "model" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {"model": ckpt}
        else:
            raise CheckpointError(
                f"Checkpoint {path} has neither a 'model' entry nor is it a bare state dict (keys: {list(ckpt)[:8]})."
            )
    if isinstance(ckpt.get("args"), dict):
        ckpt["args"] = OmegaConf.create(ckpt["args"])
    return ckpt


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Saves `obj` atomically (`utils.utils.atomic_path`), flushed to the disk before it takes the name `path`.

    A DictConfig under 'args' is stored as it is (the published format), which `load_checkpoint` reads."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_epoch(ckpt: dict, latest: Path, bests: Sequence[Path], is_best: bool) -> None:
    """Saves an epoch's checkpoint as the run's latest and, when it `is_best`, under the `bests` names. The
    latest is written first and records `is_best`, so that a run stopped before the bests were written
    writes them again when it resumes from it (`scripts.train_utils.Trainer.resume`)."""
    save_checkpoint({**ckpt, "is_best": is_best}, latest)
    for path in bests if is_best else ():
        save_checkpoint(ckpt, path)


def load_weights_into(model: torch.nn.Module, state_dict: dict, path: str | os.PathLike, strict: bool = True):
    """`model.load_state_dict` of a checkpoint's weights (DDP's `module.` prefixes removed); returns its result.
    Weights that do not fit (a shape; with `strict`, a missing or unexpected key) are a CheckpointError naming
    `path`, in one line."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    fix = f"Check that the config is the one {path} was trained with."
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"The weights in {path} do not fit the model of the config ({type(model).__name__}): {len(missing)} "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). {fix}"
        )
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except (RuntimeError, ValueError) as e:
        problem = " ".join(str(e).split())  # one line: load_state_dict lists the mismatches on several
        raise CheckpointError(f"The weights in {path} do not fit the model of the config: {problem}. {fix}") from e


def config_of(ckpt: dict) -> DictConfig | None:
    """The config stored in a checkpoint, if any: not the user's, so check what it would build
    (`utils.config.check_targets`) before building anything from it, as `load_synchformer` does."""
    args = ckpt.get("args")
    return args if isinstance(args, DictConfig) else None
