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


def dense_logits(q: Tensor, k: Tensor, bias=None, key_padding=None) -> Tensor:
    """Full pre-softmax logits q·k/√d + b(t, j), masked to -inf above the diagonal (float32).
    ``key_padding`` (B, Tk), True at pad keys: those are masked too, except for the pad query
    itself (a pad sees only itself, so its row stays finite; no real query reads a pad)."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.dense().float()
    Tq, Tk = q.shape[2], k.shape[2]
    mask = causal_mask(Tq, Tk, q.device)
    if key_padding is not None:
        own_key = torch.arange(Tk - Tq, Tk, device=q.device)[:, None] == torch.arange(Tk, device=q.device)
        mask = mask & (~key_padding.to(q.device)[:, None, None, :] | own_key)
    return logits.masked_fill(~mask, float("-inf"))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, bias=None, key_padding=None) -> Tensor:
    """The reference: builds the full (B, H, Tq, Tk) logits, bias and mask."""
    with torch.autocast(q.device.type, enabled=False):      # float32 maths under autocast too
        probs = torch.softmax(dense_logits(q, k, bias, key_padding), dim=-1)
        return (probs @ v.float()).to(q.dtype)
