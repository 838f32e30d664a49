"""Attention with ``torch.nn.attention.flex_attention`` (the GPU path for biases that have a
``score_mod``).

The bias is evaluated inside the fused kernel by the ``score_mod`` the bias description
provides (``bias.Bias.score_mod``); FlexAttention differentiates through the tensors it
captures, so gradients reach the encoding's gates. A causal ``BlockMask`` (cached per shape
and device) lets the kernel skip the blocks above the diagonal. Nothing of size
(B, H, T, T) is built.

On CPU, torch 2.13 runs a compiled flex_attention forward but has no backward, so the
model uses the chunked path there. The dispatcher (attention.py) hands decoding (Tq < Tk)
and biases without a score_mod (GRAPE-AP) to the chunked path: flex would recompile for
every new cache length, and GRAPE-AP's suffix sum is not a score_mod.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

_block_masks: dict = {}
_compiled = None


def causal_block_mask(n_queries: int, n_keys: int, device):
    """Causal BlockMask with the queries at the end of the keys, cached per (Tq, Tk, device)."""
    key = (n_queries, n_keys, str(device))
    if key not in _block_masks:
        shift = n_keys - n_queries

        def causal(b, h, q_idx, kv_idx):
            return q_idx + shift >= kv_idx

        _block_masks[key] = create_block_mask(causal, None, None, n_queries, n_keys, device=device)
    return _block_masks[key]


def compiled_flex():
    """flex_attention only fuses (and only has a backward) when compiled."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_flex_attention, dynamic=False)
    return _compiled


def flex_attention(q: Tensor, k: Tensor, v: Tensor, score_mod: Callable) -> Tensor:
    """Causal flex attention with ``score_mod`` (from ``bias.score_mod(B, H)``)."""
    Tq, Tk = q.shape[2], k.shape[2]
    return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=causal_block_mask(Tq, Tk, q.device))
