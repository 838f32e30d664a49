"""Compare positional encodings on equal terms, with several seeds, and write RESULTS.md.

    python -m scripts.compare_encodings config/cpu/compare_cpu.py --encodings all --seeds 3
    python -m scripts.compare_encodings config/cpu/compare_cpu.py --encodings rope,grape_ap --seeds 1 --max_iters=50
    python -m scripts.compare_encodings config/paper/train_paper_medium.py --encodings rope,alibi,fox,grape_ap \
        --seeds 1 --nproc_per_node 8 --out_root out/compare-medium

Every run is the real training script with one base config, the same for every encoding:

    train_adam_finewebedu.py <config> [--key=value ...] --pos_encoding=E --seed=S --data_seed=D
        --out_dir=<out_root>/<E>/seed<i>

(under ``torchrun --standalone --nproc_per_node=N`` with ``--nproc_per_node``), so model,
token budget, schedule and data order are the same for all encodings, and whatever the
training script supports (DDP, torch.compile, bf16) applies. Options of the form
``--key=value`` that are not this script's own pass through to every run.

Encodings: ``all`` is every name in ``grape.ENCODINGS`` (read at run time, so new encodings
join by themselves) that the base config can build: one that cannot (a grid encoding needs
``grid=(H, W)``, which text has not) is skipped, with its reason in RESULTS.md; a name given
explicitly that cannot be built is an error. ``all`` adds no composition. A name may be a composition (``rope+grape_ap``)
or carry ``:kvshift`` (``rope:kvshift`` = the paper's KV-shift runs: use_k_shift and
use_v_shift on).

Seeds: run i of every encoding uses seed = <config seed> + i (model init) and
data_seed = <config data_seed> + i (data order). Encodings with the same i therefore see the
same batches in the same order, and the spread over i covers both sources of run-to-run
variation. eval_seed stays the config's: every run is validated on the same batches.
Runs go seed by seed (every encoding's seed 0 first), so a partial comparison is balanced.

After training, each final checkpoint is evaluated by scripts/eval_length.py at 1x, 2x and 4x the
training context. Throughput is the median of the tokens/s the run logged; wall time is the
driver's clock around training and evaluation.

Resuming: re-running the same command skips finished runs and resumes an interrupted one
from its checkpoint (``--init_from=resume``). Ctrl-C or SIGTERM asks the running training to
checkpoint (it handles SIGTERM) and exits. A run that fails is recorded and the others go on;
the exit status is then non-zero and a re-run retries it. Re-running with other settings in
the same --out_root is refused, naming the settings that differ.

Writes <report_dir>/RESULTS.md (default results/) and beside it curves.png,
loss_by_position.png and runs.csv (training/report.py); rewritten after every finished run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
TRAIN_SCRIPT = os.path.join(ROOT, "train_adam_finewebedu.py")
# keys this script sets per run; passing them would break the comparison
PER_RUN_KEYS = ("pos_encoding", "model_type", "seed", "data_seed", "out_dir", "init_from", "resume_dir")
# keys that do not change what a run computes (a resume may change them)
NON_RESULT_KEYS = ("out_dir", "init_from", "resume_dir", "progress", "wandb_log", "wandb_project",
                   "wandb_run_name", "wandb_mode", "attn_backend", "eval_only")
VARIANTS = {"": [], "kvshift": ["--use_k_shift=True", "--use_v_shift=True"]}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the running training was asked to checkpoint; re-run to resume."""


# -- what to run -----------------------------------------------------------------------------


def all_encodings() -> list[str]:
    import grape
    return list(grape.ENCODINGS)


def parse_encodings(text: str) -> list[str]:
    """'all' or comma-separated names ('rope', 'rope+grape_ap', 'fox:kvshift'), checked."""
    import grape
    names = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        names += all_encodings() if item == "all" else [item]
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("--encodings names no encoding")
    for name in names:
        base, _, variant = name.partition(":")
        grape.check_encoding_name(base)     # ValueError listing the known names
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} in {name!r}; known: "
                             f"{sorted(v for v in VARIANTS if v)}")
    return names


