"""``out_dir/log.jsonl``: one JSON object per line, appended by the training run (a resume keeps
the history), read by the plots, the comparison report and the drivers. One writer, one reader.

A record is one ``write`` of one complete line, so a reader never sees half a record unless the
writer was killed, or the disk filled, in the middle of that write. Such a torn last line is
dealt with on both sides: a run that appends to the log (a resume) first cuts the torn tail off,
so the next record starts on a line of its own; a reader skips a torn last line with a warning
(a run may still be writing it), and recovers the record glued behind a torn line in logs
written before the writer cut tails off.
"""
from __future__ import annotations

import json
import os
import sys


class JsonlLog:
    """out_dir/log.jsonl, one JSON object per line, appended (a resume keeps the history). The
    file is never opened through a symbolic link (``O_NOFOLLOW``)."""

    FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def create(cls, path: str) -> "JsonlLog":
        """A new, empty log (a new run)."""
        os.close(os.open(path, cls.FLAGS | os.O_CREAT | os.O_TRUNC, 0o666))
        return cls(path)

    @classmethod
    def append_to(cls, path: str) -> "JsonlLog":
        """The log of a resumed run, its torn last line (if any) cut off first."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            cut = torn_tail_bytes(fd)
            if cut:
                os.ftruncate(fd, os.fstat(fd).st_size - cut)
                print(f"warning: {path} ended in a record cut off mid-write ({cut} bytes, the run that wrote it "
                      "was stopped or the disk was full); removed it", file=sys.stderr)
        finally:
            os.close(fd)
        return cls(path)

    def write(self, **record) -> None:
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, self.FLAGS)
        try:
            written = os.write(fd, line)
            while written < len(line):          # a regular file takes it in one write, but be exact
                written += os.write(fd, line[written:])
        finally:
            os.close(fd)


def torn_tail_bytes(fd: int) -> int:
    """How many bytes follow the file's last newline (0 when it ends in one, or is empty)."""
    size = os.fstat(fd).st_size
    end, chunk = size, 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        at = data.rfind(b"\n")
        if at >= 0:
            return size - (start + at + 1)
        end = start
    return size


def read_jsonl(path: str) -> list[dict]:
    """log.jsonl records. A torn last line (a run still writing, or killed mid-write) is skipped
    with a warning; a torn record with a complete one glued behind it (a resume of a run killed
    mid-write, before writers cut torn tails) gives that record, with a warning; any other bad
    line is an error naming the file and line."""
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            continue
        except json.JSONDecodeError as e:
            error = e
        if i == len(lines) - 1:
            print(f"warning: {path}:{i + 1}: skipping an incomplete last line", file=sys.stderr)
            continue
        glued = record_behind_torn_line(line)
        if glued is None:
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({error})") from None
        print(f"warning: {path}:{i + 1}: skipping a record cut off mid-write", file=sys.stderr)
        records.append(glued)
    return records


def record_behind_torn_line(line: str):
    """The complete JSON object that ends ``line`` after a torn start, or None."""
    if not line.startswith("{"):
        return None
    at = line.find("{", 1)
    while at > 0:
        try:
            record = json.loads(line[at:])
        except json.JSONDecodeError:
            at = line.find("{", at + 1)
            continue
        return record if isinstance(record, dict) else None
    return None


def run_log(path: str) -> dict:
    """Validation and training records of a log.jsonl, in iteration order, the last record of
    an iteration winning: {'val': [(iter, tokens, loss)], 'train': [(iter, tokens, loss, tok/s)]}."""
    val, train = {}, {}
    for r in read_jsonl(path):
        if "val_loss" in r:
            val[r["iter"]] = (r["iter"], r["tokens"], r["val_loss"])
        elif "train_loss" in r:
            train[r["iter"]] = (r["iter"], r["tokens"], r["train_loss"], r.get("tokens_per_sec"))
    return {"val": [val[i] for i in sorted(val)], "train": [train[i] for i in sorted(train)]}
