"""Parity with the original implementation, against golden files its own code wrote
(tests/make_original_goldens.py, run by hand against a checkout of the original).

For every original model type, with and without KV-shift, and a few variants: the same
parameters (every one perturbed, norm weights included) loaded through the checkpoint
conversion (original_checkpoint.py) give the original's logits, gradients, and parameters
after one AdamW step with the original's parameter groups and settings; the decayed set is
the original's; the deterministic initial values are the original's; and the original's
save_pretrained folders load with its logits.

Tolerances (float32 on CPU): logits 2e-5 absolute (values of order 1-10: the two codes sum
in different orders, and FoX's original runs a Triton kernel); gradients 2e-4 of the largest
entry of each tensor; stepped parameters 1e-5 absolute (the step is ±lr = 0.05 per entry, so a
wrong sign or a wrong decay group, lr·wd·|p| ≥ 5e-5 for every decayed entry, is far outside).

    python tests/test_original_parity.py        # the table of max |ours - original| per case
"""
import glob
import os
import runpy
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from original_goldens import GOLDEN_DIR, perturbed, sample  # noqa: E402

from model import GPT  # noqa: E402
from training.checkpoint import load_model
from training.original_checkpoint import config_from_original, from_original, name_map, to_original  # noqa: E402

CASES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(GOLDEN_DIR, "*.pt")))
ADDITIVE = ("alibi", "fox", "grape-a", "grape-ap")
LOGITS_ATOL, GRAD_RTOL, STEP_ATOL = 2e-5, 2e-4, 1e-5


def load_case(name: str) -> dict:
    return torch.load(os.path.join(GOLDEN_DIR, f"{name}.pt"), weights_only=True)


def original_parameters(case: dict) -> dict:
    return {name: perturbed(name, shape, base, scale) for name, shape, base, scale in case["recipes"]}


def build(case: dict, backend: str = "auto") -> GPT:
    """Our model for the case's original config, with the case's parameters converted."""
    model_type = case["model_type"] + ("-kvshift" if case["kv_shift"] else "")
    config = config_from_original(case["original_config"], model_type, attn_backend=backend)
    model = GPT(config)
    state = model.state_dict()
    state.update(from_original(original_parameters(case), config))
    model.load_state_dict(state)
    return model


def split(flat: torch.Tensor, names: list, shapes: dict) -> dict:
    out, i = {}, 0
    for name in names:
        n = sample(torch.empty(shapes[name])).numel()
        out[name] = flat[i:i + n]
        i += n
    assert i == flat.numel()
    return out


def step_like_training(model: GPT, case: dict) -> None:
    """Clip, then one AdamW step with our default (the original's) groups, as the training script does."""
    adamw = case["adamw"]
    torch.nn.utils.clip_grad_norm_(model.parameters(), adamw["grad_clip"])
    optimizer = torch.optim.AdamW(model.optimizer_groups(adamw["weight_decay"]), lr=adamw["lr"],
                                  betas=adamw["betas"], eps=adamw["eps"], fused=True)
    optimizer.step()


def differences(name: str, backend: str = "auto") -> dict:
    """max |ours - original| for logits, loss, gradients (relative) and stepped parameters."""
    case = load_case(name)
    model = build(case, backend)
    logits, loss = model(case["idx"], case["targets"])
    loss.backward()
    shapes = {n: s for n, s, _, _ in case["recipes"]}
    config = model.config
    ours_grad = to_original({n: p.grad for n, p in model.named_parameters()}, config)
    grad_err = 0.0
    for n, golden in split(case["grads"], case["grad_names"], shapes).items():
        grad_err = max(grad_err, ((sample(ours_grad[n]) - golden).abs().max() / golden.abs().max().clamp_min(1e-30)).item())
    step_like_training(model, case)
    ours_param = to_original(dict(model.named_parameters()), config)
    stepped = split(case["stepped"], [n for n, _, _, _ in case["recipes"]], shapes)
    step_err = max((sample(ours_param[n]) - golden).abs().max().item() for n, golden in stepped.items())
    return {"logits": (logits - case["logits"]).abs().max().item(), "loss": abs(loss.item() - case["loss"]),
            "grad": grad_err, "step": step_err}


def test_every_original_model_type_has_goldens_with_and_without_kv_shift():
    types = {(load_case(n)["model_type"], load_case(n)["kv_shift"]) for n in CASES}
    original = ["rope", "alibi", "fox", "grape-m-nonctx", "grape-m-ctx", "grape-a-querygated",
                "grape-a-keygated", "grape-a-querykeygated", "grape-ap-v1"]       # its model/ files
    assert types >= {(f"llama-mha-{t}", kv) for t in original for kv in (False, True)}


