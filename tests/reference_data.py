"""Data the tests read from outside the repository: reference facts measured from the original
implementation (../shared/reference, see its README) and the original's sample clips and metadata
(../shared/data, or ./data as `python -m scripts.download_metadata --samples` fetches them)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.download_metadata import SAMPLES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # beside the checkout, also in CI
REFERENCE = SHARED / "reference"
COMPLETE = [d for d in (SHARED / "data", REPO / "data") if all((d / rel).is_file() for rel in SAMPLES)]
DATA = (COMPLETE or [REPO / "data"])[0]  # where the sample files are, or will be once fetched
needs_samples = pytest.mark.skipif(
    not COMPLETE,
    reason="the original's sample clips and metadata are not in ../shared/data or ./data: fetch them with "
    "`python -m scripts.download_metadata --samples`",
)


def reference_file(name: str) -> Path:
    """`name` in the original's measured outputs; skips the test when the shared data are not there."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference data not found: {path}")
    return path


def reference_arrays(name: str) -> dict[str, torch.Tensor]:
    """The original's measured outputs `<name>.npz`."""
    return {k: torch.from_numpy(v) for k, v in np.load(reference_file(f"{name}.npz")).items()}


def reference_json(name: str) -> dict:
    return json.loads(reference_file(f"{name}.json").read_text())


def reference_keys(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of a state dict recorded from the original (`<name>.tsv`)."""
    path = reference_file(f"{name}.tsv")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line]
    return {key: (dtype, tuple(int(n) for n in shape.split(",") if n)) for key, dtype, shape in rows}


def keys_of(state_dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state_dict.items()}
