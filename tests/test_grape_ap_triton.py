"""The GRAPE-AP Triton kernel against the dense reference (dense.dense_attention).

Without a GPU the kernels run in Triton's interpreter, which must be switched on before the
first ``import triton`` in the process: set it here (grape_ap_triton.py does the same).
Shapes are small because the interpreter is slow; block sizes of 16/32 make every case walk
several key blocks, with ragged tails and blocks that hold no visible key for some rows.
"""
import contextlib
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from modeling import grape_ap_triton as gat                       # noqa: E402
from modeling.attention import dense_attention, dense_logits     # noqa: E402
from grape import GrapeAP  # noqa: E402
from modeling.cache import LayerCache
from modeling.bias import PathIntegralBias

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL, RTOL = 2e-5, 2e-5


def _inputs(B, H, Tq, Tk, D, dp, seed=0, slope_scale=1.0, p_scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt).requires_grad_()

    q, k, v = leaf(B, H, Tq, D, dt=dtype), leaf(B, H, Tk, D, dt=dtype), leaf(B, H, Tk, D, dt=dtype)
    p, r = leaf(B, H, Tq, dp, scale=p_scale), leaf(B, H, Tk, dp)
    slope = (torch.rand(H, generator=g) * slope_scale + 0.05).to(DEVICE).requires_grad_()
    return q, k, v, p, r, slope


def _bias(p, r, slope, offset=3):
    Tq, Tk = p.shape[2], r.shape[2]
    return PathIntegralBias(Tq, Tk, offset + Tk - Tq, p=p, r=r, slope=slope)


def _grads(out, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return torch.autograd.grad(out, leaves, grad_out)


@contextlib.contextmanager
def _deterministic(on: bool = True):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def _assert_close(name, got, want, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,H,Tq,Tk,D,dp,block_m,block_n", [
    (2, 2, 37, 37, 16, 8, 16, 16),     # T not a multiple of the block, B > 1, H > 1
    (1, 2, 20, 45, 16, 8, 32, 16),     # Tq < Tk (chunked prefill); query block wider than key block
    (1, 2, 20, 45, 24, 6, 16, 32),     # key block wider than query block; D and dp padded
    (1, 1, 1, 40, 16, 8, 16, 16),      # decoding: one query against every key
])
def test_forward_and_gradients_match_dense(B, H, Tq, Tk, D, dp, block_m, block_n):
    leaves = _inputs(B, H, Tq, Tk, D, dp)
    q, k, v, p, r, slope = leaves
    want = dense_attention(q, k, v, _bias(p, r, slope))
    got = gat.grape_ap_attention(q, k, v, p, r, slope, None, block_m, block_n)
    assert got.shape == want.shape == (B, H, Tq, D) and got.dtype == q.dtype
    _assert_close("output", got, want)
    for name, g_got, g_want in zip(("q", "k", "v", "p", "r", "slope"), _grads(got, leaves), _grads(want, leaves)):
        _assert_close(f"grad {name}", g_got, g_want)


def test_strongly_negative_bias_stays_finite_and_matches_dense():
    # large slopes and probes push logsigmoid far below 0: biases of several hundred, rows
    # whose far keys underflow to probability 0, and the backward's R_t - prefix rebuild
    leaves = _inputs(1, 2, 40, 40, 16, 8, seed=2, slope_scale=4.0, p_scale=8.0)
    q, k, v, p, r, slope = leaves
    bias = _bias(p, r, slope)
    assert bias.dense().min() < -200
    want = dense_attention(q, k, v, bias)
    got = gat.grape_ap_attention(q, k, v, p, r, slope, None, 16, 16)
    _assert_close("output", got, want)
    for name, g_got, g_want in zip("qkvprs", _grads(got, leaves), _grads(want, leaves)):
        assert torch.isfinite(g_got).all(), name
        _assert_close(f"grad {name}", g_got, g_want, atol=1e-4, rtol=1e-4)


