"""An original checkpoint folder loads only as what it is: a model_type that contradicts the folder
(its parameters, config.json's p_tie_mode and use_k_shift, the original's out_<model_type>_...
folder name) is refused instead of loading with wrong logits.

The folders are written here as the original writes them (config.json with model_type 'gpt2',
pytorch_model.bin under the original's names) from the parity goldens of
tests/golden/original/, whose logits the original computed: a folder that loads must give them.
"""
import json
import os
import runpy
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from original_goldens import GOLDEN_DIR, perturbed  # noqa: E402

from training.checkpoint import CheckpointError, load_model  # noqa: E402
from training.original_checkpoint import ORIGINAL_TYPES  # noqa: E402

LOGITS_ATOL = 2e-5                       # as in test_original_parity.py
RUN = "out_{}_1m_Opt_adamw_LR_0.05_D_fineweb-edu100B_T_0.01B_time_20250101_000000_jobid_7"


def original_folder(tmp_path, case_name: str, folder: str) -> str:
    """The golden case's parameters and config as the original's save_pretrained writes them."""
    case = torch.load(os.path.join(GOLDEN_DIR, f"{case_name}.pt"), weights_only=True)
    path = tmp_path / folder
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**case["original_config"], "model_type": "gpt2"}))
    state = {name: perturbed(name, shape, base, scale) for name, shape, base, scale in case["recipes"]}
    torch.save(state, path / "pytorch_model.bin")
    return str(path)


def expected_logits(case_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    case = torch.load(os.path.join(GOLDEN_DIR, f"{case_name}.pt"), weights_only=True)
    return case["idx"], case["logits"]


@pytest.mark.parametrize("case_name, folder, encoding", [
    ("rope", RUN.format("llama-mha-rope"), "rope"),
    ("alibi", RUN.format("llama-mha-alibi") + "/checkpoint-1000", "alibi"),      # a snapshot below the run
    ("rope-kvshift", RUN.format("llama-mha-rope"), "rope"),             # the original's plain name + use_k_shift
    ("grape-ap-v1-pq-tie", "renamed", "grape_ap"),                       # config.json's p_tie_mode says it
])
def test_a_folder_without_model_type_loads_as_what_its_name_or_config_says_with_the_originals_logits(
        tmp_path, case_name, folder, encoding):
    model = load_model(original_folder(tmp_path, case_name, folder))
    assert model.config.pos_encoding == encoding
    assert model.config.use_k_shift == case_name.endswith("kvshift")
    idx, logits = expected_logits(case_name)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("case_name, folder, model_type, reason", [
    ("rope", RUN.format("llama-mha-rope"), "llama-mha-alibi", "its folder name says it was trained as 'llama-mha-rope'"),
    ("rope", RUN.format("llama-mha-rope"), "llama-mha-nope", "the original repository has no NoPE model"),
    ("alibi", RUN.format("llama-mha-alibi"), "llama-mha-rope", "its folder name says it was trained as 'llama-mha-alibi'"),
    ("grape-ap-v1-pq-tie", "renamed", "llama-mha-rope", "its config.json sets p_tie_mode='pqtie', a GRAPE-AP with a tied"),
    ("grape-ap-v1-pq-tie", "renamed", "llama-mha-alibi", "its config.json sets p_tie_mode='pqtie', a GRAPE-AP with a tied"),
    ("rope", "renamed", "llama-mha-grape-ap-v1", "its parameters are those of RoPE or ALiBi"),
    ("rope", "renamed", "llama-mha-fox", "its parameters are those of RoPE or ALiBi"),
    ("rope", "renamed", "llama-mha-rope-kvshift", "asks for KV-shift, but the folder has no KV-shift parameters"),
    ("fox", "renamed", "llama-mha-rope", "its parameters are those of 'llama-mha-fox'"),
])
def test_a_model_type_that_contradicts_the_folder_is_refused(tmp_path, case_name, folder, model_type, reason):
    path = original_folder(tmp_path, case_name, folder)
    with pytest.raises(CheckpointError) as error:
        load_model(path, model_type=model_type)
    assert str(error.value).startswith(f"{path}: ") or "no NoPE model" in str(error.value)
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_the_originals_plain_model_type_with_use_k_shift_loads_its_kv_shift_run(tmp_path):
    model = load_model(original_folder(tmp_path, "rope-kvshift", "renamed"), model_type="llama-mha-rope")
    assert model.config.use_k_shift and model.config.use_v_shift
    idx, logits = expected_logits("rope-kvshift")
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], logits, atol=LOGITS_ATOL, rtol=0)


def test_a_renamed_rope_or_alibi_folder_asks_for_one_of_the_two_and_never_offers_nope(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_model(original_folder(tmp_path, "alibi", "renamed"))
    assert "pass the original's model_type: 'llama-mha-rope' or 'llama-mha-alibi'" in str(error.value)
    with pytest.raises(CheckpointError) as error:
        load_model(original_folder(tmp_path, "rope", "renamed-too"), model_type="llama-mha-ropez")
    assert "unknown model_type" in str(error.value) and "nope" not in str(error.value)
    assert "llama-mha-nope" not in ORIGINAL_TYPES and "llama-mha-grape-ap-v1" in ORIGINAL_TYPES


def test_convert_original_refuses_a_wrong_model_type_in_one_line(tmp_path, monkeypatch):
    path = original_folder(tmp_path, "alibi", RUN.format("llama-mha-alibi"))
    monkeypatch.setattr(sys, "argv", ["convert_original", path, str(tmp_path / "converted"), "--model_type",
                                      "llama-mha-rope"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("scripts.convert_original", run_name="__main__")
    assert str(exit_info.value.code).startswith(f"convert_original: {path}: its folder name says it was trained as")
    assert not (tmp_path / "converted").exists()
