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

Grid encodings run on a grid of rows of 64 tokens (T // 64, 64).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Optional

import torch

import grape
from grape import build_encoding
from modeling import attention
from scripts.bench_common import config_for, fmt, machine_description, measured_rows, ratio, run_config, write_section

ENCODINGS = ["nope", "rope", "grape_m", "grape_m_ctx", "alibi", "fox",
             "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]
# --family: learned planes against the d x d learned basis and RoPE; grids, phases, dictionaries
FAMILY = ["grape_m_basis", "grape_m_planes", "grape_m_grid", "grape_m_ctx_dict",
          "alibi", "grape_a_grid", "grape_a_phase", "grape_a_dict"]
SECTION = "## Attention (CPU)"
FAMILY_SECTION = "## Attention (CPU): the rest of the GRAPE family"
PRECISION_SECTION = "## Attention precision (float32)"


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
             "Command: `python -m scripts.bench_attention " + " ".join(sys.argv[1:]) + "`.",
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

def table(results: dict, what: str, Ts, encodings) -> list[str]:
    lines = ["| T | encoding | auto uses | time auto (ms) | ×RoPE | time dense (ms) | auto/dense "
             "| peak auto (MiB) | ×RoPE | peak dense (MiB) | auto/dense |",
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
    cmd = "python -m scripts.bench_attention " + " ".join(sys.argv[1:])
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
    ap.add_argument("--out", help="write the results as a section of this markdown file (e.g. results/BENCHMARKS.md)")
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
