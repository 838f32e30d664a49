"""eval_length.py: its loss at 1x/2x the training context equals an independent
cross-entropy computation on the same validation windows, and it writes table and plot."""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F


from scripts import eval_length  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from training.checkpoint import load_model
from training.shards import ShardError, read_shard, write_shard  # noqa: E402

T = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training-style out_dir: ckpt.pt with model, model_config and the run's config."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_shard(str(data / "val_000000.bin"), rng.integers(0, 50257, size=600))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, pos_encoding="alibi"))
    out = root / "out-tiny"
    out.mkdir()
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                "config": {"block_size": T, "data_dir": str(data)}}, out / "ckpt.pt")
    return out, data


def independent_position_loss(path, data, length, starts):
    """Windows of length+1 tokens read straight from the shard; log-softmax and gather by hand."""
    tokens = np.asarray(read_shard(str(data / "val_000000.bin")), dtype=np.int64)
    model = load_model(str(path), block_size=length).eval()
    per_position = np.zeros(length)
    for s in starts:
        w = torch.from_numpy(tokens[s:s + length + 1])
        with torch.no_grad():
            logits, _ = model(w[None, :-1])
        logp = F.log_softmax(logits[0].double(), dim=-1)
        per_position += -logp[torch.arange(length), w[1:]].numpy()
    return per_position / len(starts)


def test_eval_length_matches_independent_cross_entropy_and_writes_outputs(run_dir, tmp_path, capsys):
    path, data = run_dir
    out = tmp_path / "eval"
    results = eval_length.main([str(path), "--num_windows", "2", "--multipliers", "1,2",
                                "--batch_size", "3", "--out_dir", str(out)])
    by_k = {r.multiplier: r for r in results}
    assert by_k[1].trained == T and by_k[2].length == 2 * T
    # 600 tokens hold 18 windows of 2T+1 = 33 tokens; 2 windows spread evenly are the first
    # and the last (start 17*33); 1x reads the same tokens as two T-windows each
    big = [0, 17 * 33]
    starts = {1: [b + j * T for b in big for j in (0, 1)], 2: big}
    assert (by_k[1].n_windows, by_k[2].n_windows) == (4, 2)
    for k, r in by_k.items():
        want = independent_position_loss(path, data, k * T, starts[k])
        np.testing.assert_allclose(r.position_loss, want, rtol=1e-5, atol=1e-5)
        assert r.mean_loss == pytest.approx(want.mean(), abs=1e-5)

    printed = capsys.readouterr().out
    assert "| out-tiny (alibi) | 16 |" in printed
    rows = list(csv.DictReader(open(out / "eval_length.csv")))
    assert [int(r["multiplier"]) for r in rows] == [1, 2]
    assert float(rows[0]["mean_loss"]) == pytest.approx(by_k[1].mean_loss, abs=1e-5)
    positions = list(csv.DictReader(open(out / "eval_length_positions.csv")))
    assert len(positions) == T + 2 * T
    assert (out / "eval_length.md").read_text().startswith("| checkpoint |")
    assert (out / "eval_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_length_too_short_val_split_is_a_clear_error(run_dir, tmp_path):
    path, _ = run_dir
    with pytest.raises(ShardError, match="multipliers"):
        eval_length.main([str(path), "--multipliers", "64", "--out_dir", str(tmp_path)])


def test_on_the_training_runs_own_validation_batches_it_gives_the_logged_val_loss(tmp_path):
    """What the training log's val_loss measures (eval_iters random windows drawn with
    eval_seed) is what eval_length reports beside its own evenly spread windows; on the same
    checkpoint the two agree with the log to float rounding."""
    from train_adam_finewebedu import main
    from training.length_eval import training_validation_loss
    from training.runlog import run_log
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 4000), ("val", 2000)):
        write_shard(str(data / f"{split}_000000.bin"), rng.integers(0, 256, size=n))
    out = tmp_path / "out"
    main([f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2",
          "--n_embd=32", "--head_dim=16", "--vocab_size=256", "--block_size=32", "--batch_size=3", "--max_iters=4", "--eval_interval=4",
          "--eval_iters=3", "--log_interval=2", "--warmup_iters=1", "--pos_encoding=fox", "--eval_seed=9",
          "--progress=False"])
    logged = run_log(str(out / "log.jsonl"))["val"][-1]
    own = training_validation_loss(str(out), str(data))
    assert own["iter"] == logged[0] == 4 and own["windows"] == 9 and own["T"] == 32
    assert own["logged"] == logged[2]
    assert own["loss"] == pytest.approx(logged[2], rel=1e-6)
    printed = eval_length.what_is_measured(eval_length.evaluate([str(out)], (1,), 4), None, "cpu")
    assert f"{logged[2]:.4f}" in printed and "4 windows of 32 tokens" in printed
