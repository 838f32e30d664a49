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
            assert len(checkpoint.temporary_paths(out)) == 3
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=30)
    # a save stages the save_pretrained folder, then ckpt.pt: the first kill left both
    left = [os.path.basename(p) for p in checkpoint.temporary_paths(out)]
    assert [name.split(".")[:2] for name in left] == [["", "pretrained"], ["", "pretrained"], ["ckpt", "pt"]]
    assert snapshot(out) == good                                # the checkpoint itself is intact
    capsys.readouterr()
    main(tiny(data_dir, out, "--max_iters=3", "--eval_interval=3", "--init_from=resume"))
    assert "removed 3 temporary file(s)" in capsys.readouterr().out
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


@pytest.mark.parametrize("kind, expected", [
    ("empty", "out_dir error: out_dir is empty; give the folder the run writes to"),
    ("a file", "out_dir error: {out} is a file, not a folder"),
    ("under a file", "out_dir error: cannot create out_dir {out}: {parent} is a file, not a folder"),
    ("a name too long", "out_dir error: out_dir {out} is too long for this filesystem: its part xxxxxxxx"),
    ("a path too long", "out_dir error: out_dir {out} is too long for this filesystem: "),
])
def test_an_out_dir_that_cannot_hold_a_run_is_one_line_before_anything_is_written(data_dir, tmp_path, kind,
                                                                                 expected):
    parent = tmp_path / "parent"
    parent.mkdir()
    out = {"empty": "", "a file": str(parent / "file"), "under a file": str(parent / "file" / "run"),
           "a name too long": str(parent / ("x" * 300)),
           "a path too long": str(parent / "/".join(["y" * 200] * 21))}[kind]
    (parent / "file").write_text("not a folder\n")
    message = exit_message(tiny(data_dir, out, "--max_iters=2"))
    assert message.startswith(expected.format(out=out, parent=parent / "file")) and "\n" not in message
    assert os.listdir(parent) == ["file"] and (parent / "file").read_text() == "not a folder\n"


