"""``out_dir/log.jsonl``: one JSON object per line, appended by the training run (a resume keeps
the history), read by the plots, the comparison report and the drivers. One writer, one reader."""
from __future__ import annotations

import json
import sys


class JsonlLog:
    """out_dir/log.jsonl, one JSON object per line, appended (a resume keeps the history)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """log.jsonl records. A cut-off last line (a run still writing) is skipped; any other bad
    line is an error naming the file and line."""
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"warning: {path}:{i + 1}: skipping an incomplete last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({e})") from None
    return records


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
