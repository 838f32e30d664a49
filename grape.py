"""Positional encodings of the GRAPE paper behind one small interface.

Every encoding is an ``nn.Module`` with one method the attention calls:

    q, k, bias = encoding(x, q, k, v=None, offset=0, cache=None, layout=None)

- ``x`` is the attention input (B, T, C); ``q``, ``k`` are (B, H, T, D) after QK-norm.
- Multiplicative encodings return rotated q/k (``q̃_t = G(t) q_t``, ``k̃_j = G(j) k_j``).
- Additive encodings return a *bias description*, a ``Bias`` (``SeparableBias``,
  ``PathIntegralBias`` or a subclass of their own), instead of a (B, H, T, T) tensor, so each
  attention backend can evaluate the bias the way it likes (dense for reference, block by
  block, or inside a kernel).
- ``offset`` is the absolute position of the first query. With a ``LayerCache`` the
  encoding stores what streaming decoding needs (key-side gates, running sums, rotated
  probes) and the bias it returns covers every cached key.
- ``layout`` (``modeling.padding.Layout``, None for a plain batch) describes a padded batch:
  each row's own token positions, which encodings that read absolute positions use (rotary,
  GRAPE-AP's probe rotations, grids), and which tokens are real, so that cumulative encodings
  (FoX, GRAPE-M-ctx, the phase clocks) add nothing at a pad. Pad keys are masked by the
  attention, not here.

Keys always end at the last query: the Tq queries sit at positions offset..offset+Tq-1 and
the Tk >= Tq keys at offset+Tq-Tk..offset+Tq-1.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from modeling.bias import Bias, PathIntegralBias, SeparableBias
from modeling.cache import LayerCache


# ----------------------------------------------------------------------------------------
# Shared maths
# ----------------------------------------------------------------------------------------

def positions(offset: int, length: int, device) -> Tensor:
    return torch.arange(offset, offset + length, device=device)


def token_positions(offset: int, length: int, device, layout=None) -> Tensor:
    """The queries' positions: offset .. offset+length-1, shaped (T,), or each row's own
    (``layout.positions``, a padded batch or explicit position_ids), shaped (B, 1, T) so that
    it broadcasts over the heads."""
    if layout is None or layout.positions is None:
        return positions(offset, length, device)
    return layout.positions.to(device)[:, None, :]


def row_positions(offset: int, length: int, device, layout=None) -> Tensor:
    """The queries' positions as (T,), or (B, T) per row for a padded batch (coordinates)."""
    pos = token_positions(offset, length, device, layout)
    return pos if pos.dim() == 1 else pos[:, 0]


def drop_pads(per_token: Tensor, layout) -> Tensor:
    """A per-token increment (B, H|1|R, T) with 0 at the pads of a padded batch, so that running
    sums (FoX's forget sums, phase clocks) count real tokens only."""
    if layout is None or layout.real is None:
        return per_token
    return per_token.masked_fill(~layout.real.to(per_token.device)[:, None, :], 0.0)


def rope_frequencies(dim: int, base: float) -> Tensor:
    """θ_i = 1 / base^(2i/d), i = 0..d/2-1, in float32 exactly as the original repository
    computes them (so its checkpoints see the same spectrum to the last bit)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rotate_pairs(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate coordinate pairs (x[2i], x[2i+1]) by ``angle[..., i]`` (Eq. 3.1, RoPE planes).
    The rotation is computed in at least float32 (as the original does; float64 stays, for the
    gradient checks) and returned in x's dtype."""
    x1, x2 = _float(x[..., 0::2]), _float(x[..., 1::2])
    cos, sin = _float(angle.cos()), _float(angle.sin())
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
    coef_a, coef_b = rodrigues_plane_coordinates(alpha[..., None], beta[..., None], gamma[..., None],
                                                 f1[..., None], f2[..., None], u, v)
    return x + coef_a * a + coef_b * b


def rodrigues_plane_coordinates(alpha, beta, gamma, f1, f2, u, v):
    """The update exp(cL)x - x = c_a a + c_b b in the plane's own vectors (Appendix I):
    Lx = a v - b u and L²x = γ(a v + b u) - β a u - α b v, with u = a·x, v = b·x."""
    return f1 * v + f2 * (gamma * v - beta * u), -f1 * u + f2 * (gamma * u - alpha * v)


# ----------------------------------------------------------------------------------------
# Encodings
# ----------------------------------------------------------------------------------------

