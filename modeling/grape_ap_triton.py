"""GRAPE-AP attention as a Triton flash-attention kernel: linear memory, no (T, T) tensor.

Per head, with z_{tl} = <p_t, r_l> / d_p and psi(t, l) = m_h * logsigmoid(z_{tl}):

    logit(t, j) = q_t . k_j * sm_scale + b(t, j),    b(t, j) = sum_{j < l <= t} psi(t, l),

causal (j <= t), so the diagonal bias is 0. The bias is a suffix sum along each row, which
no separable score_mod can express; the kernels below evaluate it block by block:

- forward (one program per query block): walk key blocks from the diagonal down to 0,
  carrying carry_t = sum of psi(t, l) over the blocks already passed. Inside a block,
  b = carry + reverse exclusive cumsum of psi. Online softmax as in FlashAttention-2. Saves
  the log-sum-exp and the row total R_t = sum_{l <= t} psi(t, l) for the backward.
- backward (one program per query block): walk key blocks from 0 up to the diagonal. The
  bias is rebuilt as b = (R_t - sum of psi over earlier blocks) - inclusive cumsum; the bias
  gradient dpsi(t, l) = sum_{j < l} dS_{tj} is an exclusive prefix sum of dS carried along
  the same walk. dq and dp stay in registers; the key-side gradients (dk, dv, dr) are
  summed over query blocks with float32 atomics, whose order (so the rounding) varies from
  run to run. Rebuilding b from R_t instead of the forward's suffix sums costs about one
  float32 ulp of |R_t| per logit (|R_t| grows ~linearly in t, e.g. ~1e-4 absolute at
  |R_t| ~ 2000): negligible next to bfloat16, and the price of getting dpsi as a true prefix
  sum (a suffix-sum backward would add the rounding error of Delta to dpsi at every key).
- deterministic backward (chosen when ``torch.are_deterministic_algorithms_enabled()``): the
  same query-block walk stores, at every key-block boundary, the two running row sums (psi
  and dS over the earlier blocks: 8 bytes x Tk / BLOCK_N per query row, in slices of heads
  that keep this buffer under CARRY_BUDGET_BYTES) instead of adding key-side gradients; a
  second, key-block-outer pass (one program per key block) restarts every tile from those
  sums and adds dk, dv, dr over the query blocks in a fixed order. No atomics (the sm_90
  compile in ``compile_for_gpu`` counts them), every output written by one program: the
  same inputs give the same bits. Each tile is recomputed once more: 7 head-dim matmuls per
  tile instead of 5 (not yet timed on a GPU).
- slope gets its gradient too (sum over t, l of dpsi * logsigmoid(z)), from per-row partial
  sums.

Dtypes: q/k/v in float32, float16 or bfloat16 (the model's autocast dtype); p, r, slope and
every accumulator in float32. With 16-bit inputs the two matmuls of each tile take 16-bit
operands (exact products, float32 sums): the softmax weights are rounded to q's dtype before
P @ V, and dS before dS @ K and dS^T @ Q, as in FlashAttention.

Under ``torch.compile`` the kernels are two ``torch.library`` custom ops (forward, backward)
with fake implementations and a registered autograd formula, so a compiled model traces
through them without a graph break; each module copy (checkpoint folders ship their own)
registers under its own namespace.

Status: checked against the dense reference in Triton's interpreter (CPU), bfloat16 included
(the tests give the interpreter the GPU's bfloat16 arithmetic, which it lacks: see
``_dot_reads``), and compiled ahead of time for sm_90 down to a cubin (``compile_for_gpu``);
not yet run on a GPU.

The rotation and RMS-norm that make r from p stay outside, in autograd (grape.GrapeAP).
Without a GPU, Triton runs only through its interpreter: importing this module on a machine
without CUDA sets TRITON_INTERPRET=1 (unless already set) before Triton is imported, so the
same kernels run on CPU tensors (slowly; used by the tests).
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every triton import in one try block: only the triton backend imports this module, and
# transformers' import check of the remote code that checkpoint folders carry (modeling/shipping.py)
# treats imports inside a try as optional, so a folder loads where triton is not installed.
try:
    import triton                      # noqa: E402  (after the interpreter switch above)
    import triton.language as tl       # noqa: E402
    from triton.backends.compiler import GPUTarget                  # noqa: E402
    from triton.runtime.interpreter import InterpretedFunction      # noqa: E402
except ImportError as err:
    raise ImportError("the GRAPE-AP Triton kernel needs triton (pip install triton)") from err

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MIN_DOT = 16            # tl.dot needs every dimension >= 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_ready() -> bool:
    """True when Triton's own jit helpers (tl.zeros, tl.sum...) were built for the interpreter,
    i.e. TRITON_INTERPRET=1 was set before the process first imported triton."""
    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_logsigmoid, InterpretedFunction)


@triton.jit
def _logsigmoid(z):
    # log sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)), stable for both signs
    return tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _fwd_kernel(
    Q, K, V, P, R, SLOPE, O, LSE, ROWSUM,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    spb, sph, spt, spd, srb, srh, srt, srd, sob, soh, sot, sod,
    H, Tq, Tk, D, DP, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    off = Tk - Tq                                   # query row i sits at key index i + off

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_idx = rows + off
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DP)
    row_ok = rows < Tq

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    p = tl.load(P + b * spb + h * sph + rows[:, None] * spt + e[None, :] * spd,
                mask=row_ok[:, None] & (e[None, :] < DP), other=0.0)
    slope = tl.load(SLOPE + h)
    inv_dp = 1.0 / DP

    carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)   # finite: a row may see no key in a block
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    last_key = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, Tq - 1) + off
    n_blocks = last_key // BLOCK_N + 1
    for it in range(0, n_blocks):
        start = (n_blocks - 1 - it) * BLOCK_N       # diagonal block first, then down to 0
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skt + d[None, :] * skd,
                    mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :] * svd,
                    mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        r = tl.load(R + b * srb + h * srh + cols[:, None] * srt + e[None, :] * srd,
                    mask=col_ok[:, None] & (e[None, :] < DP), other=0.0)
        visible = (cols[None, :] <= t_idx[:, None]) & col_ok[None, :]

        z = tl.dot(p, tl.trans(r), input_precision="ieee") * inv_dp
        psi = tl.where(visible, slope * _logsigmoid(z), 0.0)
        # b(t, j) = carry_t + sum_{l in block, l > j} psi(t, l)
        bias = carry[:, None] + (tl.cumsum(psi, axis=1, reverse=True) - psi)
        carry += tl.sum(psi, axis=1)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale + bias
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        prob = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))
    stats = pid_bh.to(tl.int64) * Tq + rows
    tl.store(LSE + stats, m_i + tl.log(l_i), mask=row_ok)
    tl.store(ROWSUM + stats, carry, mask=row_ok)


@triton.jit
def _recompute_tile(q, k, p, r, slope, lse, row_total, psi_before, visible, sm_scale, inv_dp,
                    PRECISION: tl.constexpr):
    """One (query block, key block) tile as the forward saw it: softmax weights P, z, logsigmoid(z)
    and the row sums of psi over the tile. b(t, j) = R_t - sum_{l <= j} psi(t, l)."""
    z = tl.dot(p, tl.trans(r), input_precision="ieee") * inv_dp
    log_sig = _logsigmoid(z)
    psi = tl.where(visible, slope * log_sig, 0.0)
    bias = (row_total - psi_before)[:, None] - tl.cumsum(psi, axis=1)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale + bias
    prob = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    return prob, z, log_sig, tl.sum(psi, axis=1)


@triton.jit
def _bias_gradient(ds, ds_before, visible, z, slope, inv_dp):
    """dpsi(t, l) = sum_{j < l} dS(t, j), an exclusive prefix sum carried across key blocks, and
    dz = dpsi * m_h * sigmoid(-z) / d_p."""
    dpsi = tl.where(visible, ds_before[:, None] + (tl.cumsum(ds, axis=1) - ds), 0.0)
    return dpsi, dpsi * slope * tl.sigmoid(-z) * inv_dp


@triton.jit
def _bwd_kernel(
    Q, K, V, P, R, SLOPE, DO, LSE, ROWSUM, DELTA,
    DQ, DK, DV, DPP, DR, DSLOPE, CARRY_PSI, CARRY_DS,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    spb, sph, spt, spd, srb, srh, srt, srd, sdob, sdoh, sdot, sdod,
    H, Tq, Tk, D, DP, sm_scale, bh_start, n_key_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    # DQ, DK, DV: contiguous float32 (B, H, T, D); DPP, DR: contiguous float32 (B, H, T, DP);
    # DSLOPE: float32 (B, H, Tq), the per-row part of d loss / d m_h. This launch covers heads
    # bh_start + program_id(1). Atomic variant: DK, DV, DR start at 0 and get every query block's
    # share. DETERMINISTIC: they are left to _bwd_keys_kernel, and CARRY_PSI / CARRY_DS
    # (float32, (heads of this launch, n_key_blocks, Tq)) get the running row sums at every
    # key-block boundary.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + bh_start
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    off = Tk - Tq

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_idx = rows + off
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DP)
    row_ok = rows < Tq
    qd_mask = row_ok[:, None] & (d[None, :] < D)
    qe_mask = row_ok[:, None] & (e[None, :] < DP)

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdot + d[None, :] * sdod,
                 mask=qd_mask, other=0.0)
    p = tl.load(P + b * spb + h * sph + rows[:, None] * spt + e[None, :] * spd, mask=qe_mask, other=0.0)
    stats = bh * Tq + rows
    lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
    row_total = tl.load(ROWSUM + stats, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    slope = tl.load(SLOPE + h)
    inv_dp = 1.0 / DP
    carry = tl.program_id(1).to(tl.int64) * n_key_blocks * Tq + rows

    psi_before = tl.zeros([BLOCK_M], dtype=tl.float32)    # sum of psi(t, l) over earlier blocks
    ds_before = tl.zeros([BLOCK_M], dtype=tl.float32)     # sum of dS(t, j) over earlier blocks
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dp = tl.zeros([BLOCK_M, BLOCK_DP], dtype=tl.float32)
    dslope = tl.zeros([BLOCK_M], dtype=tl.float32)

    last_key = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, Tq - 1) + off
    n_blocks = last_key // BLOCK_N + 1
    for it in range(0, n_blocks):
        start = it * BLOCK_N                        # block 0 first, up to the diagonal
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        kd_mask = col_ok[:, None] & (d[None, :] < D)
        ke_mask = col_ok[:, None] & (e[None, :] < DP)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skt + d[None, :] * skd, mask=kd_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :] * svd, mask=kd_mask, other=0.0)
        r = tl.load(R + b * srb + h * srh + cols[:, None] * srt + e[None, :] * srd, mask=ke_mask, other=0.0)
        visible = (cols[None, :] <= t_idx[:, None]) & col_ok[None, :] & row_ok[:, None]
        if DETERMINISTIC:
            tl.store(CARRY_PSI + carry + it * Tq, psi_before, mask=row_ok)
            tl.store(CARRY_DS + carry + it * Tq, ds_before, mask=row_ok)

        prob, z, log_sig, psi_sum = _recompute_tile(q, k, p, r, slope, lse, row_total, psi_before,
                                                    visible, sm_scale, inv_dp, PRECISION)
        psi_before += psi_sum
        ds = prob * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
        dpsi, dz = _bias_gradient(ds, ds_before, visible, z, slope, inv_dp)
        ds_before += tl.sum(ds, axis=1)
        dslope += tl.sum(dpsi * log_sig, axis=1)
        dp += tl.dot(dz, r, input_precision="ieee")

        if not DETERMINISTIC:
            dv_blk = tl.dot(tl.trans(prob.to(do.dtype)), do, input_precision=PRECISION)
            dk_blk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale
            dr_blk = tl.dot(tl.trans(dz), p, input_precision="ieee")
            key_d = bh * Tk * D + cols[:, None] * D + d[None, :]
            tl.atomic_add(DK + key_d, dk_blk, mask=kd_mask)
            tl.atomic_add(DV + key_d, dv_blk, mask=kd_mask)
            tl.atomic_add(DR + bh * Tk * DP + cols[:, None] * DP + e[None, :], dr_blk, mask=ke_mask)

    tl.store(DQ + bh * Tq * D + rows[:, None] * D + d[None, :], dq, mask=qd_mask)
    tl.store(DPP + bh * Tq * DP + rows[:, None] * DP + e[None, :], dp, mask=qe_mask)
    tl.store(DSLOPE + stats, dslope, mask=row_ok)


@triton.jit
def _bwd_keys_kernel(
    Q, K, V, P, R, SLOPE, DO, LSE, ROWSUM, DELTA, DK, DV, DR, CARRY_PSI, CARRY_DS,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    spb, sph, spt, spd, srb, srh, srt, srd, sdob, sdoh, sdot, sdod,
    H, Tq, Tk, D, DP, sm_scale, bh_start, n_key_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr, PRECISION: tl.constexpr,
):
    # The deterministic backward's second pass: one program per key block (same BLOCK_M and
    # BLOCK_N as the _bwd_kernel launch that filled CARRY_PSI / CARRY_DS) walks the query
    # blocks that see it, in order, and writes its dk, dv, dr once.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1) + bh_start
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    off = Tk - Tq

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DP)
    col_ok = cols < Tk
    kd_mask = col_ok[:, None] & (d[None, :] < D)
    ke_mask = col_ok[:, None] & (e[None, :] < DP)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skt + d[None, :] * skd, mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :] * svd, mask=kd_mask, other=0.0)
    r = tl.load(R + b * srb + h * srh + cols[:, None] * srt + e[None, :] * srd, mask=ke_mask, other=0.0)
    slope = tl.load(SLOPE + h)
    inv_dp = 1.0 / DP
    carry = (tl.program_id(1).to(tl.int64) * n_key_blocks + pid_n) * Tq

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dr = tl.zeros([BLOCK_N, BLOCK_DP], dtype=tl.float32)

    first_row = tl.maximum(pid_n * BLOCK_N - off, 0)      # the first query that sees this block
    for m in range(first_row // BLOCK_M, tl.cdiv(Tq, BLOCK_M)):
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        t_idx = rows + off
        row_ok = rows < Tq
        qd_mask = row_ok[:, None] & (d[None, :] < D)
        qe_mask = row_ok[:, None] & (e[None, :] < DP)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd, mask=qd_mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdot + d[None, :] * sdod,
                     mask=qd_mask, other=0.0)
        p = tl.load(P + b * spb + h * sph + rows[:, None] * spt + e[None, :] * spd, mask=qe_mask, other=0.0)
        stats = bh * Tq + rows
        lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
        row_total = tl.load(ROWSUM + stats, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
        psi_before = tl.load(CARRY_PSI + carry + rows, mask=row_ok, other=0.0)
        ds_before = tl.load(CARRY_DS + carry + rows, mask=row_ok, other=0.0)
        visible = (cols[None, :] <= t_idx[:, None]) & col_ok[None, :] & row_ok[:, None]

        prob, z, log_sig, psi_sum = _recompute_tile(q, k, p, r, slope, lse, row_total, psi_before,
                                                    visible, sm_scale, inv_dp, PRECISION)
        ds = prob * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dv += tl.dot(tl.trans(prob.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dpsi, dz = _bias_gradient(ds, ds_before, visible, z, slope, inv_dp)
        dr += tl.dot(tl.trans(dz), p, input_precision="ieee")

    key_d = bh * Tk * D + cols[:, None] * D + d[None, :]
    tl.store(DK + key_d, dk * sm_scale, mask=kd_mask)
    tl.store(DV + key_d, dv, mask=kd_mask)
    tl.store(DR + bh * Tk * DP + cols[:, None] * DP + e[None, :], dr, mask=ke_mask)


@triton.jit
def _dot_probe_kernel(A, C):
    i = tl.arange(0, 16)
    a = tl.load(A + i[:, None] * 16 + i[None, :])
    tl.store(C + i[:, None] * 16 + i[None, :], tl.dot(a, a))


def _block_width(n: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(n))


def _launch_config(backward: bool, head_dim: int, block_m, block_n):
    """(BLOCK_M, BLOCK_N, num_warps). Explicit block sizes (tests) apply to both passes.

    Defaults picked for sm_90 from ptxas resource usage of an ahead-of-time compile (no GPU
    run yet): forward 128x64 / 8 warps (64x64 for head_dim > 64) spills nothing; the backward
    keeps ~10 live tiles plus two row scans, so 32x32 / 8 warps keeps spills to a few dozen bytes.
    """
    if backward:
        default = (32, 32, 8)
    else:
        default = (128, 64, 8) if head_dim <= 64 else (64, 64, 8)
    if block_m is None and block_n is None:
        return default
    return (block_m or default[0], block_n or default[1], default[2])


def _strides(x: Tensor):
    return tuple(x.stride())


def _dot_reads(dtype: torch.dtype) -> bool:
    """Whether tl.dot computes with ``dtype`` operands here. Always on a GPU. Triton 3.9's
    interpreter multiplies bfloat16 operands as their raw 16-bit integers (and truncates float32
    -> bfloat16 casts instead of rounding them to nearest); there the kernels get float32 copies.
    Probed with a small exact product, so a fixed interpreter (or the tests' GPU-arithmetic
    patch) runs the real 16-bit path."""
    if dtype == torch.float32 or not _interpreting():
        return True
    a = (torch.arange(256) % 7 - 3).float().view(16, 16)
    c = torch.empty_like(a)
    _dot_probe_kernel[(1,)](a.to(dtype), c)
    return torch.equal(c, a @ a)


def _check(q: Tensor, k: Tensor, v: Tensor, p: Tensor, r: Tensor, slope: Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("p", p), ("r", r)):
        if x.dim() != 4:
            raise ValueError(f"grape_ap_triton: {name} must be 4-D (B, H, T, dim), got shape {tuple(x.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"grape_ap_triton: q/k/v dtype {q.dtype} is not supported "
                        f"(use float16, bfloat16 or float32; the dense backend handles float64)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"grape_ap_triton: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x in (("p", p), ("r", r), ("slope", slope)):
        if not x.is_floating_point() or x.dtype == torch.float64:
            raise TypeError(f"grape_ap_triton: {name} must be float16, bfloat16 or float32 "
                            f"(the kernel computes it in float32), got {x.dtype}")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if k.shape != (B, H, Tk, D) or v.shape != (B, H, Tk, D):
        raise ValueError(f"grape_ap_triton: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"(B, H, Tk, D) = ({B}, {H}, Tk, {D})")
    if Tq > Tk:
        raise ValueError(f"grape_ap_triton: more queries ({Tq}) than keys ({Tk}); queries are the last Tq keys")
    if Tq == 0:
        raise ValueError("grape_ap_triton: no queries")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"grape_ap_triton: head dim {D} > {MAX_HEAD_DIM} is not supported")
    dp = p.shape[-1]
    if p.shape != (B, H, Tq, dp) or r.shape != (B, H, Tk, dp):
        raise ValueError(f"grape_ap_triton: p {tuple(p.shape)} must be (B, H, Tq, dp) = ({B}, {H}, {Tq}, dp) "
                         f"and r {tuple(r.shape)} must be ({B}, {H}, {Tk}, dp)")
    if dp > MAX_HEAD_DIM:
        raise ValueError(f"grape_ap_triton: probe width {dp} > {MAX_HEAD_DIM} is not supported")
    if slope.shape != (H,):
        raise ValueError(f"grape_ap_triton: slope must be (H,) = ({H},), got {tuple(slope.shape)}")
    devices = {x.device for x in (q, k, v, p, r, slope)}
    if len(devices) != 1:
        raise ValueError(f"grape_ap_triton: all inputs must be on one device, got {sorted(map(str, devices))}")


def _check_runnable(q: Tensor) -> None:
    if q.device.type == "cpu" and not _interpreter_ready():
        raise RuntimeError("grape_ap_triton: CPU tensors need Triton's interpreter, which was not on when "
                           "triton was first imported: set TRITON_INTERPRET=1 in the environment before "
                           "anything imports triton (torch's flex_attention does), or use the dense or "
                           "chunked backend on CPU")


def _kernel_operands(*xs: Tensor):
    """q, k, v (and dO) as the kernels take them: float32 copies where tl.dot cannot read their
    dtype (the interpreter's bfloat16), else unchanged."""
    return xs if _dot_reads(xs[0].dtype) else tuple(x.float() for x in xs)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"     # float32 inputs: exact products


# ----------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (one namespace per module copy)
# ----------------------------------------------------------------------------------------

_OPS = re.sub(r"\W", "_", __name__)

# Deterministic backward: the running row sums of one slice of heads at a time stay below this.
CARRY_BUDGET_BYTES = 256 << 20


@torch.library.custom_op(f"{_OPS}::grape_ap_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, p: Tensor, r: Tensor, slope: Tensor, sm_scale: float,
                block_m: Optional[int], block_n: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(o in q's dtype, log-sum-exp, row total R_t); the last two (B, H, Tq) float32."""
    _check_runnable(q)
    B, H, Tq, D = q.shape
    Tk, dp = k.shape[2], p.shape[-1]
    out_dtype = q.dtype
    q, k, v = _kernel_operands(q, k, v)
    p32, r32, slope32 = p.float(), r.float(), slope.float().contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    row_total = torch.empty_like(lse)
    bm, bn, warps = _launch_config(False, D, block_m, block_n)
    _fwd_kernel[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, p32, r32, slope32, o, lse, row_total,
        *_strides(q), *_strides(k), *_strides(v), *_strides(p32), *_strides(r32), *_strides(o),
        H, Tq, Tk, D, dp, sm_scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_width(D), BLOCK_DP=_block_width(dp),
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=2,
    )
    return o.to(out_dtype), lse, row_total


@_forward_op.register_fake
def _forward_fake(q, k, v, p, r, slope, sm_scale, block_m, block_n):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q), lse, torch.empty_like(lse)


@torch.library.custom_op(f"{_OPS}::grape_ap_backward", mutates_args=())
def _backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, r: Tensor, slope: Tensor,
                 o: Tensor, lse: Tensor, row_total: Tensor, sm_scale: float, block_m: Optional[int],
                 block_n: Optional[int], deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for q, k, v (their dtype), p, r, slope (theirs); contiguous."""
    _check_runnable(q)
    B, H, Tq, D = q.shape
    Tk, dp = k.shape[2], p.shape[-1]
    in_dtype, p_dtype, r_dtype, slope_dtype = q.dtype, p.dtype, r.dtype, slope.dtype
    q, k, v, do = _kernel_operands(q, k, v, do.to(q.dtype))
    p, r, slope = p.float(), r.float(), slope.float().contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()       # rowsum(dO * O), (B, H, Tq)
    f32 = dict(device=q.device, dtype=torch.float32)
    key_grad = torch.empty if deterministic else torch.zeros    # atomics add into zeros
    dq, dpp = torch.empty((B, H, Tq, D), **f32), torch.empty((B, H, Tq, dp), **f32)
    dk, dv, dr = key_grad((B, H, Tk, D), **f32), key_grad((B, H, Tk, D), **f32), key_grad((B, H, Tk, dp), **f32)
    dslope_rows = torch.empty((B, H, Tq), **f32)
    bm, bn, warps = _launch_config(True, D, block_m, block_n)
    n_key_blocks = triton.cdiv(Tk, bn)
    heads = B * H
    if deterministic:      # heads per launch: their running row sums stay within the budget
        chunk = max(1, min(heads, CARRY_BUDGET_BYTES // (8 * n_key_blocks * Tq)))
        carry_psi = torch.empty((chunk, n_key_blocks, Tq), **f32)
        carry_ds = torch.empty_like(carry_psi)
    else:
        chunk, carry_psi, carry_ds = heads, dq, dq               # carries unused
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(p), *_strides(r), *_strides(do))
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_width(D), BLOCK_DP=_block_width(dp),
                  PRECISION=_precision(q.dtype), num_warps=warps, num_stages=1)
    inputs = (q, k, v, p, r, slope, do, lse, row_total, delta)
    for first in range(0, heads, chunk):
        sizes = (*strides, H, Tq, Tk, D, dp, sm_scale, first, n_key_blocks)
        n = min(chunk, heads - first)
        _bwd_kernel[(triton.cdiv(Tq, bm), n)](*inputs, dq, dk, dv, dpp, dr, dslope_rows, carry_psi, carry_ds,
                                              *sizes, DETERMINISTIC=deterministic, **blocks)
        if deterministic:
            _bwd_keys_kernel[(n_key_blocks, n)](*inputs, dk, dv, dr, carry_psi, carry_ds, *sizes, **blocks)
    return (dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), dpp.to(p_dtype), dr.to(r_dtype),
            dslope_rows.sum((0, 2)).to(slope_dtype))


@_backward_op.register_fake
def _backward_fake(do, q, k, v, p, r, slope, o, lse, row_total, sm_scale, block_m, block_n, deterministic):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, p, r, slope))


def _setup_context(ctx, inputs, output):
    q, k, v, p, r, slope, sm_scale, block_m, block_n = inputs
    o, lse, row_total = output
    ctx.mark_non_differentiable(lse, row_total)
    ctx.save_for_backward(q, k, v, p, r, slope, o, lse, row_total)
    ctx.args = (sm_scale, block_m, block_n)


def _backward(ctx, do, _lse_grad, _row_total_grad):
    grads = _backward_op(do, *ctx.saved_tensors, *ctx.args, torch.are_deterministic_algorithms_enabled())
    return (*(g if ctx.needs_input_grad[i] else None for i, g in enumerate(grads)), None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def grape_ap_attention(q: Tensor, k: Tensor, v: Tensor, p: Tensor, r: Tensor, slope: Tensor,
                       sm_scale: float | None = None, block_m: int | None = None,
                       block_n: int | None = None) -> Tensor:
    """Plain-tensor entry point: q (B, H, Tq, D), k/v (B, H, Tk, D), p (B, H, Tq, dp),
    r (B, H, Tk, dp), slope (H,); queries are the last Tq keys. Returns (B, H, Tq, D) in q's
    dtype, differentiable in q, k, v, p, r and slope. Block sizes (None: tuned defaults) are
    powers of two >= 16."""
    for name, n in (("block_m", block_m), ("block_n", block_n)):
        if n is None:
            continue
        if n < MIN_DOT or n & (n - 1):
            raise ValueError(f"grape_ap_triton: {name}={n} must be a power of two >= {MIN_DOT}")
    _check(q, k, v, p, r, slope)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _forward_op(q, k, v, p, r, slope, sm_scale, block_m, block_n)[0]


def grape_ap_triton_attention(q: Tensor, k: Tensor, v: Tensor, bias) -> Tensor:
    """Backend entry point: ``bias`` is a ``bias.PathIntegralBias``; same result as
    ``dense.dense_attention(q, k, v, bias)``."""
    from .bias import PathIntegralBias
    if not isinstance(bias, PathIntegralBias):
        raise TypeError(f"grape_ap_triton: bias must be a PathIntegralBias, got {type(bias).__name__}")
    if (bias.n_queries, bias.n_keys) != (q.shape[2], k.shape[2]):
        raise ValueError(f"grape_ap_triton: the bias covers {bias.n_queries} queries x {bias.n_keys} keys, "
                         f"attention has {q.shape[2]} x {k.shape[2]}")
    return grape_ap_attention(q, k, v, bias.p, bias.r, bias.slope)


def compile_for_gpu(arch: int = 90, head_dim: int = 64, dtype: str = "bf16") -> dict:
    """Ahead-of-time compile every kernel with its default launch config for CUDA sm_<arch>
    (down to a cubin, through ptxas), without a GPU. Returns {kernel: (registers, spill bytes,
    atomic instructions)}; registers and spills are -1 when cuobjdump is not available. Needs
    TRITON_INTERPRET=0 when triton is first imported: ``TRITON_INTERPRET=0 python grape_ap_triton.py``.
    """
    import subprocess
    import tempfile
    if _interpreting():
        raise RuntimeError("compile_for_gpu needs TRITON_INTERPRET=0 before triton is imported")
    io = dict(Q=dtype, K=dtype, V=dtype, O=dtype, DO=dtype)
    kernels = (("_fwd_kernel", _fwd_kernel, False, {}),
               ("_bwd_kernel", _bwd_kernel, True, dict(DETERMINISTIC=False)),
               ("_bwd_kernel_deterministic", _bwd_kernel, True, dict(DETERMINISTIC=True)),
               ("_bwd_keys_kernel", _bwd_keys_kernel, True, {}))
    report = {}
    for label, kernel, backward, extra in kernels:
        bm, bn, warps = _launch_config(backward, head_dim, None, None)
        const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_width(head_dim), BLOCK_DP=MIN_DOT,
                     PRECISION="ieee" if dtype == "fp32" else "tf32", **extra)
        signature = {}
        for name in kernel.arg_names:
            if name in const:
                signature[name] = "constexpr"
            elif name == "sm_scale":
                signature[name] = "fp32"
            elif name in ("H", "D", "DP") or not name.isupper():     # sizes and strides
                signature[name] = "i32"
            else:
                signature[name] = "*" + io.get(name, "fp32")
        compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, const),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=warps, num_stages=1 if backward else 2))
        atomics = len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.", compiled.asm["ptx"], flags=re.MULTILINE))
        usage = ""
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(tool):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([tool, "--dump-resource-usage", f.name],
                                       capture_output=True, text=True).stdout
        fields = dict(kv.split(":") for kv in usage.split() if kv.startswith(("REG:", "STACK:")))
        report[label] = (int(fields.get("REG", -1)), int(fields.get("STACK", -1)), atomics)
    return report


if __name__ == "__main__":
    for hd in (64, 128):
        print(f"sm_90 bf16 head_dim={hd}: (registers, spill bytes, atomics) =", compile_for_gpu(90, hd))
