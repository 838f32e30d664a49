"""Token shards on disk: a 256 x int32 header, then uint16 GPT-2 token ids.

Header: [MAGIC, VERSION, n_tokens, id_bound, 0, ...]. Readers check the magic, the version and
that the file size matches n_tokens, so a truncated or foreign file fails with a clear error
instead of silently training on garbage. ``id_bound`` is 1 + the largest token id in the shard
(0 in shards written before it was recorded: those are scanned), so a shard made with a larger
vocabulary than the model's is refused when it is opened, without reading it.
"""
from __future__ import annotations

import glob
import os

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    """A missing, truncated or foreign token shard."""


def write_shard(path: str, tokens) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = (MAGIC, VERSION, tokens.size, int(tokens.max()) + 1 if tokens.size else 0)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens (uint16), after checking its header and size."""
    if not os.path.exists(path):
        raise ShardError(f"token shard {path} does not exist")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"token shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path} is not a token shard (magic {header[0]} != {MAGIC})")
    if header[1] != VERSION:
        raise ShardError(f"token shard {path} has version {header[1]}, expected {VERSION}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        raise ShardError(f"token shard {path} is corrupt: header says {n_tokens} tokens "
                         f"({expected} bytes) but the file has {size} bytes")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def largest_token_id(path: str, tokens: np.ndarray) -> int:
    """The largest id in a shard opened with ``read_shard``: from its header when recorded,
    else one pass over the memory-mapped tokens (-1 for an empty shard)."""
    bound = int(np.fromfile(path, dtype=np.int32, count=4)[3])
    if bound > 0:
        return bound - 1
    return int(tokens.max()) if len(tokens) else -1


def check_token_ids(path: str, tokens: np.ndarray, vocab_size: int) -> None:
    """ShardError naming the file and the id if the shard holds an id >= vocab_size."""
    largest = largest_token_id(path, tokens)
    if largest >= vocab_size:
        raise ShardError(f"token shard {path} holds token id {largest}, but vocab_size is {vocab_size}: it was "
                         "tokenised with a larger vocabulary than the model's; re-prepare the data or raise "
                         "vocab_size")


def list_shards(data_dir: str, split: str) -> list[str]:
    """Sorted shard paths ``{data_dir}/{split}_*.bin``; a clear error when there are none."""
    paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
    if not paths:
        raise ShardError(f"no '{split}' shards ({split}_*.bin) in {data_dir}; prepare the data first "
                         "(see README, 'Data')")
    return paths