@dataclass
class Run:
    encoding: str       # as given: 'rope', 'rope+grape_ap', 'fox:kvshift'
    index: int          # seed index i
    seed: int
    data_seed: int
    out_dir: str        # the training script's out_dir

    @property
    def name(self) -> str:           # 'rope run 0': run i has seed base + i (the seed itself is not i)
        return f"{self.encoding} run {self.index}"

    @property
    def state_path(self) -> str:     # the driver's record, beside (not inside) the training out_dir
        return self.out_dir + ".json"

    @property
    def console_path(self) -> str:
        return self.out_dir + ".log"


def folder_name(encoding: str) -> str:
    return encoding.replace(":", "-")


def plan_runs(encodings: list[str], seeds: int, base_seed: int, base_data_seed: int, out_root: str) -> list[Run]:
    return [Run(e, i, base_seed + i, base_data_seed + i, os.path.join(out_root, folder_name(e), f"seed{i}"))
            for i in range(seeds) for e in encodings]


def training_args(config_args: list[str], run: Run, clear_model_type: bool) -> list[str]:
    """The training script's arguments for one run (config file and overrides first: ours win)."""
    base, _, variant = run.encoding.partition(":")
    args = list(config_args)
    if clear_model_type:     # a paper run config names its encoding by model_type
        args.append("--model_type=")
    return args + [f"--pos_encoding={base}", *VARIANTS[variant], f"--seed={run.seed}",
                   f"--data_seed={run.data_seed}", f"--out_dir={run.out_dir}"]


def launcher(nproc_per_node: int) -> list[str]:
    if nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc_per_node}", TRAIN_SCRIPT]
    return [sys.executable, TRAIN_SCRIPT]


def resolve(args: list[str], build_model_config: bool = False):
    """The training script's resolved config for these arguments (its own defaults and checks);
    with ``build_model_config`` also the model's checks (GPTConfig), which raise ValueError."""
    from training.configurator import configure, model_fields
    from training.settings import defaults, validate
    cfg, _ = configure(args, *defaults(), verbose=False)
    validate(cfg)
    if build_model_config:
        from model import GPTConfig
        GPTConfig(**{k: cfg[k] for k in model_fields()})
    return cfg


def settings_of(cfg, world_size: int) -> dict:
    """What decides a run's result: compared when a run is resumed or skipped."""
    out = {k: v for k, v in sorted(cfg.items()) if k not in NON_RESULT_KEYS}
    out["world_size"] = world_size
    return out


# -- a run's state on disk -------------------------------------------------------------------


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: dict) -> None:
    """Temp file + rename: an interruption never leaves a half-written record."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def checkpoint_iter(out_dir: str) -> int | None:
    """The iteration of out_dir's checkpoint, None without one (read without loading weights)."""
    from training.checkpoint import CKPT_NAME, read_checkpoint_file
    path = os.path.join(out_dir, CKPT_NAME)
    if not os.path.exists(path):
        return None
    return int(read_checkpoint_file(path)["iter_num"])        # weights_only: runs nothing from the file


def last_val_iter(out_dir: str) -> int | None:
    from training.report import run_log
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return None
    val = run_log(path)["val"]
    return val[-1][0] if val else None


def training_finished(out_dir: str, max_iters: int) -> bool:
    """Validated and checkpointed at max_iters (the training script does both at its end)."""
    return checkpoint_iter(out_dir) == max_iters and last_val_iter(out_dir) == max_iters


def close_open_segment(state: dict, out_dir: str) -> None:
    """A segment the driver could not close (it was killed): it ended when its log last changed."""
    seg = state["segments"][-1] if state["segments"] else None
    if seg is not None and seg["end"] is None:
        log = os.path.join(out_dir, "log.jsonl")
        seg["end"] = max(seg["start"], os.path.getmtime(log)) if os.path.exists(log) else seg["start"]
        seg["returncode"] = None


