"""Deterministic, framework-version-independent weights and inputs for parity checks.

Every floating tensor of a state dict gets values drawn from numpy's PCG64 generator seeded by
(seed, sha256(key)), so the same key always gets the same values in any process, any torch version.
1-D tensors named '*.weight' (norm layers) get 1 + 0.02*N(0,1); all other floating tensors 0.02*N(0,1).
Non-floating tensors (integer buffers) are left as the model made them."""

import hashlib

import numpy as np


def fill_values(key: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)])
    x = rng.standard_normal(tuple(shape), dtype=np.float64) * 0.02
    if len(shape) == 1 and key.endswith(".weight"):
        x = x + 1.0
    return np.asarray(x, dtype=np.float32)  # also for 0-dim tensors


def det_state_dict(model_state_dict, seed: int = 0):
    """Returns a new state dict (torch tensors) with deterministic values for every floating tensor."""
    import torch

    return {
        k: torch.from_numpy(fill_values(k, v.shape, seed)).to(v.dtype) if torch.is_floating_point(v) else v.clone()
        for k, v in model_state_dict.items()
    }


def det_input(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng([seed, 12345])
    return (rng.standard_normal(tuple(shape), dtype=np.float64) * scale).astype(np.float32)
