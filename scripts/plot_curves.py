"""Training and validation loss curves of several runs in one PNG (the paper's Figures 2-3).

    python -m scripts.plot_curves out-rope out-alibi out-grape_ap --out curves.png --smooth 0.9
    python -m scripts.plot_curves wandb:my-team/grape/1a2b3c4d out-rope       # a run on a wandb server

Each argument is a training out_dir (its ``log.jsonl``, which every run writes whether or not
wandb is on), a ``log.jsonl`` file, a wandb offline run folder inside an out_dir
(``out_dir/wandb/offline-run-*``: the out_dir's log.jsonl is read), or ``wandb:entity/project/run_id``
for a run synced to a wandb server (read with wandb's public API, ``wandb.Api``). Curves are
plotted against training tokens; where a resumed or rolled-back run logged an iteration twice,
the later record wins. Labels are the run folder names with the encoding read from the
checkpoint (``--labels`` overrides them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field

from training.runlog import read_jsonl

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
    """Train/val (tokens, loss) points; x falls back to the step when no token count is logged.
    A point logged again at the same x (after a resume or a rollback) replaces the earlier one."""
    train, val = {}, {}
    for r in records:
        x = r["tokens"] if isinstance(r.get("tokens"), (int, float)) else _first(r, STEP_KEYS)
        if x is None:
            continue
        for keys, points in ((TRAIN_KEYS, train), (VAL_KEYS, val)):
            y = _first(r, keys)
            if y is not None and math.isfinite(y):
                points[float(x)] = float(y)
    return Curves(label, sorted(train.items()), sorted(val.items()))


WANDB_PREFIX = "wandb:"


def read_wandb_run(path: str) -> tuple[str, list[dict]]:
    """Name and logged rows of a run on a wandb server (``entity/project/run_id``), through
    wandb's public API (needs network access and a login)."""
    import wandb
    run = wandb.Api().run(path)
    return run.name, list(run.scan_history())


def offline_run_log(run_dir: str) -> str:
    """The log.jsonl of the training run that wrote a wandb offline run folder."""
    out_dir = os.path.dirname(os.path.dirname(os.path.normpath(run_dir)))   # out_dir/wandb/offline-run-*
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no log.jsonl in the out_dir around it ({out_dir}); wandb's offline "
                                "files have no public reader: `wandb sync` the run, then pass "
                                "wandb:entity/project/run_id")
    return path


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
    """A run from an out_dir, a log.jsonl file, a wandb offline run folder or wandb:entity/project/run_id."""
    if path.startswith(WANDB_PREFIX):
        name, records = read_wandb_run(path[len(WANDB_PREFIX):])
        label = label or name
    elif os.path.isfile(path):
        records = read_jsonl(path)
    elif os.path.exists(os.path.join(path, "log.jsonl")):
        records = read_jsonl(os.path.join(path, "log.jsonl"))
    elif os.path.basename(os.path.normpath(path)).startswith("offline-run-"):
        records = read_jsonl(offline_run_log(path))
    else:
        raise FileNotFoundError(f"{path}: no log.jsonl (is it a training out_dir?)")
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
    p.add_argument("runs", nargs="+", help="out_dirs, log.jsonl files, wandb offline-run folders or "
                   "wandb:entity/project/run_id")
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
