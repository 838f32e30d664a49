"""torch.compile(fullgraph=True) of the whole model, forward and backward, for every registered
encoding on the attention backends that train on CPU (the dense reference and the chunked
path; the chunked path reduces to SDPA for the encodings without a bias): Dynamo traces it as
one graph (fullgraph=True raises at any graph break) and the compiled loss and gradients equal
eager. Beside them: the chunked path's query-block loops with several blocks, the Triton
GRAPE-AP kernel inside the model (Triton's CPU interpreter), and FlexAttention's forward for
every encoding whose bias has a score_mod (torch has no FlexAttention backward on CPU).

The bulk runs with the "aot_eager_decomp_partition" backend: it traces what inductor traces
(Dynamo, AOT autograd with inductor's decompositions and its forward/backward partitioner) and
runs the graphs eagerly instead of compiling C++ kernels, so every encoding fits in the suite's
time. (Plain "aot_eager", without the decompositions, fails on GRAPE-A's backward in torch 2.13:
a view of a non-contiguous gradient that inductor and the decomposed graph do not make.) One
case per chunked path goes through inductor for real. Inductor cannot run the flex case on CPU:
torch 2.13's C++ FlexAttention template finds no kernel for an input computed in the same graph
(NoValidChoicesError); on GPU inductor lowers flex to its Triton template instead.

The chunked path needs no custom op: Dynamo traces it whole. Its tiles are plain tensor code
under torch.utils.checkpoint (a higher-order op in the graph), and GRAPE-AP's
torch.autograd.Function has a forward and a backward of plain tensor code, which Dynamo
traces into the graph as they are (the hand-written backward becomes the backward graph).
A custom op would only hide those blocks from inductor's fusion. The Python loops over query
blocks unroll: the graph grows with T / block (one block at the test's T, hence the test with
small blocks). The Triton GRAPE-AP kernel, which Dynamo cannot trace, is registered as
torch.library custom ops (opcheck'd in tests/test_grape_ap_triton.py).
"""
import pytest
import torch

from modeling import chunked
import model as model_module
from grape import ENCODINGS, GRID_ENCODINGS
from modeling.bias import SeparableBias
from model import GPT, GPTConfig
from perturbation import perturb_parameters

T = 260                          # >= 256: the CPU's fast paths run; no multiple of a block size
V = 64


def perturbed_model(pos_encoding: str, backend: str, **kw) -> GPT:
    torch.manual_seed(0)
    on_grid = any(part in GRID_ENCODINGS for part in pos_encoding.split("+"))
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=V, block_size=T, pos_encoding=pos_encoding,
                       attn_backend=backend, grid=(-(-T // 16), 16) if on_grid else None, **kw)
    model = GPT(config)
    perturb_parameters(model, 0.2)
    return model


class _Probed(Exception):
    pass


def first_bias(name: str):
    """The Bias the first layer hands to attention (None: no additive part), found without
    running attention: the backend a compiled model reaches depends on it."""
    seen = []

    def probe(q, k, v, bias=None, backend="auto", key_padding=None):
        seen.append(bias)
        raise _Probed

    real, model_module.attend = model_module.attend, probe
    try:
        perturbed_model(name, "chunked")(torch.zeros(1, T, dtype=torch.long))
    except _Probed:
        pass
    finally:
        model_module.attend = real
    return seen[0]


BIASES = {name: first_bias(name) for name in sorted(ENCODINGS)}
# encodings that reach flex_attention itself (the others hand flex's cases to sdpa or chunked)
FLEX = [name for name, bias in BIASES.items() if bias is not None and bias.score_mod(1, 2) is not None]
# encodings whose chunked path loops over query blocks (SeparableBias is one SDPA call)
BLOCKED = [name for name, bias in BIASES.items() if bias is not None and type(bias) is not SeparableBias]


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


@pytest.mark.parametrize("name", BLOCKED)
def test_chunked_query_block_loops_compile_as_one_graph_with_several_blocks(name, monkeypatch):
    """At the test's T one query block covers everything; blocks of 100 queries make the loops
    (GRAPE-AP's autograd Function, the checkpointed tiles) run three times, the last block short."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 100 * 2 * 2 * T)     # B * H * T keys
    assert chunked.query_block(2, 2, T) == 100
    assert_compiled_equals_eager(perturbed_model(name, "chunked"), "aot_eager_decomp_partition")


def test_triton_grape_ap_kernel_compiles_as_one_graph_inside_the_model():
    """The kernel's custom ops in the compiled model (Triton's interpreter on CPU)."""
    assert type(BIASES["grape_ap"]).__name__ == "PathIntegralBias"      # the kernel's case
    assert_compiled_equals_eager(perturbed_model("grape_ap", "triton"), "aot_eager_decomp_partition")


@pytest.mark.parametrize("name", FLEX)
def test_flex_forward_compiles_as_one_graph_and_matches_dense(name):
    """Forward only: torch has no FlexAttention backward on CPU (it refuses inputs that
    require grad). The reference is the dense path, not flex run eagerly."""
    assert len(FLEX) >= 2
    torch._dynamo.reset()
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    flex, dense = perturbed_model(name, "flex"), perturbed_model(name, "dense")
    with torch.no_grad():
        want = dense(idx).logits
        got = torch.compile(lambda i: flex(i).logits, fullgraph=True, backend="aot_eager_decomp_partition")(idx)
    # The two paths form the bias from the same float32 terms in different orders (FoX: a
    # difference of prefix sums that grow with T), so a logit may differ by a few units in the
    # last place of the largest bias term, which the softmax and lm_head pass on.
    bias = first_bias(name).dense().tril().abs().max().item()
    torch.testing.assert_close(got, want, atol=1e-5 + 16 * torch.finfo(torch.float32).eps * bias, rtol=1e-4)
