"""plot_curves.py: parses training logs (log.jsonl, wandb offline runs through their out_dir's
log.jsonl, wandb server runs through wandb's public API) into the logged points exactly, and
draws them into a PNG."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import plot_curves  # noqa: E402

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


def test_an_iteration_logged_again_after_a_resume_keeps_its_last_value(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [(1, 4.0), (2, 3.5), (3, 9.9), (2, 3.4), (3, 3.3), (4, 3.2)]      # resumed from iteration 1
    log.write_text("".join(json.dumps({"iter": i, "tokens": 10 * i, "train_loss": v}) + "\n" for i, v in rows)
                   + json.dumps({"iter": 3, "rollback_from": 3, "skipped_iters": 1, "lr_scale": 0.5}) + "\n")
    assert plot_curves.load_run(str(log)).train == [(10.0, 4.0), (20.0, 3.4), (30.0, 3.3), (40.0, 3.2)]


def test_a_wandb_offline_run_folder_is_read_from_its_out_dirs_log(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out_dir = tmp_path / "out-fox"
    train, val = write_log(str(out_dir))
    run = wandb.init(project="grape-test", dir=str(out_dir), mode="offline")
    run.log({"train/loss": 1.0}, step=0)
    run.finish()
    [run_dir] = (out_dir / "wandb").glob("offline-run-*")
    curves = plot_curves.load_run(str(run_dir))
    assert curves.label == "out-fox"
    assert curves.train == [(float(x), y) for x, y in train] and curves.val == [(float(x), y) for x, y in val]
    os.remove(out_dir / "log.jsonl")
    with pytest.raises(FileNotFoundError, match="wandb sync"):
        plot_curves.load_run(str(run_dir))


def test_a_wandb_server_run_is_read_through_the_public_api(tmp_path, monkeypatch):
    """No network here: wandb.Api is replaced by an object with the public API's shape
    (Api().run(path) -> a run with .name and .scan_history() yielding logged rows)."""
    wandb = pytest.importorskip("wandb")
    from wandb.apis.public import Run
    assert callable(Run.scan_history) and "name" in dir(Run)           # the API this reader relies on
    rows = [{"_step": i, "train/loss": 4.0 - i, "tokens": 64 * i, "lr": 1e-3} for i in range(3)]
    rows.append({"_step": 3, "val/loss": 2.5, "tokens": 192})
    asked = []

    class FakeRun:
        name = "rope-medium"

        def scan_history(self):
            return iter(rows)

    class FakeApi:
        def run(self, path):
            asked.append(path)
            return FakeRun()
    monkeypatch.setattr(wandb, "Api", FakeApi)
    curves = plot_curves.load_run("wandb:team/grape/abc123")
    assert asked == ["team/grape/abc123"] and curves.label == "rope-medium"
    assert curves.train == [(0.0, 4.0), (64.0, 3.0), (128.0, 2.0)] and curves.val == [(192.0, 2.5)]
