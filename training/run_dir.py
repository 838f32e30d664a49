"""One training run per out_dir: an exclusive lock, the fresh-start rule, stale temporaries.

A trainer takes ``out_dir/.lock`` with ``flock`` before it writes anything there. The kernel
releases the lock when the process ends, however it ends (SIGKILL included), so there is
nothing to clean up; a second trainer on the same folder is refused with the first one's pid.
With the lock held nothing else writes in out_dir, so any checkpoint temporary found there
was left by a process killed while saving, and is removed.

A run that does not resume from out_dir itself (``init_from='scratch'``, or resuming from
another ``resume_dir``) would replace the checkpoints and the log of whatever run out_dir
holds: it needs ``overwrite_out_dir=True`` when out_dir is not empty.

Under DDP only rank 0 takes the lock and checks; the verdict is broadcast so that every rank
raises the same OutDirError and exits.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time

from training.checkpoint import BEST_NAME, CKPT_NAME, temporary_paths

LOCK_NAME = ".lock"


class OutDirError(RuntimeError):
    """out_dir is in use by another process, or holds a run this one would overwrite."""


class OutDirLock:
    """An exclusive ``flock`` on ``out_dir/.lock``, held until ``release()`` or the process ends."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd: int | None = None
        self.exclusive = False            # False where the filesystem cannot lock

    def acquire(self) -> "OutDirLock":
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
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

    def release(self) -> None:
        """Closing the file releases the lock. The file stays: deleting it could let two
        processes hold locks on two different files of the same name."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd, self.exclusive = None, False


def run_files(out_dir: str) -> list[str]:
    """What out_dir holds besides the lock and stale temporaries."""
    if not os.path.isdir(out_dir):
        return []
    ignored = {LOCK_NAME} | {os.path.basename(p) for p in temporary_paths(out_dir)}
    return sorted(name for name in os.listdir(out_dir) if name not in ignored)


def remove_stale_temporaries(out_dir: str) -> tuple[int, int]:
    """Delete the temporaries of interrupted saves; returns (count, bytes). Call it only
    with the lock held, so that no live save owns them."""
    count, size = 0, 0
    for path in temporary_paths(out_dir):
        if os.path.isdir(path) and not os.path.islink(path):
            size += sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
            shutil.rmtree(path, ignore_errors=True)
        else:
            size += os.path.getsize(path)
            os.remove(path)
        count += 1
    return count, size


def claim(out_dir: str, fresh: bool, overwrite: bool) -> OutDirLock:
    """Lock out_dir, refuse a fresh run over an existing one unless ``overwrite``, and remove
    stale temporaries. The caller releases the returned lock when the run ends."""
    lock = OutDirLock(out_dir).acquire()
    try:
        used = run_files(out_dir)
        if fresh and used and not overwrite:
            first = [name for name in (CKPT_NAME, BEST_NAME, "log.jsonl") if name in used] or used[:3]
            others = len(used) - len(first)
            shown = ", ".join(first) + (f" and {others} other file(s)" if others else "")
            raise OutDirError(f"{out_dir} already holds a run ({shown}); continue it with --init_from=resume, "
                              "start over in it with --overwrite_out_dir=True (its checkpoints and log are "
                              "replaced), or choose another out_dir")
        if lock.exclusive:
            count, size = remove_stale_temporaries(out_dir)
            if count:
                print(f"removed {count} temporary file(s) ({size / 1e6:.1f} MB) left in {out_dir} by an "
                      "interrupted save")
    except BaseException:
        lock.release()
        raise
    return lock


def claim_on_rank0(out_dir: str, fresh: bool, overwrite: bool, master: bool, ddp: bool) -> OutDirLock | None:
    """``claim`` on rank 0; every rank raises the same OutDirError if rank 0 was refused."""
    lock, failure, error = None, None, None
    if master:
        try:
            lock = claim(out_dir, fresh, overwrite)
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
