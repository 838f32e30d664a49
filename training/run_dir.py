"""One training run per out_dir: an exclusive lock, the fresh-start rule, stale temporaries,
and an overwrite that is all or nothing.

A trainer takes ``out_dir/.lock`` with ``flock`` before it writes anything there. The kernel
releases the lock when the process ends, however it ends (SIGKILL included), so there is
nothing to clean up; a second trainer on the same folder is refused with the first one's pid.
The lock file is opened with ``O_NOFOLLOW``: a ``.lock`` that is a symbolic link is refused,
never followed (the pid line would overwrite whatever it points to). With the lock held
nothing else writes in out_dir, so any checkpoint temporary found there was left by a process
killed while saving, and is removed.

A run that does not resume from out_dir itself (``init_from='scratch'``, or resuming from
another ``resume_dir``) would replace the checkpoints and the log of whatever run out_dir
holds: it needs ``overwrite_out_dir=True`` when out_dir is not empty. The old run's files are
then moved aside (checkpoints first) and deleted before the new run writes anything, so a kill
at any point never leaves the old ``ckpt.pt`` beside the new run's log. Before the lock, the
start-up checks of ``out_dir_checks.py`` (path, contents, free space) refuse a folder a run
must not write into.

Under DDP only rank 0 takes the lock and checks; the verdict is broadcast so that every rank
raises the same OutDirError and exits.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
import sys
import tempfile
import time

from training.checkpoint import BEST_NAME, CKPT_NAME, CheckpointError, checkpoint_path, fsync_dir
from training.out_dir_checks import (LOCK_NAME, LOG_NAME, REPLACED_PREFIX, OutDirError, check_contents,
                                     check_free_space, check_path, run_entries, stale_paths)


class OutDirLock:
    """An exclusive ``flock`` on ``out_dir/.lock``, held until ``release()`` or the process ends."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd: int | None = None
        self.exclusive = False            # False where the filesystem cannot lock

    def acquire(self) -> "OutDirLock":
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise self.refusal(e) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutDirError(f"{self.path} is not a regular file; a run only ever makes it one: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "owner unknown"
            os.close(fd)
            raise OutDirError(f"{self.out_dir} is in use by another training run ({owner}); wait for it to "
                              "finish or stop it, or choose another out_dir") from None
        except OSError as e:              # e.g. a network filesystem mounted without lock support
            print(f"warning: cannot lock {self.out_dir} ({e.strerror}); make sure no other run uses it",
                  file=sys.stderr)
        else:
            self.exclusive = True
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def refusal(self, e: OSError) -> OutDirError:
        """The one line for a lock that cannot be created or opened."""
        if e.errno == errno.ELOOP:
            return OutDirError(f"{self.path} is a symbolic link (to {os.readlink(self.path)}); a run never makes "
                               "one and will not write through it: remove it")
        return OutDirError(f"cannot write in {self.out_dir}: {e.strerror}" + (f" ({e.filename})" if e.filename else ""))

    def release(self) -> None:
        """Closing the file releases the lock. The file stays: deleting it could let two
        processes hold locks on two different files of the same name."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd, self.exclusive = None, False


def remove_stale_temporaries(out_dir: str) -> tuple[int, int]:
    """Delete the temporaries of interrupted saves and overwrites; returns (count, bytes). Call
    it only with the lock held, so that no live save owns them."""
    count, size = 0, 0
    for path in stale_paths(out_dir):
        if os.path.isdir(path) and not os.path.islink(path):
            size += sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
            shutil.rmtree(path, ignore_errors=True)
        else:
            size += os.lstat(path).st_size
            os.remove(path)
        count += 1
    return count, size


def remove_previous_run(out_dir: str, names: list[str]) -> None:
    """Move the old run's files into a fresh folder (its checkpoints first), then delete that
    folder. Killed in between, out_dir holds no checkpoint of the old run next to anything of
    the new one (a resume finds no checkpoint), and the next claim removes the rest."""
    aside = tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=out_dir)
    for name in sorted(names, key=lambda n: n not in (CKPT_NAME, BEST_NAME)):
        os.rename(os.path.join(out_dir, name), os.path.join(aside, name))
    fsync_dir(out_dir)
    shutil.rmtree(aside)


def used_message(out_dir: str, used: list[str]) -> str:
    first = [name for name in (CKPT_NAME, BEST_NAME, LOG_NAME) if name in used] or used[:3]
    others = len(used) - len(first)
    shown = ", ".join(first) + (f" and {others} other file(s)" if others else "")
    if CKPT_NAME not in used and BEST_NAME not in used:
        # nothing to resume: advising --init_from=resume would lead to "no checkpoint"
        return (f"{out_dir} holds a run that stopped before its first checkpoint ({shown}); start over in it "
                "with --overwrite_out_dir=True (its files are replaced), or choose another out_dir")
    return (f"{out_dir} already holds a run ({shown}); continue it with --init_from=resume, start over in it "
            "with --overwrite_out_dir=True (its checkpoints and log are replaced), or choose another out_dir")


def claim(out_dir: str, fresh: bool, overwrite: bool, need_bytes: int = 0) -> OutDirLock:
    """Check out_dir, lock it, refuse a fresh run over an existing one unless ``overwrite`` (then
    remove the old run), check the free space, and remove stale temporaries. Nothing is written
    before the path and contents checks pass. The caller releases the returned lock."""
    check_path(out_dir)
    check_contents(out_dir)                # before the lock file: refused folders stay untouched
    lock = OutDirLock(out_dir).acquire()
    try:
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise OutDirError(f"cannot write in {out_dir}: permission denied")
        check_contents(out_dir)            # again, now that no other run can change it
        used = run_entries(out_dir)
        if fresh and used and not overwrite:
            raise OutDirError(used_message(out_dir, used))
        if need_bytes:
            check_free_space(out_dir, need_bytes)
        if lock.exclusive:
            count, size = remove_stale_temporaries(out_dir)
            if count:
                print(f"removed {count} temporary file(s) ({size / 1e6:.1f} MB) left in {out_dir} by an "
                      "interrupted save")
            if fresh and used:
                remove_previous_run(out_dir, used)
                print(f"removed the previous run in {out_dir} ({len(used)} file(s)): --overwrite_out_dir=True")
    except BaseException:
        lock.release()
        raise
    return lock


def checkpoint_to_resume(resume_from: str) -> str:
    """The checkpoint file ``--init_from=resume`` continues (``resume_from`` is a folder holding
    ckpt.pt, or a checkpoint file); CheckpointError with what to do when there is none."""
    path = resume_from if os.path.lexists(resume_from) and not os.path.isdir(resume_from) \
        else checkpoint_path(resume_from)
    if os.path.islink(path) and not os.path.exists(path):
        raise CheckpointError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                              "point it at a checkpoint, or resume from another one")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if os.path.exists(path):
        return path
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot resume: {folder} does not exist; start the run with --init_from=scratch")
    if os.path.exists(os.path.join(folder, LOG_NAME)):
        raise CheckpointError(f"no checkpoint to resume in {folder}: the run there stopped before its first "
                              "checkpoint; start it over with --overwrite_out_dir=True (and --init_from=scratch)")
    raise CheckpointError(f"no checkpoint to resume at {path}; start the run with --init_from=scratch, or point "
                          "resume_dir at a folder holding ckpt.pt")


def claim_on_rank0(out_dir: str, fresh: bool, overwrite: bool, master: bool, ddp: bool,
                   need_bytes: int = 0) -> OutDirLock | None:
    """``claim`` on rank 0; every rank raises the same OutDirError if rank 0 was refused."""
    lock, failure, error = None, None, None
    if master:
        try:
            lock = claim(out_dir, fresh, overwrite, need_bytes)
        except Exception as e:            # whatever it is, the other ranks must not wait forever
            failure, error = e, str(e) if isinstance(e, OutDirError) else f"rank 0 could not claim {out_dir}: {e}"
    if ddp:
        import torch.distributed as dist
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise OutDirError(error)
    return lock