def test_a_folder_holding_other_files_is_refused_even_with_overwrite_and_left_as_it_was(data_dir, tmp_path):
    # the repository's own top level, as `--out_dir=. --overwrite_out_dir=True` from its root would see it
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in sorted(os.listdir(ROOT)):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source) and not os.path.islink(source):
            (folder / name).write_bytes(open(source, "rb").read())
        elif os.path.isdir(source):
            (folder / name).mkdir()
    before = snapshot(str(folder))
    assert {"model.py", "grape.py", "README.md"} <= set(before)
    for extra in (["--overwrite_out_dir=True"], []):
        message = exit_message(tiny(data_dir, str(folder), "--max_iters=2", *extra))
        assert message.startswith(f"out_dir error: {folder} holds files that no training run writes (")
        assert "LICENSE" in message and "choose an empty or new folder" in message
    assert snapshot(str(folder)) == before and sorted(os.listdir(folder)) == sorted(os.listdir(ROOT))


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(data_dir, tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    os.symlink(victim, out / ".lock")
    message = exit_message(tiny(data_dir, str(out), "--max_iters=2"))
    assert message == (f"out_dir error: {out}/.lock is a symbolic link (to {victim}); a run never makes one and "
                       "will not write through it: remove it")
    assert victim.read_text() == "precious\n" and os.listdir(out) == [".lock"]


def test_a_run_log_that_is_a_symbolic_link_is_never_written_through(data_dir, tmp_path):
    out, victim = str(tmp_path / "run"), tmp_path / "victim.txt"
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    victim.write_text("precious\n")
    os.replace(os.path.join(out, "log.jsonl"), tmp_path / "old_log.jsonl")
    os.symlink(victim, os.path.join(out, "log.jsonl"))
    message = exit_message(tiny(data_dir, out, "--max_iters=3", "--init_from=resume"))
    assert message.startswith(f"out_dir error: cannot write {out}/log.jsonl (a symbolic link to {victim}; a run "
                              "never makes one)")
    # starting over replaces the link itself, never what it points to
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2", "--overwrite_out_dir=True"))
    assert victim.read_text() == "precious\n" and not os.path.islink(os.path.join(out, "log.jsonl"))


def test_overwrite_is_all_or_nothing_when_killed_between(data_dir, tmp_path):
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=4", "--eval_interval=2"))
    # start over in it and kill the new run before its first checkpoint
    new = start(tiny(data_dir, out, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=1000",
                     "--overwrite_out_dir=True", "--learning_rate=6e-3"), tmp_path, "new")

    def new_run_is_training():           # its log: the first step's learning rate is the new run's
        lrs = [r["lr"] for r in read_log(out) if "lr" in r] if os.path.exists(os.path.join(out, "log.jsonl")) else []
        return len(lrs) >= 2 and lrs[0] == pytest.approx(2e-3)
    try:
        wait_for(new_run_is_training, new)
    finally:
        new.send_signal(signal.SIGKILL)
        new.wait(timeout=30)
    # nothing of the old run is left beside the new run's log: no checkpoint to mix them up
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl"]
    assert read_log(out)[0] == {"iter": 0, "tokens": 0, "val_loss": read_log(out)[0]["val_loss"]}
    message = exit_message(tiny(data_dir, out, "--max_iters=3", "--init_from=resume"))
    assert message == (f"checkpoint error: no checkpoint to resume in {out}: the run there stopped before its first "
                       "checkpoint; start it over with --overwrite_out_dir=True (and --init_from=scratch)")
    message = exit_message(tiny(data_dir, out, "--max_iters=3"))
    assert message.startswith(f"out_dir error: {out} holds a run that stopped before its first checkpoint "
                              "(log.jsonl); start over in it with --overwrite_out_dir=True")
    assert "--init_from=resume" not in message
    assert main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2", "--overwrite_out_dir=True"))["iter_num"] == 2


@pytest.mark.parametrize("kind", ["no out_dir", "a folder", "a dangling link"])
def test_a_missing_checkpoint_to_resume_is_one_line_saying_what_to_do(data_dir, tmp_path, kind):
    out = tmp_path / "run"
    if kind != "no out_dir":
        out.mkdir()
    if kind == "a folder":
        (out / "ckpt.pt").mkdir()
    if kind == "a dangling link":
        os.symlink(tmp_path / "gone.pt", out / "ckpt.pt")
    message = exit_message(tiny(data_dir, str(out), "--max_iters=3", "--init_from=resume"))
    expected = {"no out_dir": f"cannot resume: {out} does not exist; start the run with --init_from=scratch",
                "a folder": f"{out}/ckpt.pt is a folder, not a checkpoint file",
                "a dangling link": f"{out}/ckpt.pt is a symbolic link to {tmp_path}/gone.pt, which does not exist"}
    assert message.startswith("checkpoint error: " + expected[kind]) and "\n" not in message
    assert os.listdir(out) == ["ckpt.pt"] if kind != "no out_dir" else not out.exists()     # nothing written


def test_a_checkpoint_is_never_saved_into_the_repository_itself(tmp_path, monkeypatch):
    from modeling import shipping
    from model import GPT, GPTConfig
    copy = tmp_path / "repository"                 # stands for the root: a failure cannot touch the real one
    (copy / "modeling").mkdir(parents=True)
    (copy / "model.py").write_text("# the repository's own model.py\n")
    monkeypatch.setattr(shipping, "ROOT", str(copy))
    monkeypatch.setattr(shipping, "PACKAGE_DIR", str(copy / "modeling"))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=256, block_size=32))
    state = {"model": model.state_dict(), "model_config": model.config.to_dict(), "optimizer": {}, "iter_num": 1}
    for folder in (copy, copy / "modeling"):
        with pytest.raises(checkpoint.CheckpointError, match="refusing to save a checkpoint into the repository"):
            checkpoint.save_checkpoint(str(folder), state, model)
    assert sorted(os.listdir(copy)) == ["model.py", "modeling"] and os.listdir(copy / "modeling") == []
    assert (copy / "model.py").read_text() == "# the repository's own model.py\n"
