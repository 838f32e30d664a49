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
"""
from __future__ import annotations

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
    return np.fromfile(path, dtype=np.uint16, count=length, offset=HEADER_BYTES + 2 * start)


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
        rows = np.stack([_window(self.paths[s], o, self.block_size + 1) for s, o in zip(shard, offsets)])
        rows = torch.from_numpy(rows.astype(np.int64))
        self.calls += 1
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

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
