"""Entry point: `python main.py config=configs/sync.yaml [key=value ...]` (also under torchrun or srun)."""

import importlib
import sys

from utils.cli import run_cli
from utils.config import ConfigError, load_config, set_env_from_slurm
from utils.utils import reuse_freed_memory

# `action` in the config -> the module whose `train` runs it, imported only when asked for.
ACTIONS = {
    "train_avclip": "scripts.train_avclip",
    "train_avsync_model": "scripts.train_sync",
    "ft_avsync_model_for_syncability": "scripts.train_sync",
}


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    set_env_from_slurm()
    reuse_freed_memory()
    if cfg.action not in ACTIONS:
        raise ConfigError(f"Unknown action '{cfg.action}'; expected one of {sorted(ACTIONS)}.")
    importlib.import_module(ACTIONS[cfg.action]).train(cfg)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
