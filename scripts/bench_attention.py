"""Time and peak memory of attention with every positional encoding, auto vs dense backend.

For each encoding and sequence length T it measures forward+backward of
  (a) one attention layer (model.Attention: projections, encoding, attention), and
  (b) one model step (GPT, 2 layers, n_embd 256, 4 heads, batch 1, GPT-2 vocabulary: loss.backward()),
once with attn_backend='auto' and once with 'dense', and prints ratios to RoPE and to dense,
all measured in the same run. With --precision it prints instead how far each additive
encoding's attention output lies from a float64 dense reference, for the auto backend and for
the float32 dense path (init parameters, and every parameter perturbed).

Time and peak memory as ``bench_common.py`` measures them.

    python -m scripts.bench_attention --quick
    python -m scripts.bench_attention --device cpu --T 512 1024 2048 4096 --out results/BENCHMARKS.md
    python -m scripts.bench_attention --family --T 1024 4096 --out results/BENCHMARKS.md     # the rest of the GRAPE family
    python -m scripts.bench_attention --precision --T 4096
    # issue 24's shape: 8 heads of 64, vocabulary 512, 2 threads, times interleaved in one process
    python -m scripts.bench_attention --T 512 1024 2048 4096 --n_embd 512 --n_head 8 --vocab_size 512 \
        --threads 2 --interleave --repeats 3 --encodings rope alibi fox grape_a_q grape_a_k grape_a_qk grape_ap
    python -m scripts.bench_attention --breakdown --T 4096 --n_embd 512 --n_head 8 --threads 2   # where GRAPE-AP's time goes

Grid encodings run on a grid of rows of 64 tokens (T // 64, 64).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from typing import Optional

import torch

import grape
from grape import build_encoding
from modeling import attention
from modeling import chunked, grape_ap_cpu
from modeling.bias import PathIntegralBias
from modeling.dense import causal_sdpa
from scripts.bench_common import (config_for, fmt, interleaved_times, load_average, machine_description,
                                  measured_rows, ratio, run_config, write_section)

ENCODINGS = ["nope", "rope", "grape_m", "grape_m_ctx", "alibi", "fox",
             "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]
# --family: learned planes against the d x d learned basis and RoPE; grids, phases, dictionaries
FAMILY = ["grape_m_basis", "grape_m_planes", "grape_m_grid", "grape_m_ctx_dict",
          "alibi", "grape_a_grid", "grape_a_phase", "grape_a_dict"]
SECTION = "## Attention (CPU)"
FAMILY_SECTION = "## Attention (CPU): the rest of the GRAPE family"
PRECISION_SECTION = "## Attention precision (float32)"
BREAKDOWN_SECTION = "## Attention (CPU): where GRAPE-AP's time goes"


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
             "Command: `python -m scripts.bench_attention " + shlex.join(sys.argv[1:]) + "`.",
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
# Breakdown: where GRAPE-AP's attention time goes
# ----------------------------------------------------------------------------------------

# aten / kernel ops by what they do in the attention paths (self CPU time); anything else is "other"
WHAT_OPS = {
    "GEMMs (q·k, P·v, dS·k, dSᵀ·q, Pᵀ·dO, dO·vᵀ; probe products p·r)":
        {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_"},
    "log-sigmoid (tensor ops: sigmoid, then log)": {"aten::sigmoid", "aten::log", "aten::log_sigmoid_forward"},
    "cumsum (tensor ops: path sums, dψ)": {"aten::cumsum", "aten::cumsum_"},
    "softmax (tensor ops)": {"aten::_softmax"},
    "elementwise glue (slope, masks, dS, dz)": {"aten::mul", "aten::mul_", "aten::sub", "aten::sub_", "aten::div",
                                                "aten::addcmul", "aten::masked_fill_", "aten::sum", "aten::amin",
                                                "aten::fill_", "aten::zero_", "aten::lt", "aten::arange"},
    "layout (flips, contiguous and float copies)": {"aten::flip", "aten::copy_", "aten::clone", "aten::empty",
                                                    "aten::zeros", "aten::empty_strided"},
    "fused kernel loops (path integral, softmax, probe gradients; grape_ap_cpu.cpp)":
        {"grape_ap_cpu::forward", "grape_ap_cpu::backward"},
    "SDPA flash kernel": {"aten::_scaled_dot_product_flash_attention_for_cpu",
                          "aten::_scaled_dot_product_flash_attention_for_cpu_backward"},
}


def grape_ap_inputs(T: int, n_head: int, head_dim: int, p_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n_head, T, head_dim, generator=g).requires_grad_() for _ in range(3))
    p = torch.randn(1, n_head, T, p_dim, generator=g).requires_grad_()
    r = torch.randn(1, n_head, T, p_dim, generator=g)
    r = (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True))).requires_grad_()      # RMS-normalised, as GRAPE-AP's
    return q, k, v, p, r, grape.alibi_slopes(n_head)


def attention_paths(T: int, n_head: int, head_dim: int) -> dict:
    """{name: (forward, inputs)} of one attention call each: RoPE's SDPA and GRAPE-AP's two CPU paths."""
    q, k, v, p, r, slope = grape_ap_inputs(T, n_head, head_dim)
    block = chunked.query_block(1, n_head, T)
    return {"rope: SDPA": (lambda: causal_sdpa(q, k, v), (q, k, v)),
            "grape_ap: CPU kernel": (lambda: grape_ap_cpu.grape_ap_cpu_attention(q, k, v, p, r, slope), (q, k, v, p, r)),
            "grape_ap: tensor ops": (lambda: chunked._PathIntegralAttention.apply(q, k, v, p, r, slope, block),
                                     (q, k, v, p, r))}


def profiled_ms(fn) -> tuple[float, dict]:
    """(wall ms, {what: self ms}) of one call of fn under torch.profiler."""
    from torch.profiler import profile
    with profile() as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
    spent = {}
    for event in prof.key_averages():
        what = next((w for w, ops in WHAT_OPS.items() if event.key in ops), "other")
        spent[what] = spent.get(what, 0.0) + event.self_cpu_time_total / 1e3
    return wall, spent


def breakdown_rows(T: int, args) -> list[str]:
    rows = []
    for name, (forward, leaves) in attention_paths(T, args.n_head, args.n_embd // args.n_head).items():
        if name.endswith("kernel") and grape_ap_cpu.ops() is None:
            rows.append(f"| {T} | {name} | - | not built here | | |")
            continue
        grad = torch.randn_like(leaves[0])
        forward().backward(grad)                                    # warm-up
        for t in leaves:
            t.grad = None
        out = []
        wall_f, spent_f = profiled_ms(lambda: out.append(forward()))
        wall_b, spent_b = profiled_ms(lambda: out[0].backward(grad))
        total = wall_f + wall_b
        rows.append(f"| {T} | {name} | **all** | **{wall_f:.0f}** | **{wall_b:.0f}** | **100%** |")
        for what in [*WHAT_OPS, "other"]:
            f, b = spent_f.get(what, 0.0), spent_b.get(what, 0.0)
            if f + b >= 0.005 * total:
                rows.append(f"| {T} | {name} | {what} | {f:.0f} | {b:.0f} | {100 * (f + b) / total:.0f}% |")
        print("\n".join(rows[-8:]), flush=True)
    return rows


def breakdown_report(args) -> str:
    lines = [f"## {args.section}" if args.section else BREAKDOWN_SECTION, "",
             f"Machine: {machine_description(args.device)}; {load_average()} at the start.",
             "Command: `python -m scripts.bench_attention " + shlex.join(sys.argv[1:]) + "`.",
             f"One attention call, forward then backward, batch 1, {args.n_head} heads of "
             f"{args.n_embd // args.n_head}, GRAPE-AP probes of width 8 (r RMS-normalised), ALiBi slopes; "
             "torch.profiler's self CPU time per op, grouped by what the op does (a group under 0.5% of "
             "the call is left out; the kernel's GEMMs are aten ops it calls, its own loops the rest). "
             "ms of one profiled call after a warm-up call; the profiler adds a little to each op.",
             "", "| T | path | what | forward ms | backward ms | share |", "|---|---|---|---:|---:|---:|"]
    for T in args.T:
        lines += breakdown_rows(T, args)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def table(results: dict, what: str, Ts, encodings) -> list[str]:
    lines = ["| T | encoding | auto uses | time auto (ms) | ×RoPE | time dense (ms) | auto/dense "
             "| peak auto (MiB) | ×RoPE | peak dense (MiB) | auto/dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = lambda r: r is not None and "error" not in r
    for T, enc, a, d, rope in measured_rows(results, what, Ts, encodings):
        used = a.get('used', a.get('error', '-')) if a else '-'
        if used == "chunked" and "grape_ap" in enc and grape_ap_cpu.ops() is not None:
            used = "chunked: CPU kernel"
        lines.append(
            f"| {T} | {enc} | {used} "
            f"| {fmt(a, 'time', 1e3)} | {ratio(a['time'], rope['time']) if ok(a) and ok(rope) else '-'} "
            f"| {fmt(d, 'time', 1e3)} | {ratio(a['time'], d['time']) if ok(a) and ok(d) else '-'} "
            f"| {fmt(a, 'peak')} | {ratio(a['peak'], rope['peak']) if ok(a) and ok(rope) else '-'} "
            f"| {fmt(d, 'peak')} | {ratio(a['peak'], d['peak']) if ok(a) and ok(d) else '-'} |")
    return lines


def shape_text(args) -> str:
    text = (f"batch 1, {args.n_head} heads of {args.n_embd // args.n_head}, n_embd {args.n_embd}, "
            f"vocabulary {args.vocab_size}")
    return text + (f", {args.dtype} autocast" if args.dtype != "float32" else "")


def report(results, args, Ts, encodings, elapsed) -> str:
    head = SECTION if args.device == "cpu" else f"## Attention ({args.device.upper()})"
    if args.family:
        head = FAMILY_SECTION.replace("CPU", args.device.upper()) if args.device != "cpu" else FAMILY_SECTION
    head = f"## {args.section}" if args.section else head
    cmd = "python -m scripts.bench_attention " + shlex.join(sys.argv[1:])
    lines = [head, "",
             f"Machine: {machine_description(args.device)}.",
             f"Command: `{cmd}` ({elapsed / 60:.0f} min).",
             (f"Min of {args.repeats} forward+backward steps per configuration, the configurations taking turns "
              "in one process after a warm-up step each"
              + ("; time = CPU time of the process (time.process_time), not wall-clock" if args.cpu_time else "")
              if args.interleave else
              f"Median of {args.repeats} forward+backward steps after one warm-up")
             + f"; {shape_text(args)}; {load_average()} at the end. Peak = extra memory of the step (CPU: peak RSS of a forked child minus its RSS "
             "before the step; CUDA: max_memory_allocated). ×RoPE: against RoPE with the auto backend "
             "(SDPA) of the same T; auto/dense: the same encoding through the dense T² reference path.",
             ""]
    if args.note:
        lines += [args.note, ""]
    for what, title in (("model", "One model step (2 layers)"), ("layer", "One attention layer")):
        if any(k[0] == what for k in results):
            lines += [f"### {title}", ""] + table(results, what, Ts, encodings) + [""]
    return "\n".join(lines)


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
    ap.add_argument("--vocab_size", type=int, default=50304)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--interleave", action="store_true",
                    help="time every configuration of a T in this process, taking turns, min of --repeats "
                         "(memory still from forked children)")
    ap.add_argument("--cpu_time", action="store_true",
                    help="with --interleave: report this process's CPU time per step instead of wall-clock time "
                         "(with one thread, what a busy machine disturbs least)")
    ap.add_argument("--breakdown", action="store_true",
                    help="profile one GRAPE-AP attention call (the CPU kernel, the tensor-op path) and RoPE's SDPA "
                         "at each T and write where the time goes")
    ap.add_argument("--quick", action="store_true", help="T 256 512, rope/alibi/grape_ap, 1 repeat")
    ap.add_argument("--out", help="write the results as a section of this markdown file (e.g. results/BENCHMARKS.md)")
    ap.add_argument("--note", default="", help="a line added to the written section")
    ap.add_argument("--section", default=None, help="the '## ' heading of the written section (default: by mode)")
    ap.add_argument("--precision", action="store_true",
                    help="print the float32 error of each additive encoding against a float64 reference instead")
    args = ap.parse_args()
    if args.quick:
        args.T, args.encodings, args.repeats = [256, 512], ["rope", "alibi", "grape_ap"], 1
    if args.family:
        args.encodings = FAMILY
    encodings = list(dict.fromkeys(["rope", *args.encodings]))      # RoPE is the yardstick
    if args.threads:
        torch.set_num_threads(args.threads)
    if "grape_ap" in encodings or args.breakdown:
        grape_ap_cpu.ops()           # build or load the CPU kernel once, before any child is forked
    print(machine_description(args.device), flush=True)
    if args.breakdown:
        section = breakdown_report(args)
        if args.out:
            write_section(args.out, section)
        print(section)
        return
    if args.precision:
        section = precision_report(args, encodings)
        if args.out:
            write_section(args.out, section)
        return
    results, start, done = {}, time.perf_counter(), []
    shape = dict(dtype=args.dtype, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size)
    configs = [(enc, backend) for enc in encodings for backend in args.backends]
    if args.interleave:          # every fork first: a child forked after OpenMP work can hang in libgomp
        for T in args.T:
            for what in args.what:
                for enc, backend in configs:
                    results[(what, enc, backend, T)] = run_config(what, enc, backend, T, args.device, 1, **shape)
    for T in args.T:
        for what in args.what:
            if args.interleave:
                for key, r in interleaved_times(what, configs, T, args.device, args.repeats, **shape).items():
                    if "error" not in results[(what, *key, T)]:
                        results[(what, *key, T)].update(time=r["cpu"] if args.cpu_time else r["time"], used=r["used"])
            for enc, backend in configs:
                if not args.interleave:
                    results[(what, enc, backend, T)] = run_config(what, enc, backend, T, args.device,
                                                                  args.repeats, **shape)
                r = results[(what, enc, backend, T)]
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
