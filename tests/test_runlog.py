"""A torn log.jsonl line (a run killed or a disk filled mid-write) never breaks a reader: a resume
cuts it off before appending, readers skip a torn last line with a warning, and an older log with
a torn record glued to the next one still reads."""
import json
import os

import pytest

from training.runlog import JsonlLog, read_jsonl, run_log
from test_training import data_dir, read_log, tiny  # noqa: F401  (data_dir: a fixture)
from train_adam_finewebedu import main


def test_a_resume_after_a_torn_last_line_leaves_a_log_every_reader_reads(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    main(tiny(data_dir, out, "--max_iters=3", "--eval_interval=3"))
    path = os.path.join(out, "log.jsonl")
    whole = open(path).read()
    torn = '{"iter": 4, "tokens": 1024, "train_lo'                  # killed in the middle of a record
    with open(path, "a") as f:
        f.write(torn)
    capsys.readouterr()
    main(tiny(data_dir, out, "--max_iters=5", "--eval_interval=5", "--init_from=resume"))
    assert f"ended in a record cut off mid-write ({len(torn)} bytes" in capsys.readouterr().err
    text = open(path).read()
    assert text.startswith(whole) and text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]        # every line is a record
    assert [r["iter"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5]
    assert read_jsonl(path) == records
    assert [i for i, _, _, _ in run_log(path)["train"]] == [1, 2, 3, 4, 5]
    assert "warning" not in capsys.readouterr().err


def test_readers_skip_a_torn_last_line_and_recover_a_record_glued_behind_a_torn_one(tmp_path, capsys):
    path = str(tmp_path / "log.jsonl")
    log = JsonlLog.create(path)
    log.write(iter=1, tokens=8, train_loss=2.5)
    with open(path, "a") as f:
        f.write('{"iter": 2, "tok' + json.dumps({"iter": 2, "tokens": 16, "train_loss": 2.25}) + "\n")
        f.write('{"iter": 3, "tokens": 24, "train_')
    assert read_jsonl(path) == [{"iter": 1, "tokens": 8, "train_loss": 2.5},
                                {"iter": 2, "tokens": 16, "train_loss": 2.25}]
    err = capsys.readouterr().err
    assert f"{path}:2: skipping a record cut off mid-write" in err
    assert f"{path}:3: skipping an incomplete last line" in err
    with open(path, "a") as f:
        f.write("\nnot a record at all\n" + json.dumps({"iter": 4}) + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl:3 is not valid JSON"):       # damage that is no tear
        read_jsonl(path)


def test_the_log_is_never_written_through_a_symbolic_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "log.jsonl")
    for open_log in (JsonlLog.create, JsonlLog.append_to):
        with pytest.raises(OSError):
            open_log(str(tmp_path / "log.jsonl"))
    assert victim.read_text() == "precious\n"
