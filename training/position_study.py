"""The synthetic-task part of the position study: train one small model per (encoding, seed) on a
mixture of the tasks of ``training.synthetic_tasks`` at one length, then score it at 1x..8x.

Why one model per (encoding, seed) on the mixture, not one per task: 16 encodings x 3 seeds x 4
tasks would be 192 trainings, four times what two CPU cores give in the hour this part has; the
mixture costs one training per (encoding, seed), every task still gets its own accuracy, and the
task token first in each sequence tells the model which task it reads. Each batch holds the
tasks in equal numbers, in the same order for every encoding (the data depend on the seed only).

A model is evaluated at a longer length by building the same model with a larger block_size and
loading the trained weights (no encoding has parameters that depend on the length).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from model import GPT, GPTConfig
from training import synthetic_tasks as tasks_mod


@dataclass
class TaskStudyConfig:
    """Everything that decides a synthetic-task run's result (recorded beside it)."""
    tasks: tuple = tasks_mod.TASKS
    train_length: int = 64
    multipliers: tuple = (1, 2, 4, 8)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    p_head_dim: int = 8
    batch_size: int = 32          # sequences per step, the tasks in equal numbers
    max_iters: int = 1500
    learning_rate: float = 3e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.01
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_sequences: int = 64      # per task and length
    eval_batch_size: int = 16
    eval_seed: int = 4242
    log_interval: int = 100

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.multipliers = tuple(int(k) for k in self.multipliers)
        problems = [f"{f.name}={getattr(self, f.name)!r} must be positive" for f in fields(self)
                    if f.type in ("int", "float") and f.name not in ("weight_decay", "grad_clip", "min_lr")
                    and getattr(self, f.name) <= 0]
        if not self.tasks or not self.multipliers or min(self.multipliers) < 1:
            problems.append("tasks and multipliers must be non-empty, multipliers >= 1")
        if self.batch_size % len(self.tasks):
            problems.append(f"batch_size={self.batch_size} must be a multiple of the {len(self.tasks)} tasks")
        if problems:
            raise ValueError("; ".join(problems))
        tasks_mod.check_tasks(self.tasks, [self.train_length * k for k in self.multipliers])

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tasks"], d["multipliers"] = list(self.tasks), list(self.multipliers)
        return d


def model_config(cfg: TaskStudyConfig, encoding: str, block_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=tasks_mod.VOCAB.size, block_size=block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, head_dim=cfg.n_embd // cfg.n_head,
                     pos_encoding=encoding, p_head_dim=cfg.p_head_dim, attn_backend="auto",
                     bos_token_id=tasks_mod.VOCAB.PAD, eos_token_id=tasks_mod.VOCAB.PAD)