class Encoding(nn.Module):
    """Base class: identity on q/k, no bias. Subclasses override ``forward``."""
    multiplicative = False   # rotates q/k
    additive = False         # returns a bias description
    takes_coords = False     # forward accepts coords= (grid encodings: explicit token coordinates)

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Optional[Tensor] = None,
                offset: int = 0, cache: Optional[LayerCache] = None, layout=None):
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

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
        theta = self.frequencies()                                  # (D/2,) or (H, D/2)
        pos = token_positions(offset, q.shape[2], q.device, layout).float()    # (T,) or (B, 1, T)
        angle = pos[..., None] * theta[..., None, :]                # (T|H,T|B,H|1,T, D/2)
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
    the relative law stays exact). ``grape_basis_shared``: one E for all heads, as Algorithm 1
    writes it (per-head spectra then come from ``grape_m_per_head``)."""

    def __init__(self, config):
        super().__init__(config)
        n_bases = 1 if config.grape_basis_shared else self.n_head
        self.basis_raw = nn.Parameter(torch.zeros(n_bases, self.head_dim, self.head_dim))

    def basis(self) -> Tensor:
        upper = torch.triu(self.basis_raw, diagonal=1)
        return torch.linalg.matrix_exp(upper - upper.transpose(-1, -2))      # (H|1, D, D)

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
        E = self.basis().to(q.dtype)
        to_planes = lambda y: y @ E                                          # coordinates in E
        from_planes = lambda y: y @ E.transpose(-1, -2)
        q, k, _ = super().forward(x, to_planes(q), to_planes(k), offset=offset, layout=layout)
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

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
        E, Lr = self.compressed()
        pos = token_positions(offset, q.shape[2], q.device, layout).to(Lr.dtype)
        Gr = torch.linalg.matrix_exp(pos[..., None, None, None] * Lr)            # (T|B,1,T, H, r, r)
        Gr = Gr - torch.eye(Lr.shape[-1], device=Lr.device, dtype=Lr.dtype)
        # one exponential per position, or per row and position (a padded batch)
        gr_spec = "thrs" if Gr.dim() == 4 else "bthrs"
        Gr = Gr if Gr.dim() == 4 else Gr[:, 0]

        def apply(y):
            u = torch.einsum("bhtd,hdr->bhtr", y, E.to(y.dtype))
            u = torch.einsum(f"{gr_spec},bhts->bhtr", Gr.to(y.dtype), u)
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

    def phases(self, x: Tensor, cache: Optional[LayerCache], layout=None) -> Tensor:
        """Φ_t = Σ_{ℓ<t} ω_ℓ (exclusive prefix sum over real tokens), continued from the cache."""
        omega = drop_pads(self.increments(x), layout)
        before = cache.get("phase_total") if cache is not None else None
        inclusive = omega.cumsum(-1)
        if before is not None:
            inclusive = inclusive + before
        phi = inclusive - omega
        if cache is not None:
            cache.set("phase_total", inclusive[..., -1:])
        return phi

    def forward(self, x, q, k, v=None, offset=0, cache=None, phase_offset: float = 0.0, layout=None):
        phi = self.phases(x, cache, layout) + phase_offset              # (B, H|1, T)
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

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
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

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
        cum = drop_pads(self.log_forget(x), layout).cumsum(-1)
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

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
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

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
        raw = self.probes(x, q, k, v)
        p = raw.float()
        # the original's F.rms_norm(p) without weight: eps = machine epsilon of p's dtype
        # (1.2e-7 in float32, 7.8e-3 for bf16 probes under autocast)
        p_hat = p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + torch.finfo(raw.dtype).eps)
        pos = token_positions(offset, q.shape[2], q.device, layout).float()      # (T,) or (B, 1, T)
        r = rotate_pairs(p_hat, pos[..., None] * self.probe_freq)
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
        self.takes_coords = rotary.takes_coords or additive.takes_coords
        self.rotary, self.bias = rotary, additive

    def forward(self, x, q, k, v=None, offset=0, cache=None, coords=None, layout=None):
        def extra(part):
            return {"coords": coords} if coords is not None and part.takes_coords else {}
        _, _, bias = self.bias(x, q, k, v=v, offset=offset, cache=cache, layout=layout, **extra(self.bias))
        q, k, _ = self.rotary(x, q, k, v=v, offset=offset, cache=cache, layout=layout, **extra(self.rotary))
        return q, k, bias


def _require_even(value: int, name: str, why: str) -> None:
    if value % 2:
        raise ValueError(f"{name}={value} must be even for {why}")


# ----------------------------------------------------------------------------------------
# The rest of the family: learned planes, grids, contextual phases, additive dictionary
# ----------------------------------------------------------------------------------------

def _float(t: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 -> float32; float64 stays, for gradient checks)."""
    return t if t.dtype == torch.float64 else t.float()


