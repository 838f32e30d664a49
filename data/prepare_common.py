"""Shared data preparation: documents -> GPT-2 tokens -> uint16 shards (see shards.py).

Documents come from a Hugging Face dataset (streamed, so nothing is downloaded up front) or
from a local folder of .txt / .jsonl / .json / .parquet files, for clusters without internet.
Each document is tokenised as [EOT] + encode_ordinary(text), as nanoGPT and llm.c do, in
parallel worker processes, and the token stream is cut into fixed-size shards

    {out_dir}/train_000000.bin, train_000001.bin, ...   (shard_size tokens each, the last shorter)
    {out_dir}/val_000000.bin, ...

The validation split is deterministic: either the first ``val_tokens`` tokens of the stream
(llm.c's convention for FineWeb) or the documents whose content hash falls below
``val_fraction`` (duplicates of a document land in the same split, so they cannot leak).
The output does not depend on num_proc: results are consumed in document order.

Resumable: after every train shard, ``{out_dir}/prepare_state.json`` records where in the
document stream that shard ended; a rerun with the same settings skips the finished shards
(and exits at once when everything is done). Different settings need ``--overwrite``.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the prepare scripts run from data/<name>/; training/ lives at the root
    sys.path.insert(0, ROOT)

from training.progress import progress_bar  # noqa: E402
from training.shards import list_shards, read_shard, write_shard  # noqa: E402
from training.tokenizer import EOT, gpt2_encoding  # noqa: E402

LOCAL_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
STATE_FILE = "prepare_state.json"


class DataPrepError(ValueError):
    """Bad input to data preparation (empty folder, missing text field, unreadable file)."""


# ----------------------------------------------------------------------------- reading documents

def _records_text(records, text_field: str, where: str):
    for k, rec in enumerate(records):
        if not isinstance(rec, dict) or text_field not in rec:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataPrepError(f"{where}: record {k} has no text field '{text_field}' "
                                f"(it has {keys}); pass --text_field")
        text = rec[text_field]
        if text is not None and not isinstance(text, str):
            raise DataPrepError(f"{where}: record {k} field '{text_field}' is {type(text).__name__}, not text")
        yield text


def _read_json(path: str, text_field: str):
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data" = several objects: JSON lines in a .json file
            raise
        yield from _read_jsonl_lines(raw.splitlines(), text_field, path)
        return
    records = obj if isinstance(obj, list) else [obj]
    yield from _records_text(records, text_field, path)


def _read_jsonl_lines(lines, text_field: str, path: str):
    records = (json.loads(line) for line in lines if line.strip())
    yield from _records_text(records, text_field, path)


def _read_parquet(path: str, text_field: str):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataPrepError(f"{path}: no column '{text_field}' (columns: {pf.schema_arrow.names}); "
                            "pass --text_field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _read_file(path: str, text_field: str):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            yield f.read()
    elif ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            yield from _read_jsonl_lines(f, text_field, path)
    elif ext == ".json":
        yield from _read_json(path, text_field)
    else:
        yield from _read_parquet(path, text_field)


def local_files(local_dir: str) -> list[str]:
    """Supported files under ``local_dir`` (recursively), sorted by relative path for a fixed order."""
    if os.path.isfile(local_dir):
        files = [local_dir]
    elif os.path.isdir(local_dir):
        files = sorted(p for p in glob.glob(os.path.join(local_dir, "**", "*"), recursive=True)
                       if os.path.isfile(p) and p.lower().endswith(LOCAL_EXTENSIONS))
    else:
        raise DataPrepError(f"local data folder {local_dir} does not exist")
    if not files:
        raise DataPrepError(f"no {'/'.join(LOCAL_EXTENSIONS)} files in {local_dir}")
    return files


def local_documents(local_dir: str, text_field: str = "text"):
    """Texts of every document in a local folder (or one file), in a deterministic order."""
    for path in local_files(local_dir):
        try:
            for text in _read_file(path, text_field):
                if text:  # empty/None documents carry no tokens worth an EOT
                    yield text
        except DataPrepError:
            raise
        except Exception as e:  # decoding errors, malformed JSON/parquet, permissions
            raise DataPrepError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def hf_documents(dataset: str, name: str | None, split: str, text_field: str = "text", revision: str | None = None):
    """Texts of a Hugging Face dataset, streamed (needs internet, or a warm HF cache)."""
    from datasets import load_dataset
    try:
        ds = load_dataset(dataset, name=name, split=split, streaming=True, revision=revision)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        raise DataPrepError(f"{dataset} still uses a loading script, which datasets>=4 cannot run; pass "
                            "--revision refs/convert/parquet (the hub's parquet export, which may be partial "
                            "for big datasets) or download the data and pass --local_dir") from e
    for k, rec in enumerate(ds):
        if text_field not in rec:
            raise DataPrepError(f"{dataset} ({name}, {split}): no field '{text_field}' "
                                f"(fields: {sorted(rec)}); pass --text_field")
        if rec[text_field]:
            yield rec[text_field]


# ----------------------------------------------------------------------------- tokenising

def _in_val(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < val_fraction * 2 ** 64


def _tokenize_many(texts, val_fraction):
    enc = gpt2_encoding()
    out = []
    for text in texts:
        toks = np.array([EOT] + enc.encode_ordinary(text), dtype=np.uint16)
        out.append((toks, val_fraction > 0 and _in_val(text, val_fraction)))
    return out


def tokenize_stream(texts, num_proc: int, val_fraction: float = 0.0, chunk_docs: int = 64):
    """Yield (uint16 tokens, goes_to_val) per document, in input order.

    At most 4 * num_proc chunks are in flight, so a fast reader cannot pile the whole
    dataset up in memory (Pool.imap consumes its input eagerly).
    """
    texts = iter(texts)  # islice on a list would restart at its head every time
    chunks = iter(lambda: list(itertools.islice(texts, chunk_docs)), [])
    if num_proc <= 1:
        for chunk in chunks:
            yield from _tokenize_many(chunk, val_fraction)
        return
    with mp.Pool(num_proc) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_tokenize_many, (chunk, val_fraction)))
            if len(pending) >= 4 * num_proc:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ----------------------------------------------------------------------------- writing shards

class _ShardWriter:
    """Fills fixed-size shards {out_dir}/{split}_NNNNNN.bin from a stream of token arrays."""

    def __init__(self, out_dir, split, shard_size, first_index=0):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.index = first_index
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.written = 0  # tokens written by this run

    def add(self, toks) -> int:
        """Append as many tokens as fit in the current shard; returns how many were taken."""
        n = min(len(toks), self.shard_size - self.fill)
        self.buf[self.fill:self.fill + n] = toks[:n]
        self.fill += n
        return n

    @property
    def full(self) -> bool:
        return self.fill == self.shard_size

    def flush(self) -> None:
        if self.fill:
            write_shard(os.path.join(self.out_dir, f"{self.split}_{self.index:06d}.bin"), self.buf[:self.fill])
            self.written += self.fill
            self.index += 1
            self.fill = 0


def _write_state(out_dir, state) -> None:
    tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, STATE_FILE))


def _existing_shards(out_dir):
    found = []
    for split in ("train", "val"):
        try:
            found += list_shards(out_dir, split)
        except ValueError:
            pass
    return found


def prepare(documents, out_dir: str, *, source: str, shard_size: int = 100_000_000,
            val_tokens: int = 0, val_fraction: float = 0.0, max_tokens: int | None = None,
            num_proc: int = 1, overwrite: bool = False, rebuild_if_changed: bool = False,
            progress: bool = True) -> dict:
    """Tokenise ``documents`` (an iterable of str) into shards under ``out_dir``.

    ``source`` names the input (dataset / folder) so a rerun can tell whether existing shards
    came from the same preparation. Exactly one of ``val_tokens`` (first N tokens of the
    stream) and ``val_fraction`` (hash-selected documents) must be positive. ``max_tokens``
    caps train + val tokens (the last document is cut). ``rebuild_if_changed`` replaces shards
    made with other settings instead of refusing (for corpora that are cheap to rebuild).
    Returns the final state (token and shard counts).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if (val_tokens > 0) == (val_fraction > 0):
        raise ValueError(f"set exactly one of val_tokens ({val_tokens}) and val_fraction ({val_fraction})")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    os.makedirs(out_dir, exist_ok=True)
    settings = dict(source=source, shard_size=shard_size, val_tokens=val_tokens,
                    val_fraction=val_fraction, max_tokens=max_tokens, tokenizer="gpt2", eot_first=True)

    # --- resume: skip what an earlier run with the same settings finished
    state_path = os.path.join(out_dir, STATE_FILE)
    state = None
    if os.path.exists(state_path) and not overwrite:
        with open(state_path) as f:
            state = json.load(f)
        if state["settings"] != settings and rebuild_if_changed:
            print(f"{out_dir}: settings changed, rebuilding")
            overwrite, state = True, None
        elif state["settings"] != settings:
            raise DataPrepError(f"{out_dir} holds shards prepared with different settings "
                                f"({state['settings']} != {settings}); pass --overwrite to replace them")
    elif _existing_shards(out_dir) and not overwrite:
        raise DataPrepError(f"{out_dir} already has shards but no {STATE_FILE}; pass --overwrite to replace them")
    if overwrite:
        for path in _existing_shards(out_dir):
            os.remove(path)
        if os.path.exists(state_path):
            os.remove(state_path)
    if state is not None:
        for path in _existing_shards(out_dir):  # every recorded shard must still be intact
            read_shard(path)
        if state["complete"]:
            print(f"{out_dir}: already prepared ({state['train_tokens']:,} train / {state['val_tokens']:,} val "
                  f"tokens); nothing to do")
            return state
        print(f"{out_dir}: resuming after {state['train_shards']} train shards (document {state['next_doc']:,})")
        # shards past the last recorded one are from the crashed run: they will be rewritten
    else:
        state = dict(settings=settings, complete=False, next_doc=0, doc_offset=0,
                     train_shards=0, val_shards=0, train_tokens=0, val_tokens=0)

    train = _ShardWriter(out_dir, "train", shard_size, state["train_shards"])
    val = _ShardWriter(out_dir, "val", shard_size, state["val_shards"])
    val_left = max(val_tokens - state["val_tokens"], 0)
    budget = None if max_tokens is None else max_tokens - state["train_tokens"] - state["val_tokens"]
    skip_docs, skip_toks = state["next_doc"], state["doc_offset"]

    state_train0, state_val0 = state["train_tokens"], state["val_tokens"]

    def checkpoint(doc, offset, complete=False):
        state.update(next_doc=doc, doc_offset=offset, complete=complete,
                     train_shards=train.index, val_shards=val.index,
                     train_tokens=state_train0 + train.written, val_tokens=state_val0 + val.written)
        _write_state(out_dir, state)

    checkpoint(skip_docs, skip_toks)  # from now on a rerun resumes instead of refusing
    documents = itertools.islice(iter(documents), skip_docs, None)
    bar = None
    if progress:
        bar = progress_bar(total=max_tokens, initial=state_train0 + state_val0, unit="tok", unit_scale=True,
                           desc=f"tokenizing {source}")
    doc = skip_docs
    for doc, (toks, to_val) in enumerate(tokenize_stream(documents, num_proc, val_fraction), start=skip_docs):
        pos = skip_toks if doc == skip_docs else 0
        if budget is not None:
            toks = toks[:pos + budget]
        while pos < len(toks):
            if val_left > 0:  # val_tokens mode: the stream's first tokens
                n = val.add(toks[pos:pos + val_left])
                val_left -= n
            elif to_val:  # val_fraction mode: whole documents
                n = val.add(toks[pos:])
            else:
                n = train.add(toks[pos:])
            pos += n
            if budget is not None:
                budget -= n
            if bar is not None:
                bar.update(n)
            flushed = train.full or val.full or (val_tokens and val_left == 0 and val.fill)
            if train.full:
                train.flush()
                if val_fraction:  # keep val in step with train, so a resume point covers both
                    val.flush()
            if val.full or (val_tokens and val_left == 0):
                val.flush()
            if flushed and train.fill == 0 and val.fill == 0:  # nothing buffered: a clean resume point
                checkpoint(doc, pos)
        if budget is not None and budget <= 0:
            break
    if bar is not None:
        bar.close()
    n_train, n_val = state_train0 + train.written + train.fill, state_val0 + val.written + val.fill
    if n_train == 0 or n_val == 0:  # unusable output: fail before marking it complete
        raise DataPrepError(f"{source}: {n_train} train and {n_val} val tokens; the input is too small for "
                            "this split (change val_tokens/val_fraction)")
    train.flush()
    val.flush()
    checkpoint(doc + 1, 0, complete=True)
    print(f"{out_dir}: {state['train_tokens']:,} train tokens in {state['train_shards']} shards, "
          f"{state['val_tokens']:,} val tokens in {state['val_shards']} shards")
    return state


