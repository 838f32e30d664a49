"""compare_encodings.py end to end at toy size: the RESULTS.md table equals what the runs
logged themselves, a re-run trains nothing, an interrupted run resumes from its checkpoint,
and differences within the seed spread are marked by a hand-computed rule."""
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest

from scripts import compare_encodings
from training import report
from scripts import eval_length
import grape
from test_training import data_dir  # noqa: F401  (the shards fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ITERS, B, T = 6, 4, 32


@pytest.fixture(scope="module")
def toy(tmp_path_factory, data_dir):
    """A base config for a tiny model on test_training's shards (a learnable pattern plus noise)."""
    root = tmp_path_factory.mktemp("compare")
    config = root / "toy.py"
    config.write_text(
        f"data_dir = {data_dir!r}\ndevice = 'cpu'\ncompile = False\nprogress = False\n"
        "n_layer = 1\nn_head = 2\nn_embd = 32\nhead_dim = 16\nvocab_size = 256\n"
        f"block_size = {T}\nbatch_size = {B}\ngradient_accumulation_steps = 1\n"
        f"max_iters = {MAX_ITERS}\nlr_decay_iters = {MAX_ITERS}\nwarmup_iters = 1\nlearning_rate = 3e-3\n"
        "eval_interval = 3\neval_iters = 2\nlog_interval = 2\nseed = 7\ndata_seed = 11\neval_seed = 5\n")
    return root, str(config)


def compare_args(root, config, *extra):
    return [config, "--encodings", "rope,alibi", "--seeds", "1", "--out_root", str(root / "runs"),
            "--report_dir", str(root / "report"), "--eval_windows", "2", *extra]


@pytest.fixture(scope="module")
def compared(toy):
    root, config = toy
    assert compare_encodings.main(compare_args(root, config)) == 0
    return root, config