def test_backend_entry_with_model_layout_and_cache_matches_dense():
    """End to end through grape.GrapeAP: q/k/v in the model's (B, T, H, D) -> (B, H, T, D)
    transposed layout, r built from p by RMS-norm + rotation in autograd, and a second chunk
    attending to cached keys (Tq < Tk, absolute offset). Gradients reach x and W_p."""
    torch.manual_seed(0)
    B, H, D, C, T1, T2 = 1, 2, 16, 32, 19, 14
    enc = GrapeAP(SimpleNamespace(n_head=H, head_dim=D, n_embd=C, p_tie_mode="none", p_head_dim=8)).to(DEVICE)
    x = torch.randn(B, T1 + T2, C, device=DEVICE, requires_grad=True)
    qkv = torch.nn.Linear(C, 3 * C, bias=False).to(DEVICE)

    def project(xs):
        return [t.view(B, xs.shape[1], H, D).transpose(1, 2) for t in qkv(xs).split(C, dim=-1)]

    outs = {}
    for backend, attend in (("dense", dense_attention), ("triton", gat.grape_ap_triton_attention)):
        cache, chunks = LayerCache(), []
        k_all = v_all = None
        for start, stop in ((0, T1), (T1, T1 + T2)):
            xs = x[:, start:stop]
            q, k, v = project(xs)
            q, k, bias = enc(xs, q, k, v, offset=start, cache=cache)
            k_all = k if k_all is None else torch.cat([k_all, k], 2)
            v_all = v if v_all is None else torch.cat([v_all, v], 2)
            cache.length += stop - start
            chunks.append(attend(q, k_all, v_all, bias))
        out = torch.cat(chunks, 2)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        grads = torch.autograd.grad((out * weights).sum(), (x, enc.p_proj.weight, qkv.weight))
        outs[backend] = (out, *grads)
    for name, got, want in zip(("output", "x", "W_p", "W_qkv"), outs["triton"], outs["dense"]):
        _assert_close(name, got, want)


class _LaunchSpy:
    """Stands in for a Triton kernel and records the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("B,H,Tq,Tk,D,dp,block_m,block_n", [
    (2, 1, 37, 37, 16, 8, 16, 16),     # two batch rows: two launches of one head each below
    (1, 2, 20, 45, 24, 6, 16, 32),     # Tq < Tk; key block wider than query block
])
def test_deterministic_backward_matches_dense_and_repeats_bit_for_bit(monkeypatch, B, H, Tq, Tk, D, dp,
                                                                      block_m, block_n):
    """Under torch.use_deterministic_algorithms(True) the backward runs the key-block-outer pass
    (no atomics: see the sm_90 compile test), agrees with the dense reference, gives the same
    bits twice, and the same bits again when the running sums are kept for one head at a time."""
    leaves = _inputs(B, H, Tq, Tk, D, dp, seed=5)
    want = _grads(dense_attention(leaves[0], leaves[1], leaves[2], _bias(*leaves[3:])), leaves)
    spy = _LaunchSpy(gat._bwd_keys_kernel)
    monkeypatch.setattr(gat, "_bwd_keys_kernel", spy)

    def grads():
        return _grads(gat.grape_ap_attention(*leaves, None, block_m, block_n), leaves)

    with _deterministic():
        first, second = grads(), grads()
        monkeypatch.setattr(gat, "CARRY_BUDGET_BYTES", 1)
        one_head_at_a_time = grads()
    n_key_blocks = -(-Tk // block_n)
    assert spy.grids == [(n_key_blocks, B * H)] * 2 + [(n_key_blocks, 1)] * (B * H)
    fast = grads()                                                # deterministic mode off again
    assert len(spy.grids) == 2 + B * H
    for name, a, b, c, d, w in zip("qkvprs", first, second, one_head_at_a_time, fast, want):
        _assert_close(f"grad {name}", a, w)
        _assert_close(f"grad {name} (atomic variant)", d, w)
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the two
    ops that torch.compile sees, checked by torch.library.opcheck against real runs."""
    q, k, v, p, r, slope = _inputs(1, 2, 20, 20, 16, 8, seed=6)
    args = (q, k, v, p, r, slope, 0.25, 16, 16)
    torch.library.opcheck(gat._forward_op, args)
    with torch.no_grad():
        o, lse, row_total = gat._forward_op(*args)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    plain = [x.detach() for x in (q, k, v, p, r, slope)]
    for deterministic in (False, True):
        torch.library.opcheck(gat._backward_op, (do, *plain, o, lse, row_total, 0.25, 16, 16, deterministic))


