"""The position study's page (results/POSITION_STUDY.md), its figures and CSVs, from the records
scripts/position_study.py keeps: one per synthetic-task run, one per language-model run.

Spread: sample standard deviation over seeds. In each column the best mean is bold, and ≈ marks
a mean whose difference from the best is smaller than their combined spread sqrt(std² + std_best²)
(within the seed spread of the best); with one seed nothing is marked.
"""
from __future__ import annotations

import csv
import os
import shlex
import time

import numpy as np

from training.report import machine, mean_std, within_spread
from training.encoding_styles import styles

SOLVED = 0.9          # "solves the task": mean accuracy at least this


# -- aggregation -------------------------------------------------------------------------------


def task_table_data(records: list[dict]) -> dict:
    """{encoding: {task: {k: (mean, std)}}, '_n': {encoding: seeds}}."""
    out, n = {}, {}
    for enc in dict.fromkeys(r["encoding"] for r in records):
        runs = [r for r in records if r["encoding"] == enc]
        n[enc] = len(runs)
        out[enc] = {task: {int(k): mean_std(r["accuracy"][task][k] for r in runs) for k in by_k}
                    for task, by_k in runs[0]["accuracy"].items()}
    return {"acc": out, "n": n}


def lm_table_data(records: list[dict]) -> dict:
    out = {}
    for enc in dict.fromkeys(r["encoding"] for r in records):
        runs = [r for r in records if r["encoding"] == enc]
        mults = sorted(set.intersection(*(set(r["length_loss"]) for r in runs)))
        T = runs[0]["trained_context"]
        out[enc] = {"n": len(runs), "val": mean_std(r["val_loss"] for r in runs),
                    "length": {k: mean_std(r["length_loss"][k] for r in runs) for k in mults},
                    "gain": mean_std(float(np.mean(r["gain"][T:])) for r in runs),
                    "n_params": runs[0]["n_params"], "runs": runs}
    return out


# -- text --------------------------------------------------------------------------------------


def cell(ms: tuple, best: tuple, digits: int, is_best: bool) -> str:
    m, s = ms
    text = f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"
    if is_best:
        return f"**{text}**"
    return text + (" ≈" if within_spread(ms, best) else "")


def column_cells(values: dict, digits: int, higher_is_better: bool) -> dict:
    """Formatted cells of one column {encoding: (mean, std)}, the best bold, ≈ within its spread."""
    pick = max if higher_is_better else min
    best = values[pick(values, key=lambda e: values[e][0])]
    # equal means at the shown precision are all best (a tie, e.g. several at accuracy 1.000)
    return {e: cell(v, best, digits, round(v[0], digits) == round(best[0], digits)) for e, v in values.items()}


