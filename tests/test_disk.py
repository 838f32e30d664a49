"""Disks that are full or read-only: one line, nothing lost. A save that fills the disk names it and
leaves the previous ckpt.pt and the folder's weights in place, of one iteration; too little free
space for a checkpoint and a read-only out_dir are refused at start-up, before training.

Real filesystems: a small tmpfs mounted for the test, which needs root (CAP_SYS_ADMIN); elsewhere
these tests are skipped with the reason.
"""
import os
import re
import subprocess

import pytest
import torch

from training import checkpoint, runlog, trainer
from training.checkpoint import load_checkpoint, load_model
from test_training import data_dir, read_log, tiny  # noqa: F401  (data_dir: a fixture)
from train_adam_finewebedu import cli, main

WIDER = ["--n_embd=64", "--head_dim=32"]          # a checkpoint of ~0.8 MB: well above tmpfs page rounding


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of ``size`` bytes; unmounted at the end (remount(ro=True) too)."""
    mounts = []

    def mount(size: int) -> str:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return str(point)

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount_read_only(point: str) -> None:
    subprocess.run(["mount", "-o", "remount,ro", point], check=True, capture_output=True)


def fill(folder: str, leave: int) -> None:
    """Write a file that leaves about ``leave`` bytes free on folder's filesystem."""
    free = checkpoint.free_bytes(folder)
    with open(os.path.join(folder, "..filler"), "wb") as f:      # a name the next run would not own
        f.write(bytes(max(0, free - leave)))


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    return exit_info.value.code


@pytest.mark.parametrize("stage", ["the save_pretrained files", "ckpt.pt"])
def test_disk_full_while_saving_is_named_and_keeps_the_previous_checkpoint_and_weights_of_one_iteration(
        data_dir, small_disk, monkeypatch, stage):
    disk = small_disk(64 * 2 ** 20)
    out = os.path.join(disk, "run")
    real_save = trainer.save_checkpoint
    saves = []

    def save_on_a_filling_disk(out_dir, state, model=None, best=False):
        saves.append(state["iter_num"])
        if len(saves) == 2:            # the second save: the disk fills up
            if stage == "ckpt.pt":     # room for the staged save_pretrained files, half of ckpt.pt
                staged = sum(-(-os.path.getsize(os.path.join(out_dir, n)) // 4096) * 4096 for n in os.listdir(out_dir)
                             if n not in ("ckpt.pt", "best.pt", "log.jsonl", ".lock"))
                fill(out_dir, staged + 64 * 4096 + os.path.getsize(os.path.join(out_dir, "ckpt.pt")) // 2)
            else:
                fill(out_dir, 1 << 20)
        return real_save(out_dir, state, model, best)
    monkeypatch.setattr(trainer, "save_checkpoint", save_on_a_filling_disk)
    message = exit_message(tiny(data_dir, out, *WIDER, "--max_iters=4", "--eval_interval=2",
                                "--always_save_checkpoint=True"))
    assert message.startswith(f"checkpoint error: disk full while saving the checkpoint of iter 4 to {out} "
                              f"(writing {stage}; ")
    assert message.endswith(f"the last checkpoint, {out}/ckpt.pt (iter 2), is intact. Free some space, then "
                            "resume with --init_from=resume")
    assert checkpoint.temporary_paths(out) == []                   # no half-written file left
    kept = load_checkpoint(out)
    assert kept["iter_num"] == 2
    weights = load_model(out).state_dict()                         # the folder's save_pretrained weights
    assert all(torch.equal(weights[k], v) for k, v in checkpoint.clean_state_dict(kept["model"]).items()
               if k in weights)
    assert [r["iter"] for r in read_log(out) if "val_loss" in r] == [0, 2, 4]


def test_too_little_free_space_for_a_checkpoint_is_refused_at_start_up(data_dir, small_disk):
    disk = small_disk(2 * 2 ** 20)
    out = os.path.join(disk, "run")
    message = exit_message(tiny(data_dir, out, *WIDER, "--max_iters=4"))
    have, need = re.fullmatch(rf"out_dir error: {out} has ([\d.]+) MB free, but saving a checkpoint there needs "
                              r"about ([\d.]+) MB \(weights, optimizer state and the save_pretrained copy\); free "
                              "some space or choose another out_dir", message).groups()
    assert float(have) < float(need)
    assert os.listdir(out) == [".lock"]                            # no log: training never started


def test_a_read_only_out_dir_is_one_line_at_start_up(data_dir, small_disk):
    disk = small_disk(64 * 2 ** 20)
    out = os.path.join(disk, "run")
    main(tiny(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    remount_read_only(disk)
    for extra in (["--init_from=resume"], ["--overwrite_out_dir=True"]):
        message = exit_message(tiny(data_dir, out, "--max_iters=3", *extra))
        assert message == f"out_dir error: cannot write in {out}: Read-only file system ({out}/.lock)"
    fresh = os.path.join(disk, "fresh")
    message = exit_message(tiny(data_dir, fresh, "--max_iters=3"))
    assert message == f"out_dir error: cannot write in {fresh}: Read-only file system ({fresh})"


def test_disk_full_while_logging_is_one_line_and_the_run_starts_over_once_there_is_room(data_dir, small_disk,
                                                                                         monkeypatch):
    disk = small_disk(64 * 2 ** 20)
    out = os.path.join(disk, "run")
    real_create = runlog.JsonlLog.create

    def create_then_fill_the_disk(path):            # the first record needs the file's first page
        log = real_create(path)
        fill(os.path.dirname(path), 0)
        return log
    monkeypatch.setattr(runlog.JsonlLog, "create", staticmethod(create_then_fill_the_disk))
    message = exit_message(tiny(data_dir, out, "--max_iters=4", "--eval_interval=2"))
    assert message == (f"out_dir error: cannot write {out}/log.jsonl at iter 0: No space left on device; no "
                       "checkpoint had been written yet")
    monkeypatch.undo()
    os.remove(os.path.join(out, "..filler"))
    assert main(tiny(data_dir, out, "--max_iters=4", "--eval_interval=2", "--overwrite_out_dir=True"))["iter_num"] == 4
    assert [r["iter"] for r in read_log(out) if "train_loss" in r] == [1, 2, 3, 4]
