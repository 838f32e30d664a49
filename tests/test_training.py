"""train_adam_finewebedu.py: exact resume, SIGKILL/SIGTERM, DDP == single process, atomic checkpoints.

Tiny models (1 layer, n_embd 32, block 32) on tiny shards written here, so the whole file runs
in well under a minute of CPU; training runs in-process (``main(argv)``) except where a real
process must be killed or launched by torchrun.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from training import checkpoint
from model import GPT
from training.checkpoint import load_model
from training.shards import write_shard
from train_adam_finewebedu import main
from training.settings import get_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_adam_finewebedu.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two train shards and a val shard of a repeating pattern (learnable) plus noise."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 256, size=48)
    tokens = np.concatenate([np.roll(pattern, i % 5) for i in range(250)])
    noise = rng.random(tokens.size) < 0.1
    tokens[noise] = rng.integers(0, 256, size=noise.sum())
    write_shard(str(d / "train_000000.bin"), tokens[:6000])
    write_shard(str(d / "train_000001.bin"), tokens[6000:10000])
    write_shard(str(d / "val_000000.bin"), tokens[10000:])
    return str(d)


def tiny(data_dir, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--compile=False",
            "--n_layer=1", "--n_head=2", "--n_embd=32", "--head_dim=16", "--vocab_size=256",
            "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2",
            "--log_interval=1", "--eval_iters=2", "--warmup_iters=2", "--lr_decay_iters=12",
            "--learning_rate=3e-3", "--progress=False", *extra]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    """iter -> train loss; a resumed run re-logs iterations after its checkpoint: keep the last."""
    return {r["iter"]: r["train_loss"] for r in read_log(out_dir) if "train_loss" in r}


def params_of(out_dir):
    return checkpoint.load_checkpoint(out_dir)["model"]


def test_lr_schedule_is_warmup_then_cosine_to_min_lr():
    from training.configurator import Config
    cfg = Config(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=14, decay_lr=True)
    assert [get_lr(i, cfg) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert get_lr(4, cfg) == pytest.approx(1.0)
    assert get_lr(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert get_lr(14, cfg) == get_lr(100, cfg) == pytest.approx(0.1)
    cfg.decay_lr = False
    assert get_lr(3, cfg) == 1.0


def test_lr_decay_iters_defaults_to_max_iters_unless_set(data_dir, tmp_path):
    from training.configurator import ConfigError, configure
    from training.settings import defaults, derive_defaults, validate

    def resolved(*argv):
        cfg, explicit = configure(argv, *defaults(), verbose=False)
        derive_defaults(cfg, explicit)
        validate(cfg, explicit)
        return cfg.lr_decay_iters
    assert resolved("--max_iters=3000") == 3000
    assert resolved("--max_iters=3000", "--lr_decay_iters=2500") == 2500
    (tmp_path / "run.py").write_text("max_iters = 5000\nlr_decay_iters = 4000\n")
    assert resolved(str(tmp_path / "run.py"), "--max_iters=6000") == 4000     # set in the file: kept
    with pytest.raises(ConfigError, match=r"'lr_decay_iters' \(100, from max_iters\) must exceed 'warmup_iters'"):
        resolved("--max_iters=100")                                         # warm-up 2000 > the whole run
    # in a run: the cosine reaches its end at max_iters (hand formula, lr 1e-3 -> min_lr 1e-4)
    args = [a for a in tiny(data_dir, str(tmp_path / "run")) if not a.startswith("--lr_decay_iters")]
    main(args + ["--max_iters=6", "--eval_interval=6", "--learning_rate=1e-3", "--min_lr=1e-4"])
    lrs = [r["lr"] for r in read_log(str(tmp_path / "run")) if "lr" in r]
    cosine = [1e-4 + 0.5 * (1 + math.cos(math.pi * (i - 2) / 4)) * 9e-4 for i in range(2, 6)]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3] + cosine)


@pytest.mark.parametrize("mode, encoding", [("stateless", "grape_ap"), ("stateful", "fox")])
def test_resume_gives_bitwise_the_same_losses_as_one_run(data_dir, tmp_path, mode, encoding):
    common = [f"--data_rng_mode={mode}", f"--pos_encoding={encoding}", "--eval_interval=3"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(tiny(data_dir, straight, *common, "--max_iters=8"))
    main(tiny(data_dir, split, *common, "--max_iters=4"))     # same lr_decay_iters: same schedule
    assert checkpoint.load_checkpoint(split)["iter_num"] == 4
    main(tiny(data_dir, split, *common, "--max_iters=8", "--init_from=resume"))
    a, b = train_losses(straight), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[i] for i in range(1, 9)] == [b[i] for i in range(1, 9)]       # bitwise
    assert a[8] < a[1]
    pa, pb = params_of(straight), params_of(split)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    val_a = {r["iter"]: r["val_loss"] for r in read_log(straight) if "val_loss" in r}
    val_b = {r["iter"]: r["val_loss"] for r in read_log(split) if "val_loss" in r}
    assert sorted(val_a) == [0, 3, 6, 8] and sorted(val_b) == [0, 3, 4, 6, 8]   # 4: end of the first part
    assert all(val_a[i] == val_b[i] for i in val_a)


def test_checkpoint_has_the_agreed_contents(data_dir, tmp_path):
    out = str(tmp_path / "run")
    result = main(tiny(data_dir, out, "--max_iters=3", "--eval_interval=3"))
    ckpt = checkpoint.load_checkpoint(out)
    for key in ("model", "model_config", "optimizer", "iter_num", "config", "rank_states", "scaler"):
        assert key in ckpt
    assert ckpt["iter_num"] == 3 and ckpt["config"]["max_iters"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"torch_rng", "data"} <= set(ckpt["rank_states"][0])
    log = read_log(out)
    train = [r for r in log if "train_loss" in r]
    assert set(train[0]) == {"iter", "tokens", "train_loss", "lr", "tokens_per_sec", "mfu"}
    assert train[0]["tokens"] == 4 * 32 * 2 and train[0]["mfu"] is None     # no GPU: no MFU
    assert {"iter", "tokens", "val_loss"} == set(next(r for r in log if "val_loss" in r))
    assert result["iter_num"] == 3


def test_checkpoint_loads_for_evaluation_with_the_trained_weights(data_dir, tmp_path):
    out = str(tmp_path / "run")
    trained = main(tiny(data_dir, out, "--max_iters=3", "--eval_interval=3", "--pos_encoding=grape_ap",
                        "--use_k_shift=True", "--use_v_shift=True"))["model"].eval()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(idx)[0]
        for loaded in (GPT.from_pretrained(out), load_model(out), load_model(os.path.join(out, "ckpt.pt"))):
            assert loaded.config.use_k_shift and loaded.config.pos_encoding == "grape_ap"
            torch.testing.assert_close(loaded.eval()(idx)[0], expected, rtol=0, atol=0)
    # ...and the loaded weights are the trained ones, not a fresh init
    fresh = GPT(trained.config).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(idx)[0], expected)


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    good = {"model": {"w": torch.ones(3)}, "model_config": {}, "optimizer": {}, "iter_num": 5}
    checkpoint.save_checkpoint(out, good)

    def crashing_save(obj, f):
        f.write(b"half a checkpoint")
        f.flush()
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(out, {**good, "iter_num": 6})
    monkeypatch.undo()
    kept = checkpoint.load_checkpoint(out)
    assert kept["iter_num"] == 5 and torch.equal(kept["model"]["w"], torch.ones(3))
    assert os.listdir(out) == ["ckpt.pt"]                    # no temporary file left behind


def test_config_error_stops_before_training(data_dir, tmp_path):
    from training.configurator import ConfigError
    with pytest.raises(ConfigError, match="'data_rng_mode'"):
        main(tiny(data_dir, str(tmp_path), "--data_rng_mode=random"))
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_resume_with_another_model_config_fails_and_keeps_the_checkpoint(data_dir, tmp_path):
    from training.configurator import ConfigError
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2", "--pos_encoding=grape_ap"))
    files = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    with pytest.raises(ConfigError, match=r"pos_encoding='rope' \(checkpoint: 'grape_ap'\)"):
        main(tiny(data_dir, out, "--max_iters=4", "--pos_encoding=rope", "--init_from=resume"))
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == files
    # the same model settings resume, and a kernel choice may change
    assert main(tiny(data_dir, out, "--max_iters=3", "--pos_encoding=grape_ap", "--init_from=resume",
                     "--attn_backend=chunked"))["iter_num"] == 3


def start(args, tmp_path, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / f"{name}.out", "w")
    return subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with code {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the training process")


def test_sigkilled_run_resumes_from_its_last_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    args = tiny(data_dir, out, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=4")
    proc = start(args, tmp_path, "killed")
    ckpt_path = os.path.join(out, "ckpt.pt")
    wait_for(lambda: os.path.exists(ckpt_path) and max(train_losses(out), default=0) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = train_losses(out)
    saved = checkpoint.load_checkpoint(out)["iter_num"]
    # the kill may land right after a checkpoint, so the log may end at the saved iteration
    assert saved >= 4 and saved % 4 == 0 and max(before) >= saved
    n_lines = len(read_log(out))
    main(args + [f"--max_iters={saved + 2}", "--init_from=resume"])     # later overrides win
    resumed = [r for r in read_log(out)[n_lines:] if "train_loss" in r]
    assert [r["iter"] for r in resumed] == [saved + 1, saved + 2]
    for r in resumed:     # the same computation the killed process did for these iterations
        if r["iter"] in before:
            assert r["train_loss"] == pytest.approx(before[r["iter"]], rel=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = start(tiny(data_dir, out, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=1000"),
                 tmp_path, "terminated")
    wait_for(lambda: os.path.exists(os.path.join(out, "log.jsonl")) and len(train_losses(out)) >= 2, proc)
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))   # no checkpoint before the signal
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    saved = checkpoint.load_checkpoint(out)["iter_num"]
    assert saved == max(train_losses(out)) >= 2
    assert "SIGTERM" in (tmp_path / "terminated.out").read_text()


def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(data_dir, tmp_path):
    common = ["--max_iters=3", "--eval_interval=3", "--pos_encoding=grape_a_qk"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    main(tiny(data_dir, single, *common, "--gradient_accumulation_steps=4"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           *tiny(data_dir, ddp, *common, "--gradient_accumulation_steps=2")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    a, b = train_losses(single), train_losses(ddp)
    assert sorted(a) == sorted(b) == [1, 2, 3]                # rank 0 alone logs
    assert len([r for r in read_log(ddp) if "train_loss" in r]) == 3
    for i in a:
        assert b[i] == pytest.approx(a[i], rel=1e-5)
    pa, pb = params_of(single), params_of(ddp)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5)
    assert checkpoint.load_checkpoint(ddp)["world_size"] == 2


def test_wandb_offline_mode_logs_without_network(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2", "--wandb_log=True", "--wandb_mode=offline"))
    runs = [d for d in os.listdir(os.path.join(out, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert checkpoint.load_checkpoint(out)["wandb_id"] in runs[0]


def test_resume_keeps_the_weight_decay_groups_its_optimizer_state_was_saved_with(data_dir, tmp_path):
    """AdamW's state is stored per group and position: a resume must rebuild the same groups."""
    from training.configurator import ConfigError
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2", "--pos_encoding=grape_a_qk"))
    assert checkpoint.load_checkpoint(out)["config"]["weight_decay_on"] == "all_but_norms"
    with pytest.raises(ConfigError, match="weight_decay_on='matrices'"):
        main(tiny(data_dir, out, "--max_iters=3", "--pos_encoding=grape_a_qk", "--init_from=resume",
                  "--weight_decay_on=matrices"))
    # a checkpoint from before the key existed was trained with 'matrices' and resumes with them
    old = str(tmp_path / "old")
    main(tiny(data_dir, old, "--max_iters=2", "--eval_interval=2", "--pos_encoding=grape_a_qk",
              "--weight_decay_on=matrices"))
    ckpt = checkpoint.load_checkpoint(old)
    del ckpt["config"]["weight_decay_on"]
    checkpoint.atomic_torch_save(ckpt, os.path.join(old, checkpoint.CKPT_NAME))
    assert main(tiny(data_dir, old, "--max_iters=3", "--pos_encoding=grape_a_qk",
                     "--init_from=resume"))["iter_num"] == 3


def test_run_ends_with_a_summary_of_what_it_did(data_dir, tmp_path, capsys):
    """The last line a run prints: iterations, tokens, time, the validation loss from its first
    to its last evaluation (as log.jsonl has them) and where the checkpoint is."""
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=4", "--eval_interval=2"))
    val = [(r["iter"], r["val_loss"]) for r in read_log(out) if "val_loss" in r]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    expected = (rf"done: 4 iterations \(1,024 tokens\) in \d+ s; validation loss {val[0][1]:.3f} at iter 0 -> "
                rf"{val[-1][1]:.3f} at iter 4 \(best {min(v for _, v in val):.3f}\); checkpoint and Hugging Face "
                rf"folder in {re.escape(out)}")
    assert re.fullmatch(expected, last), last
