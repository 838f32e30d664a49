"""What a longer context does to a language model's loss, token by token.

eval_length's loss by position at k x the training context T averages different tokens at
every position, so document-to-document variation (about ±0.1 nats per bucket even over
hundreds of windows) hides the effect of the position itself. Here every token is scored twice,
on the same windows: once with the whole window of k*T tokens before it (``full``) and once with
the window cut into blocks of T, so that it sees only the part of its block before it, as in
training (``short``). Their difference at position p, averaged over windows,

    gain(p) = loss_full(p) - loss_short(p)

is 0 for p < T, negative where the extra context helps and positive where positions past the
training context hurt; the text is the same in both terms, so its variation cancels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model import GPT


@torch.no_grad()
def token_losses(model: GPT, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cross-entropy of every next token: rows (N, L + 1) -> (N, L)."""
    out = []
    for i in range(0, len(rows), batch_size):
        x = rows[i:i + batch_size]
        logits = model(x[:, :-1]).logits
        out.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(len(x), -1))
    return torch.cat(out)


def context_gain(model: GPT, windows: list[np.ndarray], trained: int, batch_size: int = 8) -> dict:
    """Per position of the k*T windows (k*T + 1 tokens each, ``model`` built with block_size
    >= k*T): mean full and short losses, their mean difference and its standard error."""
    rows = torch.from_numpy(np.stack(windows).astype(np.int64))
    span = rows.shape[1] - 1
    if span % trained:
        raise ValueError(f"windows of {span} tokens are not a whole number of {trained}-token blocks")
    model.eval()
    full = token_losses(model, rows, batch_size)
    blocks = torch.stack([rows[:, j * trained:(j + 1) * trained + 1] for j in range(span // trained)], 1)
    short = token_losses(model, blocks.flatten(0, 1), batch_size).view(len(rows), span)
    diff = (full - short).double()
    return {"full": full.double().mean(0).numpy(), "short": short.double().mean(0).numpy(),
            "gain": diff.mean(0).numpy(),
            "gain_stderr": (diff.std(0) / max(1, len(rows)) ** 0.5).numpy() if len(rows) > 1 else None,
            "n_windows": len(rows)}


def gain_to_file(out_dir: str, data_dir: str, trained: int, multiplier: int, num_windows: int, path: str,
                 threads: int) -> str:
    """In a worker process: the gain of the training run in ``out_dir`` on ``num_windows`` windows of
    ``multiplier * trained`` tokens of ``data_dir``'s validation split (eval_length's windows),
    written to ``path`` as JSON."""
    import json
    import os

    from training.checkpoint import load_model
    from training.length_eval import spread_windows
    from training.progress import hf_progress_bars_off
    torch.set_num_threads(threads)
    span = multiplier * trained
    with hf_progress_bars_off():
        model = load_model(out_dir, block_size=span)
    windows = spread_windows(data_dir, span, num_windows, model.config.vocab_size)
    g = context_gain(model, windows, trained)
    record = {"out_dir": out_dir, "trained": trained, "multiplier": multiplier, "n_windows": g["n_windows"],
              "num_windows_asked": num_windows,
              **{k: [round(float(v), 6) for v in g[k]] for k in ("full", "short", "gain")}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    return f"[gain {out_dir}] {float(np.mean(g['gain'][trained:])):+.4f} past {trained} ({g['n_windows']} windows)"
