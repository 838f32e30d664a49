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


# -- run configs ------------------------------------------------------------------------------

# Keys of the original's resolved configs that are not compared, and why (logging, paths, system).
NOT_COMPARED = {
    "out_dir": "where checkpoints go (the original's script derives output/out_<model>_..._<date>_<job id>)",
    "resume_dir": "a path",
    "wandb_log": "logging: off here unless asked for (the original's configs turn it on)",
    "wandb_project": "logging",
    "wandb_run_name": "logging (the original's script derives it from the date and job id)",
    "data_path": "a path",
    "dataset": "a path: here data/fineweb-edu/fineweb-edu100B, where data/fineweb-edu/prepare.py writes",
    "device": "the system: 'auto' picks cuda where there is one (the original: 'cuda')",
    "backend": "the system: 'auto' picks nccl on GPUs (the original: 'nccl')",
}
# Keys with no counterpart here; they change nothing in the original's runs either.
ORIGINAL_ONLY = {
    "tpa_kvrank": "TPA's, read by no model file of these model types",
    "tpa_qrank": "TPA's, read by no model file of these model types",
    "group_size": "GQA's, passed only for 'gqa' model types",
    "rho": "defined, never read (the script trains with AdamW)",
    "interval": "defined, never read",
    "variant": "defined, never read",
    "scale_attn_by_inverse_layer_idx": "passed to the model, read by none of its files",
}
P_TIE = {"pqtie": "pq", "pktie": "pk", "pvtie": "pv"}


def _ours(key: str, ours: dict):
    """Our value for one of the original's keys."""
    if key == "grape_base":
        return ours["rope_base"]
    if key == "grape_share_across_heads":
        return not ours["grape_m_per_head"]
    return ours[key]


def _normalised(key: str, value):
    if key == "p_tie_mode":
        return P_TIE.get(value, value)
    return value


def config_mismatches(original: dict, ours: dict) -> list[str]:
    """Where our resolved config differs from the original's (one configs.json entry: its
    resolved values and the model_args it passes to GPTConfig). ``ours`` is the configurator's
    dict plus its FIXED_KEYS at their only accepted values (``with_fixed_keys``)."""
    out = []
    for part in ("values", "model_args"):
        for key, value in original[part].items():
            if key in NOT_COMPARED or key in ORIGINAL_ONLY:
                continue
            if part == "model_args" and key == "vocab_size" and value is None:
                value = 50304                    # what the original's script then puts there
            try:
                mine = _ours(key, ours)
            except KeyError:
                out.append(f"{part}.{key}: the original has {value!r}, ours has no such key")
                continue
            if _normalised(key, mine) != _normalised(key, value):
                out.append(f"{part}.{key}: original {value!r}, ours {mine!r}")
    return out


def with_fixed_keys(config: dict) -> dict:
    """The configurator's resolved dict plus the keys it accepts at one value only (not stored)."""
    from training.configurator import FIXED_KEYS
    return {**{key: value for key, (value, _) in FIXED_KEYS.items()}, **config}
