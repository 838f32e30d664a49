"""Time and peak memory of attention with every positional encoding, auto vs dense backend.

For each encoding and sequence length T it measures forward+backward of
  (a) one attention layer (model.Attention: projections, encoding, attention), and
  (b) one model step (GPT, 2 layers, n_embd 256, 4 heads, batch 1, GPT-2 vocabulary: loss.backward()),
once with attn_backend='auto' and once with 'dense', and prints ratios to RoPE and to dense,
all measured in the same run. With --precision it prints instead how far each additive
encoding's attention output lies from a float64 dense reference, for the auto backend and for
the float32 dense path (init parameters, and every parameter perturbed).

Time: time.perf_counter around each step, one warm-up step, the median of --repeats steps.
Peak memory:
- CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the step.
- CPU: PyTorch's CPU allocator keeps no statistics (and tracemalloc does not see its
  allocations), so each configuration runs in a child process forked from this one
  (fork is cheap and skips re-importing torch/transformers; run it as a command: a child forked
  from a process that has already run OpenMP work can hang in libgomp): peak resident set size
  (getrusage ru_maxrss) minus the resident size just before the first step. The number
  therefore covers activations, gradients and temporaries as the OS sees them, allocator
  slack included; parameters and inputs are already resident before the step.

    python bench_attention.py --quick
    python bench_attention.py --device cpu --T 512 1024 2048 4096 --out BENCHMARKS.md
    python bench_attention.py --family --T 1024 4096 --out BENCHMARKS.md     # the rest of the GRAPE family
    python bench_attention.py --precision --T 4096

Grid encodings run on a grid of rows of 64 tokens (T // 64, 64).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Optional

import torch

import attention
import grape
from grape import build_encoding
from model import GPT, Attention, GPTConfig

ENCODINGS = ["nope", "rope", "grape_m", "grape_m_ctx", "alibi", "fox",
             "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]
# --family: learned planes against the d x d learned basis and RoPE; grids, phases, dictionaries
FAMILY = ["grape_m_basis", "grape_m_planes", "grape_m_grid", "grape_m_ctx_dict",
          "alibi", "grape_a_grid", "grape_a_phase", "grape_a_dict"]
SECTION = "## Attention (CPU)"
FAMILY_SECTION = "## Attention (CPU): the rest of the GRAPE family"
PRECISION_SECTION = "## Attention precision (float32)"


def config_for(encoding: str, backend: str, T: int, n_embd: int = 256, n_head: int = 4,
               vocab_size: int = 50304) -> GPTConfig:
    on_grid = any(part in grape.GRID_ENCODINGS for part in encoding.split("+"))
    return GPTConfig(n_layer=2, n_embd=n_embd, n_head=n_head, block_size=T, vocab_size=vocab_size,
                     pos_encoding=encoding, attn_backend=backend, grid=(T // 64, 64) if on_grid else None)


def make_step(what: str, config: GPTConfig, device, dtype: str = "float32"):
    """One forward+backward; ``dtype`` 'bfloat16'/'float16' runs it under autocast (float32
    weights), as train_adam_finewebedu.py does on a GPU."""
    torch.manual_seed(0)
    T = config.block_size
    amp = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else torch.autocast(device.type, enabled=False))
    if what == "layer":
        layer = Attention(config).to(device)
        x = torch.randn(1, T, config.n_embd, device=device, requires_grad=True)

        def step():
            with amp:
                y = layer(x)
            y.float().square().mean().backward()
    else:
        model = GPT(config).to(device)
        idx = torch.randint(0, config.vocab_size, (1, T + 1), device=device)

        def step():
            with amp:
                loss = model(idx[:, :-1], targets=idx[:, 1:])[1]
            loss.backward()
    return step


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(what: str, encoding: str, backend: str, T: int, device: str, repeats: int,
            dtype: str = "float32", n_embd: int = 256, n_head: int = 4, vocab_size: int = 50304) -> dict:
    """Runs in the process that measures: returns times (s), peak (MiB) and the backend used."""
    chosen = set()
    pick = attention.choose_backend

    def recording_choice(q, bias, device_type=None):
        name = pick(q, bias, device_type)
        chosen.add(name)
        return name
    attention.choose_backend = recording_choice
    try:
        dev = torch.device(device)
        step = make_step(what, config_for(encoding, backend, T, n_embd, n_head, vocab_size), dev, dtype)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        if dev.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = current_rss_kib()
        times = []
        for i in range(repeats + 1):             # the first step is the warm-up
            t0 = time.perf_counter()
            step()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    finally:
        attention.choose_backend = pick
    used = backend if backend != "auto" else "+".join(sorted(chosen)) or "sdpa"
    return {"time": statistics.median(times), "peak": peak, "used": used}


def run_config(what, encoding, backend, T, device, repeats, **shape) -> dict:
    """``measure`` in isolation: in a forked child on CPU; on a GPU in this process, with an
    error (out of memory, a kernel that fails) reported in the result instead of raised."""
    if device != "cpu":
        try:
            return measure(what, encoding, backend, T, device, repeats, **shape)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"[:200]}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # child: measure, send JSON, exit
        os.close(read)
        try:
            out = measure(what, encoding, backend, T, device, repeats, **shape)
        except Exception as e:                    # e.g. out of memory: report, do not crash the run
            out = {"error": f"{type(e).__name__}: {e}"[:200]}
        with os.fdopen(write, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"error": f"child process died (status {status}), probably out of memory"}
    return json.loads(text)


# ----------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------

def dense_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, rows: int = 256) -> torch.Tensor:
    """Softmax(q·k/√d + b) v in float64, the bias evaluated from its tensors cast to float64,
    a few query rows at a time (the full T×T matrix would not fit at long T)."""
    tensors = {f.name: getattr(bias, f.name).double() for f in dataclasses.fields(bias)
               if isinstance(getattr(bias, f.name), torch.Tensor)}
    bias64 = dataclasses.replace(bias, **tensors)
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    T = q.shape[2]
    for s in range(0, T, rows):
        e = min(T, s + rows)
        logits = q[:, :, s:e] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias64.block(slice(s, e), slice(None))
        hidden = torch.arange(T)[None, :] > torch.arange(s, e)[:, None]
        out[:, :, s:e] = torch.softmax(logits.masked_fill(hidden, float("-inf")), -1) @ v
    return out


def float32_errors(encoding: str, T: int, perturbed: bool, device: str) -> Optional[dict]:
    """Largest |output - float64 reference| of the auto backend and of the float32 dense path
    (None for an encoding without a bias)."""
    config = config_for(encoding, "auto", T)
    torch.manual_seed(0)
    enc = build_encoding(config).to(device)
    if not enc.additive:
        return None
    if perturbed:
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.5 * torch.randn_like(p))
    H, D = config.n_head, config.head_dim
    x = torch.randn(1, T, config.n_embd, device=device)
    q, k, v = (torch.randn(1, H, T, D, device=device) for _ in range(3))
    with torch.no_grad():
        q, k, bias = enc(x, q, k, v)
        ref = dense_float64(q, k, v, bias)
        used = attention.choose_backend(q, bias)
        fast = attention.attend(q, k, v, bias)
        dense = attention.dense_attention(q, k, v, bias)
    return {"used": used, "fast": (fast.double() - ref).abs().max().item(),
            "dense": (dense.double() - ref).abs().max().item(), "min_bias": bias.dense().min().item()}


def precision_report(args, encodings) -> str:
    lines = [PRECISION_SECTION, "",
             f"Machine: {machine_description(args.device)}.",
             "Command: `python " + " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "`.",
             "Largest absolute error of the attention output (v ~ N(0, 1); batch 1, 4 heads of 64) against "
             "a float64 dense reference; parameters at init, and with every parameter perturbed by 0.5·N(0, 1).",
             "", "| T | encoding | parameters | min bias | auto uses | auto error | dense float32 error |",
             "|---|---|---|---|---|---|---|"]
    for T in args.T:
        for enc in encodings:
            for perturbed in (False, True):
                r = float32_errors(enc, T, perturbed, args.device)
                if r is None:
                    break
                lines.append(f"| {T} | {enc} | {'perturbed' if perturbed else 'init'} | {r['min_bias']:.0f} "
                             f"| {r['used']} | {r['fast']:.1e} | {r['dense']:.1e} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def machine_description(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def fmt(r, key, scale=1.0, digits=0):
    if r is None or "error" in r:
        return "err" if r is not None else "-"
    return f"{r[key] * scale:.{digits}f}"


def measured_rows(results: dict, what: str, Ts, encodings):
    """(T, encoding, auto result, dense result, RoPE's auto result at T) for each measured row."""
    for T in Ts:
        rope = results.get((what, "rope", "auto", T))
        for enc in encodings:
            a, d = results.get((what, enc, "auto", T)), results.get((what, enc, "dense", T))
            if a is not None or d is not None:
                yield T, enc, a, d, rope


def table(results: dict, what: str, Ts, encodings) -> list[str]:
    lines = [f"| T | encoding | auto uses | time auto (ms) | ×RoPE | time dense (ms) | auto/dense "
             f"| peak auto (MiB) | ×RoPE | peak dense (MiB) | auto/dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = lambda r: r is not None and "error" not in r
    for T, enc, a, d, rope in measured_rows(results, what, Ts, encodings):
        lines.append(
            f"| {T} | {enc} | {a.get('used', a.get('error', '-')) if a else '-'} "
            f"| {fmt(a, 'time', 1e3)} | {ratio(a['time'], rope['time']) if ok(a) and ok(rope) else '-'} "
            f"| {fmt(d, 'time', 1e3)} | {ratio(a['time'], d['time']) if ok(a) and ok(d) else '-'} "
            f"| {fmt(a, 'peak')} | {ratio(a['peak'], rope['peak']) if ok(a) and ok(rope) else '-'} "
            f"| {fmt(d, 'peak')} | {ratio(a['peak'], d['peak']) if ok(a) and ok(d) else '-'} |")
    return lines


def shape_text(args) -> str:
    text = f"batch 1, {args.n_head} heads of {args.n_embd // args.n_head}, n_embd {args.n_embd}"
    return text + (f", {args.dtype} autocast" if args.dtype != "float32" else "")


def report(results, args, Ts, encodings, elapsed) -> str:
    head = SECTION if args.device == "cpu" else f"## Attention ({args.device.upper()})"
    if args.family:
        head = FAMILY_SECTION.replace("CPU", args.device.upper()) if args.device != "cpu" else FAMILY_SECTION
    cmd = "python " + " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    lines = [head, "",
             f"Machine: {machine_description(args.device)}.",
             f"Command: `{cmd}` ({elapsed / 60:.0f} min).",
             f"Median of {args.repeats} forward+backward steps after one warm-up; {shape_text(args)}. Peak = extra memory of the step (CPU: peak RSS of a forked child minus its RSS "
             "before the step; CUDA: max_memory_allocated). ×RoPE: against RoPE with the auto backend "
             "(SDPA) of the same T; auto/dense: the same encoding through the dense T² reference path.",
             ""]
    if args.note:
        lines += [args.note, ""]
    for what, title in (("model", "One model step (2 layers, GPT-2 vocabulary)"), ("layer", "One attention layer")):
        if any(k[0] == what for k in results):
            lines += [f"### {title}", ""] + table(results, what, Ts, encodings) + [""]
    return "\n".join(lines)


def write_section(path: str, section: str) -> None:
    """Replace this section of the file where it stands (or append it), keeping every other
    section; a section runs from its '## ' heading to the next one."""
    head = section.splitlines()[0]
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    body = section.rstrip("\n") + "\n"
    lines = old.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == head]
    if starts:
        i = starts[0]
        j = next((n for n in range(i + 1, len(lines)) if lines[n].startswith("## ")), len(lines))
        rest = "".join(lines[j:])
        new = "".join(lines[:i]) + body + ("\n" + rest if rest else "")
    else:
        new = old.rstrip("\n") + "\n\n" + body
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--encodings", nargs="+", default=ENCODINGS, choices=sorted(grape.ENCODINGS))
    ap.add_argument("--family", action="store_true", help=f"the encodings {FAMILY}, in their own section")
    ap.add_argument("--what", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    ap.add_argument("--backends", nargs="+", default=["auto", "dense"], choices=["auto", "dense"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="autocast dtype of the step (float32 weights, as in training)")
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="T 256 512, rope/alibi/grape_ap, 1 repeat")
    ap.add_argument("--out", help="write the results as a section of this markdown file (e.g. BENCHMARKS.md)")
    ap.add_argument("--note", default="", help="a line added to the written section")
    ap.add_argument("--precision", action="store_true",
                    help="print the float32 error of each additive encoding against a float64 reference instead")
    args = ap.parse_args()
    if args.quick:
        args.T, args.encodings, args.repeats = [256, 512], ["rope", "alibi", "grape_ap"], 1
    if args.family:
        args.encodings = FAMILY
    encodings = list(dict.fromkeys(["rope", *args.encodings]))      # RoPE is the yardstick
    print(machine_description(args.device), flush=True)
    if args.precision:
        section = precision_report(args, encodings)
        if args.out:
            write_section(args.out, section)
        return
    results, start, done = {}, time.perf_counter(), []
    for T in args.T:
        for what in args.what:
            for enc in encodings:
                for backend in args.backends:
                    r = run_config(what, enc, backend, T, args.device, args.repeats,
                                   dtype=args.dtype, n_embd=args.n_embd, n_head=args.n_head)
                    results[(what, enc, backend, T)] = r
                    print(f"T={T} {what:5s} {enc:12s} {backend:5s} " +
                          (r["error"] if "error" in r else
                           f"{r['used']:8s} {r['time'] * 1e3:9.1f} ms  {r['peak']:8.1f} MiB"), flush=True)
        done.append(T)
        section = report(results, args, sorted(done), encodings, time.perf_counter() - start)
        if args.out:
            write_section(args.out, section)       # after every T, so a long run leaves partial results
    print()
    print(section)


if __name__ == "__main__":
    main()
