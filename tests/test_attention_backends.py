"""Attention backends against the dense reference: values, gradients, decoding, choice.

Every comparison is with ``dense_attention``, which builds the full (B, H, Tq, Tk) bias
from the bias description's own ``dense()`` (an independent, O(T²) evaluation). The list of
additive encodings comes from ``grape.ENCODINGS``: a newly registered encoding is compared on
every backend at T >= 256 without touching this file. A toy encoding, registered only for
its tests, checks that a bias of a new kind runs everywhere through the generic contract.
"""
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from modeling import attention
from modeling import chunked
from modeling.attention import attend, choose_backend, dense_attention, dense_logits
from modeling.chunked import chunked_attention
from grape import ENCODINGS, GRID_ENCODINGS, Encoding, build_encoding
from modeling.bias import Bias, PathIntegralBias, SeparableBias
from modeling.cache import LayerCache
from model import GPT, GPTConfig
from perturbation import perturb_parameters

H, D, C = 3, 8, 24
LONG = 260                  # >= 256, where the CPU runs the fast paths; a multiple of no block size


def encoding_config(name, **kw):
    on_grid = any(part in GRID_ENCODINGS for part in name.split("+"))
    base = dict(n_layer=1, n_head=H, n_embd=C, vocab_size=64, block_size=1024, pos_encoding=name,
                grid=(32, 32) if on_grid else None)     # grid encodings: rows of 32 tokens
    return GPTConfig(**{**base, **kw})      # kw may change the sizes (the CUDA tests' wider heads)


def additive_encodings():
    return sorted(n for n in ENCODINGS if build_encoding(encoding_config(n)).additive)


ADDITIVE = additive_encodings()
CPU_BACKENDS = ["chunked", "flex", "triton"]     # dense is the reference; auto picks chunked


def make_encoding(name, seed=0, **config):
    """An encoding with random (not init-value) parameters, so every gate matters."""
    torch.manual_seed(seed)
    enc = build_encoding(encoding_config(name, **config))
    perturb_parameters(enc, 0.5)
    return enc


def inputs(B, H, T, D, C, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, requires_grad=True)
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
    return x, q, k, v


def values_and_grads(backend, enc, x, q, k, v, split=None, block=None):
    """Run encoding + attention (optionally as prefix then continuation through a cache)
    and return the output and the gradients of a fixed random projection of it."""
    leaves = [x, q, k, v, *enc.parameters()]
    for t in leaves:
        t.grad = None
    fn = attention.BACKENDS[backend] if block is None else (lambda *a: chunked_attention(*a, block=block))
    if split is None:
        qe, ke, bias = enc(x, q, k, v)
        out = fn(qe, ke, v, bias)
    else:
        cache = LayerCache()
        _, k0, _ = enc(x[:, :split], q[:, :, :split], k[:, :, :split], v[:, :, :split], cache=cache)
        cache.length = split
        qe, k1, bias = enc(x[:, split:], q[:, :, split:], k[:, :, split:], v[:, :, split:],
                           offset=split, cache=cache)
        out = fn(qe, torch.cat([k0, k1], 2), v, bias)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out * weight).sum().backward()
    return out.detach(), {i: t.grad.clone() for i, t in enumerate(leaves) if t.grad is not None}


def assert_close_grads(ref, got, rtol=1e-4):
    assert ref.keys() == got.keys()
    for i in ref:
        scale = ref[i].abs().max().clamp_min(1e-6)
        err = (ref[i] - got[i]).abs().max() / scale
        assert err < rtol, f"gradient {i}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ADDITIVE)
def test_chunked_matches_dense_values_and_gradients(name):
    enc = make_encoding(name)
    x, q, k, v = inputs(B=2, H=3, T=75, D=8, C=24)     # 75: not a multiple of the block
    ref_out, ref_grads = values_and_grads("dense", enc, x, q, k, v)
    out, grads = values_and_grads("chunked", enc, x, q, k, v, block=16)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert_close_grads(ref_grads, grads)
    n_params = len(list(enc.parameters()))
    needed = {1, 2, 3, *range(4, 4 + n_params)}          # q, k, v and every encoding parameter
    assert needed <= grads.keys(), f"no gradient for leaves {needed - grads.keys()}"


