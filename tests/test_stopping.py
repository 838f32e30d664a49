"""Stopping a run from outside loses nothing: Ctrl-C saves a checkpoint and exits 0 like SIGTERM, a
second Ctrl-C stops at once with one line and leaves the last checkpoint as it was, and a
torchrun job pre-empted with SIGTERM (through pretrain.sh) saves and exits 0 on every rank."""
import os
import signal
import subprocess
import sys

import pytest

from training import checkpoint, trainer
from training.trainer import Trainer
from test_training import ROOT, data_dir, read_log, start, tiny, train_losses, wait_for  # noqa: F401
from train_adam_finewebedu import cli, main

LONG = ["--max_iters=100000", "--lr_decay_iters=100000"]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = start(tiny(data_dir, out, *LONG, "--eval_interval=1000"), tmp_path, "ctrl_c")
    wait_for(lambda: os.path.exists(os.path.join(out, "log.jsonl")) and len(train_losses(out)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    output = (tmp_path / "ctrl_c.out").read_text()
    assert "Ctrl-C received: saving a checkpoint at iter" in output and "Traceback" not in output
    assert checkpoint.load_checkpoint(out)["iter_num"] == max(train_losses(out)) >= 2


def test_a_second_ctrl_c_stops_at_once_without_saving(data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    real_step = Trainer.train_step

    def step_then_ctrl_c_twice(self):
        real_step(self)
        if self.iter_num == 4:                      # both presses land inside one step
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c_twice)
    with pytest.raises(SystemExit) as exit_info:
        cli(tiny(data_dir, out, "--max_iters=8", "--eval_interval=8", "--init_from=resume"))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"interrupted: stopped by a second Ctrl-C at iter 4 without saving; the "
                                            f"last checkpoint, {out}/ckpt.pt (iter 2), is untouched")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # handlers restored


def test_torchrun_preemption_exits_0_on_every_rank_after_the_save(data_dir, tmp_path):
    out = str(tmp_path / "run")
    config = tmp_path / "tiny_config.py"
    config.write_text("".join(f"{arg[2:].split('=', 1)[0]} = {python_value(arg.split('=', 1)[1])}\n"
                              for arg in tiny(data_dir, out, *LONG, "--eval_interval=1000")))
    log = open(tmp_path / "job.out", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2", "PYTHONUNBUFFERED": "1"}
    # a session of its own: the SIGTERM goes to every process of the job, as a cluster sends it
    job = subprocess.Popen(["bash", os.path.join(ROOT, "pretrain.sh"), str(config)], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "log.jsonl")) and len(train_losses(out)) >= 2, job,
                 timeout=240)
        os.killpg(job.pid, signal.SIGTERM)
        assert job.wait(timeout=120) == 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = (tmp_path / "job.out").read_text()
    assert "SIGTERM received: saving a checkpoint at iter" in output
    assert "Traceback" not in output and "SignalException" not in output
    saved = checkpoint.load_checkpoint(out)
    assert saved["world_size"] == 2 and saved["iter_num"] == max(train_losses(out)) >= 2


def python_value(text: str) -> str:
    """A --key=value argument's value as Python source for a config file."""
    if text in ("True", "False"):
        return text
    try:
        float(text)
        return text
    except ValueError:
        return repr(text)


def test_a_stop_asked_while_the_run_is_set_up_exits_before_the_first_step(data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    real_claim = trainer.claim_on_rank0

    def claim_then_sigterm(*args, **kwargs):        # pre-empted while the data loads
        lock = real_claim(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return lock
    monkeypatch.setattr(trainer, "claim_on_rank0", claim_then_sigterm)
    capsys.readouterr()
    assert main(tiny(data_dir, out, "--max_iters=8", "--init_from=resume"))["iter_num"] == 2
    assert "SIGTERM received before the first step: nothing new to save; exiting" in capsys.readouterr().out
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert [r["iter"] for r in read_log(out) if "train_loss" in r] == [1, 2]
