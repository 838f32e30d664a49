"""Training batches from token shards (see shards.py and data/prepare_common.py).

Every batch row is a random window of block_size + 1 consecutive tokens from one shard
(x = the first block_size, y = the last block_size), so all windows in the split are equally
likely: a shard is chosen with probability proportional to its number of windows.

Two ways to make the order reproducible (README, "Determinism"):
- "stateless": the batch is a pure function of (seed, rank, step, micro_step). Runs repeat
  exactly, a resumed run sees the same batches it would have seen, ranks see different data,
  and nothing needs to be checkpointed.
- "stateful": one random stream per rank, advanced on every call; ``state_dict()`` holds its
  state so a checkpoint restores the stream exactly (same WORLD_SIZE/RANK mapping needed).

Rows are read with np.fromfile at an offset instead of a long-lived np.memmap: nothing stays
mapped, so resident memory does not creep up over a long run (nanoGPT's memmap note).

Every batch is checked on the host before it reaches the model, cheaply: its largest token id
against ``vocab_size`` (a damaged shard body under a valid header would otherwise be an
IndexError, or a device-side assert on a GPU), and each shard it reads against the size,
modification time and inode recorded when the shard was opened (a shard truncated or rewritten
under a running job would otherwise train on garbage and look like a divergence). Both are a
``ShardError`` naming the shard: a data error, never a rollback.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from training.shards import HEADER_BYTES, ShardError, check_token_ids, list_shards, read_shard

MODES = ("stateless", "stateful")


def _load_shards(data_dir: str, split: str, block_size: int,
                 vocab_size: int | None = None) -> tuple[list[str], np.ndarray]:
    """Paths and token counts of the split's shards, each checked (header, size, length and,
    given ``vocab_size``, the range of its token ids)."""
    paths = list_shards(data_dir, split)
    lengths = []
    for path in paths:
        tokens = read_shard(path)
        if vocab_size is not None:
            check_token_ids(path, tokens, vocab_size)
        n = len(tokens)
        del tokens                              # nothing stays mapped (see the module docstring)
        if n < block_size + 1:
            raise ShardError(f"token shard {path} has {n} tokens, fewer than block_size + 1 = {block_size + 1}; "
                             "use a smaller block_size or re-prepare the data with larger shards")
        lengths.append(n)
    return paths, np.array(lengths, dtype=np.int64)


def _window(path: str, start: int, length: int) -> np.ndarray:
    row = np.fromfile(path, dtype=np.uint16, count=length, offset=HEADER_BYTES + 2 * start)
    if len(row) != length:
        raise ShardError(f"token shard {path} changed while this run was reading it: it ends before token "
                         f"{start + length}; {RESTORE_ADVICE}")
    return row


RESTORE_ADVICE = ("a running job's data must stay as it was: restore the shard (or re-prepare the data) and "
                  "resume with --init_from=resume")


def identity(path: str) -> tuple[int, int, int, int]:
    """What changes when a file is truncated, rewritten or replaced: inode, size, mtime."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def describe_change(path: str, before: tuple, now: tuple) -> str:
    if before[:2] != now[:2]:
        return f"token shard {path} was replaced by another file while this run was reading it"
    if before[2] != now[2]:
        return f"token shard {path} changed size while this run was reading it ({before[2]} -> {now[2]} bytes)"
    return f"token shard {path} was rewritten while this run was reading it (its modification time changed)"


