"""The position study: where the positional encodings differ, on a CPU, in one command.

    python -m scripts.position_study                        # the whole study (about 2 h on 2 cores)
    python -m scripts.position_study --parts tasks --encodings rope,alibi,nope --seeds 1 --task.max_iters=300
    python -m scripts.position_study --report_only          # rewrite the page from the finished runs

Two parts, each over every encoding text can build (``grape.ENCODINGS`` without the grid ones,
or ``--encodings``) and ``--seeds`` seeds (``--lm_seeds`` for the language models, default the same):

- ``tasks``: a small model per (encoding, seed) trained on a mixture of position-sensitive
  synthetic tasks (training/synthetic_tasks.py) at one length, scored at 1x, 2x, 4x and 8x it
  (training/position_study.py; settings in ``--task_config``, override with ``--task.KEY=VALUE``).
- ``lm``: a language model per (encoding, seed) trained on the offline corpus at a short context
  by the training script through ``compare_encodings`` (``--lm_config``; ``--lm.KEY=VALUE`` passes
  ``--KEY=VALUE`` to every training run), evaluated by eval_length at 1x-8x, then scored token by
  token with and without the context past T (training/context_gain.py).

``--workers`` processes run at once, ``--threads`` threads each (two one-thread workers on two
cores): task runs and gain evaluations in a process pool, the language models as one
``compare_encodings`` stream per worker, the encodings dealt out round-robin.

Writes ``--report`` (default results/POSITION_STUDY.md) with its figures and CSVs in
``results/position_study/`` (training/position_report.py), after each part. Runs are kept under
``--out_root``: re-running the same command skips what is finished and resumes the rest (an
interrupted language-model run from its checkpoint); a run recorded with other settings is an error.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import runpy
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = [sys.executable, "-m", "scripts.compare_encodings"]
PARTS = ("tasks", "lm")


# -- settings ----------------------------------------------------------------------------------


def literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def task_settings(path: str, overrides: dict) -> tuple[dict, int]:
    """TaskStudyConfig fields from the config file and overrides, checked; and the base seed."""
    from training.position_study import TaskStudyConfig
    values = {k: v for k, v in runpy.run_path(path).items() if not k.startswith("_") and not callable(v)
              and not isinstance(v, type(os))}
    values.update(overrides)
    seed = int(values.pop("seed", 1337))
    known = set(TaskStudyConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: unknown task setting(s) {', '.join(unknown)} (in {path} or --task.*); "
                         f"known: {', '.join(sorted(known))}")
    try:
        return TaskStudyConfig(**values).as_dict(), seed
    except ValueError as e:
        raise SystemExit(f"error: task settings: {e}") from None


def buildable(encodings: list[str], named: set[str], settings: dict) -> tuple[list[str], dict]:
    """The encodings a text model can build; the others, with their reason (a named one: error)."""
    from training.position_study import TaskStudyConfig, model_config
    cfg = TaskStudyConfig(**settings)
    keep, skipped = [], {}
    for enc in encodings:
        try:
            model_config(cfg, enc, cfg.train_length)
            keep.append(enc)
        except ValueError as e:
            if enc in named:
                raise SystemExit(f"error: {enc}: {e}") from None
            skipped[enc] = str(e)
    return keep, skipped


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="--task.KEY=VALUE sets a task setting; --lm.KEY=VALUE passes "
                                       "--KEY=VALUE to every language-model training run.")
    p.add_argument("--parts", default="tasks,lm", help="tasks, lm or both (default %(default)s)")
    p.add_argument("--encodings", default="all", help="'all' (grape.ENCODINGS that text can build) or a list")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lm_seeds", type=int, default=None,
                   help="seeds of the language-model part (default: --seeds); it costs most of the study's time")
    p.add_argument("--workers", type=int, default=2, help="processes at once (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default %(default)s)")
    p.add_argument("--task_config", default="config/cpu/position_tasks.py")
    p.add_argument("--lm_config", default="config/cpu/position_lm.py")
    p.add_argument("--lm_multipliers", default="1,2,4,8")
    p.add_argument("--lm_eval_windows", type=int, default=128, help="windows of the longest length (default %(default)s)")
    p.add_argument("--out_root", default="out-position-study")
    p.add_argument("--report", default="results/POSITION_STUDY.md")
    p.add_argument("--note", default="", help="a line for the page, e.g. what else ran on the machine")
    p.add_argument("--report_only", action="store_true", help="write the page from the finished runs; run nothing")
    opts, rest = p.parse_known_args(argv)
    opts.task_overrides, opts.lm_overrides = {}, []
    for arg in rest:
        key, sep, value = arg[2:].partition("=")
        if arg.startswith("--task.") and sep:
            opts.task_overrides[key[len("task."):]] = literal(value)
        elif arg.startswith("--lm.") and sep:
            opts.lm_overrides.append(f"--{key[len('lm.'):]}={value}")
        else:
            p.error(f"unrecognised argument {arg!r} (settings look like --task.KEY=VALUE or --lm.KEY=VALUE)")
    opts.parts = [x.strip() for x in opts.parts.split(",") if x.strip()]
    if not opts.parts or set(opts.parts) - set(PARTS):
        p.error(f"--parts must name some of {', '.join(PARTS)}")
    opts.lm_multipliers = [int(k) for k in opts.lm_multipliers.split(",")]
    opts.lm_seeds = opts.seeds if opts.lm_seeds is None else opts.lm_seeds
    if min(opts.seeds, opts.lm_seeds, opts.workers, opts.threads, opts.lm_eval_windows, *opts.lm_multipliers) < 1:
        p.error("--seeds, --lm_seeds, --workers, --threads, --lm_eval_windows and --lm_multipliers must be positive")
    for path in (opts.task_config, opts.lm_config):
        if not os.path.isfile(path):
            p.error(f"config file {path!r} not found")
    return opts


def encoding_list(text: str) -> tuple[list[str], set[str]]:
    import grape
    names = []
    for item in (s.strip() for s in text.split(",")):
        if item:
            names += list(grape.ENCODINGS) if item == "all" else [item]
    named = {s.strip() for s in text.split(",")} - {"all", ""}
    for name in named:
        try:
            grape.check_encoding_name(name)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return list(dict.fromkeys(names)), named


# -- part 1: synthetic tasks -------------------------------------------------------------------


def task_path(out_root: str, enc: str, i: int) -> str:
    return os.path.join(out_root, "tasks", enc, f"seed{i}.json")


def run_tasks(opts, encodings, settings, base_seed, pool) -> dict:
    """Every missing (encoding, seed) of the task part in the pool, seed by seed; {name: error}."""
    from training.position_study import read_record, run_to_file
    jobs = [(e, i) for i in range(opts.seeds) for e in encodings
            if read_record(task_path(opts.out_root, e, i), settings, base_seed + i) is None]
    print(f"tasks: {len(encodings) * opts.seeds} runs, {len(jobs)} to run", flush=True)
    futures = {pool.submit(run_to_file, e, i, base_seed + i, settings, task_path(opts.out_root, e, i),
                           opts.threads): f"{e} seed {i}" for e, i in jobs}
    failed = {}
    for future in as_completed(futures):
        try:
            print(future.result(), flush=True)
        except Exception as e:      # noqa: BLE001 - one failed run must not stop the others
            failed[futures[future]] = f"{type(e).__name__}: {e}"
            print(f"[tasks {futures[future]}] FAILED: {e}", flush=True)
    return failed


def task_records(opts, encodings, settings, base_seed) -> tuple[list[dict], dict]:
    from training.position_study import read_record
    records, pending = [], {}
    for i in range(opts.seeds):
        for e in encodings:
            r = read_record(task_path(opts.out_root, e, i), settings, base_seed + i)
            if r is None:
                pending[f"tasks {e} seed {i}"] = "not run yet"
            else:
                records.append(r)
    return records, pending


# -- part 2: language models -------------------------------------------------------------------


def lm_root(opts) -> str:
    return os.path.join(opts.out_root, "lm")


def compare_command(opts, encodings: list[str], stream: int) -> list[str]:
    """compare_encodings' command (run from the repository root, so every path is absolute)."""
    root = os.path.abspath(lm_root(opts))
    return COMPARE + [os.path.abspath(opts.lm_config), "--encodings", ",".join(encodings), "--seeds", str(opts.lm_seeds),
                      "--out_root", root, "--report_dir", os.path.join(root, f"stream{stream}"),
                      "--multipliers", ",".join(map(str, opts.lm_multipliers)),
                      "--eval_windows", str(opts.lm_eval_windows), "--eval_device", "cpu", *opts.lm_overrides]


