"""Token shards on disk: a 256 x int32 header, then uint16 GPT-2 token ids.

Header: [MAGIC, VERSION, n_tokens, 0, ...]. Readers check the magic, the version and that
the file size matches n_tokens, so a truncated or foreign file fails with a clear error
instead of silently training on garbage.
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
    header[:3] = (MAGIC, VERSION, tokens.size)
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


def list_shards(data_dir: str, split: str) -> list[str]:
    """Sorted shard paths ``{data_dir}/{split}_*.bin``; a clear error when there are none."""
    paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
    if not paths:
        raise ShardError(f"no '{split}' shards ({split}_*.bin) in {data_dir}; prepare the data first "
                         "(see README, 'Data')")
    return paths