def learning_rate(it: int, cfg: TaskStudyConfig) -> float:
    """Linear warm-up, cosine to min_lr at max_iters (as the training script's schedule)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, ratio))) * (cfg.learning_rate - cfg.min_lr)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens, averaged within each sequence first: every sequence,
    and so every task, weighs the same however many answers it holds (a copy sequence has
    six times as many as a passkey one)."""
    mask = targets >= 0
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(),
                                           reduction="none").view_as(targets)
    return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def train(encoding: str, seed: int, cfg: TaskStudyConfig, log=print) -> tuple[GPT, list]:
    """Train from scratch; returns the model and its training curve [(iter, loss)]."""
    torch.manual_seed(seed)
    model = GPT(model_config(cfg, encoding, cfg.train_length))
    opt = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate,
                            betas=(0.9, cfg.beta2))
    rng = tasks_mod.training_rng(seed)
    per_task = cfg.batch_size // len(cfg.tasks)
    order = [t for t in cfg.tasks for _ in range(per_task)]
    curve, window, t0 = [], [], time.time()
    model.train()
    for it in range(cfg.max_iters):
        for group in opt.param_groups:
            group["lr"] = learning_rate(it, cfg)
        x, y = (torch.from_numpy(a) for a in tasks_mod.batch(order, cfg.train_length, rng))
        loss = answer_loss(model(x).logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{encoding} seed {seed}: non-finite loss at iteration {it}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        window.append(loss.item())
        if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
            curve.append((it + 1, float(np.mean(window))))
            log(f"iter {it + 1}: answer loss {curve[-1][1]:.4f} ({time.time() - t0:.0f} s)")
            window = []
    return model, curve


@torch.no_grad()
def accuracy(model: GPT, task: str, length: int, cfg: TaskStudyConfig) -> float:
    """Fraction of answer tokens whose argmax prediction is right, over the evaluation set."""
    x, y = (torch.from_numpy(a) for a in tasks_mod.evaluation_set(task, length, cfg.eval_sequences, cfg.eval_seed))
    right = total = 0
    for i in range(0, len(x), cfg.eval_batch_size):
        xb, yb = x[i:i + cfg.eval_batch_size], y[i:i + cfg.eval_batch_size]
        pred = model(xb).logits.argmax(-1)
        mask = yb >= 0
        right += int((pred[mask] == yb[mask]).sum())
        total += int(mask.sum())
    return right / total


def evaluate(model: GPT, encoding: str, cfg: TaskStudyConfig) -> dict:
    """{task: {multiplier: accuracy}}, each length with a model built for it."""
    state = model.state_dict()
    out = {task: {} for task in cfg.tasks}
    for k in cfg.multipliers:
        longer = GPT(model_config(cfg, encoding, k * cfg.train_length))
        longer.load_state_dict(state, strict=True)
        longer.eval()
        for task in cfg.tasks:
            out[task][k] = accuracy(longer, task, k * cfg.train_length, cfg)
    return out


def run(encoding: str, seed: int, cfg: TaskStudyConfig, log=print) -> dict:
    """Train and evaluate one (encoding, seed): the record the report reads."""
    t0, c0 = time.time(), time.process_time()
    model, curve = train(encoding, seed, cfg, log)
    t1, c1 = time.time(), time.process_time()
    acc = evaluate(model, encoding, cfg)
    return {"encoding": encoding, "seed": seed, "settings": cfg.as_dict(), "curve": curve,
            "accuracy": {t: {str(k): v for k, v in by_k.items()} for t, by_k in acc.items()},
            "n_params": model.num_parameters_unique(), "train_s": t1 - t0, "eval_s": time.time() - t1,
            "train_cpu_s": c1 - c0, "eval_cpu_s": time.process_time() - c1}


# -- records on disk (one JSON per run, written whole) -------------------------------------------


def write_json(path: str, obj: dict) -> None:
    """Temp file + rename: an interruption never leaves half a record."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_record(path: str, settings: dict, seed: int) -> dict | None:
    """The finished run at ``path``, None when there is none; SystemExit (one line) when it was
    run with other settings, so a re-run never mixes two studies in one out_root."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("settings") != settings or record.get("seed") != seed:
        differ = sorted(k for k in set(settings) | set(record.get("settings", {}))
                        if settings.get(k) != record.get("settings", {}).get(k))
        raise SystemExit(f"error: {path} was run with other settings ({', '.join(differ) or 'seed'}); "
                         "re-run with those settings or use another --out_root")
    return record


def run_to_file(encoding: str, index: int, seed: int, settings: dict, path: str, threads: int) -> str:
    """One (encoding, seed) in a worker process: train, evaluate, write the record to ``path``
    (its log beside it); returns a one-line summary."""
    torch.set_num_threads(threads)
    cfg = TaskStudyConfig(**settings)
    prefix = f"[tasks {encoding} s{index}] "
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path[:-len(".json")] + ".log", "a") as log_file:
        def log(message: str) -> None:
            print(prefix + message, flush=True)
            log_file.write(message + "\n")
            log_file.flush()
        record = run(encoding, seed, cfg, log)
        record.update(index=index, vocab_size=tasks_mod.VOCAB.size)
        summary = ", ".join(f"{t} " + "/".join(f"{v:.2f}" for v in by_k.values())
                            for t, by_k in record["accuracy"].items())
        log_file.write(f"accuracy at {'/'.join(f'{k}x' for k in cfg.multipliers)}: {summary}\n")
    write_json(path, record)
    return f"{prefix}accuracy at {'/'.join(f'{k}x' for k in cfg.multipliers)}: {summary}"
