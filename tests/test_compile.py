"""torch.compile(fullgraph=True) of the whole model, forward and backward, for every registered
encoding on the attention backends that train on CPU (the dense reference and the chunked
path; the chunked path reduces to SDPA for rotary encodings): Dynamo traces it as one graph
(fullgraph=True raises at any graph break) and the compiled loss and gradients equal eager.

The bulk runs with the "aot_eager_decomp_partition" backend: it traces what inductor traces
(Dynamo, AOT autograd with inductor's decompositions and its forward/backward partitioner) and
runs the graphs eagerly instead of compiling C++ kernels, so every encoding fits in the suite's
time. (Plain "aot_eager", without the decompositions, fails on GRAPE-A's backward in torch 2.13:
a view of a non-contiguous gradient that inductor and the decomposed graph do not make.) One
case per path goes through inductor for real.
The chunked path needs no custom op: it is plain tensor code (a Python loop over key blocks,
torch.utils.checkpoint), which Dynamo unrolls into the graph. The Triton GRAPE-AP kernel is
registered as torch.library custom ops, traced in tests/test_grape_ap_triton.py.
"""
import pytest
import torch

from grape import ENCODINGS, GRID_ENCODINGS
from model import GPT, GPTConfig

T = 260                          # >= 256: the CPU's fast paths run; no multiple of a block size
V = 64


def perturbed_model(pos_encoding: str, backend: str, **kw) -> GPT:
    torch.manual_seed(0)
    on_grid = any(part in GRID_ENCODINGS for part in pos_encoding.split("+"))
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=V, block_size=T, pos_encoding=pos_encoding,
                       attn_backend=backend, grid=(-(-T // 16), 16) if on_grid else None, **kw)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():       # gates, frequencies, slopes off their init values
            p.add_(0.2 * torch.randn_like(p))
    return model


def loss_and_grads(model: GPT, fn, idx):
    model.zero_grad(set_to_none=True)
    loss = fn(idx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_compiled_equals_eager(model: GPT, backend: str, atol=1e-5, rtol=1e-4):
    torch._dynamo.reset()
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))

    def loss(i):
        return model(i, targets=i).loss
    want_loss, want = loss_and_grads(model, loss, idx)
    compiled = torch.compile(loss, fullgraph=True, backend=backend)      # raises at a graph break
    got_loss, got = loss_and_grads(model, compiled, idx)
    torch.testing.assert_close(got_loss, want_loss, atol=atol, rtol=rtol)
    assert got.keys() == want.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("attn_backend", ["dense", "chunked"])
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_every_encoding_compiles_as_one_graph_forward_and_backward(name, attn_backend):
    assert_compiled_equals_eager(perturbed_model(name, attn_backend), "aot_eager_decomp_partition")


@pytest.mark.parametrize("name", ["rope+grape_ap", "fox"])
def test_compositions_and_kv_shift_compile_as_one_graph(name):
    model = perturbed_model(name, "chunked", use_k_shift=True, use_v_shift=True)
    assert_compiled_equals_eager(model, "aot_eager_decomp_partition")


@pytest.mark.parametrize("name", ["grape_ap", "rope"])
def test_inductor_compiles_the_chunked_path_and_sdpa_as_one_graph(name):
    assert_compiled_equals_eager(perturbed_model(name, "chunked"), "inductor")