def compare_with_dense(enc, backend, T=LONG):
    """``backend`` against the dense reference on encoding ``enc`` at length T: the output,
    and the gradients of the input, q, k, v and every parameter of the encoding."""
    x, q, k, v = inputs(B=1, H=H, T=T, D=D, C=C)
    ref_out, ref_grads = values_and_grads("dense", enc, x, q, k, v)
    with torch.no_grad():
        has_score_mod = enc(x, q, k, v)[2].score_mod(1, H) is not None
    if backend == "flex" and has_score_mod and not torch.cuda.is_available():
        # torch has no FlexAttention backward on CPU: the compiled forward is all that runs here
        with torch.no_grad():
            x, q, k, v = (t.detach() for t in (x, q, k, v))
            qe, ke, bias = enc(x, q, k, v)
            out = attend(qe, ke, v, bias, "flex")
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
        return
    out, grads = values_and_grads(backend, enc, x, q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert_close_grads(ref_grads, grads)
    assert set(range(1, 4 + len(list(enc.parameters())))) <= grads.keys()   # q, k, v, parameters


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ADDITIVE)
def test_every_additive_encoding_matches_dense_on_every_cpu_backend_at_long_length(name, backend):
    compare_with_dense(make_encoding(name), backend)


def test_grape_ap_tensor_op_path_matches_dense_at_long_length(monkeypatch):
    """GRAPE-AP's tensor-op path (where the CPU kernel does not run: under torch.compile, in a
    checkpoint folder, without a compiler), in several query blocks, against dense: the
    output and the gradients of x, q, k, v and every parameter of the encoding."""
    from modeling import grape_ap_cpu
    monkeypatch.setenv(grape_ap_cpu.SWITCH, "0")
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 64 * H * LONG)         # queries in blocks of 64
    calls = []
    real = chunked._PathIntegralAttention.apply
    monkeypatch.setattr(chunked._PathIntegralAttention, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    compare_with_dense(make_encoding("grape_ap"), "chunked")
    assert calls == [64]


def float64_reference(q, k, v, bias, rows=512):
    """softmax(q·k/√d + b) v in float64, a few query rows at a time."""
    full, T = bias.dense().double(), q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s in range(0, T, rows):
        logits = q[:, :, s:s + rows].double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        logits = logits + full[..., s:s + rows, :]
        hidden = torch.arange(T)[None, :] > torch.arange(s, min(T, s + rows))[:, None]
        out[:, :, s:s + rows] = torch.softmax(logits.masked_fill(hidden, float("-inf")), -1) @ v.double()
    return out


# Largest output error of the fast paths at T = 2048 against float64 (dense float32: ~1e-6),
# measured 5.4e-6 (ALiBi), 4.2e-5 (FoX), 3.0e-6 (GRAPE-A-q), 5.0e-6 (GRAPE-A-k), 4.5e-6
# (GRAPE-A-qk), 7e-7 (GRAPE-AP, the CPU kernel); the bounds leave 1.3-2x for other CPUs' BLAS.
# Before the key blocks (one reference at the middle key for every column) the separable path
# gave 9e-6 (ALiBi), 1.8e-4 (FoX), 1.1e-5 (GRAPE-A-q), 2.1e-5 (GRAPE-A-qk); with key blocks
# for the query slope only, GRAPE-A-k 1.1e-5 and GRAPE-A-qk 1.6e-5 (the key-slope term
# -(t - c)·sk_j rounded at |sk|·T/2); GRAPE-AP 1.1e-5 while the ψ of later keys entered its cumsum.
FAST_PATH_ERROR = {"alibi": 7e-6, "fox": 8e-5, "grape_a_q": 6e-6, "grape_a_k": 8e-6, "grape_a_qk": 8e-6,
                   "grape_ap": 2e-6}


@pytest.mark.parametrize("name", sorted(FAST_PATH_ERROR))
def test_fast_paths_stay_precise_at_long_length(name):
    enc = make_encoding(name)
    x, q, k, v = (t.detach() for t in inputs(B=1, H=H, T=2048, D=D, C=C))
    with torch.no_grad():
        qe, ke, bias = enc(x, q, k, v)
        err = (chunked_attention(qe, ke, v, bias).double() - float64_reference(qe, ke, v, bias)).abs().max()
    assert err < FAST_PATH_ERROR[name], f"{name}: {err:.2e}"


@pytest.mark.parametrize("name", ADDITIVE)
@pytest.mark.parametrize("split", [74, 60])          # Tq = 1 (one-token decoding) and Tq = 15
def test_chunked_decoding_with_cache_matches_dense(name, split):
    enc = make_encoding(name)
    x, q, k, v = inputs(B=2, H=3, T=75, D=8, C=24)
    ref_out, ref_grads = values_and_grads("dense", enc, x, q, k, v, split=split)
    out, grads = values_and_grads("chunked", enc, x, q, k, v, split=split, block=8)
    assert out.shape[2] == 75 - split
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert_close_grads(ref_grads, grads)


def dense_then_chunked(q, k, v, make_bias, leaves, block):
    """(output, leaf gradients) of the dense reference, then of the chunked path."""
    results = []
    for run in (dense_attention, lambda *a: chunked_attention(*a, block=block)):
        for t in leaves:
            t.grad = None
        out = run(q, k, v, make_bias())
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [t.grad.clone() for t in leaves]))
    return results