# ----------------------------------------------------------------------------- command line

def add_common_args(p: argparse.ArgumentParser, *, out_dir: str, shard_size: int = 100_000_000,
                    val_tokens: int = 0, val_fraction: float = 0.0, max_tokens: int | None = None):
    p.add_argument("--out_dir", default=out_dir, help="output folder (default: %(default)s)")
    p.add_argument("--shard_size", type=int, default=shard_size, help="tokens per shard (default: %(default)s)")
    p.add_argument("--val_tokens", type=int, default=None,
                   help=f"validation = the first N tokens of the stream (default: {val_tokens or 'off'})")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="validation = this fraction of documents, chosen by a hash of their text; "
                        f"replaces --val_tokens (default: {val_fraction or 'off'})")
    p.set_defaults(default_val_split=(val_tokens, val_fraction))
    p.add_argument("--max_tokens", type=int, default=max_tokens,
                   help="stop after this many tokens in all (default: %(default)s = everything)")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokeniser processes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace shards from an earlier preparation")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_source_args(p: argparse.ArgumentParser, *, dataset: str, name: str | None, split: str = "train"):
    p.add_argument("--dataset", default=dataset, help="Hugging Face dataset (default: %(default)s)")
    p.add_argument("--name", default=name, help="dataset config name (default: %(default)s)")
    p.add_argument("--split", default=split, help="dataset split (default: %(default)s)")
    p.add_argument("--local_dir", default=None,
                   help="read a local folder (or file) of .txt/.jsonl/.json/.parquet files instead of "
                        "the hub, for clusters without internet")
    p.add_argument("--revision", default=None, help="dataset revision (branch, tag or commit) on the hub")
    p.add_argument("--text_field", default="text", help="field/column holding the text (default: %(default)s)")


def run_from_args(args) -> dict:
    """Prepare from --local_dir when given, else stream --dataset from the hub."""
    val_tokens, val_fraction = args.val_tokens, args.val_fraction
    if val_tokens is None and val_fraction is None:
        val_tokens, val_fraction = args.default_val_split
    val_tokens, val_fraction = val_tokens or 0, val_fraction or 0.0
    if args.local_dir:
        docs, source = local_documents(args.local_dir, args.text_field), f"local:{os.path.abspath(args.local_dir)}"
    else:
        docs, source = hf_documents(args.dataset, args.name, args.split, args.text_field, args.revision), \
            f"hf:{args.dataset}/{args.name}/{args.split}@{args.revision}"
    return prepare(docs, args.out_dir, source=source, shard_size=args.shard_size, val_tokens=val_tokens,
                   val_fraction=val_fraction, max_tokens=args.max_tokens, num_proc=args.num_proc,
                   overwrite=args.overwrite, progress=not args.no_progress)