class TokenBatches:
    """Random (x, y) batches of one split: x, y int64 (batch_size, block_size), y = x shifted by one."""

    def __init__(self, data_dir: str, split: str, batch_size: int, block_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1337, mode: str = "stateless", vocab_size: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown data_rng_mode {mode!r}; expected one of {MODES}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.data_dir, self.split, self.mode = data_dir, split, mode
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.paths, self.lengths = _load_shards(data_dir, split, block_size, vocab_size)
        self.identities = [identity(path) for path in self.paths]   # read-only from here on
        self.vocab_size = vocab_size
        # window starts per shard: 0 .. n - block_size - 1; cumulative counts map a global index to a shard
        self.cum_windows = np.cumsum(self.lengths - block_size)
        self.calls = 0
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, rank])) if mode == "stateful" else None

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def _rng_for(self, step: int, micro_step: int) -> np.random.Generator:
        if self.mode == "stateful":
            return self._rng
        if step < 0 or micro_step < 0:
            raise ValueError(f"step and micro_step must be non-negative, got {step} and {micro_step}")
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, step, micro_step]))

    def _draw_starts(self, rng: np.random.Generator) -> np.ndarray:
        """Global window indices of one batch: all a batch takes from the random stream."""
        return rng.integers(0, self.cum_windows[-1], size=self.batch_size)

    def get(self, step: int = 0, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for (step, micro_step); in "stateful" mode the next batch of the stream
        (step and micro_step are then ignored)."""
        starts = self._draw_starts(self._rng_for(step, micro_step))
        shard = np.searchsorted(self.cum_windows, starts, side="right")
        offsets = starts - np.concatenate(([0], self.cum_windows))[shard]
        self.check_unchanged(np.unique(shard))
        rows = np.stack([_window(self.paths[s], o, self.block_size + 1) for s, o in zip(shard, offsets)])
        self.check_token_ids(rows, shard, offsets)
        rows = torch.from_numpy(rows.astype(np.int64))
        self.calls += 1
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def check_unchanged(self, shards) -> None:
        """ShardError if a shard was truncated, rewritten or replaced since it was opened."""
        for s in shards:
            try:
                now = identity(self.paths[s])
            except FileNotFoundError:
                raise ShardError(f"token shard {self.paths[s]} was deleted while this run was reading it; "
                                 f"{RESTORE_ADVICE}") from None
            if now != self.identities[s]:
                raise ShardError(f"{describe_change(self.paths[s], self.identities[s], now)}; {RESTORE_ADVICE}")

    def check_token_ids(self, rows: np.ndarray, shard: np.ndarray, offsets: np.ndarray) -> None:
        """ShardError naming the shard and position of an id >= vocab_size (one max per row)."""
        if self.vocab_size is None:
            return
        largest = rows.max(axis=1)
        bad = np.flatnonzero(largest >= self.vocab_size)
        if len(bad):
            r = bad[0]
            j = int(np.argmax(rows[r] >= self.vocab_size))
            raise ShardError(f"token shard {self.paths[shard[r]]} holds token id {int(rows[r, j])} at token "
                             f"{int(offsets[r]) + j}, "
                             f"but vocab_size is {self.vocab_size}: its body does not match its header (a damaged "
                             "shard, or one tokenised with a larger vocabulary); re-prepare the data")

    def skip(self, n_batches: int) -> None:
        """Advance a "stateful" stream past ``n_batches`` batches without reading them (a
        "stateless" loader has no stream: skip there by asking for later steps)."""
        if self.mode != "stateful":
            raise ValueError("skip() advances a stateful stream; stateless batches are addressed by step")
        for _ in range(n_batches):
            self._draw_starts(self._rng)
        self.calls += n_batches

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this stream (only the RNG matters in "stateful" mode)."""
        state = dict(mode=self.mode, seed=self.seed, rank=self.rank, world_size=self.world_size,
                     split=self.split, calls=self.calls)
        if self._rng is not None:
            state["bit_generator"] = self._rng.bit_generator.state
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "seed", "rank", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"data loader state is for {key}={state.get(key)!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; resume with the same settings and "
                                 "WORLD_SIZE/RANK mapping")
        if self._rng is not None:
            self._rng.bit_generator.state = state["bit_generator"]
        self.calls = int(state.get("calls", 0))


def iter_sequential(data_dir: str, split: str, block_size: int, max_tokens: int | None = None):
    """Yield (x, y), int64 tensors of shape (block_size,), from consecutive non-overlapping windows
    of block_size + 1 tokens, shard by shard in order (a shard's tail shorter than a window is
    skipped). For evaluation by position. ``max_tokens`` caps the x tokens yielded
    (max_tokens // block_size windows)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    paths = list_shards(data_dir, split)
    lengths = [len(read_shard(p)) for p in paths]  # validate everything before yielding anything
    if max(lengths) < block_size + 1:
        raise ShardError(f"no '{split}' shard in {data_dir} holds block_size + 1 = {block_size + 1} tokens "
                         f"(longest: {max(lengths)})")
    budget = None if max_tokens is None else max_tokens // block_size
    if budget == 0:
        raise ValueError(f"max_tokens={max_tokens} is smaller than one window of block_size={block_size}")
    w = block_size + 1
    for path, n in zip(paths, lengths):
        for start in range(0, n - w + 1, w):
            if budget is not None:
                if budget == 0:
                    return
                budget -= 1
            row = torch.from_numpy(_window(path, start, w).astype(np.int64))
            yield row[:-1], row[1:]
