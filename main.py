"""Entry point: `python main.py config=configs/sync.yaml [key=value ...]` (also under torchrun or srun)."""

import sys

from scripts.train_utils import run_action as main
from utils.cli import run_cli

if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
