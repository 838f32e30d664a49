"""Sample text from a trained model, nanoGPT-style.

    python -m scripts.sample                                   # the newest out*/ckpt.pt (what pretrain.sh left)
    python -m scripts.sample --out_dir=out-cpu-grape-ap
    python -m scripts.sample --ckpt=out/ckpt.pt --start="The meaning of life" --num_samples=3
    python -m scripts.sample --ckpt=path/to/save_pretrained_folder --start=FILE:prompt.txt

``--ckpt`` is a training checkpoint (``ckpt.pt``) or a ``save_pretrained`` folder; without it
``{out_dir}/ckpt.pt`` (or ``{out_dir}`` as a ``save_pretrained`` folder) is used, and without
``--out_dir`` the most recently written ``out*/ckpt.pt`` under the current folder. Decoding prefills
the prompt once and continues from the KV cache (``GPT.generate``); text is GPT-2 BPE.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

from training.checkpoint import CheckpointError, load_model
from training.tokenizer import EOT, gpt2_encoding


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=None, help="training output folder holding ckpt.pt "
                   "(default: the newest out*/ with a checkpoint)")
    p.add_argument("--ckpt", default=None, help="ckpt.pt file or save_pretrained folder (overrides --out_dir)")
    p.add_argument("--start", default="\n", help='prompt text, or "FILE:path" to read it from a file')
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=non_negative, default=0,
                   help="CPU threads while decoding (0: automatic, 1 for small models; see generation.decoding_threads)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype on GPU (weights stay float32, as in training)")
    return p.parse_args(argv)


def find_checkpoint(args) -> str:
    if args.ckpt is not None:
        return args.ckpt
    if args.out_dir is None:
        found = glob.glob("out*/ckpt.pt") + [os.path.dirname(p) for p in glob.glob("out*/config.json")]
        if not found:
            raise FileNotFoundError("no checkpoint in out*/ here; train one (bash pretrain.sh) or pass "
                                    "--out_dir=<folder> or --ckpt=<ckpt.pt or save_pretrained folder>")
        newest = max(found, key=os.path.getmtime)
        print(f"(sampling from {newest})", file=sys.stderr)
        return newest
    for candidate in (os.path.join(args.out_dir, "ckpt.pt"), args.out_dir):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"no checkpoint in {args.out_dir!r}; train one (bash pretrain.sh) "
                            "or pass --ckpt=<ckpt.pt or save_pretrained folder>")


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        with open(start[len("FILE:"):], encoding="utf-8") as f:
            return f.read()
    return start


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    model = load_model(find_checkpoint(args), map_location="cpu")
    torch.manual_seed(args.seed)       # after loading: building the model draws random numbers
    model.to(args.device).eval()
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")

    enc = gpt2_encoding()
    prompt = enc.encode(read_prompt(args.start), allowed_special={"<|endoftext|>"}) or [EOT]
    room = model.config.block_size - len(prompt) + 1
    if room < 1:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than block_size={model.config.block_size}")
    if args.max_new_tokens > room:
        print(f"(max_new_tokens {args.max_new_tokens} -> {room}: block_size={model.config.block_size})",
              file=sys.stderr)
    max_new = min(args.max_new_tokens, room)

    idx = torch.tensor([prompt], dtype=torch.long, device=args.device)
    texts = []
    for _ in range(args.num_samples):
        with autocast:
            out = model.generate(idx, max_new, temperature=args.temperature, top_k=args.top_k,
                                 threads=args.threads)
        # the embedding is padded past GPT-2's 50257 tokens; an untrained model may pick those ids
        tokens = [t for t in out[0].tolist() if t < enc.n_vocab]
        texts.append(enc.decode(tokens))
        print(texts[-1])
        print("---------------")
    return texts


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileNotFoundError) as e:    # the message names the path
        sys.exit(f"error: {e}")