# -- running ---------------------------------------------------------------------------------


def stop(proc: subprocess.Popen, timeout: float = 600.0) -> None:
    """SIGTERM the training's process group: it checkpoints at the next step and exits."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def launch(cmd: list[str], console_path: str, prefix: str) -> int:
    """Run one training process; its output goes to the console (prefixed) and to console_path.
    It runs in its own session, so a Ctrl-C reaches only this driver, which then asks it to stop
    with SIGTERM (the training script checkpoints on SIGTERM)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(console_path, "a") as console:
        console.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        try:
            for line in proc.stdout:
                console.write(line)
                print(prefix + line, end="", flush=True)
            return proc.wait()
        except BaseException:
            print(f"{prefix}stopping the training (SIGTERM: it saves a checkpoint) ...", flush=True)
            stop(proc)
            for line in proc.stdout:      # what it printed while stopping
                console.write(line)
                print(prefix + line, end="", flush=True)
            raise


def train(run: Run, state: dict, cmd: list[str], max_iters: int, prefix: str) -> None:
    """Train (or resume) one run up to max_iters; raises RuntimeError if it fails."""
    close_open_segment(state, run.out_dir)
    resume_iter = checkpoint_iter(run.out_dir)
    if resume_iter is not None:
        cmd = cmd + ["--init_from=resume"]
    state["segments"].append({"start": time.time(), "end": None, "from_iter": resume_iter or 0})
    write_json(run.state_path, state)
    print(f"{prefix}{'resuming from iter ' + str(resume_iter) if resume_iter is not None else 'starting'}"
          f" -> {max_iters} iterations; log: {run.console_path}", flush=True)
    try:
        rc = launch(cmd, run.console_path, prefix)
    finally:
        seg = state["segments"][-1]
        seg["end"] = time.time()
        seg["returncode"] = None
        write_json(run.state_path, state)
    seg["returncode"] = rc
    write_json(run.state_path, state)
    if rc != 0:
        raise RuntimeError(f"training exited with status {rc}; see {run.console_path}")
    if not training_finished(run.out_dir, max_iters):
        raise RuntimeError(f"training stopped before iteration {max_iters}; see {run.console_path}")


def evaluate(run: Run, multipliers: list[int], num_windows: int, batch_size: int, device: str) -> dict:
    """Loss by position of the final checkpoint at each context multiple (eval_length.py)."""
    from training import length_eval
    from training.checkpoint import load_model
    from training.progress import hf_progress_bars_off
    t0 = time.time()
    with hf_progress_bars_off():          # from_pretrained's per-load bar (restored afterwards)
        results = length_eval.evaluate([run.out_dir], multipliers, num_windows, batch_size=batch_size,
                                       device=device, labels=[run.name])
    return {
        "multipliers": multipliers,
        "n_windows": {str(r.multiplier): r.n_windows for r in results},
        "mean_loss": {str(r.multiplier): r.mean_loss for r in results},
        "position_loss": {str(r.multiplier): [round(float(v), 6) for v in r.position_loss] for r in results},
        "trained_context": results[0].trained,
        "n_params": load_model(run.out_dir).num_parameters_unique(),
        "wall_s": time.time() - t0,
    }


