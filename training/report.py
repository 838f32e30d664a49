"""RESULTS.md and its figures from the runs of compare_encodings.py.

Every number comes from a run's own files: the final validation loss and the validation and
training curves from ``<out_dir>/log.jsonl`` (for an iteration logged twice, because a resumed
run repeats the iterations after its checkpoint, the later record), tokens/s as the median of
the logged per-interval throughputs, the loss at 1x/2x/4x the context and by position from the
eval_length results the driver stored in ``<out_dir>.json``, wall time from that record too.

Spread: the sample standard deviation over seeds. A difference between two encodings is
called within the spread when it is smaller than their combined spread,
sqrt(std_a^2 + std_b^2); with one seed there is no spread and nothing is qualified.
"""
from __future__ import annotations

import csv
import math
import os
import platform
import statistics
import time

import numpy as np

from training.runlog import run_log


# -- one run ---------------------------------------------------------------------------------


def summarize(run, state: dict) -> dict:
    """The numbers of one finished run."""
    log = run_log(os.path.join(run.out_dir, "log.jsonl"))
    ev = state["eval"]
    speeds = [t[3] for t in log["train"] if t[3]]
    train_wall = sum(s["end"] - s["start"] for s in state["segments"] if s["end"] is not None)
    return {
        "encoding": run.encoding, "index": run.index, "seed": run.seed, "data_seed": run.data_seed,
        "out_dir": run.out_dir,
        "iters": log["val"][-1][0], "tokens": log["val"][-1][1], "val_loss": log["val"][-1][2],
        "val_curve": [(t, v) for _, t, v in log["val"]],
        "train_curve": [(t, v) for _, t, v, _ in log["train"]],
        "tokens_per_sec": statistics.median(speeds) if speeds else float("nan"),
        "train_wall_s": train_wall, "wall_s": train_wall + ev["wall_s"],
        "length_loss": {int(k): v for k, v in ev["mean_loss"].items()},
        "position_loss": {int(k): np.asarray(v) for k, v in ev["position_loss"].items()},
        "n_windows": {int(k): v for k, v in ev["n_windows"].items()},
        "trained_context": ev["trained_context"], "n_params": ev["n_params"],
    }


# -- statistics ------------------------------------------------------------------------------


def mean_std(values) -> tuple[float, float | None]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def within_spread(a: tuple, b: tuple) -> bool | None:
    """|mean_a - mean_b| < sqrt(std_a^2 + std_b^2); None when either has no spread (one seed)."""
    (ma, sa), (mb, sb) = a, b
    if sa is None or sb is None:
        return None
    return abs(ma - mb) < math.hypot(sa, sb)


def aggregate(summaries: list[dict], encodings: list[str]) -> dict[str, dict]:
    """Per encoding: mean and spread over its finished seeds."""
    out = {}
    for enc in encodings:
        runs = [s for s in summaries if s["encoding"] == enc]
        if not runs:
            continue
        mults = sorted(set.intersection(*(set(r["length_loss"]) for r in runs)))
        out[enc] = {
            "n": len(runs),
            "val": mean_std(r["val_loss"] for r in runs),
            "length": {k: mean_std(r["length_loss"][k] for r in runs) for k in mults},
            "tokens_per_sec": statistics.fmean(r["tokens_per_sec"] for r in runs),
            "wall_s": statistics.fmean(r["wall_s"] for r in runs),
            "n_params": runs[0]["n_params"],
            "runs": runs,
        }
    return out


# -- text ------------------------------------------------------------------------------------


def fmt(ms: tuple, digits: int = 3) -> str:
    m, s = ms
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return text + f", Python {platform.python_version()}"


def data_description(base) -> str:
    from training.shards import list_shards, read_shard
    data_dir = base.data_dir or os.path.join(base.data_path, base.dataset)
    try:
        sizes = {split: sum(len(read_shard(p)) for p in list_shards(data_dir, split)) for split in ("train", "val")}
    except Exception:      # noqa: BLE001 - the description must not stop the report
        return f"`{data_dir}`"
    return f"`{data_dir}`: {sizes['train']:,} training and {sizes['val']:,} validation tokens"


def ranking(agg: dict) -> str:
    """Encodings by mean validation loss; '≈' between neighbours within the spread."""
    order = sorted(agg, key=lambda e: agg[e]["val"][0])
    text = f"`{order[0]}` {agg[order[0]]['val'][0]:.3f}"
    for prev, enc in zip(order, order[1:]):
        sign = "≈" if within_spread(agg[prev]["val"], agg[enc]["val"]) else "<"
        text += f" {sign} `{enc}` {agg[enc]['val'][0]:.3f}"
    return text


