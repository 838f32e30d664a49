"""Linear-memory attention with an additive bias, in plain PyTorch (the CPU training path).

Nothing here builds a (B, H, Tq, Tk) tensor; activation memory is linear in T.

SeparableBias (ALiBi, FoX, GRAPE-A): the bias matrix has rank <= 4,

    b(t, j) = -(t - j)(sq_t + sk_j) + cq_t - ck_j
            = sq_t · j  +  (-t sq_t + cq_t) · 1  +  1 · (j sk_j - ck_j)  +  (-t) · sk_j,

so it rides along in the q·k product as up to four extra columns of q and k. Attention is
then one ``F.scaled_dot_product_attention`` call (the fused flash kernel on CPU, which keeps
only a logsumexp per row for backward); autograd carries the gradients back to the slopes
and cumulative sums. Positions are centred on the middle key and the cumulative sums on the
middle key's value to keep the extra columns small. Precision (float32): the columns are as
large as T/2 · slope (or half the range of FoX's cumulative sums), and the dot product rounds
at that magnitude, so logits carry an absolute error of ~6e-8 × that (about 1e-4 at T = 4096)
where the dense path rounds each b(t, j) on its own. That is far below bf16 resolution;
it is visible only in float32 comparisons at long T.

PathIntegralBias (GRAPE-AP): b(t, j) = Σ_{j<ℓ≤t} ψ(t, ℓ) is a per-row suffix sum, not low
rank. Queries go in blocks; each block sees its visible keys in *reverse* order, where the
suffix sum becomes a plain prefix ``cumsum`` that starts at the diagonal (accurate for the
near keys that matter, no flips of big tensors). A custom autograd Function keeps only
q, k, v, p, r, the output and a logsumexp per row, and recomputes each block in backward
(flash-attention style), with dψ(t, ℓ) = Σ_{j<ℓ} dS(t, j) as the matching cumsum.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from grape import PathIntegralBias, SeparableBias


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, bias=None, block: Optional[int] = None) -> Tensor:
    if bias is None:
        from attention import sdpa_attention
        return sdpa_attention(q, k, v)
    # float32 maths under autocast too: bias columns as large as T * slope would lose the bias
    # to a 16-bit dot product, and GRAPE-AP's blocks would round logits and weights
    with torch.autocast(q.device.type, enabled=False):
        return _biased_attention(q, k, v, bias, block)


def _biased_attention(q: Tensor, k: Tensor, v: Tensor, bias, block: Optional[int]) -> Tensor:
    if isinstance(bias, SeparableBias):
        return separable_attention(q, k, v, bias)
    if isinstance(bias, PathIntegralBias):
        return path_integral_attention(q, k, v, bias, block)
    raise TypeError(f"the chunked backend does not know the bias type {type(bias).__name__}")


# ----------------------------------------------------------------------------------------
# SeparableBias: fold the rank-4 bias into q and k
# ----------------------------------------------------------------------------------------

def separable_columns(bias: SeparableBias, batch: int, n_heads: int):
    """Extra query/key columns whose dot product is the bias: (B, H, Tq, m), (B, H, Tk, m)."""
    q_pos, k_pos = bias.q_pos, bias.k_pos
    Tq, Tk = q_pos.shape[0], k_pos.shape[0]
    centre = int(k_pos[Tk // 2])
    t = (q_pos - centre).float().view(1, 1, Tq)        # small exact integers in float32
    j = (k_pos - centre).float().view(1, 1, Tk)
    shape_q, shape_k = (batch, n_heads, Tq), (batch, n_heads, Tk)
    q_cols, k_cols = [], []
    a = c = 0.0                      # query-side and key-side terms paired with a constant 1
    if bias.slope_q is not None:
        sq = bias.slope_q.float().expand(shape_q)
        q_cols.append(sq); k_cols.append(j.expand(shape_k))
        a = a - t * sq
    if bias.slope_k is not None:
        sk = bias.slope_k.float().expand(shape_k)
        q_cols.append((-t).expand(shape_q)); k_cols.append(sk)
        c = c + j * sk
    if bias.cum_q is not None:
        # shift both sums by the middle key's value: the difference is unchanged
        ref = bias.cum_k[..., Tk // 2:Tk // 2 + 1].detach().float()
        a = a + (bias.cum_q.float() - ref)
        c = c - (bias.cum_k.float() - ref)
    if not isinstance(a, float):
        q_cols.append(a.expand(shape_q)); k_cols.append(torch.ones(shape_k, device=q_pos.device))
    if not isinstance(c, float):
        q_cols.append(torch.ones(shape_q, device=q_pos.device)); k_cols.append(c.expand(shape_k))
    if not q_cols:
        raise ValueError("SeparableBias has no term")
    return torch.stack(q_cols, -1), torch.stack(k_cols, -1)


def separable_attention(q: Tensor, k: Tensor, v: Tensor, bias: SeparableBias) -> Tensor:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    qc, kc = separable_columns(bias, B, H)
    m = qc.shape[-1]
    width = -(-(D + m) // 8) * 8          # the CPU flash kernel wants equal, aligned widths
    pad = width - D - m
    zq = q.new_zeros((B, H, Tq, pad), dtype=torch.float32)
    zk = q.new_zeros((B, H, Tk, pad), dtype=torch.float32)
    qa = torch.cat([q.float() / math.sqrt(D), qc, zq], -1)
    ka = torch.cat([k.float(), kc, zk], -1)
    va = torch.cat([v.float(), v.new_zeros((B, H, Tk, width - D), dtype=torch.float32)], -1)
    if Tq == Tk:
        out = F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=1.0)
    elif Tq == 1:
        out = F.scaled_dot_product_attention(qa, ka, va, scale=1.0)
    else:
        from attention import causal_mask
        out = F.scaled_dot_product_attention(qa, ka, va, attn_mask=causal_mask(Tq, Tk, q.device), scale=1.0)
    return out[..., :D].to(q.dtype)


# ----------------------------------------------------------------------------------------
# PathIntegralBias: query blocks, keys reversed, recomputation in backward
# ----------------------------------------------------------------------------------------

BLOCK_ELEMENTS = 1 << 23      # (B, H, block, Tk) float32 temporaries of ~32 MiB each

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


def query_block(batch: int, n_heads: int, n_keys: int) -> int:
    """Queries per block: big enough to keep matmuls efficient and Python overhead low,
    small enough that a few (B, H, block, Tk) temporaries stay bounded."""
    return max(32, min(1024, BLOCK_ELEMENTS // max(1, batch * n_heads * n_keys)))


def path_integral_attention(q: Tensor, k: Tensor, v: Tensor, bias: PathIntegralBias,
                            block: Optional[int] = None) -> Tensor:
    if bias.n_keys != k.shape[2] or bias.p.shape[2] != q.shape[2]:
        raise ValueError(f"PathIntegralBias covers {bias.p.shape[2]} queries x {bias.n_keys} keys, "
                         f"attention has {q.shape[2]} x {k.shape[2]}")
    block = block or query_block(q.shape[0], q.shape[1], k.shape[2])
    return _PathIntegralAttention.apply(q, k, v, bias.p, bias.r, bias.slope, block)


def _hidden(nq: int, device) -> Tensor:
    """(nq, nq) True where reversed key column u lies after query row i (u < nq - 1 - i).
    Only the first nq reversed columns of a block can be hidden."""
    i = torch.arange(nq, device=device)
    return i[None, :] < (nq - 1 - i)[:, None]


def _block_logits(qb, k_vis, pb, r_vis, slope, hidden):
    """Logits with the GRAPE-AP bias for one query block, keys in reverse order
    (column u = key kend-1-u). Returns S (B, H, nq, kv), -inf where hidden, and z.

    With keys reversed, b(u) = Σ_{u' < u, u' visible} ψ(u') is an exclusive prefix sum.
    The sum here also runs over the hidden columns left of the diagonal; that adds the same
    constant to every visible logit of a row, which the softmax ignores (and the gradient
    of a hidden ψ is the row sum of dS, zero), so no masking of ψ is needed."""
    nq = qb.shape[2]
    s = qb @ k_vis.transpose(-1, -2)
    z = pb @ r_vis.transpose(-1, -2)
    cum = F.logsigmoid(z).cumsum_(-1)
    s[..., 1:].addcmul_(cum[..., :-1], slope.view(1, -1, 1, 1))
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
            P, z = _block_logits(qb, kv, pb, rv, sl, hidden)
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
