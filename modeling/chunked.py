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

    b(t, j) = sq_t · (j - c_β)  +  A_β(t) · 1  -  (t - c_β) · sk_j  +  1 · C_j,
    A_β(t) = -(t - c_β) sq_t + cq_t - ρ_β,      C_j = (j - c_β) sk_j - (ck_j - ρ_β),

where A_β(t) and -(t - c_β) sit in n_kb query columns each, one per block, facing the key
columns 1[j ∈ β] and sk_j·1[j ∈ β]. A visible key j ≤ t meets only its own block's columns,
whose references come from positions ≤ j; the other blocks' columns (future ones included)
meet exact zeros. Precision: the dot product rounds at the size of its terms, about
|sq|·(block length), |sk|·(t - c_β) or the range of FoX's sums over a block for the near keys
that carry the weight, where the dense path rounds each b(t, j) on its own. Largest float32
output error against a float64 dense reference at T = 2048, with the encodings of
tests/test_attention_backends.py::test_fast_paths_stay_precise_at_long_length:

    ALiBi 5.4e-6, FoX 4.2e-5, GRAPE-A-q 3.0e-6, GRAPE-A-k 5.0e-6, GRAPE-A-qk 4.5e-6
    (dense float32: ~1e-6)

(with one reference at the middle key for every column: ALiBi 9e-6, FoX 1.8e-4, GRAPE-A-q
1.1e-5, GRAPE-A-qk 2.1e-5; with key blocks for sq only and the middle key for sk: GRAPE-A-k
1.1e-5, GRAPE-A-qk 1.6e-5). All far below bf16 resolution. The sk columns cost no time the
flash kernel shows (its widths 72 and 80 ran alike).

