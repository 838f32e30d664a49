"""Exact causality of the fast attention paths at model level: changing the tokens after
position t changes no bit of the logits at positions <= t (torch.equal, not allclose).

Checked where the fast paths run (T >= 256 on CPU: chunked for every additive bias, SDPA
otherwise) for every registered encoding, with and without KV-shift, with every parameter
perturbed away from its init so that every content-dependent gate varies; and on the Triton
GRAPE-AP kernel in Triton's interpreter (small shapes, small blocks).
"""
import pytest
import torch

from modeling import attention
from modeling import chunked
from grape import ENCODINGS, GRID_ENCODINGS
from model import GPT, GPTConfig
from perturbation import perturb_parameters

V = 97


def perturbed_model(pos_encoding, shift, T, **kw):
    torch.manual_seed(0)
    on_grid = any(part in GRID_ENCODINGS for part in pos_encoding.split("+"))
    kw.setdefault("grid", (-(-T // 16), 16) if on_grid else None)     # grid encodings: rows of 16 tokens
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=V, block_size=T, pos_encoding=pos_encoding,
                       use_k_shift=shift, use_v_shift=shift, **kw)
    model = GPT(config)
    perturb_parameters(model, 0.2)
    return model


def assert_exactly_causal(model, T, t, batch=2):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (batch, T), generator=g)
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, V, (batch, T - t - 1), generator=g)
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1]), \
        f"logits up to t={t} moved by {(a[:, :t + 1] - b[:, :t + 1]).abs().max():.2e}"
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])      # the change did reach later positions


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "kvshift"])
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_future_tokens_change_no_bit_of_earlier_logits_on_the_long_path(name, shift, monkeypatch):
    T = 300                                           # chunked (or SDPA) on CPU, several query blocks
    model = perturbed_model(name, shift, T)
    chosen = set()
    pick = attention.choose_backend

    def recording(q, bias, device_type=None):
        chosen.add(pick(q, bias, device_type))
        return pick(q, bias, device_type)

    monkeypatch.setattr(attention, "choose_backend", recording)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 1)          # query blocks of 32
    for t in (40, 170):                               # inside a key block; past several
        assert_exactly_causal(model, T, t)
    additive = model.transformer.h[0].attn.pos.additive
    assert chosen == ({"chunked"} if additive else {"sdpa"})


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "kvshift"])
def test_future_tokens_change_no_bit_of_earlier_logits_on_the_triton_kernel(shift, monkeypatch):
    pytest.importorskip("triton")
    from modeling import grape_ap_triton
    if not torch.cuda.is_available() and not grape_ap_triton._interpreter_ready():
        pytest.fail("Triton's interpreter is off: conftest.py sets TRITON_INTERPRET=1 before triton is imported")
    # blocks of 16: several query and key blocks, with rows that see no key of a block
    monkeypatch.setattr(grape_ap_triton, "_launch_config", lambda backward, d, bm, bn: (16, 16, 1))
    T = 40
    model = perturbed_model("grape_ap", shift, T, attn_backend="triton")
    calls = []
    kernel = grape_ap_triton.grape_ap_triton_attention
    monkeypatch.setattr(grape_ap_triton, "grape_ap_triton_attention", lambda *a: calls.append(1) or kernel(*a))
    for t in (9, 25):
        assert_exactly_causal(model, T, t, batch=1)
    assert len(calls) == 2 * 2 * 2                    # layers x forwards x t: the kernel really ran
