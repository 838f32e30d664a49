"""The paper's zero-shot evaluation (Tables 1-2): seven lm_eval tasks and their average.

    python lm-evaluation-harness/run_paper_eval.py out-rope out-alibi out-grape_ap --batch_size 32

For each checkpoint it runs lm_eval (0-shot) on ARC-E, ARC-C, HellaSwag, OBQA, PIQA,
WinoGrande and SciQ through the ``grape`` adapter, prints one table row per checkpoint with
the average, and writes every lm_eval result to ``--output_dir`` as JSON.

The paper does not say which of lm_eval's two accuracies it reports. ``--metric paper``
(the default) uses the common convention of the FoX/GLA line of work: acc_norm for ARC-C,
HellaSwag and OBQA, acc for the others; ``--metric acc`` or ``acc_norm`` uses one for all
(acc where a task has no acc_norm, e.g. WinoGrande). The datasets come from the Hugging Face
Hub (or its local cache with HF_DATASETS_OFFLINE=1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (column, lm_eval task, metric under --metric paper)
PAPER_TASKS = [
    ("ARC-E", "arc_easy", "acc"),
    ("ARC-C", "arc_challenge", "acc_norm"),
    ("HellaSwag", "hellaswag", "acc_norm"),
    ("OBQA", "openbookqa", "acc_norm"),
    ("PIQA", "piqa", "acc"),
    ("WinoGrande", "winogrande", "acc"),
    ("SciQ", "sciq", "acc"),
]


def score(task_results: dict, metric: str) -> float:
    """Percent, from lm_eval's per-task results ('acc,none' keys)."""
    for name in (metric, "acc"):
        if f"{name},none" in task_results:
            return 100.0 * task_results[f"{name},none"]
    raise KeyError(f"no {metric} or acc in {sorted(task_results)}")


def table(rows: list[tuple[str, list[float]]], columns: list[str]) -> str:
    """Markdown like the paper's tables: one row per checkpoint, then the average."""
    lines = ["| Method | " + " | ".join(columns) + " | Avg. |",
             "| --- | " + " | ".join("---:" for _ in columns) + " | ---: |"]
    for name, scores in rows:
        avg = sum(scores) / len(scores)
        lines.append(f"| {name} | " + " | ".join(f"{s:.2f}" for s in scores) + f" | {avg:.2f} |")
    return "\n".join(lines)


def evaluate_checkpoint(path: str, tasks: list[str], args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import grape_lm  # noqa: F401  (registers the 'grape' model)

    model_args = {"pretrained": path, "dtype": args.dtype}
    if args.max_length:
        model_args["max_length"] = args.max_length
    return lm_eval.simple_evaluate(
        model="grape", model_args=model_args, tasks=tasks, num_fewshot=0, batch_size=args.batch_size,
        device=args.device, limit=args.limit, log_samples=False,
        task_manager=TaskManager(include_path=args.include_path) if args.include_path else None)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="training out_dirs, ckpt.pt files or save_pretrained folders")
    p.add_argument("--labels", default=None, help="comma-separated row names (default: folder names)")
    p.add_argument("--metric", choices=["paper", "acc", "acc_norm"], default="paper")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm_eval tasks instead of the paper's seven (e.g. a local task)")
    p.add_argument("--include_path", default=None, help="folder with extra task YAMLs (lm_eval --include_path)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (for a quick look only)")
    p.add_argument("--output_dir", default="lm_eval_results")
    args = p.parse_args(argv)

    if args.tasks:
        spec = [(t, t, "acc" if args.metric == "paper" else args.metric) for t in args.tasks.split(",")]
    else:
        spec = [(c, t, m if args.metric == "paper" else args.metric) for c, t, m in PAPER_TASKS]
    labels = args.labels.split(",") if args.labels else [
        os.path.basename(os.path.normpath(c if os.path.isdir(c) else os.path.dirname(c) or ".")) for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        p.error(f"got {len(labels)} labels for {len(args.checkpoints)} checkpoints")

    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for label, path in zip(labels, args.checkpoints):
        out = evaluate_checkpoint(path, [t for _, t, _ in spec], args)
        with open(os.path.join(args.output_dir, f"{label}.json"), "w") as f:
            json.dump({"checkpoint": path, "results": out["results"], "n-shot": out.get("n-shot")}, f,
                      indent=2, default=str)
        rows.append((label, [score(out["results"][t], m) for _, t, m in spec]))
    text = table(rows, [c for c, _, _ in spec])
    print(text)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
