"""Divergence never costs a good checkpoint: a non-finite loss or gradient stops the run (exit 1,
the message names the iteration) or rolls back; best.pt survives a finite blow-up.

Tiny models on the shards of test_training.py. lr=1e6 (with weight decay, each step multiplies
the weights by ~1e4) makes the gradient norm non-finite at iteration 3, after a finite
checkpoint at iteration 2; a batch whose targets are all ignored (-1) is a "poisoned" batch
with a NaN loss, for the rollback.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from training import checkpoint
from training import dataloader
from training.checkpoint import load_model
from test_training import data_dir, read_log, tiny, train_losses  # noqa: F401  (data_dir: a fixture)
from train_adam_finewebedu import cli, main

NAN_LR = ["--learning_rate=1e6", "--decay_lr=False", "--warmup_iters=0", "--eval_interval=2"]


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert isinstance(exit_info.value.code, str), "a one-line message, exit status 1"
    return exit_info.value.code


def val_losses(out_dir) -> dict:
    return {r["iter"]: r["val_loss"] for r in read_log(out_dir) if "val_loss" in r}


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values())


def test_nan_stops_with_a_message_naming_the_iteration_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    message = exit_message(tiny(data_dir, out, *NAN_LR, "--max_iters=8"))
    assert message.startswith("training diverged at iter 3: ") and "gradient norm nan" in message
    assert "ckpt.pt (iter 2), is untouched" in message
    kept = checkpoint.load_checkpoint(out)
    assert kept["iter_num"] == 2 and all_finite(kept["model"])
    log = read_log(out)
    assert [r["iter"] for r in log if "diverged" in r] == [3]
    assert all(math.isfinite(r.get("train_loss", 0)) for r in log)     # no NaN written to the log
    # iteration 3 is the first bad one: the same run stopped at 2 iterations ends finite
    assert main(tiny(data_dir, str(tmp_path / "short"), *NAN_LR, "--max_iters=2"))["iter_num"] == 2


def val_loss_of(path: str, data_dir: str, n_batches: int = 2) -> float:
    """Validation loss of a checkpoint's weights on the batches the training run evaluates,
    computed here with a plain forward and cross-entropy."""
    model = load_model(path).eval()
    val = dataloader.TokenBatches(data_dir, "val", 4, 32, seed=1337)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
                  for x, y in (val.get(k, 0) for k in range(n_batches))]
    return sum(losses) / n_batches


def test_finite_blow_up_never_overwrites_the_best_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    constant = ["--decay_lr=False", "--eval_interval=2"]
    main(tiny(data_dir, out, *constant, "--max_iters=4"))
    # while the latest is the best, best.pt is a hard link to ckpt.pt: no second copy on disk
    assert os.path.samefile(os.path.join(out, "best.pt"), os.path.join(out, "ckpt.pt"))
    main(tiny(data_dir, out, *constant, "--max_iters=8", "--learning_rate=10", "--init_from=resume"))
    val = val_losses(out)
    assert max(val[6], val[8]) > 100 * min(val[2], val[4])          # lr=10: the loss blew up, finitely
    best_iter = min((2, 4, 6, 8), key=val.get)
    best, latest = checkpoint.load_checkpoint(os.path.join(out, "best.pt")), checkpoint.load_checkpoint(out)
    assert best["iter_num"] == best_iter == 4 and latest["iter_num"] == 8
    assert val_loss_of(os.path.join(out, "best.pt"), data_dir) == pytest.approx(val[best_iter], rel=1e-5)
    assert val_loss_of(os.path.join(out, "ckpt.pt"), data_dir) == pytest.approx(val[8], rel=1e-5)
    # the best weights are a training state too: a new run continues from best.pt at its iteration
    again = str(tmp_path / "from_best")
    main(tiny(data_dir, again, *constant, "--max_iters=6", "--init_from=resume", f"--resume_dir={out}/best.pt"))
    trained = sorted(train_losses(again))
    assert trained[0] == 5 and trained[-1] == 6
    assert val_losses(again)[6] < 2 * val[4] < val[8]                  # back on course, far from the blow-up


@pytest.fixture
def poisoned_step(monkeypatch):
    """Training batches of data step 4 get all-ignored targets (a NaN loss); records which
    data steps the trainer asks for, in order."""
    asked = []
    real_get = dataloader.TokenBatches.get

    def get(self, step=0, micro_step=0):
        x, y = real_get(self, step, micro_step)
        if self.split == "train":
            asked.append(step)
            if step == 4:
                y = torch.full_like(y, -1)
        return x, y
    monkeypatch.setattr(dataloader.TokenBatches, "get", get)
    return asked


ROLLBACK = ["--on_divergence=rollback", "--decay_lr=False", "--eval_interval=3", "--learning_rate=3e-3"]


def test_rollback_reloads_skips_the_offending_batches_and_lowers_the_learning_rate(data_dir, tmp_path,
                                                                                     poisoned_step):
    out = str(tmp_path / "run")
    assert main(tiny(data_dir, out, *ROLLBACK, "--max_iters=9"))["iter_num"] == 9
    log = read_log(out)
    # step 4 (iteration 5) is NaN; the checkpoint of iteration 3 is reloaded, and iteration i then
    # reads the batches of i + 2: those of steps 3 and 4 are never used
    assert {"iter": 3, "rollback_from": 5, "skipped_iters": 2, "lr_scale": 0.5} in log
    accum = 2
    expected = [s for s in range(5) for _ in range(accum)] + [s + 2 for s in range(3, 9) for _ in range(accum)]
    assert poisoned_step == expected
    lrs = {r["iter"]: r["lr"] for r in log if "lr" in r}                # the last record of each iteration
    assert [lrs[i] for i in range(1, 10)] == [3e-3] * 3 + [1.5e-3] * 6
    final = checkpoint.load_checkpoint(out)
    assert final["iter_num"] == 9 and all_finite(final["model"])
    assert final["recovery"] == {"rollbacks": 1, "skipped_steps": 2, "lr_scale": 0.5}


def test_a_run_resumed_after_a_rollback_continues_exactly(data_dir, tmp_path, poisoned_step):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(tiny(data_dir, straight, *ROLLBACK, "--max_iters=9"))
    main(tiny(data_dir, split, *ROLLBACK, "--max_iters=6"))
    main(tiny(data_dir, split, *ROLLBACK, "--max_iters=9", "--init_from=resume"))
    a, b = train_losses(straight), train_losses(split)
    assert [a[i] for i in range(1, 10)] == [b[i] for i in range(1, 10)]     # bitwise


def test_lr_divergence_rolls_back_to_a_healthy_checkpoint_and_recovers_with_a_lower_lr(data_dir, tmp_path):
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--decay_lr=False", "--max_iters=4", "--eval_interval=4"))
    main(tiny(data_dir, out, *NAN_LR, "--eval_interval=4", "--max_iters=8", "--init_from=resume",
              "--on_divergence=rollback", "--rollback_lr_factor=1e-9"))
    log = read_log(out)
    [rollback] = [r for r in log if "rollback_from" in r]
    assert rollback["iter"] == 4 and rollback["lr_scale"] == pytest.approx(1e-9)
    assert rollback["rollback_from"] > 4 and rollback["skipped_iters"] == rollback["rollback_from"] - 4
    final = checkpoint.load_checkpoint(out)
    assert final["iter_num"] == 8 and all_finite(final["model"])
    val = {r["iter"]: r["val_loss"] for r in log if "val_loss" in r}
    assert val[8] < val[4]                                     # at lr 1e-3 it goes on learning
    assert all(math.isfinite(loss) for loss in train_losses(out).values())


def test_rollbacks_are_bounded_and_need_a_checkpoint(data_dir, tmp_path):
    again = ["--on_divergence=rollback", "--rollback_lr_factor=1", "--max_rollbacks=2"]
    message = exit_message(tiny(data_dir, str(tmp_path / "a"), *NAN_LR, "--max_iters=8", *again))
    assert message.startswith("training diverged at iter ") and "2 rollback(s) already (max_rollbacks=2)" in message
    assert len([r for r in read_log(str(tmp_path / "a")) if "rollback_from" in r]) == 2
    message = exit_message(tiny(data_dir, str(tmp_path / "b"), *NAN_LR, "--max_iters=8", "--eval_interval=100",
                                "--on_divergence=rollback"))
    assert "no checkpoint to roll back to" in message and "no checkpoint had been written" in message
    assert not os.path.exists(tmp_path / "b" / "ckpt.pt")