def run_one(run: Run, settings: dict, cmd: list[str], opts, prefix: str) -> dict:
    state = read_json(run.state_path) or {"encoding": run.encoding, "index": run.index, "seed": run.seed,
                                          "data_seed": run.data_seed, "settings": settings, "segments": []}
    if state["settings"] != settings:
        differ = sorted(k for k in set(state["settings"]) | set(settings)
                        if state["settings"].get(k) != settings.get(k))
        shown = ", ".join(f"{k}={settings.get(k)!r} (recorded: {state['settings'].get(k)!r})" for k in differ[:6])
        raise SystemExit(f"error: {run.out_dir} was run with other settings: {shown}. Re-run with the "
                         "settings it was started with, or use another --out_root")
    state["command"] = cmd
    max_iters = settings["max_iters"]
    if not state.get("trained"):
        if not training_finished(run.out_dir, max_iters):
            train(run, state, cmd, max_iters, prefix)
        state["trained"] = True
        state.pop("error", None)
        write_json(run.state_path, state)
    if not evaluated(state, opts):
        print(f"{prefix}evaluating at {', '.join(f'{k}x' for k in opts.multipliers)} the training context "
              f"({opts.eval_windows} windows)", flush=True)
        state["eval"] = evaluate(run, opts.multipliers, opts.eval_windows, opts.eval_batch_size, opts.eval_device)
        state["eval"]["num_windows_asked"] = opts.eval_windows
        write_json(run.state_path, state)
    return state


def evaluated(state: dict, opts) -> bool:
    """Evaluated with the multipliers and windows asked for now."""
    ev = state.get("eval") or {}
    return ev.get("multipliers") == opts.multipliers and ev.get("num_windows_asked") == opts.eval_windows


def is_done(run: Run, settings: dict, opts) -> bool:
    state = read_json(run.state_path)
    return bool(state and state["settings"] == settings and state.get("trained") and evaluated(state, opts))


