"""Streaming decoding: the nanoGPT sampling loop and the glue for ``transformers``' ``generate()``.

Every layer keeps a ``cache.LayerCache`` with exactly what its encoding needs to continue
(rotated keys k̃_j = G(j) k_j and values; key gates for GRAPE-A; running log-forget sums for
FoX; rotated probes R_ℓ p̂_ℓ for GRAPE-AP; the running phase for GRAPE-M-ctx; the previous
k/v projection for KV-shift). A prompt is prefilled in one pass (or in chunks), then one token
at a time costs O(t) per layer. The logits equal those of the full forward pass.

The cache cannot slide: GRAPE-M-ctx's phase, FoX's and GRAPE-AP's sums and KV-shift's previous
projection depend on every earlier token, and rotated keys carry absolute positions. Dropping
the oldest tokens would silently change the model, so going past ``block_size`` is an error
(load the model with a larger ``block_size`` to decode further, as for evaluation).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin
from transformers.generation.configuration_utils import GenerationMode

from .cache import LayerCache


class StreamingCache:
    """The list of per-layer ``LayerCache`` in the shape ``generate()`` expects of a cache:
    it knows its length and can reorder its batch rows (beam search)."""
    is_compileable = False
    is_croppable = False

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "this model's cache cannot be cropped: KV-shift and GRAPE-M-ctx keep only their latest "
            "state, so rolling back tokens (assisted/speculative decoding) is not supported")

    def activate_past_recording(self) -> None:
        self.crop(0)

    def __len__(self) -> int:
        return len(self.layers)


# ----------------------------------------------------------------------------------------
# nanoGPT-style sampling
# ----------------------------------------------------------------------------------------

# A decoding step is a few hundred small ops. Each op split across threads pays a fork and a
# join, and on a busy machine a thread waiting for a core stalls every op: beside jobs of equal
# priority on 2 cores, 1 thread decoded 1.3-4.6x faster than 2 at every size up to ~2 GFLOP per
# step; with the cores free to it, 2 threads gained at most ~20% (results/BENCHMARKS.md
# "Decoding: threads", "Decoding: threads, beside jobs of equal priority").
PARALLEL_STEP_FLOPS = 2e9


def decoding_threads(model, batch: int) -> int:
    """CPU threads for decoding ``batch`` sequences with ``model``: 1 while a step's work,
    about 2 x parameters x batch FLOPs, stays under PARALLEL_STEP_FLOPS; above, torch's
    current count less the cores that other processes keep busy (1-minute load average)."""
    step_flops = 2 * sum(p.numel() for p in model.parameters()) * batch
    current = torch.get_num_threads()
    if step_flops < PARALLEL_STEP_FLOPS or current == 1:
        return 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):          # no load average (Windows): trust torch's count
        return current
    return max(1, min(current, int((os.cpu_count() or 1) - busy + 0.5)))


@contextmanager
def cpu_threads(n: Optional[int]):
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged), and the
    caller's count restored after it."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def threads_for(model, idx: Tensor, threads: Optional[int]) -> Optional[int]:
    """The thread count ``generate`` decodes with: ``threads`` if given (> 0), else
    ``decoding_threads`` on CPU, else None (GPU decoding: leave torch's setting alone)."""
    if threads is not None and threads > 0:
        return threads
    if idx.device.type != "cpu":
        return None
    return decoding_threads(model, idx.shape[0])


def check_room(model, prompt_len: int, max_new_tokens: int) -> None:
    """Decoding n tokens after a prompt of p feeds p + n - 1 tokens through the model."""
    block_size = model.config.block_size
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token")
    need = prompt_len + max_new_tokens - 1
    if need > block_size:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens needs a context of {need} > "
            f"block_size={block_size}; the cache cannot slide (cumulative and absolute state), so shorten the "
            f"prompt or load the model with a larger block_size: from_pretrained(..., block_size={need})")


def check_length(config, n_tokens: int) -> None:
    """A sequence longer than block_size is an error, not a silent extrapolation."""
    if n_tokens > config.block_size:
        raise ValueError(f"sequence of {n_tokens} tokens is longer than block_size={config.block_size}; load the "
                         f"model with a larger block_size (from_pretrained(..., block_size={n_tokens}) or "
                         f"load_model(path, block_size={n_tokens})) to evaluate beyond the training context")


def next_token(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """(B, vocab) logits -> (B, 1) tokens. ``temperature == 0`` means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def sample(model, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Prefill ``idx`` (B, T) in one pass, then decode one token at a time from the cache.
    Returns (B, T + max_new_tokens). Prompts in a batch have equal length (no padding)."""
    check_room(model, idx.size(1), max_new_tokens)
    caches = model.new_caches()
    out = [idx]
    logits, _ = model(idx, caches=caches, logits_to_keep=1)
    for step in range(max_new_tokens):
        token = next_token(logits[:, -1], temperature, top_k, generator)
        out.append(token)
        if step + 1 < max_new_tokens:          # the last token is never fed back
            logits, _ = model(token, caches=caches, logits_to_keep=1)
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------
# transformers' generate(): the cache it should use, and the length checked before it starts
# ----------------------------------------------------------------------------------------

class StreamingGenerationMixin(GenerationMixin):
    """``GenerationMixin`` told to let the model make its own cache (``StreamingCache``)
    instead of a ``DynamicCache``, and which decoding modes that cache supports. ``generate``
    checks the length before the first token: prompt + new tokens must fit in block_size."""
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE,
                                   GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def generate(self, inputs: Optional[Tensor] = None, generation_config=None, **kwargs):
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is not None and prompt.dim() == 2:
            mask = kwargs.get("attention_mask")
            longest = int(mask.sum(-1).max()) if mask is not None and mask.dim() == 2 else prompt.shape[1]
            config = generation_config if generation_config is not None else self.generation_config
            new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
            if new is None:
                new = kwargs.get("max_length", getattr(config, "max_length", None) or 20) - prompt.shape[1]
            check_room(self, longest, new)
        return super().generate(inputs, generation_config, **kwargs)
