"""What the golden files of the original implementation hold, shared by their generator
(``tests/make_original_goldens.py``, run by hand against a checkout of the original) and the
tests that read them (``tests/test_original_parity.py``).

Parameters are not stored: each is rebuilt from its recipe (a base value plus a scale, in the
golden file) and a deterministic hash of its name, so the same numbers come out on every
machine. Large tensors are compared on a fixed subset of their entries.
"""
from __future__ import annotations

import os

import numpy as np
import torch

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "original")
SAMPLED_ENTRIES = 64           # entries compared per large tensor (all entries of smaller ones)

_MASK = (1 << 64) - 1


def _fnv1a(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK
    return h


def uniform(name: str, numel: int) -> np.ndarray:
    """numel numbers in [-1, 1), a pure function of ``name`` (splitmix64 on the name's hash + i)."""
    with np.errstate(over="ignore"):
        z = np.uint64(_fnv1a(name)) + np.arange(numel, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0


def perturbed(name: str, shape, base, scale: float) -> torch.Tensor:
    """base + scale · uniform(name), in float64 then rounded once to float32."""
    base = np.asarray(base.double().numpy() if torch.is_tensor(base) else base, dtype=np.float64)
    numel = int(np.prod(shape)) if len(shape) else 1
    values = base.reshape(-1) + scale * uniform(name, numel)      # a scalar base broadcasts
    return torch.from_numpy(values.reshape(shape).astype(np.float32))


def sampled_indices(numel: int) -> torch.Tensor:
    """Flat indices of the entries compared: all of them, or SAMPLED_ENTRIES spread by a prime stride."""
    if numel <= SAMPLED_ENTRIES:
        return torch.arange(numel)
    return torch.sort((torch.arange(SAMPLED_ENTRIES) * 7919 + 13) % numel).values


def sample(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1)[sampled_indices(tensor.numel())].clone()


def case_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.pt")
