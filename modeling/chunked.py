"""Linear-memory attention with an additive bias, in plain PyTorch (the CPU training path).

Nothing here builds a (B, H, Tq, Tk) tensor; activation memory is linear in T. Any
``bias.Bias`` runs through ``tiled_attention``; the two bias types of the paper have faster
special paths. Every path is exactly causal: the output of query t reads no value of a later
position, not even through rounding, so changing later tokens changes no bit of it.

Any Bias: query tiles. Each tile computes its logits, adds ``bias.block`` for its visible keys,
masks, softmaxes and multiplies by v, under ``torch.utils.checkpoint``: backward recomputes
the tile, so only q, k, v and one output per tile are kept.

SeparableBias (ALiBi, FoX, GRAPE-A): the bias has low rank,

    b(t, j) = -(t - j)(sq_t + sk_j) + cq_t - ck_j,

so it rides along in the q·k product as a few extra columns of q and k, and attention is one
``F.scaled_dot_product_attention`` call (the fused flash kernel on CPU, which keeps only a
logsumexp per row for backward); autograd carries the gradients back to the slopes and sums.
The float32 dot product rounds at the size of its terms, so the columns are kept small for
the near keys that carry the weight. The keys are cut into n_kb blocks (as many as fit in the
zero padding the kernel needs anyway, at least 4), each with its own reference: its first
position c_β and that key's cumulative sum ρ_β. With β the block of key j,

    b(t, j) = sq_t · (j - c_β)  +  A_β(t) · 1  +  1 · C_j  -  (t - c) · sk_j,
    A_β(t) = -(t - c_β) sq_t + cq_t - ρ_β,      C_j = (j - c) sk_j - (ck_j - ρ_β),

where the term A_β(t) sits in n_kb query columns, one per block, facing one-hot key columns
(1 on the keys of block β). A visible key j ≤ t meets only its own block's A_β(t), whose
references come from positions ≤ j; the other blocks' columns (future ones included) meet
exact zeros. c is the middle key's position: a number fixed by the length, never a token's
value. Precision: the dot product rounds at the size of its terms, about |sq|·(block length)
or the range of FoX's sums over a block for the near keys (|sk|·T/2 for the sk term), where
the dense path rounds each b(t, j) on its own. Largest float32 output error against a float64
dense reference at T = 4096 (B = 1, H = 4, D = 64, v ~ N(0, 1); parameters at init / all
perturbed; ``python -m scripts.bench_attention --precision --T 4096``):

    ALiBi 1.0e-5, FoX 3.2e-5 / 1.9e-4, GRAPE-A-q 4.7e-6 / 5.5e-6,
    GRAPE-A-k 2.6e-5 / 3.3e-5, GRAPE-A-qk 3.1e-5 / 3.5e-5   (dense float32: ~1e-6)

(with one reference at the middle key, before the key blocks: ALiBi 2.1e-5, FoX 1.7e-4 /
7.4e-4, GRAPE-A-q 1.8e-5, GRAPE-A-qk 5.5e-5 / 3.6e-5). All far below bf16 resolution.

PathIntegralBias (GRAPE-AP): b(t, j) = Σ_{j<ℓ≤t} ψ(t, ℓ) is a per-row suffix sum, not low
rank. Queries go in blocks; each block sees its visible keys in *reverse* order, where the
suffix sum becomes a plain prefix ``cumsum`` that starts at the diagonal (accurate for the
near keys that matter, no flips of big tensors). ψ of the keys after a query is zeroed before
the cumsum, so they add exact zeros (float32 error at T = 4096 as above: 1.4e-6 / 1.5e-6,
against 6.9e-6 / 1.8e-5 when they entered the sum). A custom autograd Function keeps only
q, k, v, p, r, the output and a logsumexp per row, and recomputes each block in backward
(flash-attention style), with dψ(t, ℓ) = Σ_{j<ℓ} dS(t, j) as the matching cumsum.
Dynamo traces the Function's forward and backward into a compiled graph as they are (plain
tensor code), so it needs no torch.library custom op (tests/test_compile.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .dense import causal_mask, causal_sdpa
from .bias import Bias, PathIntegralBias, SeparableBias


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, bias=None, block: Optional[int] = None) -> Tensor:
    if bias is None:
        return causal_sdpa(q, k, v)
    if not isinstance(bias, Bias):
        raise TypeError(f"the chunked backend evaluates a Bias, got {type(bias).__name__}")
    if (bias.n_queries, bias.n_keys) != (q.shape[2], k.shape[2]):
        raise ValueError(f"{type(bias).__name__} covers {bias.n_queries} queries x {bias.n_keys} keys, "
                         f"attention has {q.shape[2]} x {k.shape[2]}")
    # float32 maths under autocast too: bias columns as large as T * slope would lose the bias
    # to a 16-bit dot product, and GRAPE-AP's blocks would round logits and weights
    with torch.autocast(q.device.type, enabled=False):
        return _biased_attention(q, k, v, bias, block)


def _biased_attention(q: Tensor, k: Tensor, v: Tensor, bias, block: Optional[int]) -> Tensor:
    # the fast paths know these exact classes; a subclass may change the maths, so it is tiled
    if type(bias) is SeparableBias:
        return separable_attention(q, k, v, bias)
    if type(bias) is PathIntegralBias:
        return path_integral_attention(q, k, v, bias, block)
    return tiled_attention(q, k, v, bias, block)


BLOCK_ELEMENTS = 1 << 23      # (B, H, block, Tk) float32 temporaries of ~32 MiB each


def query_block(batch: int, n_heads: int, n_keys: int) -> int:
    """Queries per block: big enough to keep matmuls efficient and Python overhead low,
    small enough that a few (B, H, block, Tk) temporaries stay bounded."""
    return max(32, min(1024, BLOCK_ELEMENTS // max(1, batch * n_heads * n_keys)))


# ----------------------------------------------------------------------------------------
# Any Bias: query tiles of bias.block, recomputed in backward
# ----------------------------------------------------------------------------------------

def tiled_attention(q: Tensor, k: Tensor, v: Tensor, bias: Bias, block: Optional[int] = None) -> Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    block = block or query_block(q.shape[0], q.shape[1], Tk)
    tiles = []
    for s0 in range(0, Tq, block):
        s1 = min(s0 + block, Tq)
        n_visible = Tk - Tq + s1          # the tile's last query sees keys 0 .. n_visible-1
        tiles.append(checkpoint(_tile, q[:, :, s0:s1], k[:, :, :n_visible], v[:, :, :n_visible],
                                bias, s0, s1, use_reentrant=False))
    return torch.cat(tiles, 2)


def _tile(qb: Tensor, kb: Tensor, vb: Tensor, bias: Bias, s0: int, s1: int) -> Tensor:
    n_visible = kb.shape[2]
    logits = (qb.float() @ kb.float().transpose(-1, -2)) / math.sqrt(qb.shape[-1])
    logits = logits + bias.block(slice(s0, s1), slice(0, n_visible)).float()
    logits = logits.masked_fill(~causal_mask(s1 - s0, n_visible, qb.device), float("-inf"))
    return (torch.softmax(logits, -1) @ vb.float()).to(qb.dtype)


# ----------------------------------------------------------------------------------------
# SeparableBias: fold the low-rank bias into q and k
# ----------------------------------------------------------------------------------------

MIN_KEY_BLOCKS = 4


def key_blocks(n_keys: int, other_columns: int, head_dim: int) -> int:
    """Number of key blocks: at least MIN_KEY_BLOCKS, more while they fit in the padding to a
    multiple of 8 columns; at most one per key."""
    width = -(-(head_dim + other_columns + MIN_KEY_BLOCKS) // 8) * 8
    return max(1, min(n_keys, width - head_dim - other_columns))


def separable_columns(bias: SeparableBias, batch: int, n_heads: int, head_dim: int):
    """Extra query/key columns whose dot product is the bias: (B, H, Tq, m), (B, H, Tk, m)."""
    Tq, Tk, device = bias.n_queries, bias.n_keys, bias.device
    shape_q, shape_k = (batch, n_heads, Tq), (batch, n_heads, Tk)
    sq = None if bias.slope_q is None else bias.slope_q.float().expand(shape_q)
    sk = None if bias.slope_k is None else bias.slope_k.float().expand(shape_k)
    cq = None if bias.cum_q is None else bias.cum_q.float()
    ck = None if bias.cum_k is None else bias.cum_k.float()
    per_block = sq is not None or cq is not None       # A_β(t) exists
    key_const = sk is not None or cq is not None       # C_j exists
    other = (sq is not None) + (sk is not None) + key_const
    length = -(-Tk // (key_blocks(Tk, other, head_dim) if per_block else 1))    # keys per block
    n_blocks = -(-Tk // length)
    key_idx = torch.arange(Tk, device=device)
    starts = torch.arange(0, Tk, length, device=device)         # first key of each block
    t_idx = torch.arange(Tk - Tq, Tk, device=device)             # query t as a key index
    centre = Tk // 2                                             # the sk term's global centre
    rho = None if ck is None else ck[..., starts].detach()      # (B, H, n_blocks): cancels exactly
    cols = []                                                    # (query column, key column) pairs
    if sq is not None:
        cols.append((sq[..., None], (key_idx % length).float().expand(shape_k)[..., None]))
    if sk is not None:
        cols.append((-(t_idx - centre).float().expand(shape_q)[..., None], sk[..., None]))
    if key_const:
        c = 0.0 if sk is None else (key_idx - centre).float() * sk
        if ck is not None:
            c = c - (ck - rho[..., key_idx // length])
        cols.append((torch.ones(*shape_q, 1, device=device), c.expand(shape_k)[..., None]))
    if per_block:
        a = 0.0 if sq is None else -(t_idx[:, None] - starts).float() * sq[..., None]
        if cq is not None:
            a = a + (cq[..., None] - rho[..., None, :])
        one_hot = (key_idx[:, None] // length == torch.arange(n_blocks, device=device)).float()
        cols.append((a.expand(*shape_q, n_blocks), one_hot.expand(*shape_k, n_blocks)))
    return torch.cat([c[0] for c in cols], -1), torch.cat([c[1] for c in cols], -1)


def separable_attention(q: Tensor, k: Tensor, v: Tensor, bias: SeparableBias) -> Tensor:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    qc, kc = separable_columns(bias, B, H, D)
    m = qc.shape[-1]
    width = -(-(D + m) // 8) * 8          # the CPU flash kernel wants equal, aligned widths
    pad = width - D - m
    zq = q.new_zeros((B, H, Tq, pad), dtype=torch.float32)
    zk = q.new_zeros((B, H, Tk, pad), dtype=torch.float32)
    qa = torch.cat([q.float() / math.sqrt(D), qc, zq], -1)
    ka = torch.cat([k.float(), kc, zk], -1)
    va = torch.cat([v.float(), v.new_zeros((B, H, Tk, width - D), dtype=torch.float32)], -1)
    return causal_sdpa(qa, ka, va, scale=1.0)[..., :D].to(q.dtype)


# ----------------------------------------------------------------------------------------
# PathIntegralBias: query blocks, keys reversed, recomputation in backward
# ----------------------------------------------------------------------------------------

# torch's CPU exp leaves its vector path for arguments below about -87 (results that
# underflow, and -inf) and runs ~40x slower there; far keys of a decaying bias live there.
# Flooring the shifted logits at -80 keeps every exp on the fast path: a floored weight is
# at most e^-80 ~ 2e-35, which vanishes in sums whose largest term is 1. Hidden entries are
# zeroed after the exp, so causality stays exact.
EXP_FLOOR = -80.0


def _exp_visible(shifted: Tensor, hidden: Tensor) -> Tensor:
    """In place: exp of (logit - row max, or - lse), hidden entries exactly 0."""
    shifted.clamp_(min=EXP_FLOOR).exp_()
    shifted[..., :hidden.shape[-1]].masked_fill_(hidden, 0.0)
    return shifted


def path_integral_attention(q: Tensor, k: Tensor, v: Tensor, bias: PathIntegralBias,
                            block: Optional[int] = None) -> Tensor:
    block = block or query_block(q.shape[0], q.shape[1], k.shape[2])
    return _PathIntegralAttention.apply(q, k, v, bias.p, bias.r, bias.slope, block)


def _hidden(nq: int, device) -> Tensor:
    """(nq, nq) True where reversed key column u lies after query row i (u < nq - 1 - i).
    Only the first nq reversed columns of a block can be hidden."""
    i = torch.arange(nq, device=device)
    return i[None, :] < (nq - 1 - i)[:, None]


def _block_logits(qb, k_vis, pb, r_vis, slope, hidden, hide_logits=True):
    """Logits with the GRAPE-AP bias for one query block, keys in reverse order
    (column u = key kend-1-u). Returns S (B, H, nq, kv), -inf where hidden (unless
    ``hide_logits`` is False: backward zeroes those weights after the exp anyway), and z.

    With keys reversed, b(u) = Σ_{u' < u} ψ(u') is an exclusive prefix sum. ψ is zeroed on
    the hidden columns left of each row's diagonal first: the sum then starts at the
    diagonal with exact zeros before it, so no later key touches the row, even in rounding."""
    nq = qb.shape[2]
    s = qb @ k_vis.transpose(-1, -2)
    z = pb @ r_vis.transpose(-1, -2)
    psi = F.logsigmoid(z)
    psi[..., :nq].masked_fill_(hidden, 0.0)
    cum = psi.cumsum_(-1)
    s[..., 1:].addcmul_(cum[..., :-1], slope.view(1, -1, 1, 1))
    if hide_logits:
        s[..., :nq].masked_fill_(hidden, float("-inf"))
    return s, z


class _PathIntegralAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, p, r, slope, block):
        B, H, Tq, D = q.shape
        scale = 1.0 / math.sqrt(D)
        qs, pf = q.float() * scale, p.float() / p.shape[-1]
        k_rev, v_rev, r_rev = (t.float().flip(2) for t in (k, v, r))
        sl = slope.float()
        out = torch.empty(B, H, Tq, D, device=q.device)
        lse = torch.empty(B, H, Tq, 1, device=q.device)
        for s0 in range(0, Tq, block):
            s1 = min(s0 + block, Tq)
            first = Tq - s1          # reversed index of the block's last visible key
            hidden = _hidden(s1 - s0, q.device)
            S, _ = _block_logits(qs[:, :, s0:s1], k_rev[:, :, first:], pf[:, :, s0:s1],
                                 r_rev[:, :, first:], sl, hidden)
            m = S.amax(-1, keepdim=True)
            S = _exp_visible(S.sub_(m), hidden)
            l = S.sum(-1, keepdim=True)
            out[:, :, s0:s1] = (S @ v_rev[:, :, first:]).div_(l)
            lse[:, :, s0:s1] = m + l.log()
        ctx.save_for_backward(q, k, v, p, r, slope, out, lse)
        ctx.block = block
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, p, r, slope, out, lse = ctx.saved_tensors
        block, want_slope = ctx.block, ctx.needs_input_grad[5]
        Tq, D = q.shape[2], q.shape[3]
        dp = p.shape[-1]
        scale = 1.0 / math.sqrt(D)
        qs, pf = q.float() * scale, p.float() / dp
        k_rev, v_rev, r_rev = (t.float().flip(2) for t in (k, v, r))
        sl = slope.float()
        do = grad_out.float()
        delta = (do * out).sum(-1, keepdim=True)           # rowsum(dO ∘ O) = Σ_j P dP
        dq, dpq = torch.zeros_like(qs), torch.zeros_like(pf)
        dk_rev, dv_rev, dr_rev = torch.zeros_like(k_rev), torch.zeros_like(v_rev), torch.zeros_like(r_rev)
        dslope = torch.zeros_like(sl)
        for s0 in range(0, Tq, block):
            s1 = min(s0 + block, Tq)
            first = Tq - s1
            kv, vv, rv = k_rev[:, :, first:], v_rev[:, :, first:], r_rev[:, :, first:]
            qb, pb, dob = qs[:, :, s0:s1], pf[:, :, s0:s1], do[:, :, s0:s1]
            hidden = _hidden(s1 - s0, q.device)
            P, z = _block_logits(qb, kv, pb, rv, sl, hidden, hide_logits=False)
            P = _exp_visible(P.sub_(lse[:, :, s0:s1]), hidden)
            dv_rev[:, :, first:] += P.transpose(-1, -2) @ dob
            dS = (dob @ vv.transpose(-1, -2)).sub_(delta[:, :, s0:s1]).mul_(P)
            del P
            dq[:, :, s0:s1] = dS @ kv
            dk_rev[:, :, first:] += dS.transpose(-1, -2) @ qb
            # ψ(u) feeds every later column: dψ(u) = Σ_{u'>u} dS(u') = -Σ_{u'<=u} dS(u'),
            # the rows of dS summing to zero; hidden columns (dS = 0) get exactly 0.
            neg_dpsi = dS.cumsum_(-1)
            if want_slope:
                dslope -= (neg_dpsi * F.logsigmoid(z)).sum((0, 2, 3))
            # dz = dψ · m · sigmoid(-z) = -neg_dpsi · (1 - sigmoid(z)) · m; m applied after the matmuls
            neg_dz = torch.addcmul(neg_dpsi, neg_dpsi, z.sigmoid_(), value=-1.0)
            dpq[:, :, s0:s1] = neg_dz @ rv
            dr_rev[:, :, first:] += neg_dz.transpose(-1, -2) @ pb
        m = -sl.view(1, -1, 1, 1)                          # pf already carries the 1/dp
        grads = (dq * scale, dk_rev.flip(2), dv_rev.flip(2), dpq * m / dp, dr_rev.flip(2) * m, dslope)
        inputs = (q, k, v, p, r, slope)
        return (*(g.to(t.dtype) if ctx.needs_input_grad[i] else None
                  for i, (g, t) in enumerate(zip(grads, inputs))), None)
