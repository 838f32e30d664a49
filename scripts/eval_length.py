"""Length extrapolation: validation loss by position at 1x, 2x and 4x the training context.

The paper leaves open how its encodings behave beyond the context they were trained on.
This script answers it per checkpoint: it loads each checkpoint with a longer block_size
(none of the encodings has learned absolute positions, so nothing else changes), reads
windows of k*T tokens from the validation shards, and records the mean loss at every
position. The windows of the longest length are spread evenly over the validation split
(the loss varies a lot from document to document, so the first few windows would be a poor
sample), and every shorter length reads the same tokens, cut into more windows: the mean
losses then differ only by the context length.

    python eval_length.py out-pydoc                        # one checkpoint
    python eval_length.py out-rope out-alibi out-grape_ap --num_windows 8 --out_dir eval_length_out

Writes eval_length.csv / .md (mean loss per length), eval_length_positions.csv (every
position) and eval_length.png (bucketed loss by position, one curve per checkpoint and length).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, read_checkpoint_file
from model import GPT
from shards import ShardError, check_token_ids, list_shards, read_shard

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class LengthResult:
    label: str
    path: str
    trained: int              # training context T
    multiplier: int
    n_windows: int
    position_loss: np.ndarray  # (k*T,) mean loss at each position

    @property
    def length(self) -> int:
        return self.trained * self.multiplier

    @property
    def mean_loss(self) -> float:
        return float(self.position_loss.mean())


def training_config(path: str) -> dict:
    """The training run's config dict stored in ckpt.pt (empty for a bare save_pretrained folder)."""
    ckpt = path if os.path.isfile(path) else os.path.join(path, "ckpt.pt")
    if not os.path.exists(ckpt):
        return {}
    # memory-mapped: reads the small config without loading weights and optimizer state
    return dict(read_checkpoint_file(ckpt).get("config") or {})


def resolve_data_dir(path: str, config: dict) -> str:
    """Where the run's validation shards are, as train_adam_finewebedu.py resolves it."""
    data_dir = config.get("data_dir") or (os.path.join(config.get("data_path", "data"), config["dataset"])
                                          if config.get("dataset") else "")
    if not data_dir:
        raise ValueError(f"{path} does not record its dataset; pass --data_dir")
    if not os.path.isabs(data_dir) and not os.path.isdir(data_dir) and os.path.isdir(os.path.join(HERE, data_dir)):
        data_dir = os.path.join(HERE, data_dir)   # the run was launched from the repository root
    return data_dir


def describe(path: str, model: GPT) -> str:
    cfg = model.config
    shift = "+kvshift" if (cfg.use_k_shift or cfg.use_v_shift) else ""
    name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path) or "."))
    return f"{name} ({cfg.pos_encoding}{shift})"


def spread_windows(data_dir: str, span: int, n: int, vocab_size: int | None = None) -> list[np.ndarray]:
    """``n`` windows of ``span + 1`` tokens, evenly spaced over the non-overlapping windows
    that fit in the val shards (all of them when fewer fit); token ids checked against
    ``vocab_size``."""
    paths = list_shards(data_dir, "val")
    shards = [read_shard(p) for p in paths]
    if vocab_size is not None:
        for path, tokens in zip(paths, shards):
            check_token_ids(path, tokens, vocab_size)
    slots = [(s, i * (span + 1)) for s in range(len(shards)) for i in range(len(shards[s]) // (span + 1))]
    if not slots:
        raise ShardError(f"no val shard in {data_dir} holds a window of {span + 1} tokens (longest: "
                         f"{max(len(t) for t in shards)}); evaluate fewer --multipliers or use a longer val split")
    picks = sorted(set(np.linspace(0, len(slots) - 1, min(n, len(slots))).round().astype(int).tolist()))
    return [np.asarray(shards[s][o:o + span + 1], dtype=np.int64) for s, o in (slots[i] for i in picks)]


@torch.no_grad()
def position_losses(model: GPT, windows: list[np.ndarray], length: int, batch_size: int, device: str,
                    desc: str) -> tuple[np.ndarray, int]:
    """Mean cross-entropy at each of ``length`` positions; each window of span+1 tokens is cut
    into span // length consecutive pieces of length + 1 tokens."""
    model.eval()
    pieces = [torch.from_numpy(w[j * length:(j + 1) * length + 1])
              for w in windows for j in range((len(w) - 1) // length)]
    use_amp = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    total = torch.zeros(length, dtype=torch.float64)
    for i in tqdm(range(0, len(pieces), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        rows = torch.stack(pieces[i:i + batch_size]).to(device)
        with amp:
            logits, _ = model(rows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        total += loss.view(len(rows), length).sum(0).double().cpu()
    return (total / len(pieces)).numpy(), len(pieces)


def evaluate(paths: list[str], multipliers=(1, 2, 4), num_windows: int = 32, data_dir: str | None = None,
             batch_size: int = 1, device: str = "cpu", labels: list[str] | None = None) -> list[LengthResult]:
    if labels and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} checkpoints")
    results = []
    for i, path in enumerate(paths):
        config = training_config(path)
        model = GPT.load(path)
        trained = int(config.get("block_size") or model.config.block_size)
        label = labels[i] if labels else describe(path, model)
        shards = data_dir or resolve_data_dir(path, config)
        span = trained * max(multipliers)
        windows = spread_windows(shards, span, num_windows, model.config.vocab_size)
        if len(windows) < num_windows:
            print(f"warning: the val split holds only {len(windows)} windows of {span} tokens, "
                  f"not {num_windows}", file=sys.stderr)
        for k in multipliers:
            model = GPT.load(path, block_size=k * trained).to(device)
            loss, n = position_losses(model, windows, k * trained, batch_size, device, desc=f"{label} {k}x")
            results.append(LengthResult(label, path, trained, k, n, loss))
        del model
    return results


def table(results: list[LengthResult]) -> str:
    """Markdown: one row per checkpoint, mean loss per context multiple."""
    mults = sorted({r.multiplier for r in results})
    rows = {}
    for r in results:
        rows.setdefault((r.label, r.trained), {})[r.multiplier] = r
    lines = ["| checkpoint | T | " + " | ".join(f"{k}x ({k}T)" for k in mults) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in mults) + " |"]
    for (label, trained), by_k in rows.items():
        cells = [f"{by_k[k].mean_loss:.4f}" if k in by_k else "" for k in mults]
        lines.append(f"| {label} | {trained} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bucket(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Means over consecutive buckets of ``width`` positions, at the buckets' centres."""
    n = len(values) // width * width
    means = values[:n].reshape(-1, width).mean(1)
    centres = np.arange(len(means)) * width + (width - 1) / 2
    return centres, means


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
    print("wrote " + ", ".join(files.values()))
    return results


if __name__ == "__main__":
    try:
        sys.exit(0 if main() else 1)
    except (CheckpointError, ShardError, FileNotFoundError) as e:    # the message names the file
        sys.exit(f"error: {e}")
