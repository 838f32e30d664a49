"""SeparableBias attention with ``torch.nn.attention.flex_attention`` (the GPU path).

The bias b(t, j) = -(t - j)(sq_t + sk_j) + cq_t - ck_j is evaluated inside the fused
kernel by a ``score_mod`` that reads the (B, H, T) gate tensors it captures; FlexAttention
differentiates through those captured tensors, so gradients reach the slopes and cumulative
sums. A causal ``BlockMask`` (cached per shape and device) lets the kernel skip the blocks
above the diagonal. Nothing of size (B, H, T, T) is built.

On CPU, torch 2.13 runs a compiled flex_attention forward but has no backward, so the
model uses the chunked path there. Decoding (Tq < Tk) and GRAPE-AP go to the chunked path
as well: flex would recompile for every new cache length, and GRAPE-AP's suffix sum is not a
score_mod.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

from grape import SeparableBias

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


def separable_score_mod(bias: SeparableBias, batch: int, n_heads: int, shift: int):
    """score_mod adding b(t, j); the gate tensors are captured as contiguous (B, H, T) float32."""
    Tq, Tk = bias.q_pos.shape[0], bias.n_keys

    def full(t, n):
        return None if t is None else t.float().expand(batch, n_heads, n).contiguous()

    sq, sk = full(bias.slope_q, Tq), full(bias.slope_k, Tk)
    cq, ck = full(bias.cum_q, Tq), full(bias.cum_k, Tk)
    if sq is None and sk is None and cq is None:
        raise ValueError("SeparableBias has no term")

    def score_mod(score, b, h, q_idx, kv_idx):
        dist = (q_idx + shift - kv_idx).to(torch.float32)       # t - j
        out = score
        if sq is not None:
            out = out - dist * sq[b, h, q_idx]
        if sk is not None:
            out = out - dist * sk[b, h, kv_idx]
        if cq is not None:
            out = out + (cq[b, h, q_idx] - ck[b, h, kv_idx])
        return out.to(score.dtype)

    return score_mod


def flex_attention(q: Tensor, k: Tensor, v: Tensor, bias=None) -> Tensor:
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if not isinstance(bias, SeparableBias) or Tq != Tk:
        from attention_chunked import chunked_attention
        return chunked_attention(q, k, v, bias)
    score_mod = separable_score_mod(bias, B, H, Tk - Tq)
    return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=causal_block_mask(Tq, Tk, q.device))
