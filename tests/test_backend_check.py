"""The start-up self-check's comparison logic (backend_check.py), on CPU: correct backends pass,
deliberately broken ones stop with an error that names the backend and the fallback."""
import dataclasses

import pytest
import torch

from modeling import attention
from modeling.attention import chunked_attention, dense_attention, dense_logits, triton_attention
from training.backend_check import BackendMismatch, attention_layer, backends_in_use, check_backends
from model import GPT, GPTConfig
from perturbation import perturb_parameters


def _model(pos_encoding: str, attn_backend: str = "auto", **extra) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, head_dim=16, vocab_size=64, block_size=256,
                       pos_encoding=pos_encoding, attn_backend=attn_backend, **extra)
    model = GPT(config)
    perturb_parameters(model, 0.2)
    return model


def _detached(bias):
    """The same bias with its tensors cut from autograd: the forward is right, no gradient
    reaches the encoding."""
    return dataclasses.replace(bias, **{f.name: getattr(bias, f.name).detach() for f in dataclasses.fields(bias)
                                        if isinstance(getattr(bias, f.name), torch.Tensor)})


def _sees_next_key(q, k, v, bias):
    """Causal mask off by one: query t also sees key t + 1."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias.dense().float()
    T = q.shape[2]
    visible = torch.ones(T, T, dtype=torch.bool).tril(1)
    return (torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ v.float()).to(q.dtype)


BROKEN = {
    "drops the bias": lambda q, k, v, bias: dense_attention(q, k, v, None),
    "no gradient to the encoding": lambda q, k, v, bias: dense_attention(q, k, v, _detached(bias)),
    "sees the next key": _sees_next_key,
}


@pytest.mark.parametrize("pos_encoding", ["fox", "grape_a_qk", "grape_ap"])
@pytest.mark.parametrize("mistake", sorted(BROKEN))
def test_broken_backend_stops_with_the_backend_and_the_fallback_named(pos_encoding, mistake):
    """Each mistake costs >= 35% relative error in some compared tensor (100% for the missing
    gate gradients), where correct float32 backends stay below 0.01% and bfloat16 ones below
    0.7% (next test): the 8-unit tolerance (0.4% in float32, 3.1% in bfloat16) lies between."""
    model = _model(pos_encoding, use_k_shift=True, use_v_shift=True)
    with pytest.raises(BackendMismatch) as raised:
        check_backends(model, torch.float32, backends={"flex": BROKEN[mistake]}, batch=1, log=lambda *_: None)
    message = str(raised.value)
    assert "'flex'" in message and "--attn_backend=chunked" in message and "--check_backends=False" in message
    assert "(chunked matches it here)" in message             # the advice was checked itself


@pytest.mark.parametrize("pos_encoding,backend,fn", [
    ("fox", "chunked", chunked_attention),
    ("grape_a_qk", "chunked", chunked_attention),
    ("grape_ap", "chunked", chunked_attention),
    ("grape_ap", "triton", triton_attention),     # the kernel, in Triton's interpreter
    ("rope", "sdpa", attention.sdpa_attention),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correct_backends_pass_in_float32_and_under_bfloat16_autocast(gpu_bfloat16_arithmetic, pos_encoding,
                                                                       backend, fn, dtype):
    """Under bfloat16 autocast the kernel (with the GPU's bfloat16 arithmetic in the
    interpreter) and SDPA land at ~0.6% of the float32 reference, the float32 paths at ~0.1%
    (bfloat16 matmuls around the attention round differently by then)."""
    model = _model(pos_encoding)
    logged = []
    results = check_backends(model, dtype, backends={backend: fn}, log=logged.append)
    assert [r.backend for r in results] == [backend] and results[0].ok
    # output, the input's gradient and the attention's parameters (c_q, c_k, c_v, QK-norms, encoding)
    names = set(results[0].errors)
    assert {"output", "grad input", "grad c_q.weight", "grad c_k.weight", "grad c_v.weight"} <= names
    encoding_params = {f"grad pos.{n}" for n, p in attention_layer(model).pos.named_parameters()}
    assert encoding_params <= names
    assert len(logged) == 1 and backend in logged[0]


def test_check_uses_the_models_backends_and_leaves_the_rng_alone():
    rope, grape_ap = _model("rope", attn_backend="flex"), _model("grape_ap", attn_backend="triton")
    x = torch.randn(1, 256, 32)
    assert backends_in_use(attention_layer(rope), x) == ["sdpa"]       # no bias: every fast path is SDPA
    assert backends_in_use(attention_layer(grape_ap), x) == ["triton"]
    assert backends_in_use(attention_layer(_model("fox")), x) == []     # auto on CPU: chunked, the reference's peer
    state = torch.get_rng_state()
    results = check_backends(grape_ap, torch.float32, log=lambda *_: None)
    assert [r.backend for r in results] == ["triton"] and results[0].ok
    assert torch.equal(torch.get_rng_state(), state)


def test_dense_logits_of_the_off_by_one_mask_differ():
    """The broken mask really is broken: it changes the logits the reference uses."""
    model = _model("grape_ap")
    layer = attention_layer(model)
    x = torch.randn(1, 8, 32)
    q, k, v = layer.project(x)
    q, k, bias = layer.pos(x, q, k, v=v)
    assert not torch.allclose(_sees_next_key(q, k, v, bias), dense_attention(q, k, v, bias))
    assert torch.isinf(dense_logits(q, k, bias)[..., 0, 1]).all()


@pytest.mark.parametrize("pos_encoding", ["fox", "grape_ap"])
def test_reference_and_fallback_keep_float32_maths_under_autocast(pos_encoding):
    """The dense reference and the chunked fallback compute in float32 by design; under bfloat16
    autocast their matmuls would otherwise run in bfloat16 (FoX's bias columns, as large as
    T x slope, lose most of the bias there). Same results with and without autocast."""
    layer = attention_layer(_model(pos_encoding))
    x = torch.randn(2, 256, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q, k, v = layer.project(x)
        q, k, bias = layer.pos(x, q, k, v=v)
        for fn in (dense_attention, chunked_attention):
            plain = fn(q, k, v, bias)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast = fn(q, k, v, bias)
            torch.testing.assert_close(autocast, plain, atol=1e-6, rtol=1e-6)


def test_fused_kernels_get_one_dtype_under_autocast():
    """Under autocast QK-RMSNorm's float32 weight leaves q and k in float32 while v is 16-bit;
    the Triton kernel takes all three in autocast's dtype, as autocast hands them to SDPA."""
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {x.dtype for x in attention.autocast_operands(q, k, v)} == {torch.bfloat16}
    assert [x.dtype for x in attention.autocast_operands(q, k, v)] == [torch.float32] * 2 + [torch.bfloat16]