def raise_interrupted(*_):
    raise Interrupted()


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# -- command line ----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other --key=value options pass through to every training run.")
    p.add_argument("config", nargs="?", default="config/cpu/compare_cpu.py", help="base training config (default %(default)s)")
    p.add_argument("--encodings", default="all", help="'all' (every grape.ENCODINGS name) or a comma-separated list")
    p.add_argument("--seeds", type=int, default=3, help="runs per encoding (default %(default)s)")
    p.add_argument("--out_root", default="out-compare", help="runs go to <out_root>/<encoding>/seed<i> (default %(default)s)")
    p.add_argument("--report_dir", default="results", help="where RESULTS.md and its figures are written (default %(default)s)")
    p.add_argument("--nproc_per_node", type=int, default=1, help="> 1: every run under torchrun with this many processes")
    p.add_argument("--multipliers", default="1,2,4", help="context multiples for eval_length (default %(default)s)")
    p.add_argument("--eval_windows", type=int, default=32, help="eval_length windows of the longest length (default %(default)s)")
    p.add_argument("--eval_batch_size", type=int, default=4)
    p.add_argument("--eval_device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--reference", default="rope", help="encoding the others are compared with (default %(default)s)")
    p.add_argument("--note", default="", help="a line for RESULTS.md, e.g. what else ran on the machine")
    p.add_argument("--report_only", action="store_true", help="write RESULTS.md from the finished runs; train nothing")
    p.add_argument("--dry_run", action="store_true", help="print each run's state and command; train nothing")
    opts, rest = p.parse_known_args(argv)
    overrides = []
    for arg in rest:
        key, sep, _ = arg[2:].partition("=")
        if not arg.startswith("--") or not sep:
            p.error(f"unrecognised argument {arg!r} (training overrides look like --key=value)")
        if key.replace("-", "_") in PER_RUN_KEYS:
            p.error(f"{arg!r}: {key} is set per run by this script (use --encodings, --seeds, --out_root)")
        overrides.append(arg)
    opts.multipliers = [int(k) for k in opts.multipliers.split(",")]
    if opts.seeds < 1 or opts.nproc_per_node < 1 or opts.eval_windows < 1 or opts.eval_batch_size < 1 \
            or any(k < 1 for k in opts.multipliers):
        p.error("--seeds, --nproc_per_node, --eval_windows, --eval_batch_size and --multipliers must be positive")
    if not os.path.isfile(opts.config):
        p.error(f"config file {opts.config!r} not found")
    opts.named = {e.strip() for e in opts.encodings.split(",")} - {"all", ""}
    try:
        opts.encodings = parse_encodings(opts.encodings)
    except ValueError as e:
        p.error(str(e))
    if opts.eval_device is None:
        import torch
        opts.eval_device = "cuda" if torch.cuda.is_available() else "cpu"
    return opts, [opts.config, *overrides]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, config_args = parse_args(argv)
    from training.configurator import ConfigError
    from training.report import write as write_report

    try:
        base = resolve(config_args)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    # an encoding 'all' brought in that this config cannot build (e.g. a grid encoding on text)
    # is skipped with its reason; one named explicitly is an error
    skipped = {}
    for enc in opts.encodings:
        probe = Run(enc, 0, base.seed, base.data_seed, os.path.join(opts.out_root, "probe"))
        try:
            resolve(training_args(config_args, probe, bool(base.model_type)), build_model_config=True)
        except (ConfigError, ValueError) as e:
            if enc in opts.named:
                raise SystemExit(f"config error for {enc}: {e}") from None
            skipped[enc] = str(e)
            print(f"skipping {enc}: {e}", file=sys.stderr)
    encodings = [e for e in opts.encodings if e not in skipped]
    runs = plan_runs(encodings, opts.seeds, base.seed, base.data_seed, opts.out_root)
    commands, settings = {}, {}
    for run in runs:
        args = training_args(config_args, run, clear_model_type=bool(base.model_type))
        commands[run.out_dir] = launcher(opts.nproc_per_node) + args
        settings[run.out_dir] = settings_of(resolve(args), opts.nproc_per_node)

    def report():
        return write_report(opts.report_dir, runs, settings, command=["python", "-m", "scripts.compare_encodings", *argv],
                                    base=base, reference=opts.reference, note=opts.note,
                                    nproc_per_node=opts.nproc_per_node, skipped=skipped)

    if opts.dry_run:
        for run in runs:
            done = is_done(run, settings[run.out_dir], opts)
            at = checkpoint_iter(run.out_dir)
            what = "done" if done else (f"resume from iter {at}" if at is not None else "new")
            print(f"{run.name} (seed {run.seed}, data_seed {run.data_seed}): {what}\n    "
                  f"{shlex.join(commands[run.out_dir])}")
        return 0
    if opts.report_only:
        print(f"wrote {report()}")
        return 0

    todo = [r for r in runs if not is_done(r, settings[r.out_dir], opts)]
    print(f"{len(runs)} runs ({len(encodings)} encodings x {opts.seeds} seeds): {len(runs) - len(todo)} done, "
          f"{len(todo)} to run; {base.max_iters} iterations each; out_root {opts.out_root}", flush=True)
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    failed, started, durations = [], time.time(), []
    try:
        for k, run in enumerate(todo, 1):
            eta = ""
            if durations:
                eta = f", about {fmt_duration(sum(durations) / len(durations) * (len(todo) - k + 1))} left"
            prefix = f"[{k}/{len(todo)} {run.encoding} s{run.index}] "
            print(f"\n== run {k}/{len(todo)}: {run.name} (seed {run.seed}, data_seed {run.data_seed}); "
                  f"elapsed {fmt_duration(time.time() - started)}{eta}", flush=True)
            t0 = time.time()
            try:
                run_one(run, settings[run.out_dir], commands[run.out_dir], opts, prefix)
            except RuntimeError as e:
                print(f"{prefix}FAILED: {e}", flush=True)
                state = read_json(run.state_path) or {}
                state["error"] = str(e)
                write_json(run.state_path, state)
                failed.append(run)
                continue
            durations.append(time.time() - t0)
            report()
    except (KeyboardInterrupt, Interrupted):
        print(f"\ninterrupted: re-run the same command to resume ({opts.out_root})", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    path = report()
    print(f"\nwrote {path} ({fmt_duration(time.time() - started)})")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; re-run to retry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from training.checkpoint import CheckpointError
    try:
        sys.exit(main())
    except CheckpointError as e:          # the message names the file
        sys.exit(f"error: {e}")
