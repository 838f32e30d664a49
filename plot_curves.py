"""Training and validation loss curves of several runs in one PNG (the paper's Figures 2-3).

    python plot_curves.py out-rope out-alibi out-grape_ap --out curves.png --smooth 0.9

Each argument is a training out_dir (its ``log.jsonl``, else its wandb offline run), a
``log.jsonl`` file, or a wandb offline run folder (``wandb/offline-run-*``). Curves are
plotted against training tokens; labels are the run folder names with the encoding read
from the checkpoint (``--labels`` overrides them).

wandb offline runs: wandb 0.31 has no public reader for its ``.wandb`` files, which are a
LevelDB-style record log of protobuf ``Record`` messages; ``read_wandb_history`` walks that
log and decodes the history records with wandb's own protobuf classes. A run folder that
has ``files/wandb-history.jsonl`` (older wandb versions) is read from that file instead.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field

TRAIN_KEYS = ("train_loss", "train/loss", "loss")
VAL_KEYS = ("val_loss", "val/loss")
STEP_KEYS = ("iter", "_step")


@dataclass
class Curves:
    label: str
    train: list[tuple[float, float]] = field(default_factory=list)   # (tokens, loss)
    val: list[tuple[float, float]] = field(default_factory=list)


def _first(record: dict, keys):
    return next((record[k] for k in keys if isinstance(record.get(k), (int, float))), None)


def curves_from_records(label: str, records) -> Curves:
    """Train/val (tokens, loss) points; x falls back to the step when no token count is logged."""
    c = Curves(label)
    for r in records:
        x = r["tokens"] if isinstance(r.get("tokens"), (int, float)) else _first(r, STEP_KEYS)
        if x is None:
            continue
        for keys, points in ((TRAIN_KEYS, c.train), (VAL_KEYS, c.val)):
            y = _first(r, keys)
            if y is not None and math.isfinite(y):
                points.append((float(x), float(y)))
    c.train.sort()
    c.val.sort()
    return c


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


# wandb's transaction log: a 7-byte file header, then 32 KiB blocks of records, each with a
# 7-byte header (crc32, length, type); a record split across blocks is FIRST/MIDDLE.../LAST.
_WANDB_HEADER, _BLOCK, _FULL, _FIRST, _MIDDLE, _LAST = 7, 32768, 1, 2, 3, 4


def _wandb_records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    pos, parts = _WANDB_HEADER, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:          # block trailer too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = chunk
        elif kind == _MIDDLE:
            parts += chunk
        elif kind == _LAST:
            yield parts + chunk
        elif kind == 0 and length == 0:        # zero padding up to the next block
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK


def read_wandb_history(run_dir: str) -> list[dict]:
    """The logged rows of a wandb offline run folder (``offline-run-*``)."""
    legacy = os.path.join(run_dir, "files", "wandb-history.jsonl")
    if os.path.exists(legacy):
        return read_jsonl(legacy)
    logs = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb or files/wandb-history.jsonl in {run_dir}")
    from wandb.proto import wandb_internal_pb2

    rows = []
    for blob in _wandb_records(logs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_label(path: str) -> str:
    """Run folder name, plus the encoding when a checkpoint sits next to the log."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.path.normpath(folder))
    if name.startswith("offline-run-"):
        folder = os.path.dirname(os.path.dirname(os.path.normpath(folder)))   # out_dir/wandb/offline-run-*
        name = os.path.basename(folder)
    encoding = None
    config_json = os.path.join(folder, "config.json")
    if os.path.exists(config_json):
        with open(config_json) as f:
            cfg = json.load(f)
        encoding = cfg.get("pos_encoding")
        if encoding and (cfg.get("use_k_shift") or cfg.get("use_v_shift")):
            encoding += "+kvshift"
    return f"{name} ({encoding})" if encoding and encoding not in name else name


def load_run(path: str, label: str | None = None) -> Curves:
    """A run from an out_dir, a log.jsonl file or a wandb offline run folder."""
    if os.path.isfile(path):
        records = read_jsonl(path)
    elif os.path.exists(os.path.join(path, "log.jsonl")):
        records = read_jsonl(os.path.join(path, "log.jsonl"))
    elif glob.glob(os.path.join(path, "run-*.wandb")) or os.path.exists(os.path.join(path, "files")):
        records = read_wandb_history(path)
    else:
        runs = sorted(glob.glob(os.path.join(path, "wandb", "offline-run-*")))
        if not runs:
            raise FileNotFoundError(f"{path}: no log.jsonl and no wandb/offline-run-* (is it a training out_dir?)")
        records = read_wandb_history(runs[-1])
    curves = curves_from_records(label or run_label(path), records)
    if not curves.train and not curves.val:
        raise ValueError(f"{path}: no train or val loss found in its log")
    return curves


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (like TensorBoard's smoothing)."""
    if not 0 <= weight < 1:
        raise ValueError(f"--smooth must be in [0, 1), got {weight}")
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def plot(runs: list[Curves], out: str, smoothing: float = 0.0, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xmax = max(x for r in runs for x, _ in r.train + r.val)
    scale, unit = next(((s, u) for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if xmax >= s), (1, ""))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("train", "val")):
        for i, run in enumerate(runs):
            points = getattr(run, kind)
            if not points:
                continue
            xs = [x / scale for x, _ in points]
            ys = [y for _, y in points]
            if kind == "train" and smoothing:
                ys = smooth(ys, smoothing)
            ax.plot(xs, ys, color=plt.cm.tab10(i % 10), label=run.label, marker="o" if len(xs) < 30 else None,
                    markersize=3)
        ax.set_xlabel(f"Training tokens ({unit})" if unit else "Training tokens")
        ax.set_ylabel("Training loss" if kind == "train" else "Validation loss")
        ax.set_title(("(a) Training loss" if kind == "train" else "(b) Validation loss")
                     + (f", EMA {smoothing}" if kind == "train" and smoothing else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[Curves]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="out_dirs, log.jsonl files or wandb offline-run folders")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--labels", default=None, help="comma-separated legend names, one per run")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the training loss, in [0, 1)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        p.error(f"got {len(labels)} labels for {len(args.runs)} runs")
    smooth([], args.smooth)  # validate before reading anything
    runs = [load_run(path, label) for path, label in zip(args.runs, labels)]
    plot(runs, args.out, args.smooth, args.title)
    for r in runs:
        last_val = f"{r.val[-1][1]:.4f}" if r.val else "-"
        print(f"{r.label}: {len(r.train)} train points, {len(r.val)} val points, last val loss {last_val}")
    print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
