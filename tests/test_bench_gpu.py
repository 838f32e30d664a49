"""bench_gpu.py on a machine without a GPU: arguments, the no-GPU message, the target
verdicts, the table writer, independent stages, and every stage at toy size (--smoke)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from scripts import bench_gpu
from scripts.bench_attention import run_config, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_a_gpu_it_stops_at_once_with_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--device cpu --smoke" in err
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in bench_gpu.no_gpu_message()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "sees no GPU" in bench_gpu.no_gpu_message()


def test_the_command_fails_within_its_first_minute_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}          # no GPU, even on a GPU machine
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "scripts.bench_gpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs a CUDA GPU" in done.stderr
    assert time.time() - start < 60


def test_arguments():
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--device", "cpu"])              # the real figures need a GPU
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--T", "1"])
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--stages", "benchmarks"])
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--encodings", "rotary"])
    args = bench_gpu.parse_args(["--encodings", "alibi", "grape_ap"])
    assert args.encodings == ["rope", "alibi", "grape_ap"]     # RoPE is the yardstick
    assert args.out.endswith("BENCHMARKS.md") and args.stages == list(bench_gpu.STAGES)
    smoke = bench_gpu.parse_args(["--device", "cpu", "--smoke"])
    assert smoke.out == ""                                      # a smoke run writes nothing unless asked


def test_bias_kinds_decide_the_targets():
    kinds = {name: bench_gpu.bias_kind_of(name) for name in
             ["nope", "rope", "grape_m", "grape_m_ctx", "alibi", "fox", "grape_a_q", "grape_a_qk", "grape_ap"]}
    assert kinds == {"nope": "none", "rope": "none", "grape_m": "none", "grape_m_ctx": "none",
                     "alibi": "separable", "fox": "separable", "grape_a_q": "separable_gated",
                     "grape_a_qk": "separable_gated", "grape_ap": "path_integral"}


def test_target_verdicts_per_row():
    T = 4096
    ms = lambda t, peak: {"time": t / 1e3, "peak": peak, "used": "x"}
    results = {("layer", "rope", "auto", T): ms(10.0, 100.0),
               ("layer", "alibi", "auto", T): ms(11.9, 149.0),      # 1.19x, 1.49x: pass, pass
               ("layer", "fox", "auto", T): ms(12.1, 100.0),        # 1.21x: time fails
               ("layer", "grape_ap", "auto", T): ms(19.9, 151.0),   # 1.99x pass, 1.51x memory fails
               ("layer", "grape_m", "auto", T): ms(30.0, 300.0),    # multiplicative: no target
               ("layer", "alibi", "auto", 2048): ms(50.0, 50.0),    # not the target length
               ("layer", "rope", "auto", 2048): ms(10.0, 10.0)}
    rows, checks = bench_gpu.attention_rows(results, "layer", [2048, T],
                                            ["rope", "alibi", "fox", "grape_ap", "grape_m"], T)
    assert sorted(checks) == sorted([("alibi", "layer", "time", True), ("alibi", "layer", "memory", True),
                                     ("fox", "layer", "time", False), ("fox", "layer", "memory", True),
                                     ("grape_ap", "layer", "time", True), ("grape_ap", "layer", "memory", False)])
    by_row = {(r.split("|")[1].strip(), r.split("|")[2].strip()): r for r in rows[2:]}
    assert "≤1.2 FAIL" in by_row[("4096", "fox")] and "≤1.5 FAIL" in by_row[("4096", "grape_ap")]
    assert "pass" not in by_row[("2048", "alibi")] and "FAIL" not in by_row[("2048", "alibi")]
    assert "pass" not in by_row[("4096", "grape_m")]


def test_section_is_replaced_where_it_stands(tmp_path):
    path = str(tmp_path / "BENCHMARKS.md")
    with open(path, "w") as f:
        f.write("# Benchmarks\n\n## Decoding\n\nkeep 1\n\n## GPU attention (H100)\n\nold\n\n### sub\n\nold sub\n"
                "\n## Attention (CPU)\n\nkeep 2\n")
    write_section(path, "## GPU attention (H100)\n\nnew\n")
    write_section(path, "## GPU attention (H100)\n\nnewer\n")
    write_section(path, "## GPU training (H100)\n\ntrain\n")
    text = open(path).read()
    assert text.count("## GPU attention (H100)") == 1 and "old" not in text and "newer" in text
    assert text.index("keep 1") < text.index("newer") < text.index("keep 2") < text.index("train")


def test_a_failing_stage_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "b.md")
    ran = []

    def fine(name):
        def stage(args, size):
            ran.append(name)
            return bench_gpu.section_head(name, args) + f"\n\n{name} table\n", True, "ok"
        return stage

    def broken(args, size):
        ran.append("attention")
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setattr(bench_gpu, "STAGE_FUNCTIONS", {"tests": fine("tests"), "attention": broken,
                                                       "training": fine("training"), "ddp": fine("ddp")})
    assert bench_gpu.main(["--device", "cpu", "--smoke", "--out", out]) == 1
    assert ran == ["tests", "attention", "training", "ddp"]
    text = open(out).read()
    assert "tests table" in text and "training table" in text and "ddp table" in text
    summary = capsys.readouterr().out.split("=== summary ===")[1]
    assert "attention  FAILED" in summary and "illegal memory access" in summary


def test_smoke_runs_every_stage_on_cpu(tmp_path):
    # as a command, in its own process: the CPU attention stage forks, and a child forked from
    # a process that has already run OpenMP work (this pytest process) can hang in libgomp
    out = str(tmp_path / "BENCHMARKS.md")
    done = subprocess.run([sys.executable, "-m", "scripts.bench_gpu", "--device", "cpu", "--smoke", "--out", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = open(out).read()
    for stage in bench_gpu.STAGES:
        assert text.count(f"## GPU {stage} (CPU, smoke sizes)") == 1
    assert "| 32 | grape_ap |" in text                  # attention table
    training = text.split("## GPU training")[1].split("\n## ")[0]
    row = next(line for line in training.splitlines() if line.startswith("| grape_ap |"))
    assert "err" not in row and float(row.split("|")[2].replace(",", "")) > 0   # tokens/s
    assert "Result: same losses" in text                               # DDP


@pytest.mark.cuda
@pytest.mark.parametrize("encoding, backend", [("rope", "sdpa"), ("alibi", "flex"), ("grape_ap", "triton")])
def test_bf16_attention_step_runs_on_the_gpu_backend(encoding, backend):
    """What the attention stage measures, in miniature: a bf16 autocast layer step on the
    backend auto picks on CUDA, without an error."""
    r = run_config("layer", encoding, "auto", 1024, "cuda", 1, dtype="bfloat16", n_embd=256, n_head=4)
    assert "error" not in r, r.get("error")
    assert r["used"] == backend
