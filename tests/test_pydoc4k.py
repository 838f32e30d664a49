"""data/pydoc4k/prepare.py: the most frequent ids keep their place by rank, every other id becomes
the catch-all, vocab.json maps the new ids back, and a second run changes nothing."""
import collections
import importlib.util
import json
import os

import numpy as np

from training.shards import read_shard, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_prepare():
    spec = importlib.util.spec_from_file_location("pydoc4k_prepare", os.path.join(ROOT, "data", "pydoc4k", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shards_are_renumbered_by_frequency_and_map_back(tmp_path, monkeypatch):
    prep = load_prepare()
    source, out = tmp_path / "pydoc", tmp_path / "pydoc4k"
    source.mkdir()
    rng = np.random.default_rng(0)
    train = rng.zipf(1.3, 20_000) % 50_000
    val = rng.zipf(1.3, 3_000) % 50_000
    write_shard(str(source / "train_000000.bin"), train)
    write_shard(str(source / "val_000000.bin"), val)
    (source / "prepare_state.json").write_text(json.dumps({"settings": {"source": "toy"}, "train_tokens": len(train)}))
    monkeypatch.setattr(prep, "SOURCE", str(source))

    prep.main(["--vocab_size", "16", "--out_dir", str(out)])
    counts = collections.Counter(train.tolist())
    kept = [t for t, _ in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))[:15]]   # by count, then id
    expected = {t: i for i, t in enumerate(kept)}
    for split, old in (("train", train), ("val", val)):
        new = np.asarray(read_shard(str(out / f"{split}_000000.bin")))
        assert new.tolist() == [expected.get(t, 15) for t in old.tolist()]
    back = json.load(open(out / "vocab.json"))["gpt2_id"]
    assert back == kept + [-1]

    stamp = os.path.getmtime(out / "train_000000.bin")
    prep.main(["--vocab_size", "16", "--out_dir", str(out)])     # up to date: nothing rewritten
    assert os.path.getmtime(out / "train_000000.bin") == stamp