def running_phase(omega: Tensor, cache: Optional[LayerCache], name: str) -> Tensor:
    """Φ_t = Σ_{ℓ<t} ω_ℓ along the last axis (exclusive prefix sum, §5), continued from the
    running total that ``cache[name]`` keeps between decoding steps."""
    inclusive = omega.cumsum(-1)
    before = cache.get(name) if cache is not None else None
    if before is not None:
        inclusive = inclusive + before
    if cache is not None:
        cache.set(name, inclusive[..., -1:])
    return inclusive - omega


def butterfly_pairs(m: int) -> list[Tensor]:
    """Coordinate pairs (i, i + 2^l) of layer l of a butterfly over m coordinates, as (2, n)
    index tensors; after ⌈log2 m⌉ layers every coordinate has been mixed with every other."""
    layers, step = [], 1
    while step < m:
        first = torch.tensor([i for i in range(m) if not i & step and i + step < m])
        layers.append(torch.stack([first, first + step]))
        step *= 2
    return layers


def unitary_butterfly(z_re: Tensor, z_im: Tensor, pairs: list[Tensor], m: int) -> tuple[Tensor, Tensor]:
    """Q = B_L ⋯ B_1 ∈ U(m), returned as (Re Q, Im Q) of shape (..., m, m).

    Layer l turns each of its complex coordinate pairs (i, j) by the SU(2) element
    exp([[0, -z̄], [z, 0]]) = [[cos|z|, -z̄ sinc|z|], [z sinc|z|, cos|z|]], z = z_re + i z_im
    of shape (..., L, ≥ n_pairs). Unitary for every z (by construction, not by a constraint);
    z = 0 is the identity, and both real directions of z move the frame there (no dead
    gradient at init, unlike an angle/phase parametrisation)."""
    eye = torch.eye(m, dtype=z_re.dtype, device=z_re.device)
    re = eye.expand(*z_re.shape[:-2], m, m)
    im = torch.zeros_like(re)
    one = torch.ones((), dtype=z_re.dtype, device=z_re.device)
    for layer, index in enumerate(pairs):
        i, j = index[0], index[1]
        x, y = z_re[..., layer, :i.numel(), None], z_im[..., layer, :i.numel(), None]
        s2 = x * x + y * y
        sinc, f2 = _rodrigues_coefficients(one, s2)          # sin|z|/|z|, (1 - cos|z|)/|z|²
        cos = 1 - s2 * f2
        ri, ii, rj, ij = re[..., i, :], im[..., i, :], re[..., j, :], im[..., j, :]
        new_ri = cos * ri - sinc * (x * rj + y * ij)         # row i - z̄ sinc · row j
        new_ii = cos * ii - sinc * (x * ij - y * rj)
        new_rj = cos * rj + sinc * (x * ri - y * ii)         # row j + z sinc · row i
        new_ij = cos * ij + sinc * (x * ii + y * ri)
        re = re.index_copy(-2, i, new_ri).index_copy(-2, j, new_rj)
        im = im.index_copy(-2, i, new_ii).index_copy(-2, j, new_ij)
    return re, im


