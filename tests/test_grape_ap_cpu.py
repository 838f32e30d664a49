"""The fused GRAPE-AP CPU kernel (modeling/grape_ap_cpu.cpp) against the dense reference.

The reference is ``dense_attention`` with the bias's own ``dense()`` (an independent O(T²)
evaluation, autograd for the gradients). Lengths >= 256 with several of the kernel's query
blocks, a last block cut short, queries at the end of more keys (a cache), probe widths the
kernel specialises (4, 8) and one it does not (6), and every input's gradient, the slope's
included. The kernel must build here: this machine (like CI) has a C++ compiler; set
GRAPE_AP_CPU_KERNEL=0 to run the suite without it (these tests then skip).
"""
import os
import subprocess
import sys

import pytest
import torch

from model import GPT, GPTConfig
from modeling import chunked, grape_ap_cpu
from modeling.attention import attend, dense_attention
from modeling.bias import PathIntegralBias

if os.environ.get(grape_ap_cpu.SWITCH) == "0":
    pytest.skip(f"{grape_ap_cpu.SWITCH}=0: the kernel is switched off", allow_module_level=True)


def test_kernel_builds_on_this_machine():
    assert grape_ap_cpu.ops() is not None, "the GRAPE-AP CPU kernel did not build (see the warning above)"


def path_inputs(B, H, Tq, Tk, D, dp, seed=0, probe_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = torch.randn(B, H, Tk, D, generator=g), torch.randn(B, H, Tk, D, generator=g)
    p = torch.randn(B, H, Tq, dp, generator=g) * probe_scale
    r = torch.randn(B, H, Tk, dp, generator=g)
    slope = torch.rand(H, generator=g) + 0.05
    return [q, k, v, p, r, slope]


def output_and_grads(fn, leaves, Tq, Tk):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    q, k, v, p, r, slope = leaves
    out = fn(q, k, v, PathIntegralBias(Tq, Tk, Tk - Tq, p=p, r=r, slope=slope))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def kernel(q, k, v, bias):
    assert grape_ap_cpu.serves(q, bias.p)
    return grape_ap_cpu.grape_ap_cpu_attention(q, k, v, bias.p, bias.r, bias.slope)


@pytest.mark.parametrize("B, H, Tq, Tk, D, dp", [
    (1, 3, 300, 300, 16, 8),       # several blocks, the last one short
    (2, 2, 256, 256, 64, 4),
    (1, 2, 260, 390, 8, 6),        # queries at the end of more keys; a probe width without specialisation
    (2, 1, 1, 300, 8, 8),          # one-token decoding against a cache
])
def test_kernel_matches_dense_values_and_every_gradient(B, H, Tq, Tk, D, dp):
    leaves = path_inputs(B, H, Tq, Tk, D, dp)
    ref, ref_grads = output_and_grads(dense_attention, leaves, Tq, Tk)
    out, grads = output_and_grads(kernel, leaves, Tq, Tk)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for name, a, b in zip("q k v p r slope".split(), ref_grads, grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=1e-4, msg=name)


def test_kernel_matches_dense_with_steep_decay_and_huge_probes():
    """Biases of hundreds (far weights underflow) and |z| up to ~1e3 (exp(-|z|) -> 0 in the
    kernel's log-sigmoid): still dense's values and gradients."""
    leaves = path_inputs(1, 2, 300, 300, 8, 4, seed=3, probe_scale=300.0)
    leaves[5] = torch.tensor([5.0, 0.3])
    ref, ref_grads = output_and_grads(dense_attention, leaves, 300, 300)
    out, grads = output_and_grads(kernel, leaves, 300, 300)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for name, a, b in zip("q k v p r slope".split(), ref_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=1e-4, msg=name)


def test_later_keys_change_no_bit_of_earlier_outputs():
    """Queries 0..t share kernel blocks with later ones; changing every key-side input after t
    (k, v, r), even to huge values, changes no bit of their outputs."""
    q, k, v, p, r, slope = path_inputs(1, 2, 300, 300, 8, 8, seed=4)
    t = 100                                       # inside the kernel's second block
    k2, v2, r2 = k.clone(), v.clone(), r.clone()
    k2[:, :, t + 1:] *= -3.0
    v2[:, :, t + 1:] += 1e30
    r2[:, :, t + 1:] *= 1e4
    with torch.no_grad():
        a = kernel(q, k, v, PathIntegralBias(300, 300, 0, p=p, r=r, slope=slope))
        b = kernel(q, k2, v2, PathIntegralBias(300, 300, 0, p=p, r=r2, slope=slope))
    assert torch.equal(a[:, :, :t + 1], b[:, :, :t + 1])
    assert not torch.allclose(a[:, :, t + 1:], b[:, :, t + 1:])


def test_model_trains_through_the_kernel_with_dense_gradients(monkeypatch):
    """The auto backend at T >= 256 on CPU reaches the kernel (counted), and the model's
    logits and every parameter's gradient equal the dense backend's."""
    calls = []
    real = grape_ap_cpu.grape_ap_cpu_attention
    monkeypatch.setattr(grape_ap_cpu, "grape_ap_cpu_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    settings = dict(vocab_size=64, block_size=300, n_layer=2, n_head=2, n_embd=32, pos_encoding="grape_ap")
    models = {b: GPT(GPTConfig(attn_backend=b, **settings)) for b in ("dense", "auto")}
    models["auto"].load_state_dict(models["dense"].state_dict())
    idx = torch.randint(0, 64, (2, 280))
    results = {}
    for backend, model in models.items():
        logits, loss = model(idx, targets=idx.roll(-1, 1))
        loss.backward()
        results[backend] = logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2                        # one per layer: the kernel really ran
    (ref_logits, ref_grads), (logits, grads) = results["dense"], results["auto"]
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for n in ref_grads:
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4 * scale + 1e-7, rtol=1e-3, msg=n)


def test_switched_off_kernel_leaves_the_tensor_op_path(monkeypatch):
    monkeypatch.setenv(grape_ap_cpu.SWITCH, "0")
    q, k, v, p, r, slope = path_inputs(1, 2, 260, 260, 8, 8)
    bias = PathIntegralBias(260, 260, 0, p=p, r=r, slope=slope)
    assert not grape_ap_cpu.serves(q, p)
    called = []
    real = chunked._PathIntegralAttention.apply
    monkeypatch.setattr(chunked._PathIntegralAttention, "apply", lambda *a: called.append(1) or real(*a))
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, bias, "chunked"), dense_attention(q, k, v, bias),
                                   atol=2e-6, rtol=1e-5)
    assert called