def table(agg: dict, ref: str | None) -> str:
    mults = sorted(set.intersection(*(set(a["length"]) for a in agg.values())))
    head = (["rank", "encoding", "seeds", "params", "val loss", f"Δ vs {ref}" if ref else "Δ"]
            + [f"loss {k}× ({k}T)" for k in mults] + ["tokens/s", f"× {ref}" if ref else "×", "wall/run"])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---:", "---", "---:", "---:"] + ["---:"] * (len(head) - 4)) + " |"]
    order = sorted(agg, key=lambda e: agg[e]["val"][0])
    for rank, enc in enumerate(order, 1):
        a = agg[enc]
        r = agg.get(ref)
        delta = ""
        if r is not None and enc != ref:
            delta = f"{a['val'][0] - r['val'][0]:+.3f}" + (" ≈" if within_spread(a["val"], r["val"]) else "")
        cells = []
        for k in mults:
            cell = fmt(a["length"][k])
            if r is not None and enc != ref and k in r["length"] and within_spread(a["length"][k], r["length"][k]):
                cell += " ≈"
            cells.append(cell)
        speed = f"{a['tokens_per_sec'] / r['tokens_per_sec']:.2f}" if r is not None else ""
        lines.append("| " + " | ".join([str(rank), f"`{enc}`", str(a["n"]), f"{a['n_params'] / 1e6:.2f}M",
                                        fmt(a["val"], 4), delta, *cells, f"{a['tokens_per_sec']:,.0f}", speed,
                                        f"{a['wall_s'] / 60:.1f} min"]) + " |")
    return "\n".join(lines)


def spread_sentences(agg: dict, ref: str | None) -> list[str]:
    if any(a["val"][1] is None for a in agg.values()):
        return ["With one seed per encoding there is no spread: no difference below is qualified, and "
                "none should be trusted until it is repeated over seeds."]
    out = []
    if ref in agg:
        same = [e for e in agg if e != ref and within_spread(agg[e]["val"], agg[ref]["val"])]
        diff = [e for e in agg if e != ref and e not in same]
        out.append(f"Validation loss within the seed spread of `{ref}` (|Δ| < combined std, marked ≈): "
                   + (", ".join(f"`{e}`" for e in same) or "none") + ". Beyond it: "
                   + (", ".join(f"`{e}` ({agg[e]['val'][0] - agg[ref]['val'][0]:+.3f})" for e in diff) or "none") + ".")
    out.append("Ranking by validation loss (≈: the neighbours differ by less than their combined spread): "
               + ranking(agg) + ".")
    return out


def paper_sentences(agg: dict) -> list[str]:
    """The paper's claim about validation loss (§6.2, Figures 2-3) next to what was measured."""
    if "grape_ap" not in agg:
        return []
    others = [e for e in ("rope", "alibi", "fox") if e in agg]
    parts = []
    for e in others:
        d = agg["grape_ap"]["val"][0] - agg[e]["val"][0]
        w = within_spread(agg["grape_ap"]["val"], agg[e]["val"])
        parts.append(f"vs `{e}` {d:+.3f}" + (" (within the spread)" if w else " (beyond the spread)" if w is False else ""))
    if not parts:
        return []
    return ["The paper (§6.2, Figures 2–3) reports GRAPE-AP's validation loss below RoPE's, ALiBi's and "
            "FoX's throughout training at 353M and 770M parameters on 50B tokens of FineWeb-Edu. "
            "Here GRAPE-AP's final validation loss differs " + ", ".join(parts) + "."]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def settings_text(base, settings_first: dict, nproc: int) -> list[str]:
    s = settings_first
    on_gpu = s["device"].startswith("cuda") or (s["device"] == "auto" and _cuda())
    tokens_per_iter = s["batch_size"] * s["block_size"] * s["gradient_accumulation_steps"] * s["world_size"]
    return [
        f"- **Model**: {s['n_layer']} layers, {s['n_head']} heads × {s['head_dim']}, n_embd {s['n_embd']}, "
        f"context T = {s['block_size']}, vocabulary {s['vocab_size']}, QK-RMSNorm {s['use_qk_rmsnorm']}.",
        f"- **Token budget**: {s['max_iters']} iterations × {tokens_per_iter:,} tokens "
        f"({s['batch_size']} sequences × {s['gradient_accumulation_steps']} accumulation × {s['world_size']} "
        f"process(es)) = {s['max_iters'] * tokens_per_iter:,} tokens per run.",
        f"- **Schedule**: AdamW lr {s['learning_rate']:g}, {s['warmup_iters']} warm-up iterations, cosine to "
        f"{s['min_lr']:g} at iteration {s['lr_decay_iters']} (decay {s['decay_lr']}), β = ({s['beta1']}, {s['beta2']}), "
        f"weight decay {s['weight_decay']}, gradient clip {s['grad_clip']}; device {s['device']}, "
        f"{s['dtype'] + ' autocast' if on_gpu else 'float32'}, "
        f"compile {s['compile']}.",
        f"- **Validation**: {s['eval_iters']} batches every {s['eval_interval']} iterations, eval_seed "
        f"{s['eval_seed']} for every run (the same batches everywhere).",
        f"- **Data**: {data_description(base)}.",
        f"- **Seeds**: run i uses seed {base.seed} + i (model init) and data_seed {base.data_seed} + i (data order); "
        "all encodings with the same i see the same batches in the same order.",
    ]


