"""Positional encodings of the GRAPE paper behind one small interface.

Every encoding is an ``nn.Module`` with one method the attention calls:

    q, k, bias = encoding(x, q, k, v=None, offset=0, cache=None)

- ``x`` is the attention input (B, T, C); ``q``, ``k`` are (B, H, T, D) after QK-norm.
- Multiplicative encodings return rotated q/k (``q̃_t = G(t) q_t``, ``k̃_j = G(j) k_j``).
- Additive encodings return a *bias description*, a ``Bias`` (``SeparableBias``,
  ``PathIntegralBias`` or a subclass of their own), instead of a (B, H, T, T) tensor, so each
  attention backend can evaluate the bias the way it likes (dense for reference, block by
  block, or inside a kernel).
- ``offset`` is the absolute position of the first query. With a ``LayerCache`` the
  encoding stores what streaming decoding needs (key-side gates, running sums, rotated
  probes) and the bias it returns covers every cached key.

Keys always end at the last query: the Tq queries sit at positions offset..offset+Tq-1 and
the Tk >= Tq keys at offset+Tq-Tk..offset+Tq-1.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------
# Streaming state
# ----------------------------------------------------------------------------------------

class LayerCache:
    """What one attention layer keeps while decoding: named tensors grown along time.

    The attention stores rotated keys/values here; encodings store their own key-side
    quantities (key gates, cumulative log-forget sums, rotated probes, running phase).
    """

    def __init__(self):
        self.length = 0          # tokens already seen by this layer
        self.tensors: dict[str, Tensor] = {}

    def extend(self, name: str, new: Tensor, dim: int = 2) -> Tensor:
        """Append ``new`` along ``dim`` to the stored tensor and return the whole of it."""
        old = self.tensors.get(name)
        full = new if old is None else torch.cat([old, new], dim=dim)
        self.tensors[name] = full
        return full

    def get(self, name: str) -> Optional[Tensor]:
        return self.tensors.get(name)

    def set(self, name: str, value: Tensor) -> None:
        self.tensors[name] = value

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search / batch reordering)."""
        self.tensors = {n: t.index_select(0, index.to(t.device)) for n, t in self.tensors.items()}


def positions(offset: int, length: int, device) -> Tensor:
    return torch.arange(offset, offset + length, device=device)


# ----------------------------------------------------------------------------------------
# Bias descriptions (what the attention backends evaluate)
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Shared maths
# ----------------------------------------------------------------------------------------

def rope_frequencies(dim: int, base: float) -> Tensor:
    """θ_i = 1 / base^(2i/d), i = 0..d/2-1, in float32 exactly as the original repository
    computes them (so its checkpoints see the same spectrum to the last bit)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rotate_pairs(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate coordinate pairs (x[2i], x[2i+1]) by ``angle[..., i]`` (Eq. 3.1, RoPE planes).
    The rotation is computed in float32 (as the original does) and returned in x's dtype."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    cos, sin = angle.cos().float(), angle.sin().float()
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi's geometric head slopes 2^(-8/H)...; for H not a power of two the usual
    interleave of the next power of two's slopes."""
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_head).is_integer():
        slopes = power_of_two(n_head)
    else:
        p = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes, dtype=torch.float32)


def inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


# Rank-2 rotations (§2.3, Appendix I) -----------------------------------------------------

def _rodrigues_coefficients(c: Tensor, s2: Tensor):
    """f1 = sin(c s)/s, f2 = (1 - cos(c s))/s² as functions of s² (both are even in s), with
    series guards for s → 0 so that neither the value nor the gradient meets sqrt(0)."""
    x = c * c * s2                                   # (c s)²
    small = x < 1e-6
    s = torch.sqrt(torch.where(small, torch.ones_like(s2), s2))
    f1_series = c * (1 - x / 6 + x * x / 120)
    f2_series = c * c * (0.5 - x / 24 + x * x / 720)
    f1 = torch.where(small, f1_series, torch.sin(c * s) / s)
    f2 = torch.where(small, f2_series, (1 - torch.cos(c * s)) / (s * s))
    return f1, f2


