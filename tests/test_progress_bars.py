"""Progress bars follow tqdm's ``disable=None`` convention: drawn on a terminal, absent when stderr
is a file or a pipe, so logs hold no carriage-return lines. Each tool runs twice, with stderr a
plain buffer and a buffer that says it is a terminal (the control: the bar is really there)."""
import io
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lm-evaluation-harness"))

from training import length_eval  # noqa: E402
import train_adam_finewebedu  # noqa: E402
from data import prepare_common  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from training.checkpoint import load_model
from training.shards import write_shard  # noqa: E402


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).eval()


def eval_length_positions(tmp_path):
    windows = [np.arange(33) % 256 for _ in range(4)]
    length_eval.position_losses(tiny_model(), windows, 16, 1, "cpu", desc="positions")


def load_pretrained_folder(tmp_path):
    folder = tmp_path / "pretrained"
    if not folder.exists():
        tiny_model().save_pretrained(str(folder))
    load_model(str(folder))


def lm_eval_adapter(tmp_path):
    import grape_lm
    from lm_eval.api.instance import Instance
    lm = grape_lm.GrapeLM(pretrained=tiny_model(), max_length=16)
    lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=("Hello", " world"), idx=0)])


def prepare_data(tmp_path):
    out = tmp_path / f"prep{len(os.listdir(tmp_path))}"
    documents = [f"document {i} " * 20 for i in range(5)]
    prepare_common.prepare(iter(documents), str(out), source="t", shard_size=64, val_tokens=10)


def train_tiny(tmp_path):
    """The training loop's bar (and its evaluation bars), a fresh out_dir each time."""
    data = tmp_path / "shards"
    if not data.exists():
        data.mkdir()
        tokens = np.arange(2000) % 256
        write_shard(str(data / "train_000000.bin"), tokens)
        write_shard(str(data / "val_000000.bin"), tokens[:500])
    out = tmp_path / f"out{len(os.listdir(tmp_path))}"
    train_adam_finewebedu.main([f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--compile=False",
                                "--n_layer=1", "--n_head=2", "--n_embd=32", "--head_dim=16", "--vocab_size=256",
                                "--block_size=16", "--batch_size=2", "--max_iters=3", "--eval_interval=3",
                                "--eval_iters=1", "--warmup_iters=1", "--log_interval=1"])


@pytest.mark.parametrize("tool", [eval_length_positions, load_pretrained_folder, lm_eval_adapter, prepare_data,
                                  train_tiny],
                         ids=lambda f: f.__name__)
def test_progress_bars_are_drawn_on_a_terminal_only(tool, tmp_path, monkeypatch):
    drawn = {}
    for kind, stderr in (("terminal", Terminal()), ("file", io.StringIO())):
        monkeypatch.setattr(sys, "stderr", stderr)
        tool(tmp_path)
        drawn[kind] = "\r" in stderr.getvalue()
    assert drawn == {"terminal": True, "file": False}