def raster_coordinates(pos: Tensor, grid: tuple[int, ...]) -> Tensor:
    """Raster index n -> grid coordinates (T, len(grid)); the last axis runs fastest.
    (H, W): (n // W, n % W); (T, H, W): (n // HW, n // W % H, n % W)."""
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    cols = [pos // strides[0]] + [(pos // strides[a]) % grid[a] for a in range(1, len(grid))]
    return torch.stack(cols, -1)


def explicit_coordinates(coords: Tensor, n_tokens: int, n_axes: int) -> Tensor:
    """Check user-given coordinates, (T, A) or (B, T, A), and return them as (B|1, T, A) float."""
    c = coords if coords.dim() == 3 else coords.unsqueeze(0)
    if c.dim() != 3 or c.shape[1] != n_tokens or c.shape[2] != n_axes:
        raise ValueError(f"coords must be (T, {n_axes}) or (B, T, {n_axes}) for {n_tokens} tokens, "
                         f"got {tuple(coords.shape)}")
    return c.float()


class GrapeMPlanes(Encoding):
    """Commuting GRAPE-M with learned planes, applied by the Rodrigues closed form (§2.3-2.4,
    Prop. 3.1, Appendix I).

    Per head, d/2 planes (a_k, b_k = J a_k) whose a_k are the columns of a unitary frame
    Q ∈ U(d/2) (R^d read as C^{d/2}, J = multiplication by i). Hermitian-orthonormal a_k make
    the d vectors {a_k, J a_k} orthonormal, so the planes are mutually orthogonal *by
    construction*: the rank-2 generators commute, G(n) = Π_k exp(-n θ_k L(a_k, J a_k)) =
    I + Σ_k (exp(-n θ_k L_k) - I), and the relative law is exact. Q is a butterfly of complex
    Givens rotations (``unitary_butterfly``; ⌈log2(d/2)⌉ layers per pass, ``grape_planes_depth``
    passes), the identity at init: the planes start as RoPE's coordinate pairs.

    Each plane is applied with its Rodrigues update (u = a·x, v = b·x, then x += c_a a + c_b b),
    all planes at once as four (d/2 × d) products; neither G(n) nor a basis change is formed.
    The sign: L(a, Ja) turns a away from Ja (§2.4: L|_U = -αJ), so RoPE's direction (a toward
    Ja, this repository's ``rope``) is exp(-nθ L). Frequencies θ_{h,k} = θ_RoPE·exp(δ/s) per
    head, δ = 0 at init (s = ``grape_log_freq_scale``, as GRAPE-M).

    ``axes`` > 1 is the grid form (Appendix G, ``GrapeMGrid``): the planes are split into
    contiguous groups, one per axis, and plane k turns by θ_k times its axis' coordinate.
    """
    multiplicative = True

    def __init__(self, config, axes: int = 1):
        super().__init__(config)
        _require_even(self.head_dim, "head_dim", "rotary planes")
        m = self.head_dim // 2
        if not 1 <= axes <= m:
            raise ValueError(f"{axes} position axes need 1 <= axes <= head_dim/2 = {m} planes")
        if config.grape_planes_depth < 1:
            raise ValueError(f"grape_planes_depth must be >= 1, got {config.grape_planes_depth}")
        self.n_axes = axes
        sizes = [m // axes + (a < m % axes) for a in range(axes)]
        # buffers are persistent: from_pretrained builds the model on the meta device and only
        # fills what the checkpoint holds
        self.register_buffer("plane_axis", torch.tensor([a for a, n in enumerate(sizes) for _ in range(n)]))
        # each axis gets RoPE's spectrum over its own planes (axial RoPE for grids)
        self.register_buffer("inv_freq", torch.cat([rope_frequencies(2 * s, config.rope_base) for s in sizes]))
        self.log_freq_scale = config.grape_log_freq_scale
        self.log_freq = nn.Parameter(torch.zeros(self.n_head, m))
        pairs = butterfly_pairs(m) * config.grape_planes_depth
        self.pair_counts = [index.shape[1] for index in pairs]
        self.n_layers = len(pairs)
        if self.n_layers:
            padded = torch.zeros(self.n_layers, 2, m // 2, dtype=torch.long)
            for layer, index in enumerate(pairs):
                padded[layer, :, :index.shape[1]] = index
            self.register_buffer("butterfly", padded)
            self.frame_re = nn.Parameter(torch.zeros(self.n_head, self.n_layers, m // 2))
            self.frame_im = nn.Parameter(torch.zeros(self.n_head, self.n_layers, m // 2))

    def frequencies(self) -> Tensor:
        return self.inv_freq * torch.exp(self.log_freq / self.log_freq_scale)        # (H, d/2)

    def planes(self) -> tuple[Tensor, Tensor]:
        """a_k and b_k = J a_k of every head, (H, d/2, d) each, orthonormal."""
        m = self.head_dim // 2
        if self.n_layers:
            pairs = [self.butterfly[layer, :, :n] for layer, n in enumerate(self.pair_counts)]
            re, im = unitary_butterfly(self.frame_re, self.frame_im, pairs, m)
        else:
            re = torch.eye(m, device=self.inv_freq.device).expand(self.n_head, m, m)
            im = torch.zeros_like(re)
        # column k of Q is a_k: a[2p] = Re Q[p, k], a[2p+1] = Im Q[p, k]; J a = (-Im, Re)
        a = torch.stack((re, im), -1).transpose(-3, -2).flatten(-2)
        b = torch.stack((-im, re), -1).transpose(-3, -2).flatten(-2)
        return a, b

    def coordinates(self, offset: int, n_tokens: int, device, coords: Optional[Tensor], layout=None) -> Tensor:
        """Position of each token on each axis: (T, axes) or (B, T, axes)."""
        if coords is not None:
            raise ValueError("coords are for the grid encodings (grape_m_grid, grape_a_grid)")
        return row_positions(offset, n_tokens, device, layout)[..., None]

    def forward(self, x, q, k, v=None, offset=0, cache=None, coords=None, layout=None):
        coords = self.coordinates(offset, q.shape[2], q.device, coords, layout).float()
        plane_pos = coords[..., self.plane_axis].unsqueeze(-3)                       # (B|., 1, T, d/2)
        angle = -plane_pos * self.frequencies()[:, None, :]                          # (B|., H, T, d/2)
        a, b = self.planes()
        return self.rotate(q, a, b, angle), self.rotate(k, a, b, angle), None

    @staticmethod
    def rotate(y: Tensor, a: Tensor, b: Tensor, angle: Tensor) -> Tensor:
        """y + Σ_k (exp(angle_k L(a_k, b_k)) - I) y, plane by plane (valid: the planes are orthogonal)."""
        alpha, beta, gamma = ((a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1))      # (H, d/2)
        f1, f2 = _rodrigues_coefficients(angle, _plane_norm_squared(a, b)[:, None, :])
        a_t, b_t = a.to(y.dtype), b.to(y.dtype)
        u, v = y @ a_t.transpose(-1, -2), y @ b_t.transpose(-1, -2)                  # (B, H, T, d/2)
        coef_a, coef_b = rodrigues_plane_coordinates(alpha[:, None, :], beta[:, None, :], gamma[:, None, :],
                                                     f1, f2, _float(u), _float(v))
        return y + coef_a.to(y.dtype) @ a_t + coef_b.to(y.dtype) @ b_t


class GrapeMGrid(GrapeMPlanes):
    """2D/3D multiplicative GRAPE (Appendix G): G(u, v) = exp(u L^(x)) exp(v L^(y)) with one
    commuting generator per axis, L^(axis) = Σ_{k in the axis' planes} θ_k L(a_k, J a_k) over
    learned mutually orthogonal planes (``GrapeMPlanes``). At init the planes are the
    coordinate pairs and the spectrum is RoPE's per axis: axial 2D/3D RoPE exactly.

    Tokens sit on ``grid`` = (H, W) or (T, H, W) in raster order (coordinates derived from the
    1D position), or at explicit ``coords`` (T or B, T, axes) passed to forward."""
    takes_coords = True

    def __init__(self, config):
        self.grid = _require_grid(config)
        super().__init__(config, axes=len(self.grid))

    def coordinates(self, offset, n_tokens, device, coords, layout=None):
        if coords is not None:
            return explicit_coordinates(coords.to(device), n_tokens, self.n_axes)
        return raster_coordinates(row_positions(offset, n_tokens, device, layout), self.grid)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with 0 (and a zero gradient, not NaN) at 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


@dataclass(eq=False)
class GridDistanceBias(Bias):
    """b_h(t, j) = -Σ_a α_{h,a} |c_a(t) - c_a(j)| ('abs') or -‖α_h ⊙ (c(t) - c(j))‖ ('radial')
    from grid coordinates c of the queries and keys. Not low rank: backends evaluate ``block``."""
    q_coords: Tensor = None             # (B|1, Tq, A) float
    k_coords: Tensor = None             # (B|1, Tk, A) float
    slopes: Tensor = None               # (H, A), ≥ 0
    distance: str = "abs"

    def block(self, qs: slice, ks: slice) -> Tensor:
        slopes = _float(self.slopes)
        delta = (self.q_coords[:, qs, None, :] - self.k_coords[:, None, ks, :]).to(slopes.dtype)   # (B|1, nq, nk, A)
        per_axis = slopes[None, :, None, None, :]                                      # (1, H, 1, 1, A)
        if self.distance == "abs":            # elementwise (autocast would take an einsum to bf16)
            return -(delta.abs().unsqueeze(1) * per_axis).sum(-1)
        return -_safe_sqrt((delta.unsqueeze(1) * per_axis).square().sum(-1))

    def score_mod(self, batch: int, n_heads: int):
        qc = self.q_coords.float().expand(batch, -1, -1).contiguous()
        kc = self.k_coords.float().expand(batch, -1, -1).contiguous()
        slopes = self.slopes.float().contiguous()
        radial = self.distance == "radial"

        def score_mod(score, b, h, q_idx, kv_idx):
            total = torch.zeros_like(score, dtype=torch.float32)
            for a in range(qc.shape[-1]):
                delta = qc[b, q_idx, a] - kc[b, kv_idx, a]
                total = total + ((slopes[h, a] * delta).square() if radial else slopes[h, a] * delta.abs())
            if radial:
                total = _safe_sqrt(total)
            return (score - total).to(score.dtype)

        return score_mod


class GrapeAGrid(Encoding):
    """2D/3D additive GRAPE (Appendix G): the scalar offset m becomes a function of the
    coordinate differences Δ_a = c_a(t) - c_a(j), with per-head, per-axis slopes
    α_{h,a} = softplus(ω̂_{h,a})·m_h (m_h ALiBi's slope, softplus(ω̂) = 1 at init):

    - ``grid_distance='abs'`` (default): b = -Σ_a α_{h,a}|Δ_a|, 2D ALiBi with a Manhattan
      distance: in raster order the column offset Δ_v has either sign (a key in an earlier row
      may lie right of the query), and a recency bias should penalise both;
    - ``'signed'``: b = -Σ_a α_{h,a} Δ_a, the paper's m = α_x(u_t - u_j) + α_y(v_t - v_j): exactly
      separable (a SeparableBias: the fast path), but it rewards keys to the right of the query;
    - ``'radial'``: b = -‖α_h ⊙ Δ‖, the paper's 3D m = ‖r_t - r_j‖ (with per-axis scales).

    Every form depends on the offset vector only (exact relative law); causality is the raster
    order's mask. Coordinates as in ``GrapeMGrid``."""
    additive = True
    takes_coords = True
    distances = ("abs", "signed", "radial")

    def __init__(self, config):
        super().__init__(config)
        self.grid = _require_grid(config)
        if config.grid_distance not in self.distances:
            raise ValueError(f"grid_distance must be one of {self.distances}, got {config.grid_distance!r}")
        self.distance = config.grid_distance
        self.slope_raw = nn.Parameter(torch.full((self.n_head, len(self.grid)), inverse_softplus(1.0)))
        self.register_buffer("slopes", alibi_slopes(self.n_head))

    def axis_slopes(self) -> Tensor:
        return F.softplus(self.slope_raw) * self.slopes[:, None]                     # (H, A)

    def forward(self, x, q, k, v=None, offset=0, cache=None, coords=None, layout=None):
        B, _, Tq, _ = q.shape
        n_keys = Tq + (cache.length if cache is not None else 0)
        if coords is None and layout is not None and layout.positions is not None:
            # a padded batch: each row's raster coordinates, from its own positions
            coords = raster_coordinates(layout.positions.to(q.device), self.grid)
        q_coords, k_coords = self.token_coordinates(B, Tq, n_keys, offset, q.device, cache, coords)
        alpha = self.axis_slopes()
        if self.distance == "signed":
            # elementwise, not a matmul: autocast would round the coordinates to bf16
            cum_q = -(q_coords.unsqueeze(-2) * alpha).sum(-1).transpose(1, 2)           # (B|1, H, Tq)
            cum_k = -(k_coords.unsqueeze(-2) * alpha).sum(-1).transpose(1, 2)
            return q, k, SeparableBias(Tq, n_keys, offset, cum_q=cum_q, cum_k=cum_k)
        return q, k, GridDistanceBias(Tq, n_keys, offset, q_coords=q_coords, k_coords=k_coords,
                                      slopes=alpha, distance=self.distance)

    def token_coordinates(self, B, Tq, n_keys, offset, device, cache, coords):
        """(B|1, Tq, A) query and (B|1, Tk, A) key coordinates, float."""
        stored = cache.get("grid_coords") if cache is not None else None
        if coords is None:
            if stored is not None:
                raise ValueError("this cache holds explicit coords: pass coords for every chunk")
            first_key = offset + Tq - n_keys
            k_coords = raster_coordinates(positions(first_key, n_keys, device), self.grid)[None].float()
            return k_coords[:, n_keys - Tq:], k_coords
        q_coords = explicit_coordinates(coords.to(device), Tq, len(self.grid))
        if cache is None:
            return q_coords, q_coords
        if cache.length and stored is None:
            raise ValueError("explicit coords must be given from the first token of a cached sequence")
        return q_coords, cache.extend("grid_coords", q_coords.expand(B, -1, -1), dim=1)


def _require_grid(config) -> tuple[int, ...]:
    grid = getattr(config, "grid", None)
    if not grid or any(int(s) < 1 for s in grid):
        raise ValueError(f"the grid encodings need grid=(H, W) or (T, H, W) with positive sizes, got {grid!r}")
    return tuple(int(s) for s in grid)


def clock_rate(logit: Tensor) -> Tensor:
    """ω = 2·sigmoid(logit) ∈ (0, 2): a token-driven clock that may stop or run up to twice as
    fast as the position counter, exactly 1 at logit 0 (so the encodings start as RoPE/ALiBi),
    and bounded, so phases cannot blow up at long context."""
    return 2 * torch.sigmoid(_float(logit))


class GrapeAPhase(Encoding):
    """Phase-modulated additive GRAPE (§5, 'Relation to GRAPE-A'): b_h(t, j) = -θ_h (Φ_t - Φ_j),
    Φ_u = Σ_{ℓ<u} ω_ℓ, ω_ℓ = 2·sigmoid(w·x_ℓ + b) ≥ 0 (one phase shared by the heads, or one
    per head with ``grape_ctx_per_head``), θ_h = softplus(θ̂_h)·m_h ≥ 0.

    Exactly separable, cum_q = -θ_h Φ_t and cum_k = -θ_h Φ_j: a SeparableBias (fast path); the
    cache keeps the key-side sums and the running phase. Exact relative law in Φ. Init w = 0,
    b = 0, softplus(θ̂) = 1: ω ≡ 1, Φ_u = u, and the bias is ALiBi's (the paper's 'a_ℓ ≡ 1'
    case) until the gate learns to stretch or shrink the clock."""
    additive = True

    def __init__(self, config):
        super().__init__(config)
        self.phase_proj = nn.Linear(config.n_embd, self.n_head if config.grape_ctx_per_head else 1, bias=True)
        nn.init.zeros_(self.phase_proj.weight)
        nn.init.zeros_(self.phase_proj.bias)
        self.rate_raw = nn.Parameter(torch.full((self.n_head,), inverse_softplus(1.0)))
        self.register_buffer("slopes", alibi_slopes(self.n_head))

    def rates(self) -> Tensor:
        return F.softplus(self.rate_raw) * self.slopes                               # θ_h, (H,)

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
        omega = drop_pads(clock_rate(self.phase_proj(x)).transpose(1, 2), layout)     # (B, H|1, T)
        phi = running_phase(omega, cache, "grape_a_phase_total")
        cum = -self.rates().view(1, -1, 1) * phi                                     # (B, H, T)
        cum_k = cache.extend("grape_a_phase_cum", cum) if cache is not None else cum
        return q, k, SeparableBias(q.shape[2], cum_k.shape[-1], offset, cum_q=cum, cum_k=cum_k)


class GrapeMContextualDictionary(Encoding):
    """Multi-subspace / dictionary contextual GRAPE-M (§5 phases, Appendix A): R phase
    channels Φ_{t,r} = Σ_{ℓ<t} ω_{ℓ,r}, ω_{ℓ,r} = 2·sigmoid(w_r·x_ℓ + b_r) ≥ 0, drive a dictionary
    of R commuting generators on RoPE's planes, L_{h,r} = Σ_i C_{h,r,i} θ_i L_i, and
    G_h(t) = exp(Σ_r Φ_{t,r} L_{h,r}): plane i of head h turns by θ_i Σ_r C_{h,r,i} Φ_{t,r}.
    The generators commute, so logits depend on the phase differences Φ_j - Φ_t only.

    Init: C is the one-hot split of the planes into R contiguous frequency bands (the
    multi-subspace form, each band with its own token-adaptive clock), w = 0, b = 0:
    every Φ_{t,r} = t and the encoding starts as RoPE. Learning C turns the bands into a
    dictionary (a plane may follow a mixture of clocks). Channels shared by the heads, mixing
    C per head. R = ``grape_ctx_dict_size``."""
    multiplicative = True

    def __init__(self, config):
        super().__init__(config)
        _require_even(self.head_dim, "head_dim", "rotary")
        m, R = self.head_dim // 2, config.grape_ctx_dict_size
        if not 1 <= R <= m:
            raise ValueError(f"grape_ctx_dict_size={R} needs 1 <= grape_ctx_dict_size <= head_dim/2 = {m}")
        self.phase_proj = nn.Linear(config.n_embd, R, bias=True)
        nn.init.zeros_(self.phase_proj.weight)
        nn.init.zeros_(self.phase_proj.bias)
        bands = F.one_hot(torch.arange(m) * R // m, R).T.float()                     # (R, d/2)
        self.mix = nn.Parameter(bands.repeat(self.n_head, 1, 1))                     # (H, R, d/2)
        self.register_buffer("inv_freq", rope_frequencies(self.head_dim, config.rope_base))

    def phases(self, x: Tensor, cache: Optional[LayerCache], layout=None) -> Tensor:
        omega = drop_pads(clock_rate(self.phase_proj(x)).transpose(1, 2), layout)     # (B, R, T)
        return running_phase(omega, cache, "grape_ctx_dict_total")

    def forward(self, x, q, k, v=None, offset=0, cache=None, phase_offset: Tensor | float = 0.0, layout=None):
        phi = self.phases(x, cache, layout)
        # a float is added as is (torch.as_tensor of a python float fails on the meta device)
        phi = phi + (phase_offset.reshape(-1, 1) if isinstance(phase_offset, Tensor) else phase_offset)
        # elementwise, not an einsum: autocast would take a matmul to bf16, and angles need fp32
        mix = _float(self.mix)[None, :, :, None, :]                                   # (1, H, R, 1, d/2)
        angle = (_float(phi)[:, None, :, :, None] * mix).sum(2) * self.inv_freq       # (B, H, T, d/2)
        return rotate_pairs(q, angle), rotate_pairs(k, angle), None


class GrapeADictionary(Encoding):
    """Commuting additive dictionary (§4, Appendix J.3 'dictionary closure'): R content-gated
    rank-1 unipotent atoms A_r with A_r A_s = 0 for all r, s, so Σ_r is still index-2 nilpotent,
    exp(m Σ_r A_r) = I + m Σ_r A_r, and the law stays exactly relative:

        b_h(t, j) = -(t - j) Σ_r ω_{h,r} (λ_{q,r}(q_t) + λ_{k,r}(k_j)),

    λ_{q,r} = softplus(v̂_{h,r}·q_t/√d), λ_{k,r} = softplus(û_{h,r}·k_j/√d) (gate vectors
    L2-normalised when used, as GRAPE-A), ω_{h,r} = softplus(ω̂_{h,r})·m_h / R with
    softplus(ω̂) = 1 at init: R atoms share ALiBi's slope, so the summed rate starts where
    GRAPE-A-QK's does. A sum of softplus gates is a richer, still non-negative rate. Separable
    (query- and key-side slopes): the fast path; the cache keeps the key-side slope."""
    additive = True

    def __init__(self, config):
        super().__init__(config)
        R, d = config.grape_a_dict_size, self.head_dim
        if R < 1:
            raise ValueError(f"grape_a_dict_size must be >= 1, got {R}")
        self.gate_q = nn.Parameter(torch.randn(self.n_head, R, d) / math.sqrt(d))
        self.gate_k = nn.Parameter(torch.randn(self.n_head, R, d) / math.sqrt(d))
        self.weight_raw = nn.Parameter(torch.full((self.n_head, R), inverse_softplus(1.0)))
        self.register_buffer("slopes", alibi_slopes(self.n_head))

    def weights(self) -> Tensor:
        return F.softplus(self.weight_raw) * self.slopes[:, None] / self.weight_raw.shape[1]   # (H, R)

    def rate(self, gate: Tensor, y: Tensor) -> Tensor:
        """Σ_r ω_{h,r} softplus(ĝ_{h,r}·y/√d), (B, H, T)."""
        unit = F.normalize(_float(gate), dim=-1)
        # a matmul, not an einsum: the einsum's backward views a non-contiguous gradient under
        # torch.compile's AOT autograd
        y = _float(y)
        lam = F.softplus(y @ unit.to(y.dtype).transpose(-1, -2) / math.sqrt(self.head_dim))
        return (lam * self.weights()[:, None, :]).sum(-1)

    def forward(self, x, q, k, v=None, offset=0, cache=None, layout=None):
        slope_k = self.rate(self.gate_k, k)
        if cache is not None:
            slope_k = cache.extend("grape_a_dict_slope_k", slope_k)
        return q, k, SeparableBias(q.shape[2], slope_k.shape[-1], offset,
                                   slope_q=self.rate(self.gate_q, q), slope_k=slope_k)


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
    "grape_m_planes": GrapeMPlanes,
    "grape_m_grid": GrapeMGrid,
    "grape_m_ctx_dict": GrapeMContextualDictionary,
    "grape_a_grid": GrapeAGrid,
    "grape_a_phase": GrapeAPhase,
    "grape_a_dict": GrapeADictionary,
}
GRID_ENCODINGS = ("grape_m_grid", "grape_a_grid")     # need GPTConfig.grid


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
