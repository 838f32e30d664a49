"""The GRAPE-AP Triton kernel against the dense reference (attention_common.dense_attention).

Without a GPU the kernels run in Triton's interpreter, which must be switched on before the
first ``import triton`` in the process: set it here (grape_ap_triton.py does the same).
Shapes are small because the interpreter is slow; block sizes of 16/32 make every case walk
several key blocks, with ragged tails and blocks that hold no visible key for some rows.
"""
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import grape_ap_triton as gat                       # noqa: E402
from attention import dense_attention               # noqa: E402
from grape import GrapeAP, LayerCache, PathIntegralBias   # noqa: E402

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


def test_bfloat16_inputs_keep_bfloat16_outputs_and_gradients():
    """q, k, v in bfloat16 give a bfloat16 output and bfloat16 gradients (p, r, slope keep their
    float32). Under the CPU interpreter the kernel computes on float32 copies of q, k, v (the
    interpreter's tl.dot mis-reads bfloat16): there the result must be the float32 dense
    reference on the same values, rounded once to bfloat16. The bfloat16 tensor-core
    arithmetic itself only runs on a GPU, where the tolerance is bfloat16's."""
    leaves = _inputs(1, 2, 21, 21, 16, 8, dtype=torch.bfloat16)
    q, k, v, p, r, slope = leaves
    got = gat.grape_ap_attention(q, k, v, p, r, slope, None, 16, 16)
    assert got.dtype == torch.bfloat16
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    g_got = torch.autograd.grad(got, leaves, grad_out)
    assert [g.dtype for g in g_got] == [t.dtype for t in leaves]
    if DEVICE == "cpu":
        ref = [t.detach().float().requires_grad_() for t in leaves]     # the same values, in float32
        want = dense_attention(*ref[:3], _bias(*ref[3:]))
        g_want = torch.autograd.grad(want, ref, grad_out.float())
        bf16_step = 2.0 ** -8                                            # one rounding to bfloat16
        _assert_close("output", got, want, atol=1e-6, rtol=bf16_step)
        for name, g, w in zip("qkvprs", g_got, g_want):
            rtol = bf16_step if g.dtype == torch.bfloat16 else RTOL
            _assert_close(f"grad {name}", g, w, atol=ATOL * w.abs().max().item(), rtol=rtol)
    else:
        want = dense_attention(q, k, v, _bias(p, r, slope))
        g_want = torch.autograd.grad(want, leaves, grad_out)
        _assert_close("output", got, want, atol=2e-2, rtol=2e-2)
        for name, g, w in zip("qkvprs", g_got, g_want):
            _assert_close(f"grad {name}", g, w, atol=5e-2, rtol=5e-2)


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
    """The interpreter accepts code the GPU compiler rejects (and vice versa): compile both
    kernels ahead of time for sm_90 down to a cubin, in a fresh process with the interpreter off."""
    import subprocess
    import sys
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    code = "import grape_ap_triton as g; print(g.compile_for_gpu(90, 64, 'bf16'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = eval(done.stdout.strip().splitlines()[-1])
    assert set(report) == {"_fwd_kernel", "_bwd_kernel"}


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
