"""Primitives every attention backend shares: the causal mask, causal SDPA, and the dense
reference path.

Queries are the last Tq of the Tk key positions (Tq == Tk in training; Tq < Tk while
decoding with a cache). ``bias`` is None or a ``bias.Bias``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(n_queries: int, n_keys: int, device) -> Tensor:
    """(Tq, Tk) boolean, True where key j is visible to query t (queries end with the keys)."""
    q_idx = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= q_idx[:, None]


def causal_sdpa(q: Tensor, k: Tensor, v: Tensor, scale=None) -> Tensor:
    """``F.scaled_dot_product_attention`` with the queries at the end of the keys."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device), scale=scale)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    if bias is not None:
        raise ValueError("the sdpa backend handles encodings without an additive bias only")
    return causal_sdpa(q, k, v)


def dense_logits(q: Tensor, k: Tensor, bias=None) -> Tensor:
    """Full pre-softmax logits q·k/√d + b(t, j), masked to -inf above the diagonal (float32)."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.dense().float()
    mask = causal_mask(q.shape[2], k.shape[2], q.device)
    return logits.masked_fill(~mask, float("-inf"))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    """The reference: builds the full (B, H, Tq, Tk) logits, bias and mask."""
    with torch.autocast(q.device.type, enabled=False):      # float32 maths under autocast too
        probs = torch.softmax(dense_logits(q, k, bias), dim=-1)
        return (probs @ v.float()).to(q.dtype)
