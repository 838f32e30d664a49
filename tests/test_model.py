"""Model-level properties: causality, gradients, sizes, round trips, init, and clear errors."""
import math

import pytest
import torch

from grape import ENCODINGS, GRID_ENCODINGS
from model import GPT, GPTConfig, LEGACY_MODEL_TYPES, settings_from_model_type
from training.checkpoint import load_model
from perturbation import perturb_parameters

ALL = sorted(ENCODINGS)
V = 97


def tiny(pos_encoding, shift=False, **kw):
    settings = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=V, block_size=64)
    if pos_encoding in GRID_ENCODINGS:
        settings["grid"] = (8, 8)                  # 64 tokens in raster order
    cfg = GPTConfig(**{**settings, **kw}, pos_encoding=pos_encoding, use_k_shift=shift, use_v_shift=shift)
    torch.manual_seed(0)
    return GPT(cfg)


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "kvshift"])
@pytest.mark.parametrize("name", ALL)
def test_causality_future_tokens_change_no_earlier_logit(name, shift):
    model = tiny(name, shift)
    if name in ("grape_m_ctx", "grape_m_ctx_dict", "grape_a_phase"):   # content-dependent phases: teeth
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.pos.phase_proj.weight, std=1.0)
    idx = torch.randint(0, V, (2, 24))
    t = 10
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, V, (2, 24 - t - 1))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])   # the change did reach later positions


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "kvshift"])
@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gradient_matches_central_differences_in_float64(name, shift, monkeypatch):
    """Every trainable parameter gets a nonzero gradient, and the gradients are right: the
    derivative along a random direction equals a float64 central difference of the loss, for
    each position-encoding and KV-shift parameter on its own and for all other parameters
    together. Every parameter (norm weights too) is moved off its initial value first.

    The model casts to float32 in places (accuracy under bf16 autocast); for this test
    ``.float()`` leaves float64 tensors as they are, so the whole forward runs in float64
    and a five-point difference with step 1e-3 is accurate to ~1e-12."""
    to_float32 = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda t, *a, **kw: t if t.dtype == torch.float64 else to_float32(t, *a, **kw))
    model = tiny(name, shift, n_layer=1, using_groupnorm=True).double()
    perturb_parameters(model, 0.1)
    idx = torch.randint(0, V, (2, 12))
    _, loss = model(idx, idx.roll(-1, 1))
    assert loss.dtype == torch.float64
    loss.backward()
    params = dict(model.named_parameters())
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    own = [n for n in params if ".pos." in n or "shift" in n]
    assert own or name in ("nope", "rope", "alibi"), "no position-encoding parameter found by name"
    groups = [[n for n in params if n not in own]] + [[n] for n in own]
    # five-point central difference along a unit direction, error O(h⁴): with h = 1e-3 truncation (~h⁴·f⁽⁵⁾/30) and
    # float64 rounding (~|loss|·1e-15 / h) both stay near 1e-12, far below the tolerance
    h = 1e-3
    for group in groups:
        direction = {n: torch.randn_like(params[n]) for n in group}
        norm = math.sqrt(sum(d.square().sum().item() for d in direction.values()))
        direction = {n: d / norm for n, d in direction.items()}          # a unit step of length h
        analytic = sum((params[n].grad * direction[n]).sum() for n in group).item()
        origin = {n: params[n].detach().clone() for n in group}
        losses = {}
        with torch.no_grad():
            for k in (-2, -1, 1, 2):
                for n in group:
                    params[n].copy_(origin[n] + k * h * direction[n])
                losses[k] = model(idx, idx.roll(-1, 1))[1].item()
            for n in group:
                params[n].copy_(origin[n])
        numeric = (losses[-2] - 8 * losses[-1] + 8 * losses[1] - losses[2]) / (12 * h)
        assert abs(numeric - analytic) <= 1e-6 * abs(analytic) + 1e-10, (group[:3], numeric, analytic)


def expected_llama_parameters(L, C, V, head_dim):
    """Hand count: tied embedding, per block 4 C² attention + 3 C·floor(8C/3) SwiGLU
    + two RMSNorms (2C) + QK-norms (2 head_dim); final RMSNorm C."""
    hidden = int(8 / 3 * C)
    return V * C + L * (4 * C * C + 3 * C * hidden + 2 * C + 2 * head_dim) + C


