"""Bad input gets one clear line naming the problem: unreadable checkpoints (every loader), token
ids beyond vocab_size, and config errors that used to surface late as tracebacks (and after
out_dir had been written)."""
import os
import sys

import numpy as np
import pytest

from modeling import attention
from scripts import eval_length
from scripts import sample
from training.checkpoint import CheckpointError, load_checkpoint, load_model
from training.shards import write_shard
from test_training import data_dir, tiny  # noqa: F401  (data_dir: a fixture)
from train_adam_finewebedu import cli, main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lm-evaluation-harness"))


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert isinstance(exit_info.value.code, str)
    return exit_info.value.code


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good") / "run")
    main(tiny(data_dir, out, "--max_iters=1", "--eval_interval=1"))
    return out


def damaged(good_run, tmp_path, kind) -> str:
    """A copy of the run whose ckpt.pt is random bytes, cut in half, or cut by its last byte."""
    data = open(os.path.join(good_run, "ckpt.pt"), "rb").read()
    content = {"random": np.random.default_rng(0).bytes(len(data)), "half": data[:len(data) // 2],
               "last byte": data[:-1]}[kind]
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "ckpt.pt").write_bytes(content)
    return str(folder)


LOADERS = {
    "train --init_from=resume": lambda path, data: cli(tiny(data, os.path.dirname(path), "--init_from=resume",
                                                            "--max_iters=2")),
    "checkpoint.load_checkpoint": lambda path, data: load_checkpoint(path),
    "load_model": lambda path, data: load_model(path),
    "sample.py": lambda path, data: sample.main([f"--ckpt={path}", "--num_samples=1", "--max_new_tokens=2"]),
    "eval_length.py": lambda path, data: eval_length.main([os.path.dirname(path), f"--data_dir={data}"]),
    "lm-eval adapter": lambda path, data: __import__("grape_lm").GrapeLM(pretrained=path),
}


@pytest.mark.parametrize("kind", ["random", "half", "last byte"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_names_an_unreadable_checkpoint(good_run, data_dir, tmp_path, kind, loader):
    path = os.path.join(damaged(good_run, tmp_path, kind), "ckpt.pt")
    expected = f"{path} is not a readable checkpoint (truncated or corrupt)"
    with pytest.raises((CheckpointError, SystemExit)) as error:
        LOADERS[loader](path, data_dir)
    text = error.value.code if isinstance(error.value, SystemExit) else str(error.value)
    assert expected in text and "\n" not in text
    if isinstance(error.value, SystemExit):
        assert text == f"checkpoint error: {expected}: no zip directory at its end"


def test_a_damaged_save_pretrained_folder_names_the_damaged_file(good_run, tmp_path):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(open(os.path.join(good_run, name), "rb").read())
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(CheckpointError, match=f"{folder}/model.safetensors is not a readable checkpoint"):
        load_model(str(folder))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"n_layer": 1, "n_')
    with pytest.raises(CheckpointError, match=f"{folder}/config.json is not a readable checkpoint"):
        load_model(str(folder))


def test_token_ids_beyond_vocab_size_stop_training_with_a_data_error(tmp_path):
    tokens = np.arange(2000) % 200
    tokens[1234] = 300
    write_shard(str(tmp_path / "train_000000.bin"), tokens)
    write_shard(str(tmp_path / "val_000000.bin"), np.arange(500) % 200)
    out = str(tmp_path / "run")
    message = exit_message(tiny(str(tmp_path), out, "--max_iters=2"))
    assert message == (f"data error: token shard {tmp_path}/train_000000.bin holds token id 300, but vocab_size "
                       "is 256: it was tokenised with a larger vocabulary than the model's; re-prepare the data "
                       "or raise vocab_size")


@pytest.mark.parametrize("args, expected", [
    (["--learning_rate=-1"], "config key 'learning_rate' must be >= 0, got -1.0"),
    (["--beta2=1.5"], "config key 'beta2' must be in [0, 1), got 1.5"),
    (["--n_head=3", "--head_dim=None"], "n_head * head_dim must equal n_embd, got 3 * 10 != 32"),
    (["--pos_encoding=grape_ap", "--p_head_dim=7"], "p_head_dim=7 must be even"),
    (["--pos_encoding=bogus"], "unknown pos_encoding 'bogus'"),
    (["--on_divergence=ignore"], "config key 'on_divergence' must be one of ('stop', 'rollback')"),
    (["--max_iters=100", "--lr_decay_iters=-1"], "config key 'lr_decay_iters' (-1) must exceed 'warmup_iters'"),
])
def test_late_config_errors_are_one_line_before_out_dir_is_written(data_dir, tmp_path, args, expected):
    out = tmp_path / "run"
    message = exit_message(tiny(data_dir, str(out), *args))
    assert message.startswith("config error: ") and expected in message and "\n" not in message
    assert not out.exists()


def test_unknown_attn_backend_lists_the_backends_of_attention_py(data_dir, tmp_path):
    out = tmp_path / "run"
    message = exit_message(tiny(data_dir, str(out), "--attn_backend=bogus"))
    assert message == f"config error: config key 'attn_backend' must be one of {('auto', *attention.BACKENDS)}, got 'bogus'"
    assert not out.exists()
