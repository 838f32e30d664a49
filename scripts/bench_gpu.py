"""The GPU figures in one command: CUDA tests, attention benchmark, compiled training runs and
a 2-GPU torchrun with NCCL; the tables go into results/BENCHMARKS.md under the GPU's name.

    python -m scripts.bench_gpu                                   # every stage
    python -m scripts.bench_gpu --stages attention training       # some of them
    python -m scripts.bench_gpu --device cpu --smoke --out /tmp/gpu.md   # every stage at toy size (CI)

Stages run one after the other and each on its own: a stage that fails is reported and the
next one still runs; each stage writes its section as soon as it is done; the exit status is
1 if any stage failed (2: no GPU, or bad arguments).
  tests      pytest -m cuda: the tests that need a GPU (tests/conftest.py marks them)
  attention  bench_attention.py's attention layer and 2-layer model step, bf16 autocast,
             T = 1k..8k, every encoding, the auto backend against RoPE and against the
             dense path (out of memory is reported as such)
  training   train_adam_finewebedu.py compiled in bf16, a few dozen iterations per encoding
             on random tokens: tokens/s and MFU from its log
  ddp        torchrun on 2 GPUs (NCCL) against 1 GPU with twice the accumulation (the same
             global batch): both must finish with the same losses; skipped with one GPU
Targets, printed beside the figures at T = 4096 (pass/fail per row): separable additive
encodings (ALiBi, FoX, GRAPE-A) at most 1.2x RoPE's step time, GRAPE-AP at most 2x, and every
additive encoding at most 1.5x RoPE's peak memory.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

from scripts.bench_common import BENCHMARKS
from training.runlog import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
STAGES = ("tests", "attention", "training", "ddp")
TIME_TARGETS = {"separable": 1.2, "separable_gated": 1.2, "path_integral": 2.0}   # x RoPE's step time
MEMORY_TARGET = 1.5                                                             # x RoPE's peak memory


@dataclass
class Sizes:
    """How big each stage runs: the real figures, or a toy version that tests the plumbing."""
    T: list
    n_embd: int
    n_head: int
    vocab_size: int
    repeats: int
    target_T: int
    train: dict             # train_adam_finewebedu.py settings
    train_encodings: list
    ddp_encoding: str
    loss_rtol: float        # 2 GPUs vs 1 GPU with twice the accumulation
    tests: list


def sizes(smoke: bool, device: str) -> Sizes:
    if smoke:
        return Sizes(T=[32], n_embd=32, n_head=2, vocab_size=512, repeats=1, target_T=32,
                     train=dict(n_layer=1, n_embd=32, n_head=2, head_dim=16, block_size=32, vocab_size=256,
                                batch_size=2, max_iters=4, log_interval=2, warmup_iters=1,
                                lr_decay_iters=4, compile=False),
                     train_encodings=["grape_ap"], ddp_encoding="rope",
                     loss_rtol=1e-4 if device == "cpu" else 2e-2, tests=["tests/test_bench_gpu.py"])
    # the paper's attention layout (8 heads of 128, n_embd 1024) at its context, 4 layers
    return Sizes(T=[1024, 2048, 4096, 8192], n_embd=1024, n_head=8, vocab_size=50304, repeats=5, target_T=4096,
                 train=dict(n_layer=4, n_embd=1024, n_head=8, head_dim=128, block_size=4096,
                            vocab_size=50304, batch_size=4, max_iters=60, log_interval=20,
                            warmup_iters=10, lr_decay_iters=60, compile=True),
                 train_encodings=[], ddp_encoding="rope", loss_rtol=2e-2, tests=["tests"])


# ----------------------------------------------------------------------------------------
# Start-up checks
# ----------------------------------------------------------------------------------------

def no_gpu_message() -> str:
    if torch.version.cuda is None:
        why = (f"this torch ({torch.__version__}) is a CPU-only build; install torch for CUDA "
               "(https://pytorch.org/get-started/locally/)")
    else:
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; check nvidia-smi "
               f"and CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r}")
    return (f"bench_gpu.py needs a CUDA GPU: {why}.\n"
            "To run every stage at toy size on CPU (what CI does): python -m scripts.bench_gpu --device cpu --smoke")


def parse_args(argv=None):
    from grape import ENCODINGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu only with --smoke (the real figures need a GPU)")
    ap.add_argument("--smoke", action="store_true", help="every stage at toy size: checks the plumbing")
    ap.add_argument("--encodings", nargs="+", choices=sorted(ENCODINGS), default=None,
                    help="default: every encoding (smoke: rope, alibi, grape_ap)")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths of the attention stage")
    ap.add_argument("--out", default=None,
                    help="markdown file for the tables (default results/BENCHMARKS.md; with --smoke: none)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        ap.error("--device cpu runs only with --smoke: the GPU figures need a GPU")
    if args.T is not None and min(args.T) < 2:
        ap.error(f"--T must be at least 2, got {args.T}")
    if args.out is None:
        args.out = "" if args.smoke else BENCHMARKS
    if args.encodings is None:
        args.encodings = ["rope", "alibi", "grape_ap"] if args.smoke else list(ENCODINGS)
    args.encodings = list(dict.fromkeys(["rope", *args.encodings]))     # RoPE is the yardstick
    return args


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def section_head(stage: str, args) -> str:
    """One section per stage and device: a new run on the same device replaces it."""
    where = device_name(args.device) + (", smoke sizes" if args.smoke else "")
    return f"## GPU {stage} ({where})"


def machine_line(args) -> str:
    from scripts.bench_common import machine_description
    line = machine_description(args.device)
    if args.device == "cuda":
        line += f", {torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}"
    return f"Machine: {line}."


def command_line() -> str:
    return "python " + shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])


def run(cmd, timeout, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------
# Stage: CUDA tests
# ----------------------------------------------------------------------------------------

def stage_tests(args, size: Sizes):
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider", *size.tests]
    t0 = time.time()
    done = run(cmd, timeout=3600)
    tail = (done.stdout + done.stderr).strip().splitlines()
    summary = next((line.strip("= ") for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                   tail[-1] if tail else "no output")
    ok = done.returncode == 0
    print("\n".join(tail[-30:]))
    lines = [section_head("tests", args), "", machine_line(args),
             f"Command: `{' '.join(['python', *cmd[1:]])}` ({time.time() - t0:.0f} s): {summary}.", ""]
    failed = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
    lines += [f"- {line}" for line in failed[:20]]
    return "\n".join(lines), ok, summary


# ----------------------------------------------------------------------------------------
# Stage: attention benchmark with targets
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bias_kind_of(encoding: str) -> str:
    """'none', 'separable', 'separable_gated' or 'path_integral': run the encoding once on
    meta tensors and look at the bias it returns."""
    from grape import build_encoding
    from model import GPTConfig
    from training.sizing import bias_kind
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, pos_encoding=encoding)
    with torch.device("meta"):
        enc = build_encoding(config)
        x = torch.empty(1, 8, 32)
        q, k, v = (torch.empty(1, 2, 8, 16) for _ in range(3))
        _, _, bias = enc(x, q, k, v=v)
    return bias_kind(bias)


def verdict(value, limit) -> str:
    if limit is None:
        return "-"
    if value is None:
        return f"≤{limit:g} n/a"
    return f"≤{limit:g} {'pass' if value <= limit else 'FAIL'}"


def attention_rows(results: dict, what: str, Ts, encodings, target_T: int):
    """Table rows, and the list of (encoding, what, 'time'|'memory', passed) at target_T."""
    from scripts.bench_common import fmt, measured_rows
    ok = lambda r: r is not None and "error" not in r
    rows, checks = [], []
    for T, enc, a, d, rope in measured_rows(results, what, Ts, encodings):
        kind = bias_kind_of(enc)
        t_ratio = a["time"] / rope["time"] if ok(a) and ok(rope) else None
        m_ratio = a["peak"] / rope["peak"] if ok(a) and ok(rope) and rope["peak"] > 0 else None
        t_limit = TIME_TARGETS.get(kind) if T == target_T else None
        m_limit = MEMORY_TARGET if (kind != "none" and T == target_T) else None
        if t_limit is not None:
            checks.append((enc, what, "time", t_ratio is not None and t_ratio <= t_limit))
        if m_limit is not None:
            checks.append((enc, what, "memory", m_ratio is not None and m_ratio <= m_limit))
        r2 = lambda v: f"{v:.2f}" if v is not None else "-"
        rows.append(
            f"| {T} | {enc} | {a.get('used', a.get('error', '-')) if a else '-'} "
            f"| {fmt(a, 'time', 1e3, 1)} | {r2(t_ratio)} | {verdict(t_ratio, t_limit)} "
            f"| {fmt(a, 'peak')} | {r2(m_ratio)} | {verdict(m_ratio, m_limit)} "
            f"| {fmt(d, 'time', 1e3, 1) if d else '-'} | {fmt(d, 'peak') if d else '-'} "
            f"| {r2(a['time'] / d['time']) if ok(a) and ok(d) else '-'} "
            f"| {r2(a['peak'] / d['peak']) if ok(a) and ok(d) and d['peak'] > 0 else '-'} |")
    head = ["| T | encoding | auto uses | time (ms) | ×RoPE | time target | peak (MiB) | ×RoPE | memory target "
            "| dense time (ms) | dense peak (MiB) | auto/dense time | auto/dense peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    return head + rows, checks


def attention_section(results, args, size: Sizes, Ts, elapsed) -> tuple[str, list]:
    lines = [section_head("attention", args), "", machine_line(args),
             f"Command: `{command_line()}` ({elapsed / 60:.1f} min).",
             f"bench_attention.py's measurements: median of {size.repeats} forward+backward steps after one "
             f"warm-up; batch 1, {size.n_head} heads of {size.n_embd // size.n_head}, n_embd {size.n_embd}, "
             "bf16 autocast (float32 weights), as in training. Peak = max_memory_allocated minus the memory "
             "before the step (CPU smoke: peak RSS of a forked child). ×RoPE: against RoPE through the auto "
             "backend (FlashAttention/SDPA) at the same T. Dense: the same encoding through the T² reference "
             "path ('err' with the error, e.g. out of memory). Targets at T = "
             f"{size.target_T}: separable additive encodings ≤ 1.2× RoPE's time, GRAPE-AP ≤ 2×; every additive "
             "encoding ≤ 1.5× RoPE's peak memory.", ""]
    checks = []
    vocab = "GPT-2 vocabulary" if size.vocab_size == 50304 else f"vocabulary {size.vocab_size}"
    for what, title in (("model", f"One model step (2 layers, {vocab})"), ("layer", "One attention layer")):
        if any(k[0] == what for k in results):
            rows, c = attention_rows(results, what, Ts, args.encodings, size.target_T)
            lines += [f"### {title}", ""] + rows + [""]
            checks += c
    if checks:
        failed = [f"{e} {w} {kind}" for e, w, kind, passed in checks if not passed]
        lines.append(f"Targets at T = {size.target_T}: {len(checks) - len(failed)} of {len(checks)} pass"
                     + (f"; not met: {', '.join(failed)}." if failed else "."))
    return "\n".join(lines), checks


def stage_attention(args, size: Sizes):
    from scripts.bench_common import run_config
    Ts = args.T or size.T
    dtype = "bfloat16"
    results, t0, errors = {}, time.time(), 0
    for T in Ts:
        for what in ("layer", "model"):
            for enc in args.encodings:
                for backend in ("auto", "dense"):
                    r = run_config(what, enc, backend, T, args.device, size.repeats,
                                   dtype=dtype, n_embd=size.n_embd, n_head=size.n_head,
                                   vocab_size=size.vocab_size)
                    results[(what, enc, backend, T)] = r
                    errors += "error" in r and backend == "auto"
                    print(f"T={T} {what:5s} {enc:12s} {backend:5s} " +
                          (r["error"] if "error" in r else
                           f"{r['used']:8s} {r['time'] * 1e3:9.1f} ms  {r['peak']:8.1f} MiB"), flush=True)
        if args.out:        # after every T, so a long run leaves partial results
            write_section(args.out, attention_section(results, args, size, sorted({*Ts} & {k[3] for k in results}),
                                                      time.time() - t0)[0])
    text, checks = attention_section(results, args, size, Ts, time.time() - t0)
    passed = sum(p for *_, p in checks)
    summary = f"{errors} auto-backend runs failed; targets: {passed} of {len(checks)} pass"
    return text, errors == 0, summary


# ----------------------------------------------------------------------------------------
# Stages: training runs (one process per encoding) and DDP
# ----------------------------------------------------------------------------------------

def write_random_shards(folder: str, vocab_size: int, n_tokens: int) -> str:
    """Random tokens: throughput does not depend on the text."""
    import numpy as np
    from training.shards import write_shard
    rng = np.random.default_rng(0)
    top = min(vocab_size, 50257)
    write_shard(os.path.join(folder, "train_000000.bin"), rng.integers(0, top, n_tokens, dtype=np.uint16))
    write_shard(os.path.join(folder, "val_000000.bin"), rng.integers(0, top, n_tokens // 4, dtype=np.uint16))
    return folder


def train_argv(size: Sizes, args, data_dir: str, out_dir: str, encoding: str, **extra) -> list:
    settings = {**size.train, **extra}
    argv = [f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--pos_encoding={encoding}",
            f"--device={args.device}", "--dtype=bfloat16", "--eval_iters=1", "--eval_interval=100000",
            "--progress=False", "--always_save_checkpoint=False"]
    return argv + [f"--{k}={v}" for k, v in settings.items()]


def read_log(out_dir: str) -> list:
    path = os.path.join(out_dir, "log.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def stage_training(args, size: Sizes):
    encodings = size.train_encodings or args.encodings
    rows, failures, t0 = {}, 0, time.time()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        per_step = size.train["batch_size"] * size.train["block_size"]
        data = write_random_shards(tmp, size.train["vocab_size"], max(200_000, 4 * per_step))
        for enc in encodings:
            out = os.path.join(tmp, f"out-{enc}")
            cmd = [sys.executable, "train_adam_finewebedu.py", *train_argv(size, args, data, out, enc)]
            start = time.time()
            done = run(cmd, timeout=1800)
            log = [r for r in read_log(out) if "tokens_per_sec" in r]
            shutil.rmtree(out, ignore_errors=True)     # its checkpoint: GBs at the full size
            if done.returncode != 0 or not log:
                failures += 1
                err = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
                rows[enc] = {"error": err[:160]}
                print(f"training {enc}: FAILED ({err})", flush=True)
                continue
            last = log[-1]                       # the first interval includes compilation
            rows[enc] = {"tok_s": last["tokens_per_sec"], "mfu": last.get("mfu"), "loss": last["train_loss"],
                         "wall": time.time() - start}
            print(f"training {enc}: {last['tokens_per_sec']:,.0f} tok/s, mfu {last.get('mfu')}", flush=True)
    s = size.train
    rope = rows.get("rope", {}).get("tok_s")
    lines = [section_head("training", args), "", machine_line(args),
             f"Command: `{command_line()}` ({(time.time() - t0) / 60:.1f} min).",
             f"train_adam_finewebedu.py on random tokens: {s['n_layer']} layers, n_embd {s['n_embd']}, "
             f"{s['n_head']} heads of {s['head_dim']}, context {s['block_size']}, batch {s['batch_size']}, "
             f"{'torch.compile, ' if s['compile'] else ''}bf16 autocast, attn_backend auto, {s['max_iters']} "
             f"iterations; tokens/s and MFU (the script's: 6N + attention FLOPs against the GPU's bf16 peak) "
             f"over the last {s['log_interval']} iterations (the first interval includes compilation).", "",
             "| encoding | tokens/s | ×RoPE | MFU | train loss | wall (s) |", "|---|---|---|---|---|---|"]
    for enc, r in rows.items():
        if "error" in r:
            lines.append(f"| {enc} | err: {r['error'].replace('|', '/')} | - | - | - | - |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {enc} | {r['tok_s']:,.0f} | {r['tok_s'] / rope:.2f} | {mfu} | {r['loss']:.3f} "
                     f"| {r['wall']:.0f} |" if rope else
                     f"| {enc} | {r['tok_s']:,.0f} | - | {mfu} | {r['loss']:.3f} | {r['wall']:.0f} |")
    return "\n".join(lines), failures == 0, f"{len(rows) - failures} of {len(rows)} runs finished"


def stage_ddp(args, size: Sizes):
    n_gpus = torch.cuda.device_count() if args.device == "cuda" else 2   # CPU smoke: 2 gloo processes
    head = [section_head("ddp", args), "", machine_line(args)]
    if n_gpus < 2:
        return None, True, f"skipped: {n_gpus} GPU (needs 2)"
    enc, t0 = size.ddp_encoding, time.time()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_ddp_") as tmp:
        per_step = size.train["batch_size"] * size.train["block_size"]
        data = write_random_shards(tmp, size.train["vocab_size"], max(200_000, 8 * per_step))
        single, ddp = os.path.join(tmp, "single"), os.path.join(tmp, "ddp")
        one = run([sys.executable, "train_adam_finewebedu.py",
                   *train_argv(size, args, data, single, enc, gradient_accumulation_steps=2)], timeout=1800)
        two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "train_adam_finewebedu.py", *train_argv(size, args, data, ddp, enc, gradient_accumulation_steps=1)],
                  timeout=1800, env={"OMP_NUM_THREADS": "1"} if args.device == "cpu" else None)
        a = {r["iter"]: r for r in read_log(single) if "train_loss" in r}
        b = {r["iter"]: r for r in read_log(ddp) if "train_loss" in r}
    problems = []
    for name, done in (("1 process", one), ("torchrun, 2 processes", two)):
        if done.returncode != 0:
            problems.append(f"{name} failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:200])
    if not problems and (not a or sorted(a) != sorted(b)):
        problems.append(f"logged iterations differ: {sorted(a)} vs {sorted(b)}")
    worst = max((abs(b[i]["train_loss"] - a[i]["train_loss"]) / abs(a[i]["train_loss"]) for i in a if i in b),
                default=None)
    if worst is not None and worst > size.loss_rtol:
        problems.append(f"losses differ by {worst:.2e} (relative), more than {size.loss_rtol:g}")
    backend = "NCCL" if args.device == "cuda" else "gloo"
    lines = head + [f"Command: `{command_line()}` ({(time.time() - t0) / 60:.1f} min).",
                    f"{enc}, {size.train['n_layer']} layers, n_embd {size.train['n_embd']}, context "
                    f"{size.train['block_size']}, {size.train['max_iters']} iterations: torchrun with 2 processes "
                    f"({backend}, 1 micro-batch each) against 1 process with 2 micro-batches: the same global "
                    "batch (stateless data), so the losses must agree.", "",
                    "| run | tokens/s (last interval) | final train loss |", "|---|---|---|"]
    for name, log in (("1 process, accumulation 2", a), (f"2 processes ({backend})", b)):
        last = log[max(log)] if log else None
        speed = f"{last['tokens_per_sec']:,.0f}" if last else "err"
        loss = f"{last['train_loss']:.4f}" if last else "err"
        lines.append(f"| {name} | {speed} | {loss} |")
    verdict_line = ("same losses (largest relative difference "
                    f"{worst:.1e}, tolerance {size.loss_rtol:g})" if not problems else "; ".join(problems))
    lines += ["", f"Result: {verdict_line}."]
    return "\n".join(lines), not problems, verdict_line


# ----------------------------------------------------------------------------------------

def write_section(path: str, section: str) -> None:
    from scripts.bench_common import write_section as replace_or_append
    replace_or_append(path, section)


STAGE_FUNCTIONS = {"tests": stage_tests, "attention": stage_attention, "training": stage_training,
                   "ddp": stage_ddp}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(no_gpu_message(), file=sys.stderr)
        return 2
    size = sizes(args.smoke, args.device)
    print(machine_line(args), flush=True)
    report = {}
    for stage in args.stages:
        print(f"\n=== {stage} ===", flush=True)
        t0 = time.time()
        try:
            section, ok, summary = STAGE_FUNCTIONS[stage](args, size)
            if section and args.out:
                write_section(args.out, section)
            if section:
                print(section)
        except Exception as e:                 # one stage's failure must not stop the others
            traceback.print_exc()
            ok, summary = False, f"{type(e).__name__}: {e}"[:300]
        report[stage] = (ok, summary, time.time() - t0)
    print("\n=== summary ===")
    for stage, (ok, summary, seconds) in report.items():
        print(f"{stage:10s} {'ok    ' if ok else 'FAILED'} {seconds:7.0f} s  {summary}")
    if args.out:
        print(f"tables written to {args.out}")
    return 0 if all(ok for ok, *_ in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