def table_rows(md_path):
    """RESULTS.md's table as {encoding: {column: cell}}."""
    lines = [line for line in open(md_path).read().splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        rows[cells["encoding"].strip("`")] = cells
    return rows


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_results_table_equals_what_each_run_logged(compared):
    root, _ = compared
    rows = table_rows(root / "report" / "RESULTS.md")
    assert set(rows) == {"rope", "alibi"}
    speeds, finals = {}, {}
    for enc in ("rope", "alibi"):
        out = root / "runs" / enc / "seed0"
        log = read_log(out)
        val = [r for r in log if "val_loss" in r]
        # trained to the budget, validated at its end, with the planned seeds
        assert val[-1]["iter"] == MAX_ITERS and val[-1]["tokens"] == MAX_ITERS * B * T
        config = json.load(open(str(out) + ".json"))["settings"]
        assert (config["pos_encoding"], config["seed"], config["data_seed"], config["eval_seed"]) == (enc, 7, 11, 5)
        row = rows[enc]
        finals[enc] = val[-1]["val_loss"]
        assert row["val loss"] == f"{val[-1]['val_loss']:.4f}"
        speeds[enc] = statistics.median(r["tokens_per_sec"] for r in log if "train_loss" in r)
        assert row["tokens/s"] == f"{speeds[enc]:,.0f}"
        # loss at 1x/2x/4x: eval_length on the run's final checkpoint, the same windows
        for r in eval_length.evaluate([str(out)], [1, 2, 4], num_windows=2):
            assert row[f"loss {r.multiplier}× ({r.multiplier}T)"].split()[0] == f"{r.mean_loss:.3f}"
    assert rows["alibi"]["× rope"] == f"{speeds['alibi'] / speeds['rope']:.2f}"
    assert rows["alibi"]["Δ vs rope"] == f"{finals['alibi'] - finals['rope']:+.3f}"
    for png in ("curves.png", "loss_by_position.png"):
        assert (root / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (root / "report" / "RESULTS.md").read_text()
    assert "not** a reproduction" in text and "one seed" in text


def test_rerun_trains_and_evaluates_nothing_again(compared, monkeypatch):
    root, config = compared
    logs = {enc: (root / "runs" / enc / "seed0" / "log.jsonl").read_bytes() for enc in ("rope", "alibi")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was started again")
    monkeypatch.setattr(compare_encodings, "launch", refuse)
    monkeypatch.setattr(compare_encodings, "evaluate", refuse)
    assert compare_encodings.main(compare_args(root, config)) == 0
    assert {enc: (root / "runs" / enc / "seed0" / "log.jsonl").read_bytes() for enc in logs} == logs
    # other settings in the same out_root are refused, naming the key
    with pytest.raises(SystemExit, match="max_iters=7"):
        compare_encodings.main(compare_args(root, config, "--max_iters=7", "--lr_decay_iters=7"))


def test_interrupted_run_resumes_from_its_checkpoint(toy, tmp_path):
    _, config = toy
    args = [config, "--encodings", "rope", "--seeds", "1", "--out_root", str(tmp_path / "runs"),
            "--report_dir", str(tmp_path / "report"), "--eval_windows", "1",
            "--max_iters=200", "--lr_decay_iters=200", "--eval_interval=20", "--log_interval=1"]
    out = tmp_path / "runs" / "rope" / "seed0"
    driver = subprocess.Popen([sys.executable, "-m", "scripts.compare_encodings", *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (out / "ckpt.pt").exists():
        assert driver.poll() is None and time.time() < deadline, driver.stdout.read()
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)            # the driver asks the training to checkpoint and stops
    printed = driver.communicate(timeout=180)[0]
    assert driver.returncode == 130, printed
    state = json.load(open(str(out) + ".json"))
    stopped = compare_encodings.checkpoint_iter(str(out))
    assert 20 <= stopped < 200 and not state.get("trained")
    before = [line for line in (out / "log.jsonl").read_text().splitlines()
              if json.loads(line)["iter"] <= stopped]

    assert compare_encodings.main(args) == 0
    state = json.load(open(str(out) + ".json"))
    assert [s["from_iter"] for s in state["segments"]] == [0, stopped] and state["trained"]
    log = (out / "log.jsonl").read_text().splitlines()
    assert log[:len(before)] == before                  # the first segment's history is kept
    iters = [json.loads(line)["iter"] for line in log[len(before):] if "train_loss" in line]
    assert iters[0] == stopped + 1 and max(iters) == 200  # continued, not restarted
    assert "--init_from=resume" in (tmp_path / "runs" / "rope" / "seed0.log").read_text()


def test_differences_within_the_combined_seed_spread_are_marked():
    rope, near, far = [3.0, 3.1, 3.2], [3.05, 3.15, 3.25], [2.5, 2.6, 2.7]
    runs = [{"encoding": e, "val_loss": v, "length_loss": {2: v}, "tokens_per_sec": 100.0, "wall_s": 60.0,
             "n_params": 1e6} for e, vals in (("rope", rope), ("near", near), ("far", far)) for v in vals]
    agg = report.aggregate(runs, ["rope", "near", "far"])
    assert agg["rope"]["val"][1] == pytest.approx(0.1)            # sample std of 3.0, 3.1, 3.2
    rows = table_rows_from_text(report.table(agg, "rope"))
    # |3.15 - 3.10| = 0.05 < sqrt(0.1^2 + 0.1^2) = 0.141: within; |2.6 - 3.1| = 0.5: beyond
    assert rows["near"]["Δ vs rope"] == "+0.050 ≈" and rows["near"]["loss 2× (2T)"].endswith("≈")
    assert rows["far"]["Δ vs rope"] == "-0.500" and not rows["far"]["loss 2× (2T)"].endswith("≈")
    assert [r["encoding"] for r in rows.values()] == ["`far`", "`rope`", "`near`"]   # sorted by loss
    assert report.ranking(agg) == "`far` 2.600 < `rope` 3.100 ≈ `near` 3.150"


def table_rows_from_text(text):
    lines = text.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {re.sub("`", "", cells["encoding"]): cells for cells in
            (dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:])}


def test_encoding_names_all_compositions_and_kvshift(toy):
    _, config = toy
    assert compare_encodings.parse_encodings("all") == list(grape.ENCODINGS)
    with pytest.raises(ValueError, match="unknown pos_encoding 'ropez'"):
        compare_encodings.parse_encodings("rope,ropez")
    with pytest.raises(ValueError, match="unknown variant 'kv'"):
        compare_encodings.parse_encodings("rope:kv")
    run = compare_encodings.plan_runs(["fox:kvshift", "rope+grape_ap"], 2, 7, 11, "o")
    assert [(r.encoding, r.seed, r.data_seed) for r in run] == [
        ("fox:kvshift", 7, 11), ("rope+grape_ap", 7, 11), ("fox:kvshift", 8, 12), ("rope+grape_ap", 8, 12)]
    cfg = compare_encodings.resolve(compare_encodings.training_args([config], run[0], False))
    assert (cfg.pos_encoding, cfg.use_k_shift, cfg.use_v_shift, cfg.seed, cfg.data_seed) == ("fox", True, True, 7, 11)
    # a paper run config names its encoding by model_type: cleared, so --pos_encoding wins
    paper = os.path.join(ROOT, "config", "paper", "train_llama_mha_rope_medium_adam_80g8.py")
    cfg = compare_encodings.resolve(compare_encodings.training_args([paper], run[1], True))
    assert (cfg.pos_encoding, cfg.n_layer, cfg.block_size) == ("rope+grape_ap", 24, 4096)


def test_all_skips_encodings_the_config_cannot_build_and_a_named_one_is_an_error(toy, tmp_path, capsys):
    _, config = toy
    odd = ["--n_embd=30", "--head_dim=15"]       # rotary encodings need an even head width
    args = [config, "--encodings", "all", "--seeds", "1", "--out_root", str(tmp_path / "runs"), "--dry_run", *odd]
    assert compare_encodings.main(args) == 0
    printed = capsys.readouterr()
    assert "skipping rope: head_dim=15 must be even" in printed.err
    planned = re.findall(r"^(\S+) run 0 \(seed (\d+), data_seed (\d+)\): new$", printed.out, flags=re.M)
    assert {(seed, data_seed) for _, seed, data_seed in planned} == {("7", "11")}   # the config's, not 0
    planned = [encoding for encoding, _, _ in planned]
    assert "alibi" in planned and "nope" in planned and "rope" not in planned
    with pytest.raises(SystemExit, match="config error for rope: head_dim=15 must be even"):
        compare_encodings.main([config, "--encodings", "rope,alibi", "--out_root", str(tmp_path / "runs"),
                                "--dry_run", *odd])
