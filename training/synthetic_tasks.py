"""Position-sensitive synthetic tasks, generated on the fly from a seed (no files).

Every sequence starts with its task's token, holds ``length + 1`` tokens (the model reads the
first ``length`` and predicts the next token at every position) and marks the positions whose
token is an answer: only those are trained on and scored. Four tasks, each needing a different
use of position:

- ``recall`` (multi-query associative recall): ``n`` key-value pairs, SEP, then ``q`` of the keys
  again, each followed by its value. Keys are distinct; the number of pairs grows with the length,
  so a longer sequence means more pairs and longer distances between a pair and its query.
- ``copy``: ``n`` distinct symbols, SEP, the same symbols again (every copied symbol is an answer).
  The source lies ``n + 1`` positions back from its copy, half the sequence.
- ``passkey``: random filler, somewhere in it the marker KEY and a 5-token key, more filler, then
  QUERY and the key again (its 5 tokens are the answers). Only the distance between the key and the
  query grows with the length; the content to retrieve does not.
- ``lag`` ("which token was k positions back"): a stream of random symbols in which a token
  BACK_k (k = 1..8) now and then asks for the symbol k positions before it; the next token is the
  answer. The look-up distance stays at most 8 whatever the length, so what longer sequences test
  is whether the encoding still counts exactly at positions it was never trained on.

Token ids are laid out in ``VOCAB``; the model's ``vocab_size`` is ``VOCAB.size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS = ("recall", "copy", "passkey", "lag")


@dataclass(frozen=True)
class Vocabulary:
    """Disjoint ranges of token ids."""
    n_symbols: int = 256      # keys, copy strings, the lag stream
    n_values: int = 64        # recall values, passkey tokens
    n_filler: int = 16        # passkey filler
    max_lag: int = 8          # BACK_1 .. BACK_max_lag

    # fixed ids
    @property
    def task_tokens(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(TASKS)}

    PAD = len(TASKS)          # after the answer, to fill a sequence to its length
    SEP = PAD + 1
    KEY = PAD + 2
    QUERY = PAD + 3

    @property
    def back_start(self) -> int:
        return self.QUERY + 1

    def back(self, k: int) -> int:
        return self.back_start + k - 1

    @property
    def filler_start(self) -> int:
        return self.back_start + self.max_lag

    @property
    def symbol_start(self) -> int:
        return self.filler_start + self.n_filler

    @property
    def value_start(self) -> int:
        return self.symbol_start + self.n_symbols

    @property
    def size(self) -> int:
        return self.value_start + self.n_values


VOCAB = Vocabulary()
PASSKEY_TOKENS = 5
LAG_GAP = (VOCAB.max_lag + 2, VOCAB.max_lag + 6)   # spacing of lag queries: never look back onto a query


class TaskError(ValueError):
    """A task cannot be laid out at the asked length."""


def _sequence(task: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    seq = np.full(length + 1, VOCAB.PAD, dtype=np.int64)
    seq[0] = VOCAB.task_tokens[task]
    return seq, np.zeros(length + 1, dtype=bool)


def recall_counts(length: int) -> tuple[int, int]:
    """(pairs, queries) at this length: a query for every second pair."""
    queries = max(1, (length - 1) // 6)
    pairs = (length - 1 - 2 * queries) // 2
    return pairs, queries


def recall(length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pairs, queries = recall_counts(length)
    if pairs < queries or pairs > VOCAB.n_symbols:
        raise TaskError(f"recall at length {length} needs {pairs} distinct keys; "
                        f"1..{VOCAB.n_symbols} fit (and at least {queries})")
    seq, answer = _sequence("recall", length)
    keys = VOCAB.symbol_start + rng.choice(VOCAB.n_symbols, pairs, replace=False)
    values = VOCAB.value_start + rng.integers(0, VOCAB.n_values, pairs)
    seq[1:1 + 2 * pairs:2], seq[2:2 + 2 * pairs:2] = keys, values
    seq[1 + 2 * pairs] = VOCAB.SEP
    asked = rng.choice(pairs, queries, replace=False)
    start = 2 + 2 * pairs
    seq[start:start + 2 * queries:2], seq[start + 1:start + 1 + 2 * queries:2] = keys[asked], values[asked]
    answer[start + 1:start + 1 + 2 * queries:2] = True
    return seq, answer


def copy(length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = (length - 1) // 2
    if not 1 <= n <= VOCAB.n_symbols:
        raise TaskError(f"copy at length {length} needs {n} distinct symbols; 1..{VOCAB.n_symbols} fit")
    seq, answer = _sequence("copy", length)
    source = VOCAB.symbol_start + rng.choice(VOCAB.n_symbols, n, replace=False)
    seq[1:1 + n] = source
    seq[1 + n] = VOCAB.SEP
    seq[2 + n:2 + 2 * n] = source
    answer[2 + n:2 + 2 * n] = True
    return seq, answer


def passkey(length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    m = PASSKEY_TOKENS
    query = length - m                    # QUERY, then the key's m tokens up to the last position
    last_start = query - (m + 1)          # KEY + m tokens must end before QUERY
    if last_start < 1:
        raise TaskError(f"passkey at length {length} needs at least {2 * m + 3} tokens")
    seq, answer = _sequence("passkey", length)
    seq[1:query] = VOCAB.filler_start + rng.integers(0, VOCAB.n_filler, query - 1)
    key = VOCAB.value_start + rng.choice(VOCAB.n_values, m, replace=False)
    at = int(rng.integers(1, last_start + 1))
    seq[at], seq[at + 1:at + 1 + m] = VOCAB.KEY, key
    seq[query], seq[query + 1:query + 1 + m] = VOCAB.QUERY, key
    answer[query + 1:query + 1 + m] = True
    return seq, answer


def lag(length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    K = VOCAB.max_lag
    if length < K + 2:
        raise TaskError(f"lag at length {length} needs at least {K + 2} tokens")
    seq, answer = _sequence("lag", length)
    seq[1:] = VOCAB.symbol_start + rng.integers(0, VOCAB.n_symbols, length)
    p = K + 1 + int(rng.integers(0, LAG_GAP[1] - LAG_GAP[0] + 1))   # first query: K symbols before it
    while p + 1 <= length:
        k = int(rng.integers(1, K + 1))
        seq[p], seq[p + 1] = VOCAB.back(k), seq[p - k]
        answer[p + 1] = True
        p += int(rng.integers(LAG_GAP[0], LAG_GAP[1] + 1))
    return seq, answer


GENERATORS = {"recall": recall, "copy": copy, "passkey": passkey, "lag": lag}


def check_tasks(tasks, lengths) -> None:
    """TaskError (one line) if a task is unknown or cannot be laid out at one of the lengths."""
    for task in tasks:
        if task not in GENERATORS:
            raise TaskError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        for length in lengths:
            GENERATORS[task](int(length), np.random.default_rng(0))


def batch(tasks: list[str], length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sequence per entry of ``tasks``: inputs (B, length) and targets (B, length), the
    target -1 (ignored by the loss) wherever the next token is not an answer."""
    rows = [GENERATORS[t](length, rng) for t in tasks]
    seqs = np.stack([s for s, _ in rows])
    answers = np.stack([a for _, a in rows])
    targets = np.where(answers[:, 1:], seqs[:, 1:], -1)
    return seqs[:, :-1], targets


def training_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x7A5C])


def evaluation_set(task: str, length: int, n: int, eval_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same ``n`` sequences of ``task`` at ``length`` for every model: a function of
    (eval_seed, task, length) only, drawn from a stream no training run uses."""
    rng = np.random.default_rng([eval_seed, 0xE7A1, TASKS.index(task), length])
    return batch([task] * n, length, rng)