def test_kernel_rejects_inputs_it_cannot_read():
    q, k, v, p, r, slope = path_inputs(1, 2, 64, 64, 8, 4)
    ops = grape_ap_cpu.ops()
    with pytest.raises(RuntimeError, match="unit stride along the head dim"):
        ops.forward(q.transpose(2, 3), k, v, p, r, slope, 1.0)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        ops.forward(q.double(), k, v, p, r, slope, 1.0)
    with pytest.raises(RuntimeError, match="must end with k, v"):
        short = [t[:, :, :10].contiguous() for t in (k, v, r)]
        ops.forward(q, short[0], short[1], p, short[2], slope, 1.0)
    with pytest.raises(RuntimeError, match="one slope per head"):
        ops.forward(q, k, v, p, r, slope[:1], 1.0)


def test_kernel_reads_transposed_views_as_the_model_makes_them():
    """q, k, v as (B, T, H, D) tensors seen as (B, H, T, D): no copy, the same result."""
    leaves = path_inputs(2, 3, 270, 270, 16, 8)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves[:3]] + leaves[3:]
    assert not views[0].is_contiguous()
    ref, ref_grads = output_and_grads(kernel, leaves, 270, 270)
    out, grads = output_and_grads(kernel, views, 270, 270)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-6 * a.abs().max().item(), rtol=1e-5)


def test_avx2_build_matches_dense():
    """The vector width most x86 CPUs without AVX-512 have: torch told to use AVX2 builds and
    runs the kernel's AVX2 variant (a separate process: the variant is chosen at load)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    script = (
        "import torch\n"
        "from modeling import grape_ap_cpu\n"
        "from modeling.attention import dense_attention\n"
        "from modeling.bias import PathIntegralBias\n"
        "assert grape_ap_cpu.status() == 'grape_ap_cpu_avx2', grape_ap_cpu.status()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, 270, 8, generator=g) for _ in range(3))\n"
        "p, r = torch.randn(1, 2, 270, 8, generator=g), torch.randn(1, 2, 270, 8, generator=g)\n"
        "bias = PathIntegralBias(270, 270, 0, p=p, r=r, slope=torch.tensor([0.5, 0.1]))\n"
        "out = grape_ap_cpu.grape_ap_cpu_attention(q, k, v, p, r, bias.slope)\n"
        "torch.testing.assert_close(out, dense_attention(q, k, v, bias), atol=2e-6, rtol=1e-5)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_biased_attention_flushes_denormals_in_every_intra_op_thread():
    """torch.set_flush_denormal reaches only the calling thread; a product that underflows
    (1e-30 x 1e-10) over a tensor big enough to be split across 2 threads stays denormal in the
    other thread's half until the first biased CPU attention call flushes the pool's threads
    (the kernel built with OpenMP: one chunk per thread). A fresh process, so no earlier test
    has flushed anything."""
    script = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from modeling.attention import attend\n"
        "from modeling.bias import PathIntegralBias\n"
        "x = torch.full((1 << 22,), 1e-30)\n"
        "denormal = lambda: int(((x * 1e-10) != 0).sum())\n"
        "torch.set_flush_denormal(True)\n"
        "before = denormal()\n"
        "q = torch.randn(1, 2, 8, 4)\n"
        "bias = PathIntegralBias(8, 8, 0, p=torch.randn(1, 2, 8, 2), r=torch.randn(1, 2, 8, 2), slope=torch.ones(2))\n"
        "attend(q, q, q, bias)\n"
        "print(before, denormal())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert before > 0, "set_flush_denormal reached every thread by itself: this test checks nothing here"
    assert after == 0, f"{after} denormal products after the pool was flushed"