def rank2_generator(a: Tensor, b: Tensor) -> Tensor:
    """L = a bᵀ - b aᵀ ∈ so(d)."""
    return a[..., :, None] * b[..., None, :] - b[..., :, None] * a[..., None, :]


def rodrigues_exp(a: Tensor, b: Tensor, c: Tensor | float = 1.0) -> Tensor:
    """exp(c L) = I + (sin cs / s) L + ((1 - cos cs) / s²) L², s² = |a|²|b|² - (a·b)²."""
    c = torch.as_tensor(c, dtype=a.dtype, device=a.device)
    L = rank2_generator(a, b)
    f1, f2 = _rodrigues_coefficients(c, _plane_norm_squared(a, b))
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return eye + f1[..., None, None] * L + f2[..., None, None] * (L @ L)


def _plane_norm_squared(a: Tensor, b: Tensor) -> Tensor:
    """s² = |a|²|b|² - (a·b)² (Gram determinant; clamped against rounding below 0)."""
    alpha, beta, gamma = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
    return (alpha * beta - gamma * gamma).clamp_min(0)


def rodrigues_apply(a: Tensor, b: Tensor, x: Tensor, c: Tensor | float = 1.0) -> Tensor:
    """y = exp(c L) x in O(d) without forming the matrix:
    y = x + f1 (a v - b u) + f2 [γ (a v + b u) - β a u - α b v], u = a·x, v = b·x."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    alpha, beta, gamma = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
    f1, f2 = _rodrigues_coefficients(c, _plane_norm_squared(a, b))
    u, v = (a * x).sum(-1, keepdim=True), (b * x).sum(-1, keepdim=True)
    f1, f2 = f1[..., None], f2[..., None]
    alpha, beta, gamma = alpha[..., None], beta[..., None], gamma[..., None]
    return x + f1 * (a * v - b * u) + f2 * (gamma * (a * v + b * u) - beta * a * u - alpha * b * v)


# ----------------------------------------------------------------------------------------
# Encodings
# ----------------------------------------------------------------------------------------

class Encoding(nn.Module):
    """Base class: identity on q/k, no bias. Subclasses override ``forward``."""
    multiplicative = False   # rotates q/k
    additive = False         # returns a bias description

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Optional[Tensor] = None,
                offset: int = 0, cache: Optional[LayerCache] = None):
        return q, k, None


class NoPE(Encoding):
    """No position information: attention is permutation-equivariant up to the causal mask."""


class RoPE(Encoding):
    """Canonical RoPE (Eq. 3.1): d/2 coordinate planes, θ_i = base^(-2i/d)."""
    multiplicative = True

    def __init__(self, config):
        super().__init__(config)
        _require_even(self.head_dim, "head_dim", "rotary")
        self.register_buffer("inv_freq", rope_frequencies(self.head_dim, config.rope_base))

    def frequencies(self) -> Tensor:
        return self.inv_freq

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        theta = self.frequencies()                                  # (D/2,) or (H, D/2)
        pos = positions(offset, q.shape[2], q.device).float()
        angle = pos[:, None] * theta[..., None, :]                  # (T, D/2) or (H, T, D/2)
        return rotate_pairs(q, angle), rotate_pairs(k, angle), None


class GrapeM(RoPE):
    """Commuting multiplicative GRAPE (§3.1) with learnable frequencies.

    The parameter is the original repository's: ``scaled_log_freq`` = s · log θ, initialised at
    RoPE's spectrum, with s = grape_log_freq_scale (16) slowing its effective learning rate by
    s; weight decay pulls it toward 0, i.e. θ toward 1, as in the original. The frequencies are
    evaluated as θ = θ_RoPE · exp((scaled_log_freq − s · log θ_RoPE) / s), the same function
    written so that at init the exponent is exactly 0 and GRAPE-M equals RoPE bit for bit.
    ``grape_learnable_freq = False`` freezes them at RoPE's (and, as in the original, s = 1).
    """

    def __init__(self, config):
        super().__init__(config)
        learnable = config.grape_learnable_freq
        self.log_freq_scale = float(config.grape_log_freq_scale) if learnable else 1.0
        shape = (self.n_head, self.head_dim // 2) if config.grape_m_per_head else (self.head_dim // 2,)
        init = self.rope_scaled_log_freq().expand(shape).clone()
        self.scaled_log_freq = nn.Parameter(init, requires_grad=learnable)

    def rope_scaled_log_freq(self) -> Tensor:
        return self.log_freq_scale * torch.log(self.inv_freq)

    def frequencies(self) -> Tensor:
        offset = self.scaled_log_freq - self.rope_scaled_log_freq()
        return self.inv_freq * torch.exp(offset / self.log_freq_scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the original's parameterisation stored δ = s·log(θ/θ_RoPE)
        # under the name ``log_freq``: same frequencies, other value. Convert, never reinterpret.
        legacy, current = prefix + "log_freq", prefix + "scaled_log_freq"
        if legacy in state_dict and current not in state_dict:
            delta = state_dict.pop(legacy)
            state_dict[current] = delta + self.rope_scaled_log_freq().to(delta.device, delta.dtype)
            warnings.warn(f"{prefix}log_freq: converted a GRAPE-M checkpoint of this repository's earlier "
                          "parameterisation (δ = s·log(θ/θ_RoPE)) to scaled_log_freq = s·log θ")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GrapeMLearnedBasis(GrapeM):
    """Commuting GRAPE-M in a learned orthogonal basis (§3.1, Algorithm 1):
    G(n) = E blockdiag(R(nθ_i)) Eᵀ with E = exp(S - Sᵀ) ∈ SO(d) per head.

    S = 0 at init, so the encoding starts as RoPE (GRAPE-M) exactly; the planes then rotate
    away from the coordinate pairs while staying mutually orthogonal (so they commute and
    the relative law stays exact)."""

    def __init__(self, config):
        super().__init__(config)
        self.basis_raw = nn.Parameter(torch.zeros(self.n_head, self.head_dim, self.head_dim))

    def basis(self) -> Tensor:
        upper = torch.triu(self.basis_raw, diagonal=1)
        return torch.linalg.matrix_exp(upper - upper.transpose(-1, -2))      # (H, D, D)

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        E = self.basis().to(q.dtype)
        to_planes = lambda y: torch.einsum("bhtd,hde->bhte", y, E)           # coordinates in E
        from_planes = lambda y: torch.einsum("bhte,hde->bhtd", y, E)
        q, k, _ = super().forward(x, to_planes(q), to_planes(k), offset=offset)
        return from_planes(q), from_planes(k), None


class GrapeMNonCommuting(Encoding):
    """Non-commuting multiplicative GRAPE in thin-Schur form (Appendix D).

    Per head, L = Σ_i θ_i L(a_i, b_i) with m learned rank-2 generators whose planes overlap,
    so the L(a_i, b_i) do not commute. G(n) = exp(nL) is still a one-parameter subgroup (exact
    relative law). L lives in the r = 2m dimensional span of the a's and b's: with E (d × r)
    an orthonormal basis of it, L = E L_r Eᵀ and G(n) x = x + E (exp(n L_r) - I) Eᵀ x, which
    costs O(r d) per token plus an r × r exponential per position.
    """
    multiplicative = True

    def __init__(self, config):
        super().__init__(config)
        m, d = config.grape_nc_planes, self.head_dim
        if not 1 <= 2 * m <= d:
            raise ValueError(f"grape_nc_planes={m} needs 1 <= 2*grape_nc_planes <= head_dim={d}")
        self.plane_a = nn.Parameter(torch.randn(self.n_head, m, d) / math.sqrt(d))
        self.plane_b = nn.Parameter(torch.randn(self.n_head, m, d) / math.sqrt(d))
        # unit-norm planes make the angle per step ≈ θ_i; start from RoPE's spectrum on 2m dims
        self.log_freq = nn.Parameter(torch.log(rope_frequencies(2 * m, config.rope_base)).repeat(self.n_head, 1))

    def generator(self) -> Tensor:
        """The full (H, d, d) generator Σ_i θ_i (a_i b_iᵀ - b_i a_iᵀ) with unit a_i, b_i."""
        a, b = F.normalize(self.plane_a, dim=-1), F.normalize(self.plane_b, dim=-1)
        theta = self.log_freq.exp()[..., None, None]
        return (theta * rank2_generator(a, b)).sum(1)

    def compressed(self):
        """E (H, d, r) orthonormal and L_r = Eᵀ L E (H, r, r)."""
        span = torch.cat([self.plane_a, self.plane_b], dim=1).transpose(1, 2)   # (H, d, 2m)
        E, _ = torch.linalg.qr(span)
        L = self.generator()
        return E, E.transpose(1, 2) @ L @ E

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        E, Lr = self.compressed()
        pos = positions(offset, q.shape[2], q.device).to(Lr.dtype)
        Gr = torch.linalg.matrix_exp(pos[:, None, None, None] * Lr)              # (T, H, r, r)
        Gr = Gr - torch.eye(Lr.shape[-1], device=Lr.device, dtype=Lr.dtype)

        def apply(y):
            u = torch.einsum("bhtd,hdr->bhtr", y, E.to(y.dtype))
            u = torch.einsum("thrs,bhts->bhtr", Gr.to(y.dtype), u)
            return y + torch.einsum("bhtr,hdr->bhtd", u, E.to(y.dtype))
        return apply(q), apply(k), None


class GrapeMContextual(Encoding):
    """Phase-modulated GRAPE-M: ω_t = sigmoid((w·x_t + b)/s_ω) ≥ 0, Φ_t = Σ_{ℓ<t} ω_ℓ,
    plane i rotates by Φ_t θ_i. Logits depend on Φ_j - Φ_t only.

    As in the original: s_ω = grape_ctx_omega_scale (16), w = 0 and b = softplus⁻¹(ω_init)
    at init (ω_init = grape_ctx_init_omega = 1e-3, so ω₀ = sigmoid(b/16) ≈ 0.39), and learnable
    frequencies θ = exp(log_freq) with log_freq initialised at log θ_RoPE (no scaling), shared
    or per head (``grape_m_per_head``), frozen with ``grape_learnable_freq = False``. They are
    evaluated as θ_RoPE · exp(log_freq − log θ_RoPE), exactly RoPE's spectrum at init.
    """
    multiplicative = True

    def __init__(self, config):
        super().__init__(config)
        _require_even(self.head_dim, "head_dim", "rotary")
        n_out = self.n_head if config.grape_ctx_per_head else 1
        self.omega_scale = float(config.grape_ctx_omega_scale)
        self.phase_proj = nn.Linear(config.n_embd, n_out, bias=True)
        nn.init.zeros_(self.phase_proj.weight)
        nn.init.constant_(self.phase_proj.bias, inverse_softplus(max(config.grape_ctx_init_omega, 1e-8)))
        self.register_buffer("inv_freq", rope_frequencies(self.head_dim, config.rope_base))
        shape = (self.n_head, self.head_dim // 2) if config.grape_m_per_head else (self.head_dim // 2,)
        self.log_freq = nn.Parameter(torch.log(self.inv_freq).expand(shape).clone(),
                                     requires_grad=config.grape_learnable_freq)

    def frequencies(self) -> Tensor:
        """θ, shaped (D/2,) or (H, D/2)."""
        return self.inv_freq * torch.exp(self.log_freq - torch.log(self.inv_freq))

    def increments(self, x: Tensor) -> Tensor:
        """ω_t, shaped (B, H|1, T)."""
        return torch.sigmoid(self.phase_proj(x).float() / self.omega_scale).transpose(1, 2)

    def phases(self, x: Tensor, cache: Optional[LayerCache]) -> Tensor:
        """Φ_t = Σ_{ℓ<t} ω_ℓ (exclusive prefix sum), continued from the cache."""
        omega = self.increments(x)
        before = cache.get("phase_total") if cache is not None else None
        inclusive = omega.cumsum(-1)
        if before is not None:
            inclusive = inclusive + before
        phi = inclusive - omega
        if cache is not None:
            cache.set("phase_total", inclusive[..., -1:])
        return phi

    def forward(self, x, q, k, v=None, offset=0, cache=None, phase_offset: float = 0.0):
        phi = self.phases(x, cache) + phase_offset                      # (B, H|1, T)
        theta = self.frequencies().float()
        theta = theta.view(1, -1, 1, theta.shape[-1])                   # (1, H|1, 1, D/2)
        angle = phi[..., None] * theta                                  # (B, H|1, T, D/2)
        return rotate_pairs(q, angle), rotate_pairs(k, angle), None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the frequencies were learnable kept them at RoPE's:
        # load those with exactly that spectrum (the parameter's initial value).
        if prefix + "log_freq" not in state_dict and prefix + "phase_proj.weight" in state_dict:
            state_dict[prefix + "log_freq"] = torch.log(self.inv_freq).expand_as(self.log_freq).clone()
            warnings.warn(f"{prefix}log_freq: checkpoint from before GRAPE-M-ctx learned its frequencies; "
                          "loaded with RoPE's fixed spectrum, as it was trained")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ALiBi(Encoding):
    """b_h(t, j) = -m_h (t - j)."""
    additive = True

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("slopes", alibi_slopes(self.n_head))

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        n_keys = q.shape[2] + (cache.length if cache is not None else 0)
        bias = SeparableBias(q.shape[2], n_keys, offset, slope_q=self.slopes.view(1, -1, 1))
        return q, k, bias


class FoX(Encoding):
    """Forgetting Transformer: f_ℓ = sigmoid(w_h·x_ℓ + b_h), b_h(t, j) = Σ_{j<ℓ≤t} log f_ℓ."""
    additive = True

    def __init__(self, config):
        super().__init__(config)
        self.forget_proj = nn.Linear(config.n_embd, self.n_head, bias=True)
        nn.init.normal_(self.forget_proj.weight, std=0.5 / math.sqrt(config.n_embd))
        nn.init.zeros_(self.forget_proj.bias)

    def log_forget(self, x: Tensor) -> Tensor:
        return F.logsigmoid(self.forget_proj(x).float()).transpose(1, 2)   # (B, H, T)

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        cum = self.log_forget(x).cumsum(-1)
        if cache is not None and cache.get("fox_cum") is not None:
            cum = cum + cache.get("fox_cum")[..., -1:]
        cum_k = cache.extend("fox_cum", cum) if cache is not None else cum
        bias = SeparableBias(q.shape[2], cum_k.shape[-1], offset, cum_q=cum, cum_k=cum_k)
        return q, k, bias


class GrapeA(Encoding):
    """Additive GRAPE (Eq. 4.6): b_h(t, j) = -(t - j) ω_h (λ_q(q_t) + λ_k(k_j)).

    λ_q = softplus(v̂_h·q_t/√d), λ_k = softplus(û_h·k_j/√d) with û, v̂ the gate vectors
    L2-normalised (F.normalize, eps 1e-6) unless switched off; ω_h = softplus(ω̂_h)·m_h with
    m_h the ALiBi slope and softplus(ω̂_h) = ω_init (1) at init. ``gates`` selects which of
    the two terms exist: "q", "k" or "qk". The knobs keep the original's names and meaning:
    the key gate reads keygated_u_*, the query gate querygated_v_*, ω_init comes from
    keygated_/querygated_/querykeygated_omega_init for "k"/"q"/"qk" (None = 1).
    """
    additive = True

    def __init__(self, config, gates: str):
        super().__init__(config)
        self.use_q, self.use_k = "q" in gates, "k" in gates
        d = self.head_dim
        omega_init = {"q": config.querygated_omega_init, "k": config.keygated_omega_init,
                      "qk": config.querykeygated_omega_init}[gates]
        omega_init = max(1.0 if omega_init is None else float(omega_init), 1e-8)
        if self.use_q:
            std = config.querygated_v_init_std
            self.gate_q = nn.Parameter(torch.randn(self.n_head, d) * (1 / math.sqrt(d) if std is None else std))
            self.q_l2 = config.querygated_v_l2_eps if config.querygated_v_l2_norm else None
        if self.use_k:
            std = config.keygated_u_init_std
            self.gate_k = nn.Parameter(torch.randn(self.n_head, d) * (1 / math.sqrt(d) if std is None else std))
            self.k_l2 = config.keygated_u_l2_eps if config.keygated_u_l2_norm else None
        self.omega_raw = nn.Parameter(torch.full((self.n_head,), inverse_softplus(omega_init)))
        self.register_buffer("slopes", alibi_slopes(self.n_head))

    def omega(self) -> Tensor:
        return F.softplus(self.omega_raw) * self.slopes

    def _gate(self, vec: Tensor, x: Tensor, l2_eps: Optional[float]) -> Tensor:
        unit = vec.float() if l2_eps is None else F.normalize(vec.float(), dim=-1, eps=l2_eps)   # (H, D)
        score = torch.einsum("bhtd,hd->bht", x.float(), unit) / math.sqrt(self.head_dim)
        return F.softplus(score)

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        omega = self.omega().view(1, -1, 1)
        slope_q = omega * self._gate(self.gate_q, q, self.q_l2) if self.use_q else None
        slope_k = None
        if self.use_k:
            slope_k = omega * self._gate(self.gate_k, k, self.k_l2)
            if cache is not None:
                # the key-side slope ω_h λ_k(k_j) is fixed once k_j is seen: cache it
                slope_k = cache.extend("grape_a_slope_k", slope_k)
        n_keys = q.shape[2] + (cache.length if cache is not None else 0)
        bias = SeparableBias(q.shape[2], n_keys, offset, slope_q=slope_q, slope_k=slope_k)
        return q, k, bias


class GrapeAP(Encoding):
    """Path-integral additive GRAPE (§5, Eq. 5.1-5.2).

    p_t = W_p x_t per head (width p_head_dim, None = head_dim), p̂ = RMS-normalised p, r_ℓ = R_ℓ p̂_ℓ with R_ℓ
    the rotation by angle ℓ in every plane (RoPE with base 1), ψ_h(t, ℓ) = m_h ·
    logsigmoid(⟨p_t, r_ℓ⟩ / d_p), b_h(t, j) = Σ_{j<ℓ≤t} ψ_h(t, ℓ). ``p_tie_mode`` reuses
    q, k or v (after QK-norm; v raw) as p instead of a projection.
    """
    additive = True
    tie_modes = ("none", "pq", "pk", "pv")

    def __init__(self, config):
        super().__init__(config)
        self.tie = config.p_tie_mode
        if self.tie not in self.tie_modes:
            raise ValueError(f"p_tie_mode must be one of {self.tie_modes}, got {self.tie!r}")
        if self.tie == "none":
            self.p_dim = config.p_head_dim or self.head_dim
            _require_even(self.p_dim, "p_head_dim", "GRAPE-AP (its probes rotate in planes)")
            self.p_proj = nn.Linear(config.n_embd, self.n_head * self.p_dim, bias=False)
            nn.init.normal_(self.p_proj.weight, std=0.5 / math.sqrt(config.n_embd))
        else:
            self.p_dim = self.head_dim
            _require_even(self.p_dim, "head_dim", "GRAPE-AP with a tied probe")
        self.register_buffer("slopes", alibi_slopes(self.n_head))
        self.register_buffer("probe_freq", torch.ones(self.p_dim // 2))

    def probes(self, x: Tensor, q: Tensor, k: Tensor, v: Optional[Tensor]) -> Tensor:
        if self.tie == "none":
            B, T, _ = x.shape
            return self.p_proj(x).view(B, T, self.n_head, self.p_dim).transpose(1, 2)
        return {"pq": q, "pk": k, "pv": v}[self.tie]

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        raw = self.probes(x, q, k, v)
        p = raw.float()
        # the original's F.rms_norm(p) without weight: eps = machine epsilon of p's dtype
        # (1.2e-7 in float32, 7.8e-3 for bf16 probes under autocast)
        p_hat = p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + torch.finfo(raw.dtype).eps)
        pos = positions(offset, q.shape[2], q.device).float()
        r = rotate_pairs(p_hat, pos[:, None] * self.probe_freq)
        if cache is not None:
            r = cache.extend("grape_ap_r", r)
        bias = PathIntegralBias(q.shape[2], r.shape[2], offset, p=p, r=r, slope=self.slopes)
        return q, k, bias


class Composed(Encoding):
    """A multiplicative and an additive encoding in one head (Appendix E, Eq. 5.3):
    l(t, j) = q_tᵀ G(j - t) k_j / √d + b(t, j).

    The additive part sees the un-rotated q, k: its content gates λ(q_t) must not depend on
    the position through G(t), or the relative law would break."""

    def __init__(self, config, rotary: Encoding, additive: Encoding):
        super().__init__(config)
        if not rotary.multiplicative or not additive.additive:
            raise ValueError("a composed pos_encoding is '<multiplicative>+<additive>', "
                             "e.g. 'rope+grape_ap' or 'grape_m+alibi'")
        self.multiplicative = self.additive = True
        self.rotary, self.bias = rotary, additive

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        _, _, bias = self.bias(x, q, k, v=v, offset=offset, cache=cache)
        q, k, _ = self.rotary(x, q, k, v=v, offset=offset, cache=cache)
        return q, k, bias


def _require_even(value: int, name: str, why: str) -> None:
    if value % 2:
        raise ValueError(f"{name}={value} must be even for {why}")


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

ENCODINGS = {
    "nope": NoPE,
    "rope": RoPE,
    "grape_m": GrapeM,
    "grape_m_ctx": GrapeMContextual,
    "grape_m_basis": GrapeMLearnedBasis,
    "grape_m_nc": GrapeMNonCommuting,
    "alibi": ALiBi,
    "fox": FoX,
    "grape_a_q": lambda c: GrapeA(c, "q"),
    "grape_a_k": lambda c: GrapeA(c, "k"),
    "grape_a_qk": lambda c: GrapeA(c, "qk"),
    "grape_ap": GrapeAP,
}


def check_encoding_name(name: str) -> list[str]:
    """The parts of a pos_encoding name ('rope', or 'rope+grape_ap' for a composition)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in ENCODINGS]
    if unknown or len(parts) > 2:
        raise ValueError(f"unknown pos_encoding {name!r}; choose one of {sorted(ENCODINGS)} "
                         "or '<multiplicative>+<additive>'")
    return parts


def build_encoding(config) -> Encoding:
    parts = [ENCODINGS[p](config) for p in check_encoding_name(config.pos_encoding)]
    return parts[0] if len(parts) == 1 else Composed(config, *parts)