def markdown_table(head: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"] + ["| " + " | ".join(r) + " |" for r in rows]


def task_tables(data: dict, train_length: int) -> list[str]:
    acc, n = data["acc"], data["n"]
    encs = list(acc)
    tasks = list(next(iter(acc.values())))
    mults = sorted(next(iter(next(iter(acc.values())).values())))
    lines = ["### At a glance: accuracy at 1× → 8× the training length", ""]
    mean_over = {e: np.mean([acc[e][t][k][0] for t in tasks for k in mults]) for e in encs}
    order = sorted(encs, key=lambda e: -mean_over[e])
    rows = [[f"`{e}`", str(n[e])] + [f"{acc[e][t][mults[0]][0]:.2f} → {acc[e][t][mults[-1]][0]:.2f}" for t in tasks]
            + [f"{mean_over[e]:.3f}"] for e in order]
    lines += markdown_table(["encoding", "seeds", *tasks, "mean over tasks and lengths"], rows,
                            ["---", "---:"] + ["---:"] * (len(tasks) + 1))
    for task in tasks:
        lines += ["", f"### {task}", ""]
        cols = {k: column_cells({e: acc[e][task][k] for e in encs}, 3, True) for k in mults}
        order = sorted(encs, key=lambda e: -np.mean([acc[e][task][k][0] for k in mults]))
        rows = [[f"`{e}`"] + [cols[k][e] for k in mults] for e in order]
        lines += markdown_table(["encoding"] + [f"{k}× ({k * train_length})" for k in mults], rows,
                                ["---"] + ["---:"] * len(mults))
    return lines


def lm_tables(data: dict, trained: int) -> list[str]:
    encs = list(data)
    mults = sorted(set.intersection(*(set(a["length"]) for a in data.values())))
    cols = {k: column_cells({e: data[e]["length"][k] for e in encs}, 3, False) for k in mults}
    val = column_cells({e: data[e]["val"] for e in encs}, 3, False)
    gain = column_cells({e: data[e]["gain"] for e in encs}, 3, False)
    order = sorted(encs, key=lambda e: data[e]["length"][mults[-1]][0])
    rows = [[f"`{e}`", str(data[e]["n"]), f"{data[e]['n_params'] / 1e6:.2f}M", val[e]]
            + [cols[k][e] for k in mults] + [gain[e]] for e in order]
    return markdown_table(["encoding", "seeds", "params", "val loss (1×)"] + [f"loss {k}× ({k * trained})" for k in mults]
                         + [f"gain past {trained} at {mults[-1]}×"], rows, ["---", "---:", "---:"] + ["---:"] * (len(mults) + 2))


def task_findings(data: dict) -> list[str]:
    """Computed statements per task: who solves it at 1×, who keeps it at 8×, who collapses."""
    acc = data["acc"]
    out = []
    for task in next(iter(acc.values())):
        mults = sorted(next(iter(acc.values()))[task])
        lo, hi = mults[0], mults[-1]
        solved = [e for e in acc if acc[e][task][lo][0] >= SOLVED]
        kept = [e for e in solved if acc[e][task][hi][0] >= SOLVED]
        collapsed = [e for e in solved if acc[e][task][hi][0] < 0.5 * acc[e][task][lo][0]]
        names = lambda es: ", ".join(f"`{e}`" for e in es) or "none"   # noqa: E731
        out.append(f"**{task}**: solved at {lo}× (mean accuracy ≥ {SOLVED}) by {names(solved)}; "
                   f"still ≥ {SOLVED} at {hi}×: {names(kept)}; below half of its {lo}× accuracy at {hi}×: "
                   f"{names(collapsed)}.")
    return out


def literature_sentences(data: dict) -> list[str]:
    """The literature's expectations (NoPE and ALiBi extrapolate, RoPE collapses past its training
    length, recency biases hurt long-range recall) next to the numbers: for NoPE, ALiBi, RoPE and
    FoX, every task solved at 1x with its mean accuracy at each length."""
    acc = data["acc"]
    out = []
    for enc in ("nope", "alibi", "rope", "fox"):
        if enc not in acc:
            continue
        parts = []
        for task, by_k in acc[enc].items():
            mults = sorted(by_k)
            if by_k[mults[0]][0] >= SOLVED:
                parts.append(f"{task} " + " → ".join(f"{by_k[k][0]:.2f}" for k in mults))
        out.append(f"`{enc}`: " + ("; ".join(parts) if parts else f"solves no task at 1× (≥ {SOLVED})") + ".")
    return out


def lm_findings(data: dict, trained: int) -> list[str]:
    """Who loses and who gains past the training context, by more than the seed spread (with one
    seed: by the sign alone, said so)."""
    one_seed = any(a["gain"][1] is None for a in data.values())
    spread = {e: 0.0 if one_seed else a["gain"][1] for e, a in data.items()}
    rises = [e for e, a in data.items() if a["gain"][0] - spread[e] > 0]
    helps = [e for e, a in data.items() if a["gain"][0] + spread[e] < 0]
    names = lambda es: ", ".join(f"`{e}` ({data[e]['gain'][0]:+.3f})" for e in es) or "none"   # noqa: E731
    rule = "by its sign alone (one seed: no spread)" if one_seed else "by more than the seed spread"
    return [f"Loss past position {trained} higher than with the training context alone, {rule}: {names(rises)}.",
            f"Lower, i.e. the longer context helps, {rule}: {names(helps)}."]


# -- figures -----------------------------------------------------------------------------------


def _legend_right(fig, axes, look):
    handles = [axes.flat[0].lines[i] for i in range(len(look))]
    fig.legend(handles, list(look), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def plot_tasks(records: list[dict], path: str, train_length: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encs = list(dict.fromkeys(r["encoding"] for r in records))
    tasks = list(records[0]["accuracy"])
    mults = sorted(int(k) for k in records[0]["accuracy"][tasks[0]])
    look = styles(encs)
    cols = 2 if len(tasks) > 1 else 1
    fig, axes = plt.subplots((len(tasks) + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.2 * ((len(tasks) + 1) // cols)),
                             squeeze=False, sharex=True)
    x = np.array(mults) * train_length
    for ax, task in zip(axes.flat, tasks):
        for enc in encs:
            ys = np.array([[r["accuracy"][task][str(k)] for k in mults] for r in records if r["encoding"] == enc])
            ax.plot(x, ys.mean(0), lw=1.6, ms=4, label=enc, **look[enc])
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=look[enc]["color"], alpha=0.10, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{k}× ({k * train_length})" for k in mults])
        ax.axvline(train_length, color="gray", lw=0.8, ls="--")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.set_ylabel("answer-token accuracy")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("evaluation length (trained at the dashed line)")
    _legend_right(fig, axes, look)
    fig.suptitle("Accuracy against evaluation length: mean over seeds, band min–max", y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def bucket_means(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(values) // width * width
    return np.arange(n // width) * width + (width - 1) / 2, values[:n].reshape(-1, width).mean(1)


def plot_lm(data: dict, path: str, trained: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    look = styles(list(data))
    mults = sorted(set.intersection(*(set(a["length"]) for a in data.values())))
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.2), squeeze=False)
    ax = axes[0][0]
    for enc, a in data.items():
        ys = np.array([[r["length_loss"][k] for k in mults] for r in a["runs"]])
        x = np.array(mults) * trained
        ax.plot(x, ys.mean(0), lw=1.6, ms=4, label=enc, **look[enc])
        if len(ys) > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), color=look[enc]["color"], alpha=0.10, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(np.array(mults) * trained, [f"{k}× ({k * trained})" for k in mults])
    ax.set_xlabel("evaluation context")
    ax.set_ylabel("mean validation loss (nats)")
    ax.set_title("(a) loss against evaluation context (band: min–max over seeds)")
    # (b) absolute loss: the text differs from position to position, the same for every curve
    # (with finer buckets the curves share a jagged pattern of the text, not of the encodings);
    # (c) the gain cancels the text; both averaged per block of T, since inside a block the
    # reference restarts its context at the block's first token (a saw-tooth of no interest here)
    panels = ((axes[0][1], "full", f"(b) loss by position in {mults[-1]}× windows"),
              (axes[0][2], "gain", f"(c) gain per block of {trained}: loss with the whole window − "
                                   "with its block only"))
    for ax, key, title in panels:
        for enc, a in data.items():
            curves = np.array([r[key] for r in a["runs"]])
            xb, yb = bucket_means(curves.mean(0), trained)
            ax.plot(xb, yb, lw=1.3, ms=3 if key == "full" else 5, markevery=max(1, len(xb) // 8), label=enc,
                    **look[enc])
            if key == "gain" and len(curves) > 1:
                lo = np.array([bucket_means(c, trained)[1] for c in curves])
                ax.fill_between(xb, lo.min(0), lo.max(0), color=look[enc]["color"], alpha=0.10, lw=0)
        ax.axvline(trained, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"position (means over {trained} positions); dashed: training context")
        ax.set_title(title, fontsize=10)
    axes[0][2].axhline(0, color="black", lw=0.6)
    axes[0][1].set_ylabel("loss (nats), mean over windows and seeds")
    axes[0][2].set_ylabel("Δ loss (nats), band min–max over seeds; < 0: context helps")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    _legend_right(fig, axes, look)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# -- files -------------------------------------------------------------------------------------


def write_task_csv(records: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["encoding", "seed_index", "seed", "task", "multiplier", "length", "accuracy", "n_params",
                    "train_s", "train_cpu_s"])
        for r in records:
            for task, by_k in r["accuracy"].items():
                for k, v in by_k.items():
                    w.writerow([r["encoding"], r["index"], r["seed"], task, k, int(k) * r["settings"]["train_length"],
                                f"{v:.4f}", r["n_params"], f"{r['train_s']:.1f}", f"{r['train_cpu_s']:.1f}"])


def write_lm_csv(records: list[dict], path: str) -> None:
    mults = sorted(set().union(*(r["length_loss"] for r in records)))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["encoding", "seed_index", "seed", "val_loss", *[f"loss_{k}x" for k in mults],
                    "gain_past_T", "n_params", "wall_s", "out_dir"])
        for r in records:
            T = r["trained_context"]
            w.writerow([r["encoding"], r["index"], r["seed"], f"{r['val_loss']:.5f}",
                        *[f"{r['length_loss'].get(k, float('nan')):.5f}" for k in mults],
                        f"{float(np.mean(r['gain'][T:])):.5f}", r["n_params"], f"{r['wall_s']:.1f}", r["out_dir"]])


def fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def task_budget(s: dict, records: list[dict]) -> list[str]:
    tokens = s["max_iters"] * s["batch_size"] * s["train_length"]
    train_wall = np.mean([r["train_s"] for r in records])
    train_cpu = np.mean([r["train_cpu_s"] for r in records])
    lengths = ", ".join(f"{k}× = {k * s['train_length']}" for k in s["multipliers"])
    return [
        f"- **Model**: {s['n_layer']} layers, {s['n_head']} heads × {s['n_embd'] // s['n_head']}, n_embd {s['n_embd']}, "
        f"vocabulary {records[0].get('vocab_size', '?')}, QK-RMSNorm on (the repository's defaults otherwise); "
        f"{records[0]['n_params'] / 1e6:.2f}M parameters with `{records[0]['encoding']}`.",
        f"- **Training**: one model per (encoding, seed) on the mixture of {', '.join(s['tasks'])} (each batch "
        f"{s['batch_size']} sequences, the tasks in equal numbers), length {s['train_length']}: {s['max_iters']} "
        f"iterations × {s['batch_size']} × {s['train_length']} = {tokens:,} tokens per run, loss on the answer "
        f"tokens only, each sequence weighted equally. AdamW lr {s['learning_rate']:g}, {s['warmup_iters']} warm-up "
        f"iterations, cosine to {s['min_lr']:g}, β2 {s['beta2']}, weight decay {s['weight_decay']}, clip "
        f"{s['grad_clip']}; float32 on the CPU.",
        f"- **Evaluation**: {s['eval_sequences']} sequences per task and length (eval_seed {s['eval_seed']}: the same "
        f"sequences for every model), at {lengths} "
        "tokens, the model rebuilt with that block_size and the trained weights. Accuracy: argmax prediction "
        "equal to the answer, over all answer tokens.",
        f"- **Time**: {train_wall:.0f} s of training per run on average ({train_cpu:.0f} s of CPU).",
    ]


def lm_budget(s: dict, meta: dict, data: dict) -> list[str]:
    tokens = s["max_iters"] * s["batch_size"] * s["block_size"] * s["gradient_accumulation_steps"]
    walls = [r["wall_s"] for a in data.values() for r in a["runs"]]
    return [
        f"- **Model**: {s['n_layer']} layers, {s['n_head']} heads × {s['head_dim']}, n_embd {s['n_embd']}, "
        f"vocabulary {s['vocab_size']}, context T = {s['block_size']}.",
        f"- **Data**: `{s.get('data_dir') or s['data_path'] + '/' + s['dataset']}` "
        f"({meta.get('lm_data', 'see its prepare.py')}).",
        f"- **Training**: the training script through `compare_encodings` (`{meta['lm_config']}`): {s['max_iters']} "
        f"iterations × {s['batch_size'] * s['block_size']:,} tokens = {tokens:,} tokens per run; AdamW lr "
        f"{s['learning_rate']:g}, {s['warmup_iters']} warm-up iterations, cosine to {s['min_lr']:g}; seeds "
        f"{s['seed']} + i (init) and data_seed {s['data_seed']} + i (data order).",
        f"- **Evaluation**: loss k× is eval_length on {meta['lm_eval_windows']} windows of "
        f"{max(meta['lm_multipliers'])}T spread over the validation split, cut into k·T pieces (the same tokens at "
        "every k). The gain (training/context_gain.py) scores every token of those windows twice, with the whole "
        "window before it and with only its T-block, and averages the difference over windows and positions ≥ T.",
        f"- **Time**: {np.mean(walls) / 60:.1f} min per run (training + eval_length), mean over runs.",
    ]


def write_page(path: str, task_records: list[dict], lm_records: list[dict], meta: dict) -> str:
    """Write the page, figures (``<dir>/position_study/``) and CSVs; returns the page's path."""
    report_dir = os.path.dirname(os.path.abspath(path))
    fig_dir = os.path.join(report_dir, "position_study")
    os.makedirs(fig_dir, exist_ok=True)
    rel = os.path.relpath(fig_dir, report_dir)
    lines = ["# Where the encodings differ: position-sensitive tasks and length extrapolation", "",
             "Written by `scripts/position_study.py`; every number below comes from the runs' records under "
             f"`{meta['out_root']}`.", "", "```", shlex.join(meta["command"]), "```", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} on: {machine()}; {meta['workers']} worker(s) in "
             f"parallel, {meta['threads']} thread(s) each. Wall time of this study: "
             + ", ".join(f"{name} {fmt_minutes(s)}" for name, s in meta["phases"].items()) + "."]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    lines += ["", "Spread: sample standard deviation over seeds. In every column the best mean is **bold**; ≈ marks "
              "a mean within the seed spread of the best (|difference| < sqrt(std² + std_best²))."]
    if task_records:
        s = task_records[0]["settings"]
        data = task_table_data(task_records)
        plot_tasks(task_records, os.path.join(fig_dir, "task_accuracy.png"), s["train_length"])
        write_task_csv(task_records, os.path.join(fig_dir, "tasks.csv"))
        lines += ["", "## Synthetic tasks", "", *task_budget(s, task_records), "",
                  f"![accuracy against evaluation length]({rel}/task_accuracy.png)", "",
                  *task_tables(data, s["train_length"]), "", "### Computed findings", "",
                  *[f"- {x}" for x in task_findings(data)], "",
                  "The literature expects NoPE and ALiBi to extrapolate, RoPE to collapse past its training "
                  "length and recency biases to hurt long-range recall. Accuracy at "
                  + " → ".join(f"{k}×" for k in s["multipliers"]) + " on the tasks each solves at 1×:", "",
                  *[f"- {x}" for x in literature_sentences(data)], "", f"Per-run numbers: `{rel}/tasks.csv`."]
    if lm_records:
        data = lm_table_data(lm_records)
        T = lm_records[0]["trained_context"]
        plot_lm(data, os.path.join(fig_dir, "lm_length.png"), T)
        write_lm_csv(lm_records, os.path.join(fig_dir, "lm.csv"))
        lines += ["", "## Language model beyond its training context", "",
                  *lm_budget(lm_records[0]["settings"], meta, data), "",
                  f"![loss against context and position]({rel}/lm_length.png)", "",
                  "Sorted by loss at the longest context. val loss: the training script's last validation "
                  "(context T). gain: mean over positions ≥ T of (loss with the whole window − loss with its "
                  "T-block only); > 0: positions past the training context hurt.", "",
                  *lm_tables(data, T), "", "### Computed findings", "",
                  *[f"- {x}" for x in lm_findings(data, T)], "", f"Per-run numbers: `{rel}/lm.csv`."]
    for title, items in (("Encodings left out", meta.get("skipped", {})),
                         ("Failed runs", meta.get("failed", {})), ("Not finished", meta.get("pending", {}))):
        if items:
            lines += ["", f"## {title}", ""] + [f"- {k}: {v}" for k, v in items.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
