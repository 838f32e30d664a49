"""The offline corpus with a 4,096-token vocabulary: data/pydoc's shards, re-numbered.

    python data/pydoc4k/prepare.py            # writes data/pydoc4k/{train,val}_000000.bin + vocab.json

Why: on a CPU the GPT-2 output layer (50,304 x n_embd) costs most of a small model's step; with
4,096 ids a 4-layer, n_embd-128 model trains about 6x faster, which is what lets a two-hour CPU
study train language models long enough to use their context (scripts/position_study.py).
The text is the same: the 4,095 most frequent GPT-2 tokens of the training split keep their
place, numbered by frequency (ties: the smaller GPT-2 id first), and every other token becomes
id 4,095 (about 3% of the tokens of both splits). ``vocab.json`` lists the GPT-2 id of every new
id (the last entry, -1, is the catch-all), so text can be decoded back. Prepares data/pydoc
first when it is missing; rerunning with the same source does nothing.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(HERE)
sys.path.insert(0, DATA)  # data/, for prepare_common
import prepare_common  # noqa: E402

SOURCE = os.path.join(DATA, "pydoc")


def frequency_ranking(tokens: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` most frequent ids, most frequent first; equal counts: smaller id first."""
    counts = np.bincount(tokens, minlength=2 ** 16)
    order = np.lexsort((np.arange(len(counts)), -counts))    # last key sorts first
    return order[:keep]


def renumbering(kept: np.ndarray, catch_all: int) -> np.ndarray:
    """A table old id -> new id: kept[i] -> i, everything else -> catch_all."""
    table = np.full(2 ** 16, catch_all, dtype=np.uint16)
    table[kept] = np.arange(len(kept), dtype=np.uint16)
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab_size", type=int, default=4096, help="ids in the new vocabulary, the catch-all included")
    p.add_argument("--out_dir", default=HERE)
    args = p.parse_args(argv)
    if not 2 <= args.vocab_size <= 2 ** 16:
        p.error(f"--vocab_size must lie in [2, 65536], got {args.vocab_size}")
    source_state = os.path.join(SOURCE, prepare_common.STATE_FILE)
    if not os.path.exists(source_state):
        import runpy
        saved = sys.argv
        sys.argv = [os.path.join(SOURCE, "prepare.py")]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        finally:
            sys.argv = saved
    with open(source_state) as f:
        source = json.load(f)
    settings = {"source": source["settings"], "source_train_tokens": source["train_tokens"],
                "vocab_size": args.vocab_size}
    state_path = os.path.join(args.out_dir, prepare_common.STATE_FILE)
    if os.path.exists(state_path):
        with open(state_path) as f:
            if json.load(f).get("settings") == settings:
                print(f"{args.out_dir}: up to date")
                return settings
    train = [prepare_common.read_shard(q) for q in prepare_common.list_shards(SOURCE, "train")]
    kept = frequency_ranking(np.concatenate(train), args.vocab_size - 1)
    table = renumbering(kept, args.vocab_size - 1)
    os.makedirs(args.out_dir, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        n = covered = 0
        for path in prepare_common.list_shards(SOURCE, split):
            new = table[np.asarray(prepare_common.read_shard(path))]
            prepare_common.write_shard(os.path.join(args.out_dir, os.path.basename(path)), new)
            n += len(new)
            covered += int((new != args.vocab_size - 1).sum())
        counts[split] = (n, covered)
    with open(os.path.join(args.out_dir, "vocab.json"), "w") as f:
        json.dump({"gpt2_id": kept.tolist() + [-1]}, f)
    state = {"settings": settings, "complete": True,
             **{f"{s}_tokens": n for s, (n, _) in counts.items()},
             **{f"{s}_kept_fraction": round(c / n, 4) for s, (n, c) in counts.items()}}
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, state_path)
    print(f"{args.out_dir}: " + ", ".join(f"{n:,} {s} tokens ({c / n:.1%} kept, the rest -> {args.vocab_size - 1})"
                                          for s, (n, c) in counts.items()))
    return settings


if __name__ == "__main__":
    main()
