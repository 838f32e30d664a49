"""Causal attention with an optional additive bias, evaluated by one of several backends.

``attend(q, k, v, bias, backend)`` is the only entry point the model uses. ``bias`` is
None (multiplicative encodings, NoPE) or one of the bias descriptions in ``grape.py``.
Queries are the last Tq of the Tk key positions (Tq == Tk in training; Tq < Tk while
decoding with a cache).

- ``dense``: the reference. Builds the full (B, H, Tq, Tk) logits, bias and mask. Tests
  compare every other path against it; it is also the cheapest path for tiny shapes.
- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention on GPU) when there is no bias.
Other backends register themselves in ``BACKENDS``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(n_queries: int, n_keys: int, device) -> Tensor:
    """(Tq, Tk) boolean, True where key j is visible to query t (queries end with the keys)."""
    q_idx = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= q_idx[:, None]


def dense_logits(q: Tensor, k: Tensor, bias=None) -> Tensor:
    """Full pre-softmax logits q·k/√d + b(t, j), masked to -inf above the diagonal (float32)."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.dense().float()
    mask = causal_mask(q.shape[2], k.shape[2], q.device)
    return logits.masked_fill(~mask, float("-inf"))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    probs = torch.softmax(dense_logits(q, k, bias), dim=-1)
    return (probs @ v.float()).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    if bias is not None:
        raise ValueError("the sdpa backend handles encodings without an additive bias only")
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device))


BACKENDS: dict[str, Callable] = {
    "dense": dense_attention,
    "sdpa": sdpa_attention,
}


def choose_backend(q: Tensor, bias) -> str:
    """The fastest correct backend available for this device and bias."""
    if bias is None:
        return "sdpa"
    return "dense"


def attend(q: Tensor, k: Tensor, v: Tensor, bias=None, backend: str = "auto") -> Tensor:
    if backend == "auto":
        backend = choose_backend(q, bias)
    elif bias is None and backend != "dense":
        backend = "sdpa"      # every fast path reduces to SDPA when there is no bias
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attn_backend {backend!r}; choose one of {['auto', *BACKENDS]}") from None
    return fn(q, k, v, bias)
