"""Tokeniser and data preparation: local folders -> shards that decode back to the documents."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.shards import list_shards, read_shard
from training.tokenizer import EOT, gpt2_encoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
import prepare_common  # noqa: E402
from prepare_common import DataPrepError  # noqa: E402


def _load_script(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_").replace("-", "_"), os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_tokens(out_dir, split):
    return np.concatenate([np.asarray(read_shard(p)) for p in list_shards(out_dir, split)])


def _decode_docs(tokens):
    """Documents of an EOT-first token stream, decoded independently of the writer."""
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT).tolist() + [len(tokens)]
    enc = gpt2_encoding()
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_gives_gpt2_known_ids_and_round_trips():
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]  # byte-level: '!' is id 0, ',' is 11
    assert enc.n_vocab == 50257 and enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "Positional encodings: RoPE, ALiBi & FoX — über Größen, 数学, emoji 🚀\n\tdef f(x): return x"
    assert enc.decode(enc.encode_ordinary(text)) == text


# ----------------------------------------------------------------------------- local folders

DOCS = ["A plain text file.\nSecond line.", "jsonl one", "jsonl two with ünïcödé", "parquet one",
        "parquet two", "json list doc", "nested folder text"]


@pytest.fixture
def local_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for text in DOCS[1:3]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")  # empty documents are skipped
    pq.write_table(pa.table({"text": DOCS[3:5], "score": [1.0, 2.0]}), d / "c.parquet")
    (d / "d.json").write_text(json.dumps([{"text": DOCS[5]}]), encoding="utf-8")
    (d / "sub" / "e.txt").write_text(DOCS[6], encoding="utf-8")
    (d / "notes.md").write_text("ignored: not a supported extension")
    return str(d)


def test_local_folder_shards_decode_back_to_the_documents_with_eot_separators(local_dir, tmp_path):
    out = str(tmp_path / "out")
    state = prepare_common.prepare(prepare_common.local_documents(local_dir), out, source="t", shard_size=16,
                                   val_tokens=5, progress=False)
    val, train = _split_tokens(out, "val"), _split_tokens(out, "train")
    assert len(val) == 5 and state["val_tokens"] == 5
    sizes = [len(read_shard(p)) for p in list_shards(out, "train")]
    assert all(n == 16 for n in sizes[:-1]) and 0 < sizes[-1] <= 16 and len(sizes) > 2
    stream = np.concatenate([val, train])  # val is the head of the document stream
    assert _decode_docs(stream) == DOCS  # sorted paths: a.txt, b.jsonl, c.parquet, d.json, sub/e.txt
    enc = gpt2_encoding()
    expected = np.concatenate([[EOT] + enc.encode_ordinary(t) for t in DOCS])
    assert np.array_equal(stream, expected)


def test_val_fraction_holds_out_whole_documents_deterministically(tmp_path):
    docs = [f"document number {i}: " + "words " * (i % 7) for i in range(60)] + ["a duplicate"] * 2
    out1, out2 = str(tmp_path / "p1"), str(tmp_path / "p2")
    prepare_common.prepare(iter(docs), out1, source="t", shard_size=64, val_fraction=0.25, progress=False)
    prepare_common.prepare(iter(docs), out2, source="t", shard_size=64, val_fraction=0.25, num_proc=2,
                           progress=False)
    val, train = _decode_docs(_split_tokens(out1, "val")), _decode_docs(_split_tokens(out1, "train"))
    assert sorted(val + train) == sorted(docs)  # every document exactly once, none cut
    assert 5 <= len(val) <= 30  # ~25% of 62, loosely
    assert (val.count("a duplicate"), train.count("a duplicate")) in [(2, 0), (0, 2)]  # duplicates cannot leak
    assert val == [d for d in docs if d in val] and train == [d for d in docs if d in train]  # order kept
    for split in ("train", "val"):  # the worker count does not change a byte
        for p1, p2 in zip(list_shards(out1, split), list_shards(out2, split), strict=True):
            assert open(p1, "rb").read() == open(p2, "rb").read()


def test_max_tokens_caps_the_total(tmp_path):
    docs = ["some text that is long enough to be cut " * 5] * 10
    state = prepare_common.prepare(iter(docs), str(tmp_path / "o"), source="t", shard_size=50, val_tokens=30,
                                   max_tokens=333, progress=False)
    assert state["train_tokens"] + state["val_tokens"] == 333
    assert len(_split_tokens(str(tmp_path / "o"), "train")) == 303


def test_interrupted_preparation_resumes_to_identical_shards(tmp_path):
    docs = [f"doc {i} " + "lorem ipsum " * (i % 5 + 1) for i in range(200)]
    kw = dict(source="t", shard_size=300, val_tokens=10, progress=False)
    clean = str(tmp_path / "clean")
    prepare_common.prepare(iter(docs), clean, **kw)

    def crashing():
        yield from docs[:150]  # documents are read in chunks of 64: crash in the third
        raise RuntimeError("simulated crash")

    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_common.prepare(crashing(), out, **kw)
    with open(os.path.join(out, prepare_common.STATE_FILE)) as f:
        partial = json.load(f)
    assert not partial["complete"] and partial["train_shards"] > 0
    prepare_common.prepare(iter(docs), out, **kw)
    for split in ("train", "val"):
        for p1, p2 in zip(list_shards(clean, split), list_shards(out, split), strict=True):
            assert open(p1, "rb").read() == open(p2, "rb").read()

    mtimes = [os.path.getmtime(p) for p in list_shards(out, "train")]
    prepare_common.prepare(iter(docs), out, **kw)  # complete: nothing is rewritten
    assert [os.path.getmtime(p) for p in list_shards(out, "train")] == mtimes
    with pytest.raises(DataPrepError, match="different settings"):
        prepare_common.prepare(iter(docs), out, **{**kw, "shard_size": 600})
    prepare_common.prepare(iter(docs), out, **{**kw, "shard_size": 600}, overwrite=True)
    assert len(list_shards(out, "train")) < len(list_shards(clean, "train"))


def test_bad_local_inputs_fail_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataPrepError, match="no .txt"):
        list(prepare_common.local_documents(str(empty)))
    with pytest.raises(DataPrepError, match="does not exist"):
        list(prepare_common.local_documents(str(tmp_path / "missing")))

    (tmp_path / "nofield").mkdir()
    (tmp_path / "nofield" / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(DataPrepError, match="no text field 'text'.*content"):
        list(prepare_common.local_documents(str(tmp_path / "nofield")))
    assert list(prepare_common.local_documents(str(tmp_path / "nofield"), text_field="content")) == ["hi"]

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "pq" / "x.parquet")
    with pytest.raises(DataPrepError, match="no column 'text'"):
        list(prepare_common.local_documents(str(tmp_path / "pq")))

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    with pytest.raises(DataPrepError, match="cannot read .*x.txt"):
        list(prepare_common.local_documents(str(tmp_path / "bad")))
    (tmp_path / "bad" / "x.txt").unlink()
    (tmp_path / "bad" / "y.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataPrepError, match="cannot read .*y.jsonl"):
        list(prepare_common.local_documents(str(tmp_path / "bad")))

    with pytest.raises(ValueError, match="exactly one"):
        prepare_common.prepare(iter(["x"]), str(tmp_path / "o"), source="t", val_tokens=5, val_fraction=0.1)


def test_hub_reader_streams_a_dataset_and_names_a_missing_field(tmp_path, monkeypatch):
    # load_dataset on a local folder takes the same streaming path as a hub dataset, offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a b", "", "c"]))
    assert list(prepare_common.hf_documents(str(tmp_path), None, "train")) == ["a b", "c"]
    with pytest.raises(DataPrepError, match="no field 'body'"):
        list(prepare_common.hf_documents(str(tmp_path), None, "train", text_field="body"))


# ----------------------------------------------------------------------------- the scripts

def test_fineweb_alias_script_prepares_a_local_folder(local_dir, tmp_path):
    out = str(tmp_path / "fw")
    cmd = [sys.executable, os.path.join(ROOT, "data", "fineweb-edu", "fineweb-edu.py"), "--local_dir", local_dir,
           "--out_dir", out, "--shard_size", "20", "--val_fraction", "0.3", "--num_proc", "1", "--no_progress"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=str(tmp_path))
    docs = _decode_docs(_split_tokens(out, "val")) + _decode_docs(_split_tokens(out, "train"))
    assert sorted(docs) == sorted(DOCS)


def test_openwebtext_script_prepares_a_local_file_with_its_default_split(tmp_path):
    path = tmp_path / "owt.jsonl"
    docs = [f"web page {i}" for i in range(50)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    owt = _load_script("data/openwebtext/prepare.py")
    out = str(tmp_path / "owt")
    state = owt.main(["--local_dir", str(path), "--out_dir", out, "--num_proc", "1", "--no_progress",
                      "--val_fraction", "0.2"])
    assert state["complete"] and sorted(_decode_docs(_split_tokens(out, "val")) +
                                        _decode_docs(_split_tokens(out, "train"))) == sorted(docs)
    with pytest.raises(DataPrepError, match="exactly one|no 'val'|too small"):
        owt.main(["--local_dir", str(path), "--out_dir", str(tmp_path / "o2"), "--num_proc", "1",
                  "--no_progress"])  # the default 0.05% of 50 documents is an empty validation split


def test_pydoc_corpus_prepares_offline_into_valid_shards(tmp_path):
    pydoc = _load_script("data/pydoc/prepare.py")
    out = str(tmp_path / "pydoc")
    state = pydoc.main(["--out_dir", out, "--max_tokens", "30000", "--num_proc", "1", "--no_progress"])
    train, val = _split_tokens(out, "train"), _split_tokens(out, "val")
    assert len(train) + len(val) == 30000 and len(val) > 0 and state["complete"]
    from pydoc_data.topics import topics
    first_train_doc = _decode_docs(train)[0]
    assert first_train_doc in topics.values()  # the documents are the topics, in sorted order
    assert set(_decode_docs(val)) < set(topics.values())
