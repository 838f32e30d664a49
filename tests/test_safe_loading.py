"""No loader runs code from a checkpoint (issue 20, point 1).

A pickle whose ``__reduce__`` would create a marker folder goes through every loader: load_model,
--init_from=resume, scripts.sample, scripts.eval_length, the lm-eval adapter, scripts.compare_encodings'
checkpoint reading, and (in a process that cannot import this repository) transformers'
from_pretrained of a folder whose weights are such a pytorch_model.bin. Each refuses it with one
line naming the file, and the marker is never created. Weight index files may not name a file
outside their folder. What training writes is plain data (torch.load(weights_only=True) reads it
here directly), and a checkpoint of the earlier format (numpy's RNG state as a pickled array) loads
only through the documented opt-in."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from scripts import compare_encodings, eval_length, sample
from test_training import data_dir, tiny  # noqa: F401  (data_dir: a fixture)
from train_adam_finewebedu import cli, main
from training import checkpoint
from training.checkpoint import CheckpointError, load_checkpoint, load_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lm-evaluation-harness"))


class RunsCode:
    """Unpickling this calls os.mkdir(marker): the marker shows that a loader ran the file's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good") / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=1"))
    return out


def poisoned_run(good_run: str, folder, marker: str) -> str:
    """A copy of a training out_dir whose ckpt.pt carries a RunsCode beside its real state."""
    shutil.copytree(good_run, folder)
    state = torch.load(os.path.join(good_run, "ckpt.pt"), weights_only=True)
    state["wandb_id"] = RunsCode(marker)
    torch.save(state, os.path.join(folder, "ckpt.pt"))
    return str(folder)