def prepare_lm_data(opts) -> None:
    """Run data/<dataset>/prepare.py when the language models' shards are missing (it does nothing
    when they are there), so the one command also prepares the offline corpus."""
    cfg = {k: v for k, v in runpy.run_path(opts.lm_config).items() if k in ("data_dir", "data_path", "dataset")}
    for arg in opts.lm_overrides:
        key, _, value = arg[2:].partition("=")
        if key in ("data_dir", "data_path", "dataset"):
            cfg[key] = value
    if cfg.get("data_dir") or not cfg.get("dataset"):
        return
    data_dir = os.path.join(ROOT, cfg.get("data_path", "data"), cfg["dataset"])   # as the training run sees it
    script = os.path.join(ROOT, "data", cfg["dataset"], "prepare.py")
    has_shards = os.path.isdir(data_dir) and any(n.startswith("train_") and n.endswith(".bin")
                                                 for n in os.listdir(data_dir))
    if not has_shards and os.path.isfile(script):
        print(f"preparing {data_dir}: python {os.path.relpath(script, ROOT)}", flush=True)
        subprocess.run([sys.executable, script], check=True)


def run_lm_streams(opts, encodings) -> dict:
    """One compare_encodings per worker, the encodings dealt out round-robin; {stream: error}."""
    prepare_lm_data(opts)
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads)}
    procs = []
    for w in range(min(opts.workers, len(encodings))):
        cmd = compare_command(opts, encodings[w::opts.workers], w)
        os.makedirs(os.path.join(lm_root(opts), f"stream{w}"), exist_ok=True)
        log = open(os.path.join(lm_root(opts), f"stream{w}.log"), "a")
        print(f"lm stream {w}: {' '.join(cmd)}\n    log: {log.name}", flush=True)
        procs.append((w, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT), log))
    failed = {}
    try:
        for w, proc, log in procs:
            if proc.wait() != 0:
                failed[f"lm stream {w}"] = f"compare_encodings exited with {proc.returncode}; see {log.name}"
            log.close()
    except BaseException:
        for _, proc, _ in procs:     # compare_encodings checkpoints its training on SIGTERM
            proc.terminate()
        for _, proc, _ in procs:
            proc.wait()
        raise
    return failed