@pytest.mark.parametrize("size,L,H,C,paper", [("medium", 24, 8, 1024, 353e6), ("large", 36, 10, 1280, 770e6)])
def test_paper_sizes_have_the_reported_parameter_counts(size, L, H, C, paper):
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, head_dim=128, pos_encoding="rope"))
    n = model.num_parameters_unique()
    assert n == expected_llama_parameters(L, C, 50304, 128)
    assert abs(n - paper) / paper < 0.01, f"{size}: {n / 1e6:.1f}M"


def test_logits_shape_dtype_and_loss():
    model = tiny("rope")
    idx = torch.randint(0, V, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, V) and logits.dtype == torch.float32 and loss is None
    logits, loss = model(idx, idx)
    ref = torch.nn.functional.log_softmax(logits, -1).gather(-1, idx[..., None]).mean().neg()
    torch.testing.assert_close(loss, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_save_pretrained_round_trip_gives_identical_logits(name, tmp_path):
    model = tiny(name, shift=True).eval()
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_training_checkpoint_file_loads_and_rejects_foreign_state(tmp_path):
    model = tiny("fox").eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    loaded = load_model(str(path), block_size=256).eval()
    assert loaded.config.block_size == 256
    idx = torch.randint(0, V, (1, 100))
    with torch.no_grad():
        assert torch.equal(model(idx[:, :64])[0], loaded(idx[:, :64])[0])
        loaded(idx)   # beyond the training context: allowed after raising block_size
    other = tiny("grape_ap")
    torch.save({"model": other.state_dict(), "model_config": model.config.to_dict()}, path)
    with pytest.raises(ValueError, match="does not match its config"):
        load_model(str(path))


def test_init_follows_the_paper():
    L, C = 4, 64
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=C, vocab_size=5000, pos_encoding="rope"))
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.002
    block = model.transformer.h[0]
    std = 0.5 / math.sqrt(C)
    assert abs(block.attn.c_q.weight.std().item() - std) / std < 0.05
    assert abs(block.mlp.c_fc1.weight.std().item() - std) / std < 0.05
    resid = std / math.sqrt(L)
    assert abs(block.attn.c_proj.weight.std().item() - resid) / resid < 0.05
    assert abs(block.mlp.c_proj.weight.std().item() - resid) / resid < 0.05
    assert torch.equal(block.ln_1.weight, torch.ones(C))


def test_legacy_model_type_names_map_onto_pos_encoding():
    assert settings_from_model_type("llama-mha-grape-ap-v1") == {
        "pos_encoding": "grape_ap", "use_k_shift": False, "use_v_shift": False}
    assert settings_from_model_type("llama-mha-fox-kvshift")["use_v_shift"] is True
    for legacy, name in LEGACY_MODEL_TYPES.items():
        assert settings_from_model_type(legacy)["pos_encoding"] == name
        GPTConfig(n_layer=1, n_head=2, n_embd=16, **settings_from_model_type(legacy))
    with pytest.raises(ValueError, match="unknown model_type"):
        settings_from_model_type("llama-mha-xpos")


@pytest.mark.parametrize("kwargs,message", [
    (dict(pos_encoding="rotary"), "unknown pos_encoding"),
    (dict(n_head=4, n_embd=32, head_dim=6), "n_head \\* head_dim must equal n_embd"),
    (dict(n_head=4, n_embd=20, pos_encoding="rope"), "must be even"),
    (dict(pos_encoding="grape_ap", p_head_dim=5), "p_head_dim=5 must be even"),
    (dict(pos_encoding="grape_ap", p_tie_mode="pz"), "p_tie_mode"),
    (dict(attn_backend="flash"), "unknown attn_backend 'flash'; choose one of \\('auto', 'dense'"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    base = dict(n_layer=1, n_head=4, n_embd=32)
    with pytest.raises(ValueError, match=message):
        GPT(GPTConfig(**{**base, **kwargs}))


def test_wrong_config_type_is_rejected():
    with pytest.raises(Exception, match="n_layer"):
        GPTConfig(n_layer="twelve")


def test_sequence_longer_than_block_size_is_rejected():
    model = tiny("alibi")
    with pytest.raises(ValueError, match="longer than block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
