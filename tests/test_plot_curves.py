"""plot_curves.py: parses training logs (log.jsonl and wandb offline runs) into the logged
points exactly, and draws them into a PNG."""
import json
import os
import sys

import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plot_curves  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(out_dir, n_iters=40, tokens_per_iter=1000, offset=0.0, eval_every=10):
    """A synthetic log.jsonl in the training script's format; returns the expected points."""
    os.makedirs(out_dir, exist_ok=True)
    train, val = [], []
    with open(os.path.join(out_dir, "log.jsonl"), "w") as f:
        for it in range(0, n_iters + 1):
            if it % eval_every == 0:
                v = 5.0 - 0.05 * it + offset
                f.write(json.dumps({"iter": it, "tokens": it * tokens_per_iter, "val_loss": v}) + "\n")
                val.append((it * tokens_per_iter, v))
            if it > 0:
                t = 6.0 - 0.1 * it + offset + (0.3 if it % 2 else -0.3)
                f.write(json.dumps({"iter": it, "tokens": it * tokens_per_iter, "train_loss": t, "lr": 1e-3,
                                    "tokens_per_sec": 123.0, "mfu": 0.01}) + "\n")
                train.append((it * tokens_per_iter, t))
    return train, val


def test_plot_curves_parses_logs_exactly_and_writes_png(tmp_path):
    runs = [tmp_path / "out-rope", tmp_path / "out-alibi"]
    expected = [write_log(str(runs[0])), write_log(str(runs[1]), offset=0.5)]
    (runs[1] / "config.json").write_text(json.dumps({"pos_encoding": "alibi", "use_k_shift": True}))
    out = tmp_path / "curves.png"
    parsed = plot_curves.main([str(runs[0]), str(runs[1] / "log.jsonl"), "--out", str(out), "--smooth", "0.5"])
    for curves, (train, val) in zip(parsed, expected):
        assert curves.train == [(float(x), y) for x, y in train]
        assert curves.val == [(float(x), y) for x, y in val]
    assert [c.label for c in parsed] == ["out-rope", "out-alibi (alibi+kvshift)"]
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_smoothing_is_bias_corrected_ema():
    values = [4.0, 2.0, 3.0]
    w = 0.5
    # hand-derived: EMA a_i = w a_{i-1} + (1-w) v_i from 0, divided by 1 - w^(i+1)
    want = [4.0, (0.25 * 4 + 0.5 * 2) / 0.75, (0.125 * 4 + 0.25 * 2 + 0.5 * 3) / 0.875]
    assert plot_curves.smooth(values, w) == pytest.approx(want)
    assert plot_curves.smooth(values, 0.0) == values
    with pytest.raises(ValueError, match="smooth"):
        plot_curves.smooth(values, 1.0)


def test_bad_log_line_is_an_error_naming_the_line_but_a_cut_last_line_is_skipped(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1, "tokens": 10, "train_loss": 3.0}\n{"iter": 2, "tok')
    assert plot_curves.load_run(str(log)).train == [(10.0, 3.0)]
    log.write_text('{"iter": 1, "tokens": 10, "train_loss": 3.0}\nnot json\n{"iter": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2"):
        plot_curves.load_run(str(log))


def test_wandb_offline_run_history_is_read_across_log_blocks(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out_dir = tmp_path / "out-fox"
    out_dir.mkdir()
    run = wandb.init(project="grape-test", dir=str(out_dir), mode="offline")
    n = 1200  # enough rows for the .wandb file to span many 32 KiB blocks
    for i in range(n):
        run.log({"train/loss": 4.0 - i * 1e-3, "tokens": i * 64, "lr": 1e-3}, step=i)
    run.log({"val/loss": 2.5, "tokens": n * 64}, step=n)
    run.finish()
    # wandb's background writer may still be flushing its last block when finish() returns
    # on a loaded machine: wait (bounded) until the last logged row is on disk
    deadline = time.time() + 30
    curves = plot_curves.load_run(str(out_dir))     # out_dir/wandb/offline-run-*
    while not curves.val and time.time() < deadline:
        time.sleep(0.5)
        curves = plot_curves.load_run(str(out_dir))
    assert curves.label == "out-fox"
    assert curves.train == [(float(i * 64), 4.0 - i * 1e-3) for i in range(n)]
    assert curves.val == [(float(n * 64), 2.5)]