def lm_state(opts, enc: str, i: int) -> tuple[str, dict | None]:
    out_dir = os.path.join(lm_root(opts), enc.replace(":", "-"), f"seed{i}")
    path = out_dir + ".json"
    if not os.path.exists(path):
        return out_dir, None
    with open(path) as f:
        return out_dir, json.load(f)


def final_val_loss(out_dir: str) -> float:
    last = None
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "val_loss" in record:
                last = record["val_loss"]
    return last


def lm_finished(state: dict | None, opts) -> bool:
    ev = (state or {}).get("eval") or {}
    return bool(state and state.get("trained") and ev.get("multipliers") == opts.lm_multipliers
                and ev.get("num_windows_asked") == opts.lm_eval_windows)


def gain_path(out_dir: str) -> str:
    return out_dir + ".gain.json"


def run_gains(opts, encodings, pool) -> dict:
    """The context gain of every finished language model that lacks it, in the pool."""
    from training.context_gain import gain_to_file
    futures = {}
    for i in range(opts.lm_seeds):
        for enc in encodings:
            out_dir, state = lm_state(opts, enc, i)
            if not lm_finished(state, opts) or gain_is_current(out_dir, state, opts):
                continue
            s = state["settings"]
            data_dir = os.path.join(ROOT, s.get("data_dir") or os.path.join(s["data_path"], s["dataset"]))
            futures[pool.submit(gain_to_file, out_dir, data_dir, s["block_size"], max(opts.lm_multipliers),
                                opts.lm_eval_windows, gain_path(out_dir), opts.threads)] = f"{enc} seed {i}"
    failed = {}
    for future in as_completed(futures):
        try:
            print(future.result(), flush=True)
        except Exception as e:      # noqa: BLE001
            failed[f"gain {futures[future]}"] = f"{type(e).__name__}: {e}"
    return failed


def gain_is_current(out_dir: str, state: dict, opts) -> bool:
    """A gain record for these evaluation settings, newer than the run's checkpoint."""
    path, ckpt = gain_path(out_dir), os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        g = json.load(f)
    asked = (max(opts.lm_multipliers), opts.lm_eval_windows, state["settings"]["block_size"])
    return (g["multiplier"], g["num_windows_asked"], g["trained"]) == asked and \
        (not os.path.exists(ckpt) or os.path.getmtime(path) >= os.path.getmtime(ckpt))


