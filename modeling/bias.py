"""Bias descriptions: what an additive encoding hands the attention instead of a (B, H, T, T) tensor.

Shapes follow the legend in ``attention.py``. ``Bias`` is the interface every backend
evaluates (``block`` in tiles, ``dense`` for the reference, ``score_mod`` for FlexAttention);
``SeparableBias`` (ALiBi, FoX, GRAPE-A) and ``PathIntegralBias`` (GRAPE-AP) have fast paths of
their own in the backends.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(eq=False)
class Bias:
    """What an additive encoding returns instead of a (B, H, Tq, Tk) tensor: a description
    of b(t, j) that every attention backend can evaluate.

    The n_queries queries sit at positions offset .. offset+n_queries-1 and the n_keys keys
    end with the last query: offset+n_queries-n_keys .. offset+n_queries-1. Sizes and offset
    are python ints (no tensor is read to learn a shape).

    A subclass adds its tensors as dataclass fields and implements ``block``; that is enough
    for every backend (the chunked backend evaluates ``block`` in query tiles, the dense
    reference calls ``dense``). ``score_mod`` is optional: when it returns a FlexAttention
    score_mod, the GPU runs the bias inside the fused flex kernel. SeparableBias and
    PathIntegralBias also have fast paths of their own in the backends.
    """
    n_queries: int
    n_keys: int
    offset: int

    def __post_init__(self):
        if not 0 < self.n_queries <= self.n_keys:
            raise ValueError(f"{type(self).__name__}: needs 0 < n_queries <= n_keys (queries are the last "
                             f"keys), got n_queries={self.n_queries}, n_keys={self.n_keys}")

    @property
    def first_key(self) -> int:
        """Absolute position of key 0."""
        return self.offset + self.n_queries - self.n_keys

    @property
    def device(self) -> torch.device:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                return value.device
        return torch.device("cpu")

    def query_positions(self, qs: slice = slice(None)) -> Tensor:
        start, stop, step = qs.indices(self.n_queries)
        return torch.arange(self.offset + start, self.offset + stop, step, device=self.device)

    def key_positions(self, ks: slice = slice(None)) -> Tensor:
        start, stop, step = ks.indices(self.n_keys)
        return torch.arange(self.first_key + start, self.first_key + stop, step, device=self.device)

    @property
    def q_pos(self) -> Tensor:
        return self.query_positions()

    @property
    def k_pos(self) -> Tensor:
        return self.key_positions()

    def block(self, qs: slice, ks: slice) -> Tensor:
        """b(t, j) for the queries ``qs`` against the keys ``ks`` (slices of 0..n_queries-1 and
        0..n_keys-1), broadcastable to (B, H, nq, nk). Entries above the causal diagonal may
        hold any finite value: every backend masks them, and none may be needed to compute
        the visible ones."""
        raise NotImplementedError(f"{type(self).__name__} must implement block(qs, ks)")

    def dense(self) -> Tensor:
        """The whole (B|1, H, Tq, Tk) bias: the reference path's (and the tests') view."""
        return self.block(slice(None), slice(None))

    def score_mod(self, batch: int, n_heads: int):
        """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` adding b(t, j), with q_idx
        a query index and kv_idx a key index (t - j = q_idx + n_keys - n_queries - kv_idx),
        or None when the bias is not one (the backends then use ``block``)."""
        return None


@dataclass(eq=False)
class SeparableBias(Bias):
    """b(t, j) = -(t - j) * (slope_q[t] + slope_k[j]) + cum_q[t] - cum_k[j].

    ALiBi: slope_q = m_h. GRAPE-A: slope_q = ω_h λ_q(q_t), slope_k = ω_h λ_k(k_j).
    FoX: cum = inclusive prefix sum of log forget gates, so cum_q[t] - cum_k[j] = Σ_{j<ℓ≤t} log f_ℓ.
    Slopes and cums are (B, H, T) on the query or key side; a head-only slope is (1, H, 1).
    Every field may be None (absent term), but not all of them.
    """
    slope_q: Optional[Tensor] = None    # (B|1, H, Tq|1)
    slope_k: Optional[Tensor] = None    # (B, H, Tk)
    cum_q: Optional[Tensor] = None      # (B, H, Tq)
    cum_k: Optional[Tensor] = None      # (B, H, Tk)

    def __post_init__(self):
        super().__post_init__()
        if self.slope_q is None and self.slope_k is None and self.cum_q is None:
            raise ValueError("SeparableBias has no term")
        if (self.cum_q is None) != (self.cum_k is None):
            raise ValueError("SeparableBias needs cum_q and cum_k together")

    def block(self, qs: slice, ks: slice) -> Tensor:
        q_pos, k_pos = self.query_positions(qs), self.key_positions(ks)
        dist = (q_pos[:, None] - k_pos[None, :]).to(self._dtype())          # t - j
        slope = 0.0
        if self.slope_q is not None:
            sq = self.slope_q[..., qs] if self.slope_q.shape[-1] > 1 else self.slope_q
            slope = slope + sq[..., :, None]
        if self.slope_k is not None:
            slope = slope + self.slope_k[..., None, ks]
        out = 0.0 if isinstance(slope, float) else -dist * slope
        if self.cum_q is not None:
            out = out + self.cum_q[..., qs, None] - self.cum_k[..., None, ks]
        return out

    def score_mod(self, batch: int, n_heads: int):
        """Reads the gate tensors it captures as contiguous (B, H, T) float32; FlexAttention
        differentiates through captured tensors, so gradients reach the slopes and sums."""
        shift = self.n_keys - self.n_queries

        def full(t, n):
            return None if t is None else t.float().expand(batch, n_heads, n).contiguous()

        sq, sk = full(self.slope_q, self.n_queries), full(self.slope_k, self.n_keys)
        cq, ck = full(self.cum_q, self.n_queries), full(self.cum_k, self.n_keys)

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

    def _dtype(self):
        for t in (self.slope_q, self.slope_k, self.cum_q):
            if t is not None:
                return t.dtype
        return torch.float32


def path_integral_sum(psi: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """b(t, j) = Σ_{ℓ : j < ℓ ≤ t} psi(t, ℓ), with psi (..., Tq, Tk) indexed by key ℓ.

    Dense O(T²) reference used by GRAPE-AP's dense path and by tests.
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    psi = psi.masked_fill(~causal, 0.0)
    # reverse inclusive cumsum minus the element itself = sum over ℓ > j
    suffix = psi.flip(-1).cumsum(-1).flip(-1)
    return suffix - psi


@dataclass(eq=False)
class PathIntegralBias(Bias):
    """GRAPE-AP: b(t, j) = Σ_{j<ℓ≤t} m_h · logsigmoid(⟨p_t, r_ℓ⟩ / d_p), r_ℓ = R_ℓ p̂_ℓ."""
    p: Tensor                     # (B, H, Tq, dp) query-side probes
    r: Tensor                     # (B, H, Tk, dp) rotated, normalised key-side probes
    slope: Tensor                 # (H,) per-head scale m_h

    def __post_init__(self):
        super().__post_init__()
        if self.p.shape[2] != self.n_queries or self.r.shape[2] != self.n_keys:
            raise ValueError(f"PathIntegralBias of {self.n_queries} queries x {self.n_keys} keys got probes "
                             f"p {tuple(self.p.shape)} and r {tuple(self.r.shape)}")

    def psi(self, qs: slice = slice(None), ks: slice = slice(None)) -> Tensor:
        z = self.p[:, :, qs] @ self.r[:, :, ks].transpose(-1, -2) / self.p.shape[-1]
        return self.slope.view(1, -1, 1, 1) * F.logsigmoid(z)

    def block(self, qs: slice, ks: slice) -> Tensor:
        # the path of the block's last query runs past the block's keys, up to its diagonal
        q0, q1, _ = qs.indices(self.n_queries)
        k0, k1, _ = ks.indices(self.n_keys)
        path = slice(k0, max(k1, self.n_keys - self.n_queries + q1))
        b = path_integral_sum(self.psi(qs, path), self.query_positions(qs), self.key_positions(path))
        return b[..., :k1 - k0]
