"""What follows the original implementation by default or as an option: its optimizer groups,
its order of QK-norm and rotation, GRAPE-M(-ctx) learnable frequencies in its parameterisation,
and the conversion of checkpoints this repository wrote with its earlier parameterisations."""
import math

import pytest
import torch

from grape import rope_frequencies
from model import GPT, GPTConfig
from training.checkpoint import load_model

V = 64


def tiny(pos_encoding, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, head_dim=16, vocab_size=V, block_size=64,
                         pos_encoding=pos_encoding, **kw))


def is_norm_weight(name):
    return name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_norm.weight", "k_norm.weight",
                          "out_norm.weight"))


@pytest.mark.parametrize("name", ["grape_m", "grape_m_ctx", "fox", "grape_a_qk", "grape_ap"])
def test_default_weight_decay_is_on_everything_but_rmsnorm_weights(name):
    model = tiny(name, use_k_shift=True, use_v_shift=True, using_groupnorm=True)
    decayed, kept = model.optimizer_groups(0.01)
    assert decayed["weight_decay"] == 0.01 and kept["weight_decay"] == 0.0
    ids = {id(p) for p in decayed["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in ids) == (not is_norm_weight(n)), n
    # and so shared frequencies, ω and biases are decayed (the original's optim_utils)
    assert any(p.dim() < 2 for p in decayed["params"]) == (name != "grape_ap")


def test_matrices_policy_decays_parameters_of_two_or_more_dimensions_only():
    model = tiny("grape_a_qk", grape_m_per_head=True)
    decayed, kept = model.optimizer_groups(0.01, "matrices")
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in kept["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}
    with pytest.raises(ValueError, match="weight decay policy"):
        model.optimizer_groups(0.01, "everything")


def test_frozen_frequencies_are_in_no_group():
    model = tiny("grape_m", grape_learnable_freq=False)
    grouped = {id(p) for g in model.optimizer_groups(0.01) for p in g["params"]}
    assert all(id(block.attn.pos.scaled_log_freq) not in grouped for block in model.transformer.h)


@pytest.mark.parametrize("name", ["grape_m", "grape_m_ctx"])
@pytest.mark.parametrize("per_head", [False, True])
def test_learnable_frequencies_start_at_ropes_spectrum_exactly(name, per_head):
    enc = tiny(name, grape_m_per_head=per_head).transformer.h[0].attn.pos
    theta = enc.frequencies()
    assert theta.shape == ((2, 8) if per_head else (8,))
    assert torch.equal(theta.detach(), rope_frequencies(16, 10000.0).expand_as(theta))
    # the stored values are the original's: s·log θ (s = 16) for GRAPE-M, log θ for GRAPE-M-ctx
    stored = enc.scaled_log_freq if name == "grape_m" else enc.log_freq
    scale = 16.0 if name == "grape_m" else 1.0
    expected = torch.tensor([scale * (-2 * i / 16) * math.log(10000.0) for i in range(8)])
    torch.testing.assert_close(stored.detach().view(-1, 8)[-1], expected, atol=1e-4, rtol=1e-6)


def test_grape_m_ctx_learns_its_frequencies_and_can_freeze_them():
    for learnable in (True, False):
        model = tiny("grape_m_ctx", grape_learnable_freq=learnable)
        idx = torch.randint(0, V, (2, 20))
        model(idx, idx)[1].backward()
        grad = model.transformer.h[0].attn.pos.log_freq.grad
        assert (grad is not None and grad.abs().sum() > 0) if learnable else grad is None


def test_grape_m_ctx_initial_increment_follows_init_omega():
    """ω₀ = sigmoid(softplus⁻¹(init)/16): ≈ 0.39 for the original's 1e-3."""
    for init, expected in ((1e-3, 1 / (1 + math.exp(-math.log(math.expm1(1e-3)) / 16))), (2.0, None)):
        enc = tiny("grape_m_ctx", grape_ctx_init_omega=init).transformer.h[0].attn.pos
        omega = enc.increments(torch.randn(1, 3, 32))
        expected = expected or 1 / (1 + math.exp(-math.log(math.expm1(init)) / 16))
        torch.testing.assert_close(omega, torch.full_like(omega, expected), atol=1e-6, rtol=0)
    assert abs(1 / (1 + math.exp(-math.log(math.expm1(1e-3)) / 16)) - 0.3937) < 1e-4


def test_qk_norm_after_rotation_equals_before_when_norm_weights_are_one():
    """Rotations keep the RMS, so the order matters only through the norm weights."""
    before, after = tiny("rope"), tiny("rope", qk_norm_after_rotation=True)
    after.load_state_dict(before.state_dict())
    idx = torch.randint(0, V, (2, 30))
    torch.testing.assert_close(after(idx)[0], before(idx)[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for model in (before, after):
            for block in model.transformer.h:
                block.attn.q_norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    assert (after(idx)[0] - before(idx)[0]).abs().max() > 1e-3


def test_qk_norm_after_rotation_is_refused_for_additive_encodings():
    with pytest.raises(ValueError, match="qk_norm_after_rotation"):
        tiny("rope+grape_ap", qk_norm_after_rotation=True)


def old_grape_m_state(model):
    """The state dict as this repository wrote it before: δ with θ = θ_RoPE · exp(δ / 16)."""
    state = model.state_dict()
    for i in range(model.config.n_layer):
        key = f"transformer.h.{i}.attn.pos."
        theta = model.transformer.h[i].attn.pos.frequencies().detach().double()
        state[key + "log_freq"] = (16 * torch.log(theta / rope_frequencies(16, 10000.0).double())).float()
        del state[key + "scaled_log_freq"]
    return state


def perturbed_grape_m(**kw):
    model = tiny("grape_m", **kw)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.pos.scaled_log_freq.add_(torch.linspace(-6, 6, block.attn.pos.scaled_log_freq.numel())
                                                .view_as(block.attn.pos.scaled_log_freq))
    return model


@pytest.mark.parametrize("per_head", [False, True])
def test_grape_m_checkpoint_of_the_earlier_parameterisation_loads_with_its_frequencies(per_head, tmp_path):
    model = perturbed_grape_m(grape_m_per_head=per_head)
    old = old_grape_m_state(model)
    idx = torch.randint(0, V, (2, 30))
    expected = model(idx)[0]
    fresh = tiny("grape_m", grape_m_per_head=per_head)
    with pytest.warns(UserWarning, match="earlier parameterisation"):
        fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(idx)[0], expected, atol=1e-5, rtol=1e-5)
    # the same through a training checkpoint and through a save_pretrained folder
    torch.save({"model": old, "model_config": model.config.to_dict()}, tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning, match="earlier parameterisation"):
        torch.testing.assert_close(load_model(str(tmp_path / "ckpt.pt"))(idx)[0], expected, atol=1e-5, rtol=1e-5)
    from safetensors.torch import save_file
    model.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in old.items() if k != "lm_head.weight"},
              str(tmp_path / "folder" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="earlier parameterisation"):
        torch.testing.assert_close(GPT.from_pretrained(tmp_path / "folder")(idx)[0], expected, atol=1e-5, rtol=1e-5)


def test_grape_m_ctx_checkpoint_from_before_learned_frequencies_loads_with_ropes_spectrum(tmp_path):
    model = tiny("grape_m_ctx")
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.pos.phase_proj.weight.normal_(0, 1.0)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("attn.pos.log_freq")}
    fresh = tiny("grape_m_ctx")
    with torch.no_grad():
        for block in fresh.transformer.h:
            block.attn.pos.log_freq.add_(1.0)            # not the initial value: the load must set it
    with pytest.warns(UserWarning, match="fixed spectrum"):
        fresh.load_state_dict(old)
    idx = torch.randint(0, V, (2, 30))
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_folder_missing_a_parameter_is_an_error_not_an_uninitialised_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny("grape_a_qk")
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.1.attn.pos.gate_q"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="gate_q"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [("keygated_omega_init", -1.0), ("grape_ctx_omega_scale", 0.0),
                                        ("querygated_v_l2_eps", 0.0), ("grape_log_freq_scale", -16.0)])
def test_impossible_original_knob_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        GPTConfig(n_layer=1, n_head=2, n_embd=32, pos_encoding="grape_a_k", **{key: value})
