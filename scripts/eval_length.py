"""Length extrapolation: validation loss by position at 1x, 2x and 4x the training context.

The paper leaves open how its encodings behave beyond the context they were trained on.
This script answers it per checkpoint: it loads each checkpoint with a longer block_size
(none of the encodings has learned absolute positions, so nothing else changes), reads
windows of k*T tokens from the validation shards, and records the mean loss at every
position. The windows of the longest length are spread evenly over the validation split
(the loss varies a lot from document to document, so the first few windows would be a poor
sample), and every shorter length reads the same tokens, cut into more windows: the mean
losses then differ only by the context length.

    python -m scripts.eval_length out-pydoc                        # one checkpoint
    python -m scripts.eval_length out-rope out-alibi out-grape_ap --num_windows 8 --out_dir eval_length_out

Writes eval_length.csv / .md (mean loss per length), eval_length_positions.csv (every
position) and eval_length.png (bucketed loss by position, one curve per checkpoint and length).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

from training.checkpoint import CheckpointError
from training.length_eval import (LengthResult, bucket, evaluate, resolve_data_dir, table, training_config,
                                  training_validation_loss)
from training.shards import ShardError

def plot(results: list[LengthResult], path: str, n_buckets: int = 64) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in results))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    styles = {1: "-", 2: "--", 4: ":"}
    width = max(1, max(r.length for r in results) // n_buckets)   # one bucket width for every curve
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        x, y = bucket(r.position_loss, min(width, r.length))
        ax.plot(x, y, styles.get(r.multiplier, "-."), color=colors[r.label],
                label=f"{r.label} {r.multiplier}x (mean {r.mean_loss:.3f})")
    for trained in sorted({r.trained for r in results}):
        ax.axvline(trained, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("position in window (tokens); dashed grey: training context")
    ax.set_ylabel(f"validation loss (mean over buckets of {width} positions)")
    ax.set_title("Loss by position at 1x/2x/4x the training context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[LengthResult], out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    files = {name: os.path.join(out_dir, name) for name in
             ("eval_length.csv", "eval_length.md", "eval_length_positions.csv", "eval_length.png")}
    with open(files["eval_length.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "path", "trained_context", "multiplier", "length", "n_windows", "mean_loss"])
        for r in results:
            w.writerow([r.label, r.path, r.trained, r.multiplier, r.length, r.n_windows, f"{r.mean_loss:.6f}"])
    with open(files["eval_length.md"], "w") as f:
        f.write(table(results) + "\n")
    with open(files["eval_length_positions.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "multiplier", "position", "loss"])
        for r in results:
            w.writerows([r.label, r.multiplier, t, f"{v:.6f}"] for t, v in enumerate(r.position_loss))
    plot(results, files["eval_length.png"])
    return files


def main(argv=None) -> list[LengthResult]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="training out_dirs, ckpt.pt files or save_pretrained folders")
    p.add_argument("--data_dir", default=None, help="folder with val_*.bin (default: the run's own dataset)")
    p.add_argument("--multipliers", default="1,2,4", help="context multiples of the training block_size")
    p.add_argument("--num_windows", type=int, default=32, help="windows of the longest length, spread over the val split (default 32; the loss varies a lot between documents)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--labels", default=None, help="comma-separated names for the checkpoints")
    p.add_argument("--out_dir", default="eval_length_out")
    args = p.parse_args(argv)
    multipliers = [int(k) for k in args.multipliers.split(",")]
    if any(k < 1 for k in multipliers) or args.num_windows < 1 or args.batch_size < 1:
        p.error("multipliers, --num_windows and --batch_size must be positive")
    results = evaluate(args.checkpoints, multipliers, args.num_windows, args.data_dir, args.batch_size,
                       args.device, args.labels.split(",") if args.labels else None)
    files = write_outputs(results, args.out_dir)
    print(table(results))
    print(what_is_measured(results, args.data_dir, args.device))
    print("wrote " + ", ".join(files.values()))
    return results


def what_is_measured(results: list[LengthResult], data_dir: str | None, device: str) -> str:
    """Says which tokens the table's losses are over, and checks this program against the training
    log: on the run's own validation batches it gives the log's ``val_loss``."""
    first = {r.path: r for r in reversed(results)}           # the 1x (shortest) result of each checkpoint
    lines = []
    for path, r in first.items():
        lines.append(f"{r.label}: {r.multiplier}x = the mean over {r.n_windows} windows of {r.length} tokens spread "
                     "evenly over the val split (every length reads the same tokens)")
        shards = data_dir or resolve_data_dir(path, training_config(path))
        own = training_validation_loss(path, shards, device)
        if own is not None:
            logged = f"; log.jsonl at iter {own['iter']}: {own['logged']:.4f}" if own["logged"] is not None else ""
            lines.append(f"  on the training run's own validation batches ({own['windows']} random windows of "
                         f"{own['T']} tokens, eval_seed): {own['loss']:.4f}{logged}; the two samples of the val "
                         "split differ, so their means differ by sampling")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(0 if main() else 1)
    except (CheckpointError, ShardError, FileNotFoundError) as e:    # the message names the file
        sys.exit(f"error: {e}")