PathIntegralBias (GRAPE-AP): b(t, j) = Σ_{j<ℓ≤t} ψ(t, ℓ) is a per-row suffix sum, not low
rank. On CPU in eager mode the fused C++ kernel of grape_ap_cpu.py computes it (the training
path); the tensor-op path here computes the same function where the kernel does not run
(torch.compile, other devices, no C++ compiler). Queries go in blocks; each block sees its
visible keys in *reverse* order, where the suffix sum becomes a plain prefix ``cumsum`` that
starts at the diagonal (accurate for the near keys that matter, no flips of big tensors). ψ of
the keys after a query is zeroed before the cumsum, so they add exact zeros (float32 error at
T = 4096, parameters at init / perturbed: 1.4e-6 / 1.5e-6, against 6.9e-6 / 1.8e-5 when they
entered the sum). A custom autograd Function keeps only q, k, v, p, r and the output, and
recomputes each block in backward (flash-attention style: the same code gives the same
probabilities bit for bit, so no logsumexp is kept), with dψ(t, ℓ) = Σ_{j<ℓ} dS(t, j) as the
matching cumsum. Where the time goes, and why the block code looks as it does (preallocated
buffers, log(sigmoid), torch's softmax kernel): results/BENCHMARKS.md "Attention (CPU)".
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


BLOCK_ELEMENTS = 1 << 21      # (B, H, block, Tk) float32 temporaries of ~8 MiB each: they stay in
                              # cache; 32 MiB ones ran GRAPE-AP's tensor-op path 1.2-2.5x slower


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


def key_blocks(n_keys: int, other_columns: int, head_dim: int, columns_per_block: int = 1) -> int:
    """Number of key blocks: at least MIN_KEY_BLOCKS, more while their columns fit in the
    padding to a multiple of 8 columns; at most one per key."""
    width = -(-(head_dim + other_columns + columns_per_block * MIN_KEY_BLOCKS) // 8) * 8
    return max(1, min(n_keys, (width - head_dim - other_columns) // columns_per_block))


def separable_columns(bias: SeparableBias, batch: int, n_heads: int, head_dim: int):
    """Extra query/key columns whose dot product is the bias: (B, H, Tq, m), (B, H, Tk, m)."""
    Tq, Tk, device = bias.n_queries, bias.n_keys, bias.device
    shape_q, shape_k = (batch, n_heads, Tq), (batch, n_heads, Tk)
    sq = None if bias.slope_q is None else bias.slope_q.float().expand(shape_q)
    sk = None if bias.slope_k is None else bias.slope_k.float().expand(shape_k)
    cq = None if bias.cum_q is None else bias.cum_q.float()
    ck = None if bias.cum_k is None else bias.cum_k.float()
    with_a = sq is not None or cq is not None           # A_β(t) exists
    key_const = sk is not None or cq is not None        # C_j exists
    per_block = with_a + (sk is not None)               # column sets with one column per key block
    other = (sq is not None) + key_const
    length = -(-Tk // (key_blocks(Tk, other, head_dim, per_block) if per_block else 1))    # keys per block
    n_blocks = -(-Tk // length)
    key_idx = torch.arange(Tk, device=device)
    starts = torch.arange(0, Tk, length, device=device)         # first key of each block
    t_idx = torch.arange(Tk - Tq, Tk, device=device)             # query t as a key index
    one_hot = (key_idx[:, None] // length == torch.arange(n_blocks, device=device)).float()
    rho = None if ck is None else ck[..., starts].detach()      # (B, H, n_blocks): cancels exactly
    cols = []                                                    # (query column, key column) pairs
    if sq is not None:
        cols.append((sq[..., None], (key_idx % length).float().expand(shape_k)[..., None]))
    if sk is not None:
        cols.append((-(t_idx[:, None] - starts).float().expand(*shape_q, n_blocks), sk[..., None] * one_hot))
    if key_const:
        c = 0.0 if sk is None else (key_idx % length).float() * sk
        if ck is not None:
            c = c - (ck - rho[..., key_idx // length])
        cols.append((torch.ones(*shape_q, 1, device=device), c.expand(shape_k)[..., None]))
    if with_a:
        a = 0.0 if sq is None else -(t_idx[:, None] - starts).float() * sq[..., None]
        if cq is not None:
            a = a + (cq[..., None] - rho[..., None, :])
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

def path_integral_attention(q: Tensor, k: Tensor, v: Tensor, bias: PathIntegralBias,
                            block: Optional[int] = None) -> Tensor:
    """The fused CPU kernel (grape_ap_cpu.py) where it runs; else, or with ``block`` given (the
    tensor-op path's query block, for tests), the tensor-op path below. Same function."""
    if block is None:
        from .grape_ap_cpu import grape_ap_cpu_attention, serves
        if serves(q, bias.p):
            return grape_ap_cpu_attention(q, k, v, bias.p, bias.r, bias.slope)
    block = block or query_block(q.shape[0], q.shape[1], k.shape[2])
    return _PathIntegralAttention.apply(q, k, v, bias.p, bias.r, bias.slope, block)


def _hidden(nq: int, device) -> Tensor:
    """(nq, nq) True where reversed key column u lies after query row i (u < nq - 1 - i).
    Only the first nq reversed columns of a block can be hidden."""
    i = torch.arange(nq, device=device)
    return i[None, :] < (nq - 1 - i)[:, None]


def _shifted_views(buffer: Tensor, shape) -> tuple[Tensor, Tensor]:
    """Two contiguous views of one flat buffer, the second one element behind the first: a
    row-wise prefix sum written into ``ahead`` reads through ``behind`` shifted one column
    right (behind[..., u] = ahead[..., u - 1]), i.e. as the exclusive sum, without a copy.
    Column 0 of ``behind`` holds the previous row's last sum until the caller zeroes it."""
    n = math.prod(shape)
    return buffer[1:n + 1].view(shape), buffer[:n].view(shape)


def _accumulate(dst: Tensor, a: Tensor, b: Tensor) -> None:
    """dst += a @ b in place (one fused GEMM per (batch, head), no temporary); dst is a slice
    of our own contiguous (B, H, T, d) gradient, so its first two dims always merge."""
    dst.view(-1, *dst.shape[2:]).baddbmm_(a.flatten(0, 1), b.flatten(0, 1))


def _block_operands(q, k, v, p, r):
    """Contiguous float32 q/√d, p/d_p and the keys' k, v, r in reverse order, whatever the
    caller's layout (the model's q, k, v are transposed views): the in-place GEMMs need slices
    whose (batch, head) dims merge, and contiguous operands are the GEMMs' fast case."""
    qs = (q.float() / math.sqrt(q.shape[-1])).contiguous()
    ps = (p.float() / p.shape[-1]).contiguous()
    return (qs, ps, *(t.float().flip(2).contiguous() for t in (k, v, r)))


# logsigmoid(z) = log(sigmoid(z)) while sigmoid(z) is a normal float (z >= -87); below, the
# exact value z - log1p(e^z) rounds to z itself.
LOG_SIGMOID_LOW = -87.0


def _log_sigmoid(z: Tensor, sig: Tensor, out: Tensor) -> None:
    """out = logsigmoid(z), sig = sigmoid(z) (``sig`` and ``out`` may be ``z``'s memory).

    As log(sigmoid(z)): two vectorised passes, 2.3x faster than torch's log_sigmoid/softplus
    kernels (log1p), and as precise: torch's CPU log_sigmoid also rounds log(1 + e^-z) for
    z > 0. Entries below LOG_SIGMOID_LOW, where sigmoid(z) leaves the normal floats (log
    would give -inf), are set to z one by one, so no other entry changes: whether a row
    needs the patch depends on its own z only (causality)."""
    if torch.compiler.is_compiling():          # no data-dependent branch in a traced graph
        low = z < LOG_SIGMOID_LOW
        exact = torch.where(low, z, 0.0)
        torch.log(torch.sigmoid(z, out=sig), out=out)
        out.copy_(torch.where(low, exact, out))
        return
    patch = None
    if z.amin().item() < LOG_SIGMOID_LOW:       # rare: |p_t| > 87 d_p / |r_l| somewhere
        low = z < LOG_SIGMOID_LOW
        patch = low, z[low]
    torch.log(torch.sigmoid(z, out=sig), out=out)
    if patch is not None:
        out[patch[0]] = patch[1]


def _block_probs(buffer: Tensor, sig: Tensor, qb: Tensor, k_rev_t: Tensor, pb: Tensor, r_rev_t: Tensor,
                 slope: Tensor, hidden: Tensor) -> Tensor:
    """softmax(q·k/√d + b) for one query block, keys in reverse order (column u = key
    kend-1-u), computed in ``buffer``, and sigmoid(z) in ``sig`` (which may be ``buffer``:
    the forward needs no sigmoid). Forward and backward call it alike, so the backward's
    probabilities equal the forward's bit for bit and no logsumexp needs keeping.

    With keys reversed, b(u) = Σ_{u' < u} ψ(u') is an exclusive prefix sum, ψ = m·logsigmoid(z).
    logsigmoid is zeroed on the hidden columns first: the sum then starts at the diagonal with
    exact zeros before it, so no later key touches the row, even in rounding. The GEMM adds
    q·k onto the bias in place (beta = 1), and torch's softmax kernel does max, exp, sum and
    scale per row while the row is in cache (and its exp, unlike torch's elementwise one, has
    no slow path for the far keys' arguments below -87)."""
    B, H, nq, _ = qb.shape
    shape = (B, H, nq, k_rev_t.shape[-1])
    log_sig_sum, S = _shifted_views(buffer, shape)
    sig = sig[:log_sig_sum.numel()].view(shape) if sig is not buffer else log_sig_sum
    torch.matmul(pb, r_rev_t, out=sig)                                  # z
    _log_sigmoid(sig, sig, log_sig_sum)
    log_sig_sum[..., :nq].masked_fill_(hidden, 0.0)
    log_sig_sum.cumsum_(-1)
    S[..., 0] = 0.0                     # b at the diagonal: the empty sum
    S.mul_(slope)
    S.view(B * H, nq, -1).baddbmm_(qb.flatten(0, 1), k_rev_t.flatten(0, 1))
    S[..., :nq].masked_fill_(hidden, float("-inf"))
    return torch.ops.aten._softmax.out(S, -1, False, out=S)


class _PathIntegralAttention(torch.autograd.Function):
    """Query blocks against their visible keys in reverse order; backward recomputes each
    block (flash-attention style). Every (B, H, block, keys) matrix lives in preallocated flat
    buffers, updated in place: fresh tensors of that size cost the kernel's page faults on
    every block, more than the arithmetic."""

    @staticmethod
    def forward(ctx, q, k, v, p, r, slope, block):
        B, H, Tq, D = q.shape
        qs, ps, k_rev, v_rev, r_rev = _block_operands(q, k, v, p, r)
        sl = slope.float().view(1, -1, 1, 1)
        out = torch.empty(B, H, Tq, D, device=q.device)
        buffer = torch.empty(B * H * min(block, Tq) * k.shape[2] + 1, device=q.device)
        for s0 in range(0, Tq, block):
            s1 = min(s0 + block, Tq)
            first = Tq - s1          # reversed index of the block's last visible key
            P = _block_probs(buffer, buffer, qs[:, :, s0:s1], k_rev[:, :, first:].transpose(-1, -2),
                             ps[:, :, s0:s1], r_rev[:, :, first:].transpose(-1, -2), sl,
                             _hidden(s1 - s0, q.device))
            out[:, :, s0:s1] = P @ v_rev[:, :, first:]
        ctx.save_for_backward(q, k, v, p, r, slope, out)
        ctx.block = block
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _path_integral_backward(ctx, grad_out)


def _path_integral_backward(ctx, grad_out):
    q, k, v, p, r, slope, out = ctx.saved_tensors
    block, want_slope = ctx.block, ctx.needs_input_grad[5]
    B, H, Tq, D = q.shape
    Tk, dp = k.shape[2], p.shape[-1]
    qs, ps, k_rev, v_rev, r_rev = _block_operands(q, k, v, p, r)
    sl = slope.float().view(1, -1, 1, 1)
    do = grad_out.float().contiguous()
    delta = (do * out).sum(-1, keepdim=True)           # rowsum(dO ∘ O) = Σ_j P dP
    dq, dp_sum = torch.empty_like(qs), torch.empty_like(ps)
    dk_rev, dv_rev, dr_rev = (torch.zeros(t.shape, device=q.device) for t in (k_rev, v_rev, r_rev))
    dslope = torch.zeros(H, device=q.device)
    size = B * H * min(block, Tq) * Tk
    buffer, sig_buffer, grad_buffer = (torch.empty(size + extra, device=q.device) for extra in (1, 0, 0))
    for s0 in range(0, Tq, block):
        s1 = min(s0 + block, Tq)
        first = Tq - s1
        kv, vv, rv = k_rev[:, :, first:], v_rev[:, :, first:], r_rev[:, :, first:]
        qb, pb, dob = qs[:, :, s0:s1], ps[:, :, s0:s1], do[:, :, s0:s1]
        hidden = _hidden(s1 - s0, q.device)
        P = _block_probs(buffer, sig_buffer, qb, kv.transpose(-1, -2), pb, rv.transpose(-1, -2), sl, hidden)
        sig = sig_buffer[:P.numel()].view(P.shape)
        _accumulate(dv_rev[:, :, first:], P.transpose(-1, -2), dob)
        dS = grad_buffer[:P.numel()].view(P.shape)
        torch.matmul(dob, vv.transpose(-1, -2), out=dS).sub_(delta[:, :, s0:s1]).mul_(P)
        dq[:, :, s0:s1] = dS @ kv
        _accumulate(dk_rev[:, :, first:], dS.transpose(-1, -2), qb)
        # ψ(u) feeds every later column: dψ(u) = Σ_{u'>u} dS(u') = Σ_u' dS - Σ_{u'<=u} dS(u').
        # The full row sum is 0 in exact arithmetic but not in float32 (δ comes from the rounded
        # output); subtracting the computed one keeps that residual out of every far column,
        # where it would add up in the probe and slope gradients. Hidden columns get exactly 0.
        neg_dpsi = dS.cumsum_(-1)
        neg_dpsi.sub_(neg_dpsi[..., -1:].clone())[..., :s1 - s0].masked_fill_(hidden, 0.0)
        if want_slope:     # dm = Σ dψ·logsigmoid(z) (the sums are freshly made, slope gradients are rare)
            z = pb @ rv.transpose(-1, -2)
            dslope -= (neg_dpsi * F.logsigmoid(z)).sum((0, 2, 3))
        # dz = dψ·m·sigmoid(-z) = -m·neg_dpsi·(1 - sigmoid(z)); -m applied after the GEMMs
        neg_dz = torch.addcmul(neg_dpsi, neg_dpsi, sig, value=-1.0, out=sig)
        dp_sum[:, :, s0:s1] = neg_dz @ rv
        _accumulate(dr_rev[:, :, first:], neg_dz.transpose(-1, -2), pb)
    # z = p·r/d_p: dp = Σ dz r/d_p = -m (neg_dz @ r)/d_p, dr = Σ dz p/d_p = -m (neg_dzᵀ @ pb)
    grads = (dq / math.sqrt(D), dk_rev.flip(2), dv_rev.flip(2), dp_sum * (-sl / dp), dr_rev.flip(2) * -sl, dslope)
    inputs = (q, k, v, p, r, slope)
    return (*(g.to(t.dtype) if ctx.needs_input_grad[i] else None
              for i, (g, t) in enumerate(zip(grads, inputs))), None)
