"""One run per out_dir: a second trainer is refused while the first lives (also under DDP, where
every rank exits), a used out_dir needs --init_from=resume or --overwrite_out_dir=True, and the
temporaries of a save killed by SIGKILL are removed by the next run, never those of a live one."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from training import checkpoint
from training.run_dir import OutDirLock
from test_training import ROOT, SCRIPT, data_dir, read_log, start, tiny, train_losses, wait_for  # noqa: F401
from train_adam_finewebedu import cli, main


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    return exit_info.value.code


def snapshot(folder) -> dict:
    """The run's files and their bytes (not the lock, which records its holder, nor temporaries)."""
    skip = {".lock"} | {os.path.basename(p) for p in checkpoint.temporary_paths(folder)}
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name)) and name not in skip}


def test_second_trainer_is_refused_while_the_first_lives_and_admitted_once_it_died(data_dir, tmp_path):
    out = str(tmp_path / "run")
    args = tiny(data_dir, out, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=4")
    first = start(args, tmp_path, "first")
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "ckpt.pt")) and len(train_losses(out)) >= 5, first)
        head = read_log(out)[:5]
        for extra in (["--init_from=resume"], ["--overwrite_out_dir=True"], []):
            message = exit_message(tiny(data_dir, out, "--max_iters=3", *extra))
            assert message.startswith(f"out_dir error: {out} is in use by another training run (pid {first.pid} ")
        assert read_log(out)[:5] == head and first.poll() is None     # the first run's log and life go on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    saved = checkpoint.load_checkpoint(out)["iter_num"]
    # the kernel released the dead process's lock: resuming works without any clean-up
    assert main(tiny(data_dir, out, f"--max_iters={saved + 1}", "--init_from=resume"))["iter_num"] == saved + 1


def test_starting_over_in_a_used_out_dir_needs_the_overwrite_flag(data_dir, tmp_path):
    out, other = str(tmp_path / "run"), str(tmp_path / "other")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    before = snapshot(out)
    message = exit_message(tiny(data_dir, out, "--max_iters=2"))
    assert message.startswith(f"out_dir error: {out} already holds a run (")
    assert "--init_from=resume" in message and "--overwrite_out_dir=True" in message
    main(tiny(data_dir, other, "--max_iters=2", "--eval_interval=2"))
    # resuming another run's checkpoint into this out_dir would overwrite this run as well
    assert "already holds a run" in exit_message(tiny(data_dir, out, "--max_iters=3", "--init_from=resume",
                                                      f"--resume_dir={other}"))
    assert snapshot(out) == before
    main(tiny(data_dir, out, "--max_iters=1", "--eval_interval=1", "--overwrite_out_dir=True"))
    assert [r["iter"] for r in read_log(out)] == [0, 1, 1]        # a new log: val 0, train 1, val 1
    assert checkpoint.load_checkpoint(out)["iter_num"] == 1


# A child that saves like the trainer (lock held, then checkpoint.save_checkpoint) and stops in
# the middle of the save, at the point named by STAGE, until it is killed.
SAVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    from training import checkpoint, run_dir
    from model import GPT, GPTConfig
    out, stage = sys.argv[1], sys.argv[2]
    lock = run_dir.OutDirLock(out).acquire()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=256, block_size=32))
    state = {{"model": model.state_dict(), "model_config": model.config.to_dict(), "optimizer": {{}}, "iter_num": 99}}

    def stall(*args, **kwargs):
        print("saving", flush=True)
        time.sleep(600)
    if stage == "ckpt":                    # killed while ckpt.pt.*.tmp is being written
        real_save = torch.save
        def slow_save(obj, f):
            real_save(obj, f)
            stall()
        checkpoint.torch.save = slow_save
        checkpoint.save_checkpoint(out, state, model)
    else:                                  # killed while the save_pretrained files are written
        def slow_save_pretrained(self, folder, **kwargs):
            open(folder + "/model.safetensors", "wb").write(bytes(4096))
            stall()
        GPT.save_pretrained = slow_save_pretrained
        checkpoint.save_pretrained_atomic(model, out)
""")


def start_saver(out, stage, tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=ROOT))
    proc = subprocess.Popen([sys.executable, str(script), out, stage], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "saving"
    return proc


def test_temporaries_of_a_save_killed_by_sigkill_are_removed_by_the_next_run_not_while_it_lives(data_dir,
                                                                                             tmp_path, capsys):
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    good = snapshot(out)
    for stage in ("ckpt", "pretrained"):
        saver = start_saver(out, stage, tmp_path)
        if stage == "pretrained":
            # a live process owns its temporaries: the next trainer is refused and touches nothing
            message = exit_message(tiny(data_dir, out, "--max_iters=3", "--init_from=resume"))
            assert f"is in use by another training run (pid {saver.pid} " in message
            assert len(checkpoint.temporary_paths(out)) == 2
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=30)
    left = [os.path.basename(p) for p in checkpoint.temporary_paths(out)]
    assert [name.split(".")[:2] for name in left] == [["", "pretrained"], ["ckpt", "pt"]]
    assert snapshot(out) == good                                # the checkpoint itself is intact
    capsys.readouterr()
    main(tiny(data_dir, out, "--max_iters=3", "--eval_interval=3", "--init_from=resume"))
    assert "removed 2 temporary file(s)" in capsys.readouterr().out
    assert checkpoint.temporary_paths(out) == []
    assert checkpoint.load_checkpoint(out)["iter_num"] == 3


def test_every_ddp_rank_exits_when_out_dir_is_locked(data_dir, tmp_path):
    out = str(tmp_path / "run")
    lock = OutDirLock(out).acquire()           # this test process is "the other run"
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
               *tiny(data_dir, out, "--max_iters=3")]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=300)
    finally:
        lock.release()
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count(f"out_dir error: {out} is in use by another training run (pid {os.getpid()} ") == 1
    assert "OutDirError" not in output                       # no traceback
    # rank 0 reports and fails the job; rank 1 leaves quietly (status 0), so torchrun never kills
    # rank 0 first. On a loaded machine rank 1 may still be on its way out when rank 0 fails:
    # torchrun then stops it with SIGTERM, and that is all it may say about rank 1.
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 1" in output
    assert "rank      : 1" not in output or "Signal 15 (SIGTERM)" in output
    assert os.listdir(out) == [".lock"]