def test_compiled_fullgraph_traces_through_the_kernel():
    """torch.compile(fullgraph=True) of forward + backward through the kernel: no graph break
    (the ops are traced, not skipped), and the same numbers as eager."""
    leaves = _inputs(1, 2, 33, 33, 16, 8, seed=8)

    def loss(q, k, v, p, r, slope):
        return (gat.grape_ap_attention(q, k, v, p, r, slope, None, 16, 16) ** 2).sum()

    explained = torch._dynamo.explain(loss)(*leaves)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for name, got, want in zip("qkvprs", torch.autograd.grad(compiled(*leaves), leaves),
                               torch.autograd.grad(loss(*leaves), leaves)):
        _assert_close(f"grad {name}", got, want, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# 16-bit inputs: the kernel's real bfloat16 / float16 path against bounds derived from rounding
# ----------------------------------------------------------------------------------------

def _rounding_bounds(q, k, v, p, r, slope, grad_out, want, unit):
    """Elementwise first-order bounds on |kernel - exact| for 16-bit q/k/v with unit roundoff
    ``unit``, given the exact (float32 dense) output and gradients ``want``.

    The kernel rounds exactly these values to q's dtype: the softmax weights P before P @ V,
    the output O, P again before dV = P^T dO, and dS before dQ = dS K and dK = dS^T Q (products
    of 16-bit operands are exact, sums float32). So |dO_t . (O~ - O)| bounds the error of
    Delta_t = rowsum(dO * O~), which reaches dS = P (dP - Delta) and, through the prefix sums
    dpsi(t, l) = sum_{j<l} dS(t, j) (|.| <= err Delta_t), dp, dr and the slope.
    """
    f64 = [x.detach().double() for x in (q, k, v, p, r, slope, grad_out)]
    q, k, v, p, r, slope, do = f64
    d, dp_width = q.shape[-1], p.shape[-1]
    scale = 1.0 / math.sqrt(d)
    bias = _bias(p, r, slope)
    probs = torch.softmax(dense_logits(q, k, bias).double(), -1)
    visible = probs > 0
    out = probs @ v
    o_err = unit * (probs @ v.abs() + out.abs())
    delta_err = (do.abs() * o_err).sum(-1, keepdim=True)                  # (B, H, Tq, 1)
    ds = probs * (do @ v.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    ds_err = unit * ds.abs() + probs * delta_err
    z = p @ r.transpose(-1, -2) / dp_width
    dpsi_err = delta_err * visible
    dz_err = dpsi_err * slope.view(1, -1, 1, 1) * torch.sigmoid(-z) / dp_width
    g_q, g_k, g_v = (w.double().abs() for w in want[1:4])
    return {
        "output": o_err,
        "q": scale * ds_err @ k.abs() + unit * g_q,
        "k": scale * ds_err.transpose(-1, -2) @ q.abs() + unit * g_k,
        "v": unit * probs.transpose(-1, -2) @ do.abs() + unit * g_v,
        "p": dz_err @ r.abs(),
        "r": dz_err.transpose(-1, -2) @ p.abs(),
        "slope": (dpsi_err * F.logsigmoid(z).abs()).sum((0, 2, 3)),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(40, 40), (20, 45)])
def test_16bit_path_stays_within_its_rounding_bound(gpu_bfloat16_arithmetic, dtype, deterministic, Tq, Tk):
    """The kernel on 16-bit q/k/v (the model's autocast dtype on a GPU), against the float32
    dense reference on the same (exactly representable) values: every output and gradient
    element within the first-order bound that the kernel's roundings imply (unit roundoff 2^-8
    for bfloat16, 2^-11 for float16, times the magnitudes summed), plus the float32 path's own
    tolerance. The errors of out, dq, dk, dv reach 17-70% of the bound (seeds fixed), where the
    same kernel on float32 copies of the inputs stays below 0.3% of it: the 16-bit path really
    ran, and the bound is not loose."""
    assert gat._dot_reads(dtype)
    unit = torch.finfo(dtype).eps / 2
    leaves = _inputs(1, 2, Tq, Tk, 16, 8, seed=3, dtype=dtype)
    q, k, v, p, r, slope = leaves
    grad_out = torch.randn(1, 2, Tq, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    exact_leaves = [x.detach().float().requires_grad_() for x in leaves]
    exact = dense_attention(*exact_leaves[:3], _bias(*exact_leaves[3:]))
    want = [exact, *torch.autograd.grad(exact, exact_leaves, grad_out.float())]
    bounds = _rounding_bounds(*leaves, grad_out, want, unit)

    def run(inputs):
        with _deterministic(deterministic):
            out = gat.grape_ap_attention(*inputs, None, 16, 16)
            return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]

    got = run(leaves)
    float32_copies = run([x.detach().float().requires_grad_() for x in leaves])
    assert [g.dtype for g in got] == [dtype] * 4 + [torch.float32] * 3
    for name, g, g32, w in zip(bounds, got, float32_copies, want):
        bound = bounds[name].float() + ATOL + RTOL * w.abs()
        err, err32 = (g.float() - w).abs(), (g32.float() - w).abs()
        assert (err <= bound).all(), f"{name}: worst error / bound = {(err / bound).max():.3f}"
        if name in ("output", "q", "k", "v"):      # rounded in 16 bits; p, r, slope only via Delta
            assert (err / bound).max() > 0.1, f"{name}: {(err / bound).max():.3f} of the bound"
            assert (err32 / bound).max() < 0.01, f"{name}: float32 copies at {(err32 / bound).max():.3f}"


def test_interpreter_without_bfloat16_arithmetic_runs_the_kernels_on_float32_copies():
    """Without the patch the interpreter cannot multiply bfloat16 (``_dot_reads`` finds out);
    the kernels then take float32 copies of the same values: the output is the exact one
    rounded once to bfloat16, the gradients stay within the bound of the real bfloat16 path."""
    if torch.cuda.is_available() or gat._dot_reads(torch.bfloat16):
        pytest.skip("tl.dot reads bfloat16 here")
    leaves = _inputs(1, 2, 21, 21, 16, 8, dtype=torch.bfloat16)
    grad_out = torch.randn(1, 2, 21, 16, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    exact_leaves = [x.detach().float().requires_grad_() for x in leaves]
    exact = dense_attention(*exact_leaves[:3], _bias(*exact_leaves[3:]))
    want = [exact, *torch.autograd.grad(exact, exact_leaves, grad_out.float())]
    out = gat.grape_ap_attention(*leaves, None, 16, 16)
    got = [out, *torch.autograd.grad(out, leaves, grad_out)]
    unit = torch.finfo(torch.bfloat16).eps / 2
    assert [g.dtype for g in got] == [torch.bfloat16] * 4 + [torch.float32] * 3
    assert ((out.float() - exact).abs() <= unit * exact.abs() + ATOL + RTOL * exact.abs()).all()
    bounds = _rounding_bounds(*leaves, grad_out, want, unit)
    for name, g, w in zip(bounds, got, want):
        assert ((g.float() - w).abs() <= bounds[name].float() + ATOL + RTOL * w.abs()).all(), name


def test_rejects_unsupported_inputs_with_clear_errors():
    q, k, v, p, r, slope = (t.detach() for t in _inputs(1, 2, 8, 8, 16, 8))
    with pytest.raises(TypeError, match="float64"):
        gat.grape_ap_attention(q.double(), k.double(), v.double(), p, r, slope)
    with pytest.raises(TypeError, match="share one dtype"):
        gat.grape_ap_attention(q, k.half(), v, p, r, slope)
    with pytest.raises(ValueError, match="p .* must be"):
        gat.grape_ap_attention(q, k, v, p[:, :, :4], r, slope)
    with pytest.raises(ValueError, match="more queries"):
        gat.grape_ap_attention(q, k[:, :, :4], v[:, :, :4], p, r[:, :, :4], slope)
    with pytest.raises(ValueError, match="slope"):
        gat.grape_ap_attention(q, k, v, p, r, slope[:1])
    with pytest.raises(ValueError, match="4-D"):
        gat.grape_ap_attention(q[0], k, v, p, r, slope)
    with pytest.raises(ValueError, match="power of two"):
        gat.grape_ap_attention(q, k, v, p, r, slope, None, 24, 16)
    with pytest.raises(TypeError, match="PathIntegralBias"):
        gat.grape_ap_triton_attention(q, k, v, bias=object())


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (and vice versa): compile every
    kernel ahead of time for sm_90 down to a cubin, in a fresh process with the interpreter off,
    and count the atomic instructions in the PTX."""
    import subprocess
    import sys
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    code = "from modeling import grape_ap_triton as g; print(g.compile_for_gpu(90, 64, 'bf16'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = eval(done.stdout.strip().splitlines()[-1])      # {kernel: (registers, spills, atomics)}
    assert set(report) == {"_fwd_kernel", "_bwd_kernel", "_bwd_kernel_deterministic", "_bwd_keys_kernel"}
    # the fast backward adds dk, dv, dr with atomics; the deterministic one has none at all
    assert report["_bwd_kernel"][2] > 0
    assert report["_fwd_kernel"][2] == report["_bwd_kernel_deterministic"][2] == report["_bwd_keys_kernel"][2] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured on a GPU")
def test_gpu_memory_grows_linearly_not_with_t_squared():
    B, H, T, D, dp = 1, 4, 8192, 64, 8
    leaves = _inputs(B, H, T, T, D, dp, dtype=torch.bfloat16)
    q, k, v, p, r, slope = leaves
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = gat.grape_ap_attention(q, k, v, p, r, slope)
    _grads(out, leaves[:5])
    torch.cuda.synchronize()
    one_fp32_score_matrix = B * H * T * T * 4
    assert torch.cuda.max_memory_allocated() - base < one_fp32_score_matrix / 4