def lm_records(opts, encodings) -> tuple[list[dict], dict]:
    records, pending = [], {}
    for i in range(opts.lm_seeds):
        for enc in encodings:
            out_dir, state = lm_state(opts, enc, i)
            if not lm_finished(state, opts) or not gain_is_current(out_dir, state, opts):
                pending[f"lm {enc} seed {i}"] = "not finished"
                continue
            with open(gain_path(out_dir)) as f:
                g = json.load(f)
            ev = state["eval"]
            train_wall = sum(s["end"] - s["start"] for s in state["segments"] if s["end"] is not None)
            records.append({
                "encoding": enc, "index": i, "seed": state["seed"], "out_dir": out_dir, "settings": state["settings"],
                "val_loss": final_val_loss(out_dir), "length_loss": {int(k): v for k, v in ev["mean_loss"].items()},
                "trained_context": ev["trained_context"], "n_params": ev["n_params"],
                "wall_s": train_wall + ev["wall_s"], **{k: np.asarray(g[k]) for k in ("full", "short", "gain")}})
    return records, pending


# -- the study ---------------------------------------------------------------------------------


def phase_times(opts, add: dict | None = None) -> dict:
    """Wall seconds per part, summed over the invocations that ran it (out_root/study.json; see
    PartClock)."""
    path = os.path.join(opts.out_root, "study.json")
    times = json.load(open(path)) if os.path.exists(path) else {}
    for k, v in (add or {}).items():
        times[k] = times.get(k, 0.0) + v
    if add:
        os.makedirs(opts.out_root, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(times, f)
        os.replace(path + ".tmp", path)
    return times


class PartClock:
    """Credits a part's wall time to out_root/study.json every ``every`` seconds and on exit, so an
    invocation that is killed (or loses its machine) still counts all but its last minutes."""

    def __init__(self, opts, part: str, every: float = 30.0):
        self.opts, self.part, self.every = opts, part, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def tick(self) -> None:
        # one writer at a time: the thread ticks until __exit__ has joined it, then __exit__ does
        now = time.time()
        phase_times(self.opts, {self.part: now - self.last})
        self.last = now

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.tick()

    def __enter__(self):
        self.last = time.time()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.tick()


def report(opts, argv, encodings, settings, base_seed, skipped, failed) -> str:
    from training import position_report
    # a part's finished runs are shown even when this command runs only the other part;
    # its missing runs are listed only when this command asked for it
    tasks, pending = task_records(opts, encodings, settings, base_seed)
    lms, lm_pending = lm_records(opts, encodings)
    pending = {**(pending if "tasks" in opts.parts else {}), **(lm_pending if "lm" in opts.parts else {})}
    meta = {"command": ["python", "-m", "scripts.position_study", *argv], "note": opts.note,
            "out_root": opts.out_root, "workers": opts.workers, "threads": opts.threads,
            "phases": phase_times(opts), "lm_config": opts.lm_config, "lm_eval_windows": opts.lm_eval_windows,
            "lm_multipliers": opts.lm_multipliers, "skipped": skipped, "failed": failed,
            "pending": pending}
    os.makedirs(os.path.dirname(os.path.abspath(opts.report)), exist_ok=True)
    return position_report.write_page(opts.report, tasks, lms, meta)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    settings, base_seed = task_settings(opts.task_config, opts.task_overrides)
    names, named = encoding_list(opts.encodings)
    encodings, skipped = buildable(names, named, settings)
    if opts.report_only:
        print(f"wrote {report(opts, argv, encodings, settings, base_seed, skipped, {})}")
        return 0
    failed = {}
    pool = ProcessPoolExecutor(max_workers=opts.workers, mp_context=get_context("spawn"))
    try:
        for part in opts.parts:
            with PartClock(opts, part):
                if part == "tasks":
                    failed.update(run_tasks(opts, encodings, settings, base_seed, pool))
                else:
                    failed.update(run_lm_streams(opts, encodings))
                    failed.update(run_gains(opts, encodings, pool))
            print(f"wrote {report(opts, argv, encodings, settings, base_seed, skipped, failed)}", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: re-run the same command to resume ({opts.out_root})", flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
        return 130
    pool.shutdown()
    if failed:
        print(f"{len(failed)} failure(s): " + "; ".join(f"{k}: {v}" for k, v in failed.items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
