"""Reference facts measured from the original implementation (../shared/reference, see its README)."""

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def reference_arrays(name: str) -> dict[str, torch.Tensor]:
    """The original's measured outputs `<name>.npz`; skips the test when the shared data are not there."""
    path = REFERENCE / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"reference data not found: {path}")
    return {k: torch.from_numpy(v) for k, v in np.load(path).items()}


def reference_keys(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of a state dict recorded from the original (`<name>.tsv`)."""
    path = REFERENCE / f"{name}.tsv"
    if not path.is_file():
        pytest.skip(f"reference data not found: {path}")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line]
    return {key: (dtype, tuple(int(n) for n in shape.split(",") if n)) for key, dtype, shape in rows}


def keys_of(state_dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state_dict.items()}
