"""What the benchmark programs share: one measured training step (time and peak memory, in a
forked child on CPU), the machine line, the table helpers, and replacing a section of
``results/BENCHMARKS.md`` in place.

Time: time.perf_counter around each step, one warm-up step, the median of ``repeats`` steps.
Peak memory:
- CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the step.
- CPU: PyTorch's CPU allocator keeps no statistics (and tracemalloc does not see its
  allocations), so each configuration runs in a child process forked from this one
  (fork is cheap and skips re-importing torch/transformers; run it as a command: a child forked
  from a process that has already run OpenMP work can hang in libgomp): peak resident set size
  (getrusage ru_maxrss) minus the resident size just before the first step. The number
  therefore covers activations, gradients and temporaries as the OS sees them, allocator
  slack included; parameters and inputs are already resident before the step.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time

import torch

import grape
from model import GPT, Attention, GPTConfig
from modeling import attention

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "BENCHMARKS.md")


def config_for(encoding: str, backend: str, T: int, n_embd: int = 256, n_head: int = 4,
               vocab_size: int = 50304) -> GPTConfig:
    on_grid = any(part in grape.GRID_ENCODINGS for part in encoding.split("+"))
    return GPTConfig(n_layer=2, n_embd=n_embd, n_head=n_head, block_size=T, vocab_size=vocab_size,
                     pos_encoding=encoding, attn_backend=backend, grid=(T // 64, 64) if on_grid else None)


def make_step(what: str, config: GPTConfig, device, dtype: str = "float32"):
    """One forward+backward; ``dtype`` 'bfloat16'/'float16' runs it under autocast (float32
    weights), as train_adam_finewebedu.py does on a GPU."""
    torch.manual_seed(0)
    T = config.block_size
    amp = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else torch.autocast(device.type, enabled=False))
    if what == "layer":
        layer = Attention(config).to(device)
        x = torch.randn(1, T, config.n_embd, device=device, requires_grad=True)

        def step():
            with amp:
                y = layer(x)
            y.float().square().mean().backward()
    else:
        model = GPT(config).to(device)
        idx = torch.randint(0, config.vocab_size, (1, T + 1), device=device)

        def step():
            with amp:
                loss = model(idx[:, :-1], targets=idx[:, 1:])[1]
            loss.backward()
    return step


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(what: str, encoding: str, backend: str, T: int, device: str, repeats: int,
            dtype: str = "float32", n_embd: int = 256, n_head: int = 4, vocab_size: int = 50304) -> dict:
    """Runs in the process that measures: returns times (s), peak (MiB) and the backend used."""
    chosen = set()
    pick = attention.choose_backend

    def recording_choice(q, bias, device_type=None):
        name = pick(q, bias, device_type)
        chosen.add(name)
        return name
    attention.choose_backend = recording_choice
    try:
        dev = torch.device(device)
        step = make_step(what, config_for(encoding, backend, T, n_embd, n_head, vocab_size), dev, dtype)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        if dev.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = current_rss_kib()
        times = []
        for i in range(repeats + 1):             # the first step is the warm-up
            t0 = time.perf_counter()
            step()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    finally:
        attention.choose_backend = pick
    used = backend if backend != "auto" else "+".join(sorted(chosen)) or "sdpa"
    return {"time": statistics.median(times), "peak": peak, "used": used}


def run_config(what, encoding, backend, T, device, repeats, **shape) -> dict:
    """``measure`` in isolation: in a forked child on CPU; on a GPU in this process, with an
    error (out of memory, a kernel that fails) reported in the result instead of raised."""
    if device != "cpu":
        try:
            return measure(what, encoding, backend, T, device, repeats, **shape)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"[:200]}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # child: measure, send JSON, exit
        os.close(read)
        try:
            out = measure(what, encoding, backend, T, device, repeats, **shape)
        except Exception as e:                    # e.g. out of memory: report, do not crash the run
            out = {"error": f"{type(e).__name__}: {e}"[:200]}
        with os.fdopen(write, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"error": f"child process died (status {status}), probably out of memory"}
    return json.loads(text)


def interleaved_times(what: str, configs: list[tuple[str, str]], T: int, device: str, repeats: int,
                      dtype: str = "float32", **shape) -> dict:
    """{(encoding, backend): {"time": min, "cpu": min, "times": [...], "used": backend}} of one
    step each (wall-clock and this process's CPU seconds),
    measured in this process with the configurations taking turns: a warm-up step each, then
    ``repeats`` rounds of one step per configuration. On a shared machine the load moves during
    a run; taking turns exposes every configuration to the same load, and the minimum is the
    step least disturbed by it."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steps, out = {}, {}
    pick = attention.choose_backend
    for encoding, backend in configs:
        chosen = set()

        def recording_choice(q, bias, device_type=None, chosen=chosen):
            chosen.add(pick(q, bias, device_type))
            return pick(q, bias, device_type)
        attention.choose_backend = recording_choice
        try:
            steps[encoding, backend] = make_step(what, config_for(encoding, backend, T, **shape), dev, dtype)
            steps[encoding, backend]()                                       # warm-up
        finally:
            attention.choose_backend = pick
        used = backend if backend != "auto" else "+".join(sorted(chosen)) or "sdpa"
        out[encoding, backend] = {"times": [], "cpus": [], "used": used}
    for _ in range(repeats):
        for key, step in steps.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            out[key]["times"].append(time.perf_counter() - t0)
            out[key]["cpus"].append(time.process_time() - c0)
    for r in out.values():
        r["time"], r["cpu"] = min(r["times"]), min(r["cpus"])
    return out


def load_average() -> str:
    try:
        return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except (AttributeError, OSError):
        return "load average unknown"


def machine_description(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def fmt(r, key, scale=1.0, digits=0):
    if r is None or "error" in r:
        return "err" if r is not None else "-"
    return f"{r[key] * scale:.{digits}f}"


def measured_rows(results: dict, what: str, Ts, encodings):
    """(T, encoding, auto result, dense result, RoPE's auto result at T) for each measured row."""
    for T in Ts:
        rope = results.get((what, "rope", "auto", T))
        for enc in encodings:
            a, d = results.get((what, enc, "auto", T)), results.get((what, enc, "dense", T))
            if a is not None or d is not None:
                yield T, enc, a, d, rope


def write_section(path: str, section: str) -> None:
    """Replace this section of the file where it stands (or append it), keeping every other
    section; a section runs from its '## ' heading to the next one."""
    head = section.splitlines()[0]
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    body = section.rstrip("\n") + "\n"
    lines = old.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == head]
    if starts:
        i = starts[0]
        j = next((n for n in range(i + 1, len(lines)) if lines[n].startswith("## ")), len(lines))
        rest = "".join(lines[j:])
        new = "".join(lines[:i]) + body + ("\n" + rest if rest else "")
    else:
        new = old.rstrip("\n") + "\n\n" + body
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)