def test_gradients_reach_every_bias_tensor():
    """Bias dataclasses built by hand, every field a leaf (GRAPE-AP's slope included); the
    toy bias goes through the generic tiles."""
    torch.manual_seed(0)
    B, H, Tq, Tk, D = 2, 2, 40, 50, 8
    q = torch.randn(B, H, Tq, D, requires_grad=True)
    k, v = (torch.randn(B, H, Tk, D, requires_grad=True) for _ in range(2))
    offset = Tk - Tq + 3
    sq, sk = torch.rand(B, H, Tq, requires_grad=True), torch.rand(B, H, Tk, requires_grad=True)
    cum = (-torch.rand(B, H, Tk)).cumsum(-1).requires_grad_()
    p, r = torch.randn(B, H, Tq, 6, requires_grad=True), torch.randn(B, H, Tk, 6, requires_grad=True)
    slope = torch.rand(H, requires_grad=True)
    amplitude, frequency = torch.rand(H, requires_grad=True), torch.rand(H, requires_grad=True)
    cases = [
        (lambda: SeparableBias(Tq, Tk, offset, slope_q=sq, slope_k=sk, cum_q=cum[..., Tk - Tq:], cum_k=cum),
         [q, k, v, sq, sk, cum]),
        (lambda: PathIntegralBias(Tq, Tk, offset, p=p, r=r, slope=slope), [q, k, v, p, r, slope]),
        (lambda: CosineBias(Tq, Tk, offset, amplitude=amplitude, frequency=frequency),
         [q, k, v, amplitude, frequency]),
    ]
    for make_bias, leaves in cases:
        (ref, ref_g), (got, got_g) = dense_then_chunked(q, k, v, make_bias, leaves, block=16)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
        for a, b in zip(ref_g, got_g):
            assert b.abs().max() > 0
            torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=1e-4)


