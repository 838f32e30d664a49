"""scripts/position_study.py end to end at toy size (two encodings, a few steps): the page and
CSVs hold a row per encoding with the numbers the runs recorded, a re-run trains nothing, a run
recorded with other settings is refused; and the context gain against a prefix-by-prefix
computation."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from scripts import position_study
from test_training import data_dir  # noqa: F401  (the shards fixture)
from training import position_study as task_runs
from training.context_gain import context_gain

ENCODINGS = ("rope", "alibi")
TASK_ARGS = ["--task.max_iters=3", "--task.n_layer=1", "--task.n_head=2", "--task.n_embd=32",
             "--task.train_length=32", "--task.batch_size=4", "--task.eval_sequences=2", "--task.warmup_iters=1",
             "--task.multipliers=(1, 2)"]


def study_args(root, *extra):
    return ["--encodings", ",".join(ENCODINGS), "--seeds", "1", "--workers", "2", "--out_root", str(root / "runs"),
            "--report", str(root / "results" / "POSITION_STUDY.md"), *TASK_ARGS, *extra]


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def page_table_rows(page: str, heading: str) -> dict:
    """The rows of the first table after ``heading``: {encoding: cells}."""
    lines = page[page.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return {row[0].strip("`"): row for row in table[2:]}


@pytest.fixture(scope="module")
def tasks_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    assert position_study.main(study_args(root, "--parts", "tasks")) == 0
    return root


def test_task_page_and_csv_hold_what_each_run_recorded(tasks_study):
    root = tasks_study
    records = {e: json.load(open(root / "runs" / "tasks" / e / "seed0.json")) for e in ENCODINGS}
    rows = csv_rows(root / "results" / "position_study" / "tasks.csv")
    assert len(rows) == len(ENCODINGS) * 4 * 2            # encodings x tasks x lengths
    for row in rows:
        recorded = records[row["encoding"]]["accuracy"][row["task"]][row["multiplier"]]
        assert float(row["accuracy"]) == pytest.approx(recorded, abs=1e-4)
        assert int(row["length"]) == 32 * int(row["multiplier"])
    page = open(root / "results" / "POSITION_STUDY.md").read()
    for task in ("recall", "copy", "passkey", "lag"):
        table = page_table_rows(page, f"### {task}")
        assert set(table) == set(ENCODINGS)
        for enc, cells in table.items():
            shown = float(cells[1].strip("*≈ ").split()[0])
            assert shown == pytest.approx(records[enc]["accuracy"][task]["1"], abs=5e-4)
    assert os.path.getsize(root / "results" / "position_study" / "task_accuracy.png") > 10_000
    assert "## Language model" not in page


def test_rerun_trains_nothing_and_other_settings_are_refused(tasks_study, monkeypatch):
    root = tasks_study
    records = [root / "runs" / "tasks" / e / "seed0.json" for e in ENCODINGS]
    before = [os.path.getmtime(r) for r in records]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(task_runs, "run_to_file", no_training)
    assert position_study.main(study_args(root, "--parts", "tasks", "--workers", "1")) == 0
    assert [os.path.getmtime(r) for r in records] == before
    with pytest.raises(SystemExit, match="was run with other settings.*max_iters"):
        position_study.main(study_args(root, "--parts", "tasks", "--task.max_iters=4"))


def test_unknown_task_setting_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown task setting.*max_iter\\b"):
        position_study.main(study_args(tmp_path, "--task.max_iter=3"))


def test_language_model_part_end_to_end(tmp_path, data_dir):  # noqa: F811
    config = tmp_path / "toy_lm.py"
    config.write_text(f"data_dir = {data_dir!r}\ndevice = 'cpu'\ncompile = False\nprogress = False\n"
                      "n_layer = 1\nn_head = 2\nn_embd = 32\nhead_dim = 16\nvocab_size = 256\nblock_size = 16\n"
                      "batch_size = 4\nmax_iters = 4\nlr_decay_iters = 4\nwarmup_iters = 1\neval_interval = 2\n"
                      "eval_iters = 1\nlog_interval = 2\n")
    args = study_args(tmp_path, "--parts", "lm", "--lm_config", str(config), "--lm_eval_windows", "3",
                      "--lm_multipliers", "1,2,4")
    assert position_study.main(args) == 0
    rows = {r["encoding"]: r for r in csv_rows(tmp_path / "results" / "position_study" / "lm.csv")}
    assert set(rows) == set(ENCODINGS)
    for enc in ENCODINGS:
        out = tmp_path / "runs" / "lm" / enc / "seed0"
        state = json.load(open(str(out) + ".json"))
        gain = json.load(open(str(out) + ".gain.json"))
        assert (gain["multiplier"], gain["trained"], gain["n_windows"]) == (4, 16, 3)
        for k in (1, 2, 4):
            assert float(rows[enc][f"loss_{k}x"]) == pytest.approx(state["eval"]["mean_loss"][str(k)], abs=1e-5)
        assert float(rows[enc]["gain_past_T"]) == pytest.approx(np.mean(gain["gain"][16:]), abs=1e-5)
    page = open(tmp_path / "results" / "POSITION_STUDY.md").read()
    assert set(page_table_rows(page, "## Language model")) == set(ENCODINGS)


def test_context_gain_equals_a_prefix_by_prefix_computation():
    torch.manual_seed(0)
    T, k = 8, 4
    model = GPT(GPTConfig(vocab_size=64, block_size=T * k, n_layer=1, n_head=2, n_embd=32, pos_encoding="rope",
                          bos_token_id=0, eos_token_id=0)).eval()
    window = np.random.default_rng(0).integers(0, 64, T * k + 1)
    g = context_gain(model, [window], T, batch_size=2)
    x = torch.from_numpy(window)
    with torch.no_grad():
        for p in (0, 5, T, T + 3, 2 * T + 7, T * k - 1):    # the token at p + 1, predicted from p
            full = F.cross_entropy(model(x[None, :p + 1]).logits[0, -1], x[p + 1])
            start = p // T * T                              # its block's first position
            short = F.cross_entropy(model(x[None, start:p + 1]).logits[0, -1], x[p + 1])
            assert g["full"][p] == pytest.approx(full.item(), abs=1e-4)
            assert g["short"][p] == pytest.approx(short.item(), abs=1e-4)
            assert g["gain"][p] == pytest.approx(full.item() - short.item(), abs=1e-4)
    assert np.abs(g["gain"][:T]).max() < 1e-5               # inside the first block nothing differs


def test_study_time_is_credited_while_a_part_runs_not_only_when_it_ends(tmp_path):
    """A killed invocation never reaches its part's end: the time it ran must already be in
    study.json (the page's wall time would otherwise miss it)."""
    import time
    from types import SimpleNamespace
    opts = SimpleNamespace(out_root=str(tmp_path))
    position_study.phase_times(opts, {"tasks": 100.0})          # an earlier invocation
    start = time.time()
    with position_study.PartClock(opts, "tasks", every=0.05):
        time.sleep(0.4)
        during = json.load(open(tmp_path / "study.json"))["tasks"]
        assert 100.2 <= during <= 100.0 + (time.time() - start) + 1e-6
    after = json.load(open(tmp_path / "study.json"))["tasks"]
    assert abs(after - 100.0 - (time.time() - start)) < 0.05