# -- figures ---------------------------------------------------------------------------------


def _colors(encodings):
    import matplotlib.pyplot as plt
    cmap = plt.cm.tab20 if len(encodings) > 10 else plt.cm.tab10
    return {e: cmap(i % cmap.N) for i, e in enumerate(encodings)}


def _mean_curve(curves: list[list[tuple]]):
    """Mean, min and max over seeds at the x values every seed logged."""
    common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    ys = np.array([[dict(c)[x] for x in common] for c in curves])
    return np.array(common), ys.mean(0), ys.min(0), ys.max(0)


def plot_curves(agg: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(list(agg))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, title in ((axes[0], "train_curve", "(a) training loss"), (axes[1], "val_curve", "(b) validation loss")):
        tail = []
        for enc, a in agg.items():
            x, mean, lo, hi = _mean_curve([r[key] for r in a["runs"]])
            if len(x) == 0:
                continue
            ax.plot(x, mean, color=colors[enc], lw=1.3, label=f"{enc} ({a['val'][0]:.3f})")
            if a["n"] > 1:
                ax.fill_between(x, lo, hi, color=colors[enc], alpha=0.15, lw=0)
            tail += list(hi[x >= x.max() * 0.25])
        if tail:      # the first iterations (loss ~10.8) would flatten every difference
            lo_y = min(min(np.min(_mean_curve([r[key] for r in a["runs"]])[2]) for a in agg.values()), min(tail))
            ax.set_ylim(lo_y - 0.02 * (max(tail) - lo_y + 1e-9), max(tail) + 0.05 * (max(tail) - lo_y + 1e-9))
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss")
        ax.set_title(title + " — mean over seeds, band: min–max")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, title="final val loss", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_positions(agg: dict, path: str, n_buckets: int = 64) -> None:
    from training.length_eval import bucket
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(list(agg))
    mults = sorted(set.intersection(*(set(a["length"]) for a in agg.values())))
    trained = next(iter(agg.values()))["runs"][0]["trained_context"]
    width = max(1, trained * max(mults) // n_buckets)
    fig, axes = plt.subplots(1, len(mults), figsize=(5 * len(mults), 5), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], mults):
        for enc, a in agg.items():
            mean = np.mean([r["position_loss"][k] for r in a["runs"]], axis=0)
            x, y = bucket(mean, min(width, len(mean)))
            ax.plot(x, y, color=colors[enc], lw=1.2, label=f"{enc} ({a['length'][k][0]:.3f})")
        ax.axvline(trained, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{k}× the training context ({k * trained} tokens)")
        ax.set_xlabel("position (tokens); dashed: training context")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, title="mean loss", title_fontsize=6)
    axes[0][0].set_ylabel(f"validation loss, mean over seeds and buckets of {width} positions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(summaries: list[dict], path: str) -> None:
    mults = sorted(set().union(*(s["length_loss"] for s in summaries)))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["encoding", "seed_index", "seed", "data_seed", "iters", "tokens", "val_loss",
                    *[f"loss_{k}x" for k in mults], "tokens_per_sec", "train_wall_s", "wall_s", "n_params", "out_dir"])
        for s in summaries:
            w.writerow([s["encoding"], s["index"], s["seed"], s["data_seed"], s["iters"], s["tokens"],
                        f"{s['val_loss']:.6f}", *[f"{s['length_loss'].get(k, float('nan')):.6f}" for k in mults],
                        f"{s['tokens_per_sec']:.1f}", f"{s['train_wall_s']:.1f}", f"{s['wall_s']:.1f}",
                        s["n_params"], s["out_dir"]])


# -- the page --------------------------------------------------------------------------------


def write(report_dir: str, runs: list, settings: dict, command: list[str], base, reference: str = "rope",
          note: str = "", nproc_per_node: int = 1, skipped: dict | None = None) -> str:
    """Write RESULTS.md, curves.png, loss_by_position.png and runs.csv
    from the finished runs; returns the path of RESULTS.md."""
    import json
    import shlex

    encodings = list(dict.fromkeys(r.encoding for r in runs))
    summaries, pending, failed = [], [], []
    for run in runs:
        state = None
        if os.path.exists(run.state_path):
            with open(run.state_path) as f:
                state = json.load(f)
        if state and state.get("trained") and state.get("eval") and state["settings"] == settings[run.out_dir]:
            summaries.append(summarize(run, state))
        elif state and state.get("error"):
            failed.append((run, state["error"]))
        else:
            pending.append(run)
    os.makedirs(report_dir, exist_ok=True)
    md = os.path.join(report_dir, "RESULTS.md")
    agg = aggregate(summaries, encodings)
    ref = reference if reference in agg else None
    lines = ["# Comparing positional encodings: results", ""]
    lines += ["A small-scale check of the pipeline and of the paper's ordering, **not** a reproduction of its "
              "numbers: the paper trains 353M/770M-parameter models on 50B tokens of FineWeb-Edu and reports "
              "0-shot accuracy; this page trains tiny models on a small corpus and reports validation loss.", ""]
    if pending or failed:
        lines += [f"**Partial**: {len(summaries)} of {len(runs)} runs finished"
                  + (f"; {len(failed)} failed" if failed else "") + ".", ""]
    lines += ["```", shlex.join(command), "```", ""]
    lines += [f"Written {time.strftime('%Y-%m-%d %H:%M')} by `compare_encodings.py` on: {machine()}"
              + (f" ({nproc_per_node} processes per run)" if nproc_per_node > 1 else "") + "."]
    if note:
        lines += ["", f"Note: {note}"]
    if not agg:
        lines += ["", "No run has finished yet."]
    else:
        first = settings[next(s["out_dir"] for s in summaries)]
        lines += ["", *settings_text(base, first, nproc_per_node), ""]
        lines += ["## Table", "",
                  "Sorted by final validation loss (the last evaluation in each run's `log.jsonl`), mean ± sample "
                  "std over seeds. Loss at k× is eval_length.py on the final checkpoint, on the same validation tokens "
                  "at every length (" + ", ".join(f"{n} windows of {k}T" for k, n in sorted(summaries[0]['n_windows'].items()))
                  + f"). ≈: the difference from "
                  f"`{ref}` is smaller than the combined seed spread sqrt(std² + std_{ref}²)." if ref else
                  "Sorted by final validation loss, mean ± sample std over seeds.",
                  "tokens/s: median of the logged throughputs of each run, averaged over seeds; runs ran one after "
                  "another, so other load on the machine shifts it. wall/run: training + evaluation.", ""]
        lines += [table(agg, ref), ""]
        lines += ["## Within the seed spread?", ""]
        lines += [f"- {s}" for s in spread_sentences(agg, ref) + paper_sentences(agg)]
        lines += ["", "## Figures", "",
                  "![validation curves](curves.png)", "",
                  "Training and validation loss against training tokens, mean over seeds with a min–max band "
                  "(like the paper's Figures 2–3).", "",
                  "![loss by position](loss_by_position.png)", "",
                  "Validation loss by position at 1×, 2× and 4× the training context (mean over seeds); "
                  "beyond the dashed line the model sees positions it was never trained on.", "",
                  "Per-run numbers: `runs.csv`."]
        plot_curves(agg, os.path.join(report_dir, "curves.png"))
        plot_positions(agg, os.path.join(report_dir, "loss_by_position.png"))
        write_csv(summaries, os.path.join(report_dir, "runs.csv"))
    if skipped:
        lines += ["", "## Encodings left out", "", "Registered, but the base config cannot build them:", ""]
        lines += [f"- `{e}`: {reason}" for e, reason in skipped.items()]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r.name}: {err}" for r, err in failed]
    if pending:
        lines += ["", "## Not finished", ""] + [f"- {r.name}" for r in pending]
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md
