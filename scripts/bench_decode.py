"""Decode speed with the KV cache vs full recomputation, for every encoding (a benchmark, not a test).

    python -m scripts.bench_decode                         # context 1024: prompt 1000, then 24 new tokens
    python -m scripts.bench_decode --write                 # also put the table in results/BENCHMARKS.md "## Decoding"
    python -m scripts.bench_decode --encodings=rope,fox --device=cuda
    python -m scripts.bench_decode --family --write        # the rest of the GRAPE family, own section
    python -m scripts.bench_decode --sweep 1,2 --write     # decoding speed by thread count and model size

Grid encodings run on a grid of rows of 32 tokens (context // 32, 32).

For each encoding one small random model decodes greedily twice: from the cache (prefill the
prompt once, then one token per step) and by recomputing the whole sequence for every new
token (what a model without a cache must do; logits of the last position only, in both). Both
runs happen in the same process one after the other, so the ratio is meaningful even where
absolute numbers are noisy. The generated tokens must agree.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from grape import ENCODINGS, GRID_ENCODINGS
from model import GPT, GPTConfig
from modeling.generation import cpu_threads, decoding_threads, next_token
from scripts.bench_common import BENCHMARKS, load_average, machine_description, write_section

SECTION = "## Decoding"
FAMILY_SECTION = "## Decoding: the rest of the GRAPE family"
THREADS_SECTION = "## Decoding: threads"
# (layers, n_embd, heads, batch) for --sweep: the CPU demo's size up to GPT-2 small at batch 8
SWEEP_SIZES = [(2, 128, 2, 1), (4, 256, 4, 1), (12, 768, 12, 1), (4, 256, 4, 8), (12, 768, 12, 8)]
FAMILY = ["rope", "grape_m_basis", "grape_m_planes", "grape_m_grid", "grape_m_ctx_dict",
          "alibi", "grape_a_grid", "grape_a_phase", "grape_a_dict"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024, help="prompt + new tokens")
    p.add_argument("--new_tokens", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--kv_shift", action="store_true")
    p.add_argument("--encodings", default="all", help="comma-separated, or 'all'")
    p.add_argument("--attn_backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads while decoding (0: generation.decoding_threads, as generate() picks)")
    p.add_argument("--sweep", default=None, help="comma-separated thread counts: cached decoding speed of "
                   f"rope models of the sizes {SWEEP_SIZES} (layers, n_embd, heads, batch) at each count")
    p.add_argument("--write", action="store_true", help="write the table into results/BENCHMARKS.md")
    p.add_argument("--family", action="store_true", help=f"the encodings {FAMILY}, in their own section")
    p.add_argument("--section", default=None, help="the '## ' heading of the written --sweep section "
                                                   f"(default: {THREADS_SECTION[3:]!r})")
    p.add_argument("--note", default="", help="a line added to the written --sweep section (what else ran)")
    return p.parse_args(argv)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_cached(model, prompt, n, device):
    sync(device)
    t0 = time.perf_counter()
    caches = model.new_caches()
    logits, _ = model(prompt, caches=caches, logits_to_keep=1)
    out = [next_token(logits[:, -1], temperature=0)]
    sync(device)
    t1 = time.perf_counter()
    for _ in range(n - 1):
        logits, _ = model(out[-1], caches=caches, logits_to_keep=1)
        out.append(next_token(logits[:, -1], temperature=0))
    sync(device)
    t2 = time.perf_counter()
    return torch.cat(out, 1), t1 - t0, t2 - t1


@torch.no_grad()
def decode_recompute(model, prompt, n, device):
    sync(device)
    t0 = time.perf_counter()
    seq = prompt
    for _ in range(n):
        logits, _ = model(seq, logits_to_keep=1)
        seq = torch.cat([seq, next_token(logits[:, -1], temperature=0)], 1)
    sync(device)
    return seq[:, prompt.shape[1]:], time.perf_counter() - t0


@torch.no_grad()
def cached_rate(model, prompt, n, threads) -> float:
    """Tokens per second of n cached decoding steps after prefilling ``prompt``."""
    with cpu_threads(threads):
        caches = model.new_caches()
        logits, _ = model(prompt, caches=caches, logits_to_keep=1)
        token = next_token(logits[:, -1], temperature=0)
        t0 = time.perf_counter()
        for _ in range(n):
            logits, _ = model(token, caches=caches, logits_to_keep=1)
            token = next_token(logits[:, -1], temperature=0)
        return prompt.shape[0] * n / (time.perf_counter() - t0)


def sweep_threads(args, argv):
    """Cached decoding speed at each thread count, the counts interleaved (best of 3), for a
    few model sizes: where threads pay off, and what generate() picks (decoding_threads)."""
    counts = [int(c) for c in args.sweep.split(",")]
    header = ("| layers x n_embd | batch | GFLOP per step | " + " | ".join(f"{c} thread(s) tok/s" for c in counts)
              + " | generate() picks |\n|" + " --- |" * (4 + len(counts)))
    print(header)
    rows, start_load = [], load_average()
    for layers, width, heads, batch in SWEEP_SIZES:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=layers, n_embd=width, n_head=heads, block_size=args.context,
                              pos_encoding="rope")).eval()
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.context - args.new_tokens))
        best = {c: 0.0 for c in counts}
        for _ in range(3):
            for c in counts:
                best[c] = max(best[c], cached_rate(model, prompt, args.new_tokens, c))
        flops = 2 * sum(p.numel() for p in model.parameters()) * batch
        rows.append(f"| {layers} x {width} | {batch} | {flops / 1e9:.2f} | "
                    + " | ".join(f"{best[c]:.1f}" for c in counts) + f" | {decoding_threads(model, batch)} |")
        print(rows[-1], flush=True)
    command = "python -m scripts.bench_decode " + shlex.join(sys.argv[1:] if argv is None else argv)
    section = f"## {args.section}" if args.section else THREADS_SECTION
    text = (f"{section}\n\nCached greedy decoding of {args.new_tokens} tokens after a "
            f"{args.context - args.new_tokens}-token prompt, rope models with the GPT-2 vocabulary, tokens/s "
            "(batch x steps / s), best of 3 with the thread counts interleaved in one process. "
            f"*generate() picks*: generation.decoding_threads on this machine at the end of the run.\n\n"
            f"Machine: {machine_description('cpu')}; {start_load} at the start, {load_average()} at the end.  \n"
            f"Command: `{command.strip()}`\n\n" + (f"{args.note}\n\n" if args.note else "") + header + "\n" + "\n".join(rows) + "\n")
    if args.write:
        write_section(BENCHMARKS, text)
        print(f"wrote {section} in {os.path.relpath(BENCHMARKS)}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.sweep:
        return sweep_threads(args, argv)
    names = sorted(ENCODINGS) if args.encodings == "all" else args.encodings.split(",")
    if args.family:
        names = FAMILY
    section = FAMILY_SECTION if args.family else SECTION
    prompt_len = args.context - args.new_tokens
    rows = []
    header = ("| encoding | prefill ms | cached tok/s | recompute tok/s | speed-up | same tokens |\n"
              "| --- | ---: | ---: | ---: | ---: | --- |")
    print(header)
    for name in names:
        torch.manual_seed(0)
        on_grid = any(part in GRID_ENCODINGS for part in name.split("+"))
        cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.context,
                        pos_encoding=name, use_k_shift=args.kv_shift, use_v_shift=args.kv_shift,
                        attn_backend=args.attn_backend, grid=(-(-args.context // 32), 32) if on_grid else None)
        model = GPT(cfg).to(args.device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.batch_size, prompt_len), device=args.device)
        threads = args.threads or decoding_threads(model, args.batch_size)
        with cpu_threads(threads if torch.device(args.device).type == "cpu" else None):
            decode_cached(model, prompt[:, :64], 4, args.device)               # warm-up
            cached, t_prefill, t_steps = decode_cached(model, prompt, args.new_tokens, args.device)
            full, t_full = decode_recompute(model, prompt, args.new_tokens, args.device)
        # per generated token: the cache makes n-1 of them in steps, recomputation all n
        cached_tps = args.batch_size * (args.new_tokens - 1) / t_steps
        full_tps = args.batch_size * args.new_tokens / t_full
        row = (f"| {name} | {1000 * t_prefill:.0f} | {cached_tps:.1f} | {full_tps:.2f} | "
               f"{cached_tps / full_tps:.1f}x | {'yes' if torch.equal(cached, full) else 'NO'} |")
        rows.append(row)
        print(row, flush=True)

    command = "python -m scripts.bench_decode " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = (f"{section}\n\n"
            f"Greedy decoding of {args.new_tokens} tokens after a {prompt_len}-token prompt (context "
            f"{args.context}), batch {args.batch_size}, random model with {args.n_layer} layers, {args.n_head} heads, "
            f"n_embd {args.n_embd}, KV-shift {'on' if args.kv_shift else 'off'}, attn_backend {args.attn_backend}. "
            "*cached*: the prompt is prefilled once, then every token is one step on the KV cache "
            "(tokens/s over the steps; prefill time separately). *recompute*: every token reruns the "
            "whole sequence (no cache). Both in one run, same process; *same tokens*: the two greedy "
            "outputs agree. Absolute numbers move between runs on a small CPU; compare within a row. "
            "The lm_head (vocab 50304) dominates a cached step of a model this small.\n\n"
            f"Machine: {machine_description(args.device)}; decoding on {threads} thread(s).  \n"
            f"Command: `{command.strip()}`\n\n"
            + header + "\n" + "\n".join(rows) + "\n")
    if args.write:
        write_section(BENCHMARKS, text)
        print(f"wrote {section} in {os.path.relpath(BENCHMARKS)}")
    return rows


if __name__ == "__main__":
    main()