def test_chunked_matches_dense_when_far_weights_underflow():
    """Steep decay: the nearest ~20 keys share the weight, the rest lie far below e^-87,
    where the chunked path floors the exponent (and CPU flushes denormals). Values and
    gradients still match dense, and causality stays exact: changing future values
    changes no earlier output bit."""
    torch.manual_seed(3)
    B, H, T, D = 1, 2, 96, 8
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    p, r = torch.randn(B, H, T, 4, requires_grad=True), torch.randn(B, H, T, 4, requires_grad=True)
    slope = torch.full((H,), 5.0, requires_grad=True)      # ψ ≈ -5·log 2 per step back
    sq = torch.full((B, H, T), 4.0, requires_grad=True)
    cases = [(lambda: PathIntegralBias(T, T, 0, p=p, r=r, slope=slope), [q, k, v, p, r, slope]),
             (lambda: SeparableBias(T, T, 0, slope_q=sq), [q, k, v, sq])]
    for make_bias, leaves in cases:
        bias = make_bias()
        last_row = dense_logits(q, k, bias)[0, 0, -1]
        assert (last_row[:T // 2] - last_row.max() < -100).all()
        (ref, ref_g), (got, got_g) = dense_then_chunked(q, k, v, make_bias, leaves, block=32)
        # biases reach ~300 here; float32 rounds logits at that magnitude (~2e-5)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
        for a, b in zip(ref_g, got_g):
            torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=1e-4)
        with torch.no_grad():
            v2 = v.clone()
            v2[:, :, T // 2:] += 1e30      # a weight of e^-80 on these would show
            before = chunked_attention(q, k, v, make_bias(), block=32)[:, :, :T // 2]
            after = chunked_attention(q, k, v2, make_bias(), block=32)[:, :, :T // 2]
        assert torch.equal(before, after)


def path_integral_inputs(B=1, H=2, T=300, D=8, dp=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    p, r = torch.randn(B, H, T, dp, generator=g), torch.randn(B, H, T, dp, generator=g)
    return q, k, v, p, r, torch.tensor([0.5, 0.05])[:H]


def test_grape_ap_chunked_matches_dense_where_sigmoid_underflows():
    """Probes so large that z = <p, r>/d_p falls below -87 for many pairs, where the chunked
    path's log(sigmoid(z)) would be -inf: those entries are patched to z (logsigmoid's float32
    value there). Values and the gradients of q, k, v, p, r and the slope match dense, at a
    length with several query blocks."""
    q, k, v, p, r, slope = path_integral_inputs()
    p[:, :, ::7] *= 200.0                      # every 7th query: |z| up to hundreds
    leaves = [t.requires_grad_() for t in (q, k, v, p, r, slope)]
    T = q.shape[2]
    with torch.no_grad():
        z = p @ r.transpose(-1, -2) / p.shape[-1]
        assert (z.tril() < chunked.LOG_SIGMOID_LOW).sum() > 1000
    make_bias = lambda: PathIntegralBias(T, T, 0, p=p, r=r, slope=slope)
    (ref, ref_g), (got, got_g) = dense_then_chunked(q, k, v, make_bias, leaves, block=64)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(ref_g, got_g):
        assert b.abs().max() > 0
        torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=1e-4)


def test_grape_ap_underflow_patch_in_a_block_keeps_earlier_rows_bit_exact():
    """A later key whose r makes z(t, l) < -87 for the *earlier* queries of its block (pairs
    those queries never see) switches that block to the patched log-sigmoid; the earlier
    queries' outputs must not change in any bit."""
    q, k, v, p, r, slope = path_integral_inputs()
    T, t = q.shape[2], 100                     # queries 64..127 share a block of 64
    changed = r.clone()
    changed[:, :, t + 1:] = -1e4 * p[:, :, 64:65]       # <p_s, r_l> hugely negative for s near 64
    with torch.no_grad():
        z = p[:, :, 64:t + 1] @ changed[:, :, t + 1:128].transpose(-1, -2) / p.shape[-1]
        assert z.min() < chunked.LOG_SIGMOID_LOW
        before = chunked_attention(q, k, v, PathIntegralBias(T, T, 0, p=p, r=r, slope=slope), block=64)
        after = chunked_attention(q, k, v, PathIntegralBias(T, T, 0, p=p, r=changed, slope=slope), block=64)
    assert torch.equal(before[:, :, :t + 1], after[:, :, :t + 1])
    assert not torch.allclose(before[:, :, t + 1:], after[:, :, t + 1:])


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", [*ADDITIVE, "toy_cosine"])
def test_chunked_never_builds_the_full_attention_matrix(name, toy):
    B, H, T, D = 1, 3, 512, 8
    enc = make_encoding(name)
    x, q, k, v = inputs(B, H, T, D, C=24)
    qe, ke, bias = enc(x, q, k, v)
    with MaxNumel() as mode:
        out = chunked_attention(qe, ke, v, bias, block=64)
        out.sum().backward()
    assert mode.largest <= B * H * T * T // 4, f"an op produced {mode.largest} elements"


def test_auto_never_picks_dense_for_long_sequences():
    H = 2
    for T in (1024, 4096):
        q = torch.zeros(1, H, T, 8)
        biases = [SeparableBias(T, T, 0, slope_q=torch.ones(1, H, 1)),
                  PathIntegralBias(T, T, 0, p=torch.zeros(1, H, T, 4), r=torch.zeros(1, H, T, 4),
                                   slope=torch.ones(H))]
        for bias in biases:
            for device in ("cpu", "cuda", "mps"):
                assert choose_backend(q, bias, device) not in ("dense",), (T, device, type(bias))
            assert choose_backend(q, bias, "cpu") == "chunked"
        assert choose_backend(q, biases[0], "cuda") == "flex"
        assert choose_backend(q, biases[1], "cuda") in ("triton", "chunked")
        assert choose_backend(q, None, "cpu") == "sdpa"
        # decoding one token against T cached keys: the compiled kernels are for training shapes
        q1 = torch.zeros(1, H, 1, 8)
        bias1 = SeparableBias(1, T, T - 1, slope_q=torch.ones(1, H, 1))
        assert choose_backend(q1, bias1, "cuda") == "chunked"
        assert choose_backend(q1, bias1, "cpu") == "chunked"
    tiny = SeparableBias(16, 16, 0, slope_q=torch.ones(1, H, 1))
    assert choose_backend(torch.zeros(1, H, 16, 8), tiny, "cpu") == "dense"


def test_auto_matches_dense_at_long_length():
    enc = make_encoding("grape_ap")
    x, q, k, v = inputs(B=1, H=3, T=1024, D=8, C=24)
    with torch.no_grad():
        qe, ke, bias = enc(x, q, k, v)
        torch.testing.assert_close(attend(qe, ke, v, bias, "auto"), dense_attention(qe, ke, v, bias),
                                   atol=1e-5, rtol=1e-4)


def test_backends_fall_back_for_what_they_do_not_serve():
    """flex and triton hand decoding (Tq < Tk) and foreign biases to the chunked path."""
    enc = make_encoding("grape_ap")
    x, q, k, v = inputs(B=1, H=3, T=20, D=8, C=24)
    with torch.no_grad():
        cache = LayerCache()
        _, k0, _ = enc(x[:, :19], q[:, :, :19], k[:, :, :19], cache=cache)
        cache.length = 19
        q1, k1, bias = enc(x[:, 19:], q[:, :, 19:], k[:, :, 19:], offset=19, cache=cache)
        kk = torch.cat([k0, k1], 2)
        ref = dense_attention(q1, kk, v, bias)
        for backend in ("flex", "triton", "chunked", "auto"):
            torch.testing.assert_close(attend(q1, kk, v, bias, backend), ref, atol=1e-6, rtol=1e-5)
        qe, ke, bias = enc(x, q, k, v)
        torch.testing.assert_close(attend(qe, ke, v, bias, "flex"), dense_attention(qe, ke, v, bias),
                                   atol=1e-6, rtol=1e-5)


def test_unknown_backend_and_bias_fail_clearly():
    q = torch.zeros(1, 1, 4, 8)
    bias = SeparableBias(4, 4, 0, slope_q=torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="unknown attn_backend"):
        attend(q, q, q, bias, "fast")
    with pytest.raises(TypeError, match="evaluates a Bias, got object"):
        chunked_attention(q, q, q, bias=object())
    with pytest.raises(ValueError, match="covers 4 queries x 4 keys, attention has 3 x 4"):
        chunked_attention(q[:, :, 1:], q, q, bias)
    with pytest.raises(ValueError, match="n_queries <= n_keys"):
        SeparableBias(5, 4, 0, slope_q=torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="no term"):
        SeparableBias(4, 4, 0)
    with pytest.raises(ValueError, match="probes"):
        PathIntegralBias(4, 4, 0, p=torch.zeros(1, 1, 3, 2), r=torch.zeros(1, 1, 4, 2), slope=torch.ones(1))
    with pytest.raises(NotImplementedError, match="must implement block"):
        Bias(4, 4, 0).dense()


@pytest.mark.parametrize("name", ADDITIVE)
def test_gpt_chunked_matches_dense_logits_and_gradients(name, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 1)   # smallest blocks: several per sequence
    torch.manual_seed(0)
    settings = dict(vocab_size=64, block_size=96, n_layer=2, n_head=2, n_embd=32, pos_encoding=name,
                    grid=encoding_config(name).grid and (8, 12))
    models = {b: GPT(GPTConfig(attn_backend=b, **settings)) for b in ("dense", "chunked")}
    models["chunked"].load_state_dict(models["dense"].state_dict())
    idx = torch.randint(0, 64, (2, 90))
    out = {}
    for backend, model in models.items():
        logits, loss = model(idx, targets=idx.roll(-1, 1))
        loss.backward()
        out[backend] = logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (ref_logits, ref_grads), (logits, grads) = out["dense"], out["chunked"]
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for n in ref_grads:
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4 * scale + 1e-7, rtol=1e-3, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention backward needs CUDA")
@pytest.mark.parametrize("name", ADDITIVE)
def test_flex_matches_dense_forward_and_backward_on_cuda(name):
    enc = make_encoding(name, head_dim=16, n_embd=48).cuda()
    x, q, k, v = (t.detach().cuda().requires_grad_() for t in inputs(B=2, H=3, T=256, D=16, C=48))
    ref_out, ref_grads = values_and_grads("dense", enc, x, q, k, v)
    out, grads = values_and_grads("flex", enc, x, q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-3)
    assert_close_grads(ref_grads, grads, rtol=1e-3)


# ----------------------------------------------------------------------------------------
# A bias of a new kind, registered only for these tests: what README's recipe promises
# ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class CosineBias(Bias):
    """b_h(t, j) = a_h cos(w_h (t - j)): neither separable nor a path integral."""
    amplitude: torch.Tensor       # (H,)
    frequency: torch.Tensor       # (H,)

    def block(self, qs, ks):
        dist = (self.query_positions(qs)[:, None] - self.key_positions(ks)[None, :]).float()
        return self.amplitude.view(-1, 1, 1) * torch.cos(self.frequency.view(-1, 1, 1) * dist)

    def score_mod(self, batch, n_heads):
        shift, a, w = self.n_keys - self.n_queries, self.amplitude, self.frequency

        def add_cosine(score, b, h, q_idx, kv_idx):
            return score + a[h] * torch.cos(w[h] * (q_idx + shift - kv_idx).to(torch.float32))

        return add_cosine


class CosineEncoding(Encoding):
    additive = True

    def __init__(self, config):
        super().__init__(config)
        self.amplitude = nn.Parameter(torch.linspace(0.5, 2.0, self.n_head))
        self.frequency = nn.Parameter(torch.linspace(0.05, 0.5, self.n_head))

    def forward(self, x, q, k, v=None, offset=0, cache=None):
        n_keys = q.shape[2] + (cache.length if cache is not None else 0)
        return q, k, CosineBias(q.shape[2], n_keys, offset, amplitude=self.amplitude, frequency=self.frequency)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(ENCODINGS, "toy_cosine", CosineEncoding)
    return "toy_cosine"


def cosine_logits_by_hand(enc, q, k):
    """q·k/√d + a_h cos(w_h (t - j)), masked: written out here, not through the bias classes."""
    T = q.shape[2]
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).float()
    bias = enc.amplitude[:, None, None] * torch.cos(enc.frequency[:, None, None] * dist)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return logits.masked_fill(dist < 0, float("-inf"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_new_kind_of_bias_matches_dense_on_every_cpu_backend(toy, backend):
    assert toy in additive_encodings()         # the derived test lists pick it up
    enc = make_encoding(toy)
    x, q, k, v = inputs(B=1, H=H, T=LONG, D=D, C=C)
    with torch.no_grad():
        qe, ke, bias = enc(x, q, k, v)
        torch.testing.assert_close(dense_logits(qe, ke, bias), cosine_logits_by_hand(enc, qe, ke),
                                   atol=1e-5, rtol=1e-5)
    compare_with_dense(enc, backend)


@pytest.mark.parametrize("split", [LONG - 1, LONG - 40])
def test_a_new_kind_of_bias_decodes_with_a_cache_on_the_chunked_path(toy, split):
    enc = make_encoding(toy)
    x, q, k, v = inputs(B=2, H=H, T=LONG, D=D, C=C)
    ref_out, ref_grads = values_and_grads("dense", enc, x, q, k, v, split=split)
    out, grads = values_and_grads("chunked", enc, x, q, k, v, split=split, block=16)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert_close_grads(ref_grads, grads)


def test_a_new_kind_of_bias_is_exactly_causal_on_the_chunked_path(toy):
    """Changing q, k, v after position t changes no bit of the outputs up to t."""
    enc = make_encoding(toy)
    x, q, k, v = (t.detach() for t in inputs(B=1, H=H, T=LONG, D=D, C=C))
    t = 100
    later = [y.clone() for y in (q, k, v)]
    for y in later:
        y[:, :, t + 1:] = torch.randn_like(y[:, :, t + 1:])

    def run(qq, kk, vv):
        qe, ke, bias = enc(x, qq, kk, vv)
        return chunked_attention(qe, ke, vv, bias, block=32)

    with torch.no_grad():
        before, after = run(q, k, v), run(*later)
    assert torch.equal(before[:, :, :t + 1], after[:, :, :t + 1])
    assert not torch.allclose(before[:, :, t + 1:], after[:, :, t + 1:])


def test_a_new_encoding_trains_in_the_model_at_long_length(toy):
    """GPT with the toy encoding: logits and every parameter's gradient equal dense's on the
    CPU backends (auto picks chunked at this length), and a few AdamW steps lower the loss."""
    torch.manual_seed(0)
    settings = dict(vocab_size=64, block_size=LONG, n_layer=2, n_head=2, n_embd=16, pos_encoding=toy)
    ref = GPT(GPTConfig(attn_backend="dense", **settings))
    idx = torch.randint(0, 64, (1, LONG + 1))
    logits, loss = ref(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert ref_grads["transformer.h.0.attn.pos.frequency"].abs().max() > 0
    for backend in ("chunked", "triton", "auto"):
        model = GPT(GPTConfig(attn_backend=backend, **settings))
        model.load_state_dict(ref.state_dict())
        got, got_loss = model(idx[:, :-1], targets=idx[:, 1:])
        got_loss.backward()
        torch.testing.assert_close(got, logits, atol=2e-5, rtol=1e-4, msg=backend)
        for n, p in model.named_parameters():
            scale = ref_grads[n].abs().max().item()
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4 * scale + 1e-7, rtol=1e-3,
                                       msg=f"{backend}: {n}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