LOADERS = {
    "load_model": lambda run, data: load_model(os.path.join(run, "ckpt.pt")),
    "train --init_from=resume": lambda run, data: cli(tiny(data, run, "--init_from=resume", "--max_iters=3")),
    "scripts.sample": lambda run, data: sample.main([f"--ckpt={os.path.join(run, 'ckpt.pt')}", "--num_samples=1",
                                                     "--max_new_tokens=2"]),
    "scripts.eval_length": lambda run, data: eval_length.main([os.path.join(run, "ckpt.pt"), f"--data_dir={data}",
                                                               "--num_windows=1"]),
    "lm-eval adapter": lambda run, data: __import__("grape_lm").GrapeLM(pretrained=os.path.join(run, "ckpt.pt")),
    "scripts.compare_encodings": lambda run, data: compare_encodings.checkpoint_iter(run),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_a_pickle_that_runs_code(good_run, data_dir, tmp_path, loader, monkeypatch):
    monkeypatch.delenv(checkpoint.TRUST_PICKLE_ENV, raising=False)
    marker = str(tmp_path / "MARKER")
    run = poisoned_run(good_run, tmp_path / "run", marker)
    with pytest.raises((CheckpointError, SystemExit)) as error:
        LOADERS[loader](run, data_dir)
    text = error.value.code if isinstance(error.value, SystemExit) else str(error.value)
    assert "ckpt.pt holds Python objects that loading would run (pickle global posix.mkdir)" in text
    assert "\n" not in text and checkpoint.TRUST_PICKLE_ENV in text
    assert not os.path.exists(marker)


def test_the_poison_runs_when_the_file_is_trusted(good_run, tmp_path):
    """The control: the same file through the full unpickler (the opt-in) does create the marker,
    so the refusals above are what kept it from running."""
    marker = str(tmp_path / "MARKER")
    run = poisoned_run(good_run, tmp_path / "run", marker)
    load_checkpoint(run, trust_pickle=True)
    assert os.path.isdir(marker)


def poisoned_weights_folder(tmp_path, marker: str) -> str:
    """A save_pretrained folder whose weights are a pytorch_model.bin carrying a RunsCode."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, pos_encoding="rope"))
    folder = tmp_path / "poisoned_folder"
    model.save_pretrained(str(folder))
    os.remove(folder / "model.safetensors")
    torch.save({**model.state_dict(), "payload": RunsCode(marker)}, folder / "pytorch_model.bin")
    return str(folder)


FROM_PRETRAINED = r'''
import os, sys
from transformers import AutoModelForCausalLM
folder, marker = sys.argv[1], sys.argv[2]
try:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    print("LOADED")
except ValueError as e:
    print("REFUSED:" + str(e))
print("MARKER" if os.path.exists(marker) else "NO MARKER")
'''


def test_from_pretrained_refuses_a_pytorch_model_bin_that_runs_code(tmp_path, run_without_repository):
    marker = str(tmp_path / "MARKER")
    folder = poisoned_weights_folder(tmp_path, marker)
    lines = run_without_repository(FROM_PRETRAINED, folder, marker).stdout.strip().splitlines()
    assert lines[-2] == (f"REFUSED:{folder}/pytorch_model.bin holds Python objects that loading would run "
                         "(pickle global posix.mkdir); refusing to load it. Weights are tensors: save them with "
                         "safetensors")
    assert lines[-1] == "NO MARKER" and not os.path.exists(marker)
    torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=False)        # the control: it does run
    assert os.path.isdir(marker)
    os.rmdir(marker)
    # the repository's own loader says the same
    with pytest.raises(ValueError, match="pytorch_model.bin holds Python objects") as error:
        load_model(folder)
    assert "\n" not in str(error.value) and not os.path.exists(marker)


def test_a_clean_pytorch_model_bin_still_loads(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, pos_encoding="fox")).eval()
    folder = tmp_path / "bin_folder"
    model.save_pretrained(str(folder))
    os.remove(folder / "model.safetensors")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    ids = torch.randint(0, 1000, (1, 16))
    torch.testing.assert_close(load_model(str(folder)).eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/outside.safetensors", "link/outside.safetensors"])
def test_a_weight_index_may_not_name_a_file_outside_its_folder(tmp_path, name):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, pos_encoding="rope"))
    folder = tmp_path / "indexed"
    model.save_pretrained(str(folder))
    shutil.copy(folder / "model.safetensors", tmp_path / "outside.safetensors")
    (folder / "link").symlink_to(tmp_path)                   # a folder inside that leads outside
    os.remove(folder / "model.safetensors")
    index = {"metadata": {}, "weight_map": {k: name for k in model.state_dict()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"names '{name}', a file outside its folder") as error:
        GPT.from_pretrained(str(folder))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="a file outside its folder"):
        load_model(str(folder))


# ----------------------------------------------------------------------------------------
# What training writes, and checkpoints of the earlier format
# ----------------------------------------------------------------------------------------

def test_training_checkpoints_hold_plain_data_only(good_run):
    state = torch.load(os.path.join(good_run, "ckpt.pt"), weights_only=True)     # torch's own restricted loader
    numpy_rng = state["rank_states"][0]["numpy_rng"]
    assert numpy_rng[0] == "MT19937" and len(numpy_rng[1]) == 624 and isinstance(numpy_rng[1], list)
    with pytest.raises(TypeError, match=r"state\['rng'\] is a numpy.ndarray"):
        checkpoint.check_plain({"rng": np.zeros(3)})


def earlier_format(good_run: str, folder) -> str:
    """The run's checkpoint as earlier versions wrote it: numpy's RNG state with its key array."""
    shutil.copytree(good_run, folder)
    state = torch.load(os.path.join(good_run, "ckpt.pt"), weights_only=True)
    name, keys, pos, has_gauss, cached = state["rank_states"][0]["numpy_rng"]
    state["rank_states"][0]["numpy_rng"] = (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
    torch.save(state, os.path.join(folder, "ckpt.pt"))
    return str(folder)


def test_an_earlier_checkpoint_loads_through_the_opt_in_only(good_run, data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(checkpoint.TRUST_PICKLE_ENV, raising=False)
    old = earlier_format(good_run, tmp_path / "old")
    with pytest.raises(CheckpointError, match="pickle global numpy"):
        load_checkpoint(old)
    assert load_checkpoint(old, trust_pickle=True)["iter_num"] == 2
    with pytest.raises(SystemExit, match="--trust_checkpoint_pickle=True"):
        cli(tiny(data_dir, old, "--init_from=resume", "--max_iters=3"))
    # the training option, then the environment variable: the run resumes and writes the plain format
    result = main(tiny(data_dir, old, "--init_from=resume", "--max_iters=3", "--trust_checkpoint_pickle=True"))
    assert result["iter_num"] == 3
    torch.load(os.path.join(old, "ckpt.pt"), weights_only=True)
    other = earlier_format(good_run, tmp_path / "other")
    monkeypatch.setenv(checkpoint.TRUST_PICKLE_ENV, "1")
    assert load_model(os.path.join(other, "ckpt.pt")).config.n_embd == 32
