"""Bad input gets one clear line naming the problem: unreadable checkpoints (every loader), token
ids beyond vocab_size, and config errors that used to surface late as tracebacks (and after
out_dir had been written)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from modeling import attention
from scripts import eval_length
from scripts import sample
from training import trainer
from training.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, load_model
from training.shards import write_shard
from test_training import ROOT, SCRIPT, data_dir, read_log, tiny  # noqa: F401  (data_dir: a fixture)
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


@pytest.mark.parametrize("text, expected", [
    (b"n_layer = (4\n", "cfg.py', line 1: '(' was never closed"),
    (b"n_layer = 2\nimport no_such_module_here\n", "cfg.py', line 2: ModuleNotFoundError: No module named "
                                                   "'no_such_module_here'"),
    (b"# caf\xe9\nn_layer = 2\n", "cfg.py' is not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8"),
    (b"learning_rate = float('nan')\n", "config key 'learning_rate' must be a finite number, got nan"),
    (b"min_lr = float('inf')\n", "config key 'min_lr' must be a finite number, got inf"),
])
def test_a_config_file_that_cannot_run_is_one_line_naming_its_place(data_dir, tmp_path, text, expected):
    (tmp_path / "cfg.py").write_bytes(text)
    out = tmp_path / "run"
    message = exit_message([str(tmp_path / "cfg.py"), *tiny(data_dir, str(out))])
    assert message.startswith("config error: ") and expected in message and "\n" not in message
    assert not out.exists()


@pytest.mark.parametrize("device, expected", [
    ("cuda", "config key 'device' is 'cuda', but this machine has no CUDA GPU that torch can use"),
    ("gpu", "config key 'device': 'gpu' is not a device torch knows"),
])
def test_a_device_this_machine_lacks_is_a_config_error_before_out_dir_is_written(data_dir, tmp_path, device,
                                                                                expected):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "run"
    message = exit_message(tiny(data_dir, str(out)) + [f"--device={device}"])
    assert message.startswith("config error: " + expected)
    assert not out.exists()


@pytest.mark.parametrize("change, expected", [
    ("--seed=7", "with data_seed=7: it was trained with data_seed=1337 (data_seed follows seed unless set)"),
    ("--data_rng_mode=stateful", "with data_rng_mode='stateful': it was trained with data_rng_mode='stateless'"),
])
def test_resume_with_another_data_seed_or_rng_mode_is_a_config_error_before_anything_is_written(
        good_run, data_dir, tmp_path, change, expected):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    message = exit_message(tiny(data_dir, str(out), "--max_iters=2", "--init_from=resume", change))
    assert message.startswith(f"config error: cannot resume from {out}/ckpt.pt {expected}; resume with the same "
                              "value")
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()} == before


def test_a_checkpoint_whose_config_disagrees_with_its_weights_is_one_line_in_training_and_loading(good_run,
                                                                                                data_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = load_checkpoint(str(out))
    ckpt["model"]["transformer.wte.weight"] = torch.zeros(256, 16)       # its model_config says n_embd 32
    atomic_torch_save(ckpt, str(out / "ckpt.pt"))
    message = exit_message(tiny(data_dir, str(out), "--max_iters=2", "--init_from=resume"))
    assert message.startswith(f"checkpoint error: {out}/ckpt.pt does not fit the model its own config describes: "
                              "size mismatch for transformer.wte.weight") and "\n" not in message
    with pytest.raises(CheckpointError, match=r"ckpt.pt cannot be loaded: .*\(size mismatch for transformer.wte"):
        load_model(str(out / "ckpt.pt"))


@pytest.mark.parametrize("odd", [{"n_head": "eight"}, {"n_layer": -1}, {"vocab_size": None}, {"pos_encoding": 5}])
def test_a_folder_whose_config_json_holds_odd_values_is_one_line(good_run, tmp_path, odd):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(good_run, name), folder / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **odd}))
    with pytest.raises(CheckpointError) as error:
        load_model(str(folder))
    key = next(iter(odd))
    assert str(error.value).startswith(f"{folder} cannot be loaded: its config and weights do not describe a model")
    assert key in str(error.value) and "\n" not in str(error.value)


def copy_of(data_dir, tmp_path) -> str:
    copy = tmp_path / "shards"
    shutil.copytree(data_dir, copy)
    return str(copy)


def test_a_shard_body_with_ids_beyond_vocab_under_a_valid_header_is_a_data_error_naming_the_shard(data_dir,
                                                                                                 tmp_path):
    data = copy_of(data_dir, tmp_path)
    for name in ("train_000000.bin", "train_000001.bin"):        # the header's largest id stays < 256
        with open(os.path.join(data, name), "r+b") as f:
            f.seek(1024 + 2 * 100)
            f.write(np.full(5000, 300, dtype=np.uint16).tobytes()[:2 * 3000])
    out = tmp_path / "run"
    message = exit_message(tiny(data, str(out), "--max_iters=2"))
    assert re.fullmatch(rf"data error: token shard {data}/train_00000[01].bin holds token id 300 at token \d+, but "
                        "vocab_size is 256: its body does not match its header .*; re-prepare the data", message)


@pytest.mark.parametrize("change, expected", [
    ("truncated", r"changed size while this run was reading it \(13024 -> 9024 bytes\)"),
    ("rewritten in place", r"was rewritten while this run was reading it \(its modification time changed\)"),
    ("replaced", r"was replaced by another file while this run was reading it"),
])
def test_a_shard_changed_under_a_running_job_is_a_data_error_never_a_rollback(data_dir, tmp_path, monkeypatch,
                                                                            change, expected):
    data = copy_of(data_dir, tmp_path)
    shard = os.path.join(data, "train_000000.bin")
    real_step = trainer.Trainer.train_step

    def step_then_change_the_shard(self):
        real_step(self)
        if self.iter_num == 3:
            tokens = np.fromfile(shard, dtype=np.uint16, offset=1024)
            if change == "truncated":
                os.truncate(shard, os.path.getsize(shard) - 4000)
            elif change == "rewritten in place":
                with open(shard, "r+b") as f:
                    f.seek(1024)
                    f.write(tokens[::-1].tobytes())
                os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10 ** 9))   # coarse clocks: a later time
            else:
                write_shard(shard, tokens[::-1])
    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_change_the_shard)
    out = tmp_path / "run"
    message = exit_message(tiny(data, str(out), "--max_iters=8", "--eval_interval=2", "--on_divergence=rollback"))
    assert re.fullmatch(rf"data error: token shard {shard} {expected}; a running job's data must stay as it was: "
                        r"restore the shard \(or re-prepare the data\) and resume with --init_from=resume", message)
    log = read_log(str(out))
    assert not any("rollback_from" in r or "diverged" in r for r in log)
    assert load_checkpoint(str(out))["iter_num"] == 2                # the last checkpoint, untouched


def test_a_world_size_change_under_stateful_data_is_one_line_under_torchrun(data_dir, tmp_path):
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2", "--data_rng_mode=stateful"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           *tiny(data_dir, out, "--max_iters=4", "--data_rng_mode=stateful", "--init_from=resume")]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    expected = (f"config error: cannot resume from {out}/ckpt.pt on 2 rank(s): it was written by 1, and "
                "data_rng_mode='stateful' continues each rank's own data stream; resume with WORLD_SIZE=1")
    assert output.count(expected) == 1 and done.returncode != 0
    # no rank's traceback (torchrun's agent reports the failed job in its own words)
    assert "ConfigError" not in output and "ValueError" not in output and "in restore" not in output
    assert load_checkpoint(out)["iter_num"] == 2
