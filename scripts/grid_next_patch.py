"""2D GRAPE on a grid task: next-pixel prediction on generated images, 1D RoPE vs 2D GRAPE.

Each image is a G x G grid of colour indices (background 0 and a few overlapping axis-aligned
rectangles of colours 1..7), read in raster order; a small causal transformer predicts the
next pixel. Half the information sits in the pixel *above*: W tokens back in 1D, the offset
(1, 0) on the grid. Every model is trained at one size and evaluated at that size and at a
larger one (the same weights, a config with the larger grid): 1D RoPE learns "W tokens back"
for the training width only, 2D GRAPE (grape_m_grid, grape_a_grid: coordinates from
config.grid) sees the same offset vector at every size.

    python -m scripts.grid_next_patch                 # under two minutes on 2 CPU cores
    python -m scripts.grid_next_patch --write         # also record the table in results/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from model import GPT, GPTConfig
from scripts import bench_common

COLOURS = 8
ENCODINGS = ["rope", "grape_m_grid", "grape_a_grid", "grape_m_grid+grape_a_grid"]
SECTION = "## 2D GRAPE example (CPU)"


def rectangles(n_images: int, size: int, generator: torch.Generator, n_rects: int = 3) -> torch.Tensor:
    """(n, size*size) raster-order images of overlapping filled rectangles."""
    images = torch.zeros(n_images, size, size, dtype=torch.long)
    for i in range(n_images):
        for _ in range(n_rects):
            h, w = torch.randint(2, size // 2 + 2, (2,), generator=generator).tolist()
            top = torch.randint(0, size - h + 1, (1,), generator=generator).item()
            left = torch.randint(0, size - w + 1, (1,), generator=generator).item()
            images[i, top:top + h, left:left + w] = torch.randint(1, COLOURS, (1,), generator=generator).item()
    return images.flatten(1)


def model_config(encoding: str, size: int, width: int) -> GPTConfig:
    grid = (size, size) if "grid" in encoding else None
    return GPTConfig(n_layer=2, n_head=4, n_embd=width, vocab_size=COLOURS, block_size=size * size,
                     pos_encoding=encoding, grid=grid, bos_token_id=0, eos_token_id=0)   # no <|endoftext|> in 8 colours


def loss_on(model: GPT, images: torch.Tensor) -> float:
    with torch.no_grad():
        _, loss = model(images[:, :-1], targets=images[:, 1:])
    return loss.item()


def run(encoding: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = GPT(model_config(encoding, args.train_size, args.width))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = rectangles(args.batch_size, args.train_size, data)
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    val = torch.Generator().manual_seed(args.seed + 1)
    result = {"encoding": encoding, "seconds": seconds,
              "train_size": loss_on(model, rectangles(args.eval_images, args.train_size, val))}
    bigger = GPT(model_config(encoding, args.eval_size, args.width)).eval()
    bigger.load_state_dict(model.state_dict())          # same weights, larger grid / context
    result["eval_size"] = loss_on(bigger, rectangles(args.eval_images, args.eval_size, val))
    return result


def table(results: list[dict], args) -> str:
    lines = [f"| encoding | train time (s) | loss at {args.train_size}x{args.train_size} (trained) "
             f"| loss at {args.eval_size}x{args.eval_size} (larger) |", "| --- | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['encoding']} | {r['seconds']:.1f} | {r['train_size']:.3f} | {r['eval_size']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encodings", nargs="+", default=ENCODINGS, help="models to train and compare")
    p.add_argument("--train_size", type=int, default=12, help="training images are size x size")
    p.add_argument("--eval_size", type=int, default=16, help="also evaluate on larger images")
    p.add_argument("--steps", type=int, default=300, help="AdamW steps per model")
    p.add_argument("--batch_size", type=int, default=16, help="images per step")
    p.add_argument("--eval_images", type=int, default=256, help="fresh images per evaluation")
    p.add_argument("--width", type=int, default=64, help="n_embd (4 heads)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (20 warm-up steps, then linear decay to a tenth)")
    p.add_argument("--seed", type=int, default=0, help="model init and images")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a model this small gains little from more)")
    p.add_argument("--write", action="store_true", help="record the table in results/BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    uniform = torch.log(torch.tensor(float(COLOURS))).item()
    print(f"next-pixel loss in nats (uniform guess {uniform:.3f}); {args.steps} steps of {args.batch_size} "
          f"images {args.train_size}x{args.train_size}", flush=True)
    results = []
    for encoding in args.encodings:
        results.append(run(encoding, args))
        r = results[-1]
        print(f"{encoding:28s} {r['seconds']:6.1f} s  loss {r['train_size']:.3f} at {args.train_size}, "
              f"{r['eval_size']:.3f} at {args.eval_size}", flush=True)
    text = table(results, args)
    print("\n" + text)
    if args.write:
        write_section(args, text)
    return results


def write_section(args, text: str) -> None:
    import platform
    command = "python -m scripts.grid_next_patch " + shlex.join(a for a in sys.argv[1:] if a != "--write")
    body = (f"{SECTION}\n\nNext-pixel prediction on generated images of overlapping rectangles "
            f"({COLOURS} colours, raster order), 2 layers, 4 heads, n_embd {args.width}, {args.steps} AdamW steps "
            f"of {args.batch_size} images of {args.train_size}x{args.train_size}; loss (nats/pixel, uniform = "
            f"{torch.log(torch.tensor(float(COLOURS))).item():.3f}) on {args.eval_images} fresh images at the "
            f"training size and, with the same weights, at {args.eval_size}x{args.eval_size}.\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {args.threads} thread(s); load average {os.getloadavg()[1]:.1f} over the last "
            f"5 minutes of the run (other jobs on the machine stretch the times, not the losses). One seed. "
            f"Command: `{command.strip()}`\n\n{text}\n")
    bench_common.write_section(bench_common.BENCHMARKS, body)

if __name__ == "__main__":
    main()