@pytest.mark.parametrize("name", CASES)
def test_logits_gradients_and_one_adamw_step_match_the_original(name):
    err = differences(name)
    assert err["logits"] < LOGITS_ATOL and err["loss"] < LOGITS_ATOL, err
    assert err["grad"] < GRAD_RTOL, err
    assert err["step"] < STEP_ATOL, err


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith(ADDITIVE)])
def test_chunked_path_matches_the_original(name):
    """The linear-memory path the CPU (and long sequences) train with, against the same goldens."""
    err = differences(name, backend="chunked")
    assert err["logits"] < LOGITS_ATOL and err["grad"] < GRAD_RTOL and err["step"] < STEP_ATOL, err


@pytest.mark.parametrize("name", CASES)
def test_decayed_parameters_are_the_originals(name):
    """Default optimizer groups: the original decays everything but RMSNorm weights."""
    case = load_case(name)
    model = build(case)
    ours = {id(p) for p in model.optimizer_groups(0.01)[0]["params"]}
    names = name_map(model.config)                       # ours -> the original's
    decayed = {names[n] for n, p in model.named_parameters() if id(p) in ours}
    trainable = set(case["grad_names"])                  # the original also lists frozen ones
    assert decayed == set(case["decayed"]) & trainable


@pytest.mark.parametrize("name", CASES)
def test_initial_values_match_the_originals(name):
    """Norm weights, frequencies, ω, gate biases: the original's initial values (RNG-free ones)."""
    case = load_case(name)
    model_type = case["model_type"] + ("-kvshift" if case["kv_shift"] else "")
    model = GPT(config_from_original(case["original_config"], model_type))
    ours = to_original(dict(model.named_parameters()), model.config)
    assert case["init"], name
    for n, value in case["init"].items():
        torch.testing.assert_close(ours[n].detach(), value, atol=1e-6, rtol=1e-6, msg=n)


CHECKPOINTS = sorted(glob.glob(os.path.join(GOLDEN_DIR, "checkpoints", "*")))


@pytest.mark.parametrize("folder", CHECKPOINTS, ids=os.path.basename)
def test_original_checkpoint_folder_loads_with_its_logits(folder, tmp_path):
    expected = torch.load(os.path.join(folder, "expected_logits.pt"), weights_only=True)
    model_type = os.path.basename(folder)
    model = load_model(folder, model_type=model_type)
    torch.testing.assert_close(model(expected["idx"])[0], expected["logits"], atol=LOGITS_ATOL, rtol=0)
    # written as a folder of this repository, it loads the standard way with the same logits
    model.save_pretrained(tmp_path / "converted")
    again = GPT.from_pretrained(tmp_path / "converted")
    torch.testing.assert_close(again(expected["idx"])[0], expected["logits"], atol=LOGITS_ATOL, rtol=0)


def test_conversion_command_writes_a_folder_with_the_originals_logits(tmp_path, monkeypatch, capsys):
    """``python -m scripts.convert_original FOLDER OUT --model_type T``, as README gives it."""
    folder = os.path.join(GOLDEN_DIR, "checkpoints", "llama-mha-rope")
    expected = torch.load(os.path.join(folder, "expected_logits.pt"), weights_only=True)
    monkeypatch.setattr(sys, "argv", ["convert_original", folder, str(tmp_path / "out"), "--model_type", "llama-mha-rope"])
    runpy.run_module("scripts.convert_original", run_name="__main__")
    assert "-> " + str(tmp_path / "out") in capsys.readouterr().out
    converted = GPT.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(converted(expected["idx"])[0], expected["logits"], atol=LOGITS_ATOL, rtol=0)


def test_rope_folder_without_model_type_is_refused_with_the_reason():
    folder = os.path.join(GOLDEN_DIR, "checkpoints", "llama-mha-rope")
    with pytest.raises(ValueError, match="model_type"):
        load_model(folder)
    with pytest.raises(ValueError, match="parameters are those of"):
        load_model(os.path.join(GOLDEN_DIR, "checkpoints", "llama-mha-grape-m-ctx-kvshift"), model_type="llama-mha-rope")


def test_grape_m_ctx_folder_is_recognised_from_its_parameters():
    folder = os.path.join(GOLDEN_DIR, "checkpoints", "llama-mha-grape-m-ctx-kvshift")
    config = load_model(folder).config
    assert (config.pos_encoding, config.use_k_shift, config.qk_norm_after_rotation) == ("grape_m_ctx", True, True)


def table() -> str:
    rows = ["| case | logits | loss | gradients (rel.) | after one AdamW step | chunked logits |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in CASES:
        err = differences(name)
        chunked = f"{differences(name, 'chunked')['logits']:.1e}" if name.startswith(ADDITIVE) else ""
        rows.append(f"| {name} | {err['logits']:.1e} | {err['loss']:.1e} | {err['grad']:.1e} | {err['step']:.1e} | {chunked} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
