"""Loss by position beyond the training context: the measurement behind ``scripts/eval_length.py``
and the comparisons (see that program for what is measured and why the windows are spread)."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model import GPT
from training.checkpoint import CKPT_NAME, load_model, read_checkpoint_file
from training.dataloader import TokenBatches
from training.progress import progress_bar
from training.runlog import run_log
from training.shards import ShardError, check_token_ids, list_shards, read_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


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
    """Where the run's validation shards are, as the training run resolves it."""
    data_dir = config.get("data_dir") or (os.path.join(config.get("data_path", "data"), config["dataset"])
                                          if config.get("dataset") else "")
    if not data_dir:
        raise ValueError(f"{path} does not record its dataset; pass --data_dir")
    if not os.path.isabs(data_dir) and not os.path.isdir(data_dir) and os.path.isdir(os.path.join(ROOT, data_dir)):
        data_dir = os.path.join(ROOT, data_dir)   # the run was launched from the repository root
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
    for i in progress_bar(range(0, len(pieces), batch_size), desc=desc, unit="batch", leave=False):
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
        model = load_model(path)
        trained = int(config.get("block_size") or model.config.block_size)
        label = labels[i] if labels else describe(path, model)
        shards = data_dir or resolve_data_dir(path, config)
        span = trained * max(multipliers)
        windows = spread_windows(shards, span, num_windows, model.config.vocab_size)
        if len(windows) < num_windows:
            print(f"warning: the val split holds only {len(windows)} windows of {span} tokens, "
                  f"not {num_windows}", file=sys.stderr)
        for k in multipliers:
            model = load_model(path, block_size=k * trained).to(device)
            loss, n = position_losses(model, windows, k * trained, batch_size, device, desc=f"{label} {k}x")
            results.append(LengthResult(label, path, trained, k, n, loss))
        del model
    return results


@torch.no_grad()
def training_validation_loss(path: str, data_dir: str, device: str = "cpu") -> dict | None:
    """The checkpoint's loss on its training run's own validation batches: what log.jsonl's
    ``val_loss`` measures (``eval_iters`` batches of ``batch_size`` random windows of
    ``block_size`` tokens drawn with ``eval_seed``, each rank its own, averaged), next to the
    last value the log holds. None for a checkpoint without a training run's config."""
    ckpt = path if os.path.isfile(path) else os.path.join(path, CKPT_NAME)
    if not os.path.exists(ckpt):
        return None
    state = read_checkpoint_file(ckpt)
    config, world = dict(state.get("config") or {}), int(state.get("world_size") or 1)
    if not all(k in config for k in ("batch_size", "block_size", "eval_iters", "eval_seed")):
        return None
    model = load_model(ckpt).to(device).eval()
    batches = TokenBatches(data_dir, "val", config["batch_size"], config["block_size"], seed=config["eval_seed"],
                           mode="stateless", vocab_size=model.config.vocab_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    total = 0.0
    for k in range(config["eval_iters"]):
        for rank in range(world):
            x, y = batches.get(k, rank)
            with amp:
                total += model(x.to(device), y.to(device))[1].double().item()
    log = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "log.jsonl")
    logged = run_log(log)["val"] if os.path.exists(log) else []
    return {"loss": total / (config["eval_iters"] * world), "windows": config["eval_iters"] * config["batch_size"] * world,
            "T": config["block_size"], "iter": state.get("iter_num"),
            "logged": logged[-1][2] if logged and logged[-1][0] == state.get("iter_num") else None}


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
