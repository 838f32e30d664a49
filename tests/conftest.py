import os
import subprocess
import sys

import pytest

# Tests import the repository's modules from its root (pyproject.toml: pythonpath).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Triton reads TRITON_INTERPRET when first imported (torch's flex_attention may import it
# early): without a GPU the GRAPE-AP kernel tests run in Triton's CPU interpreter.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# `cuda` marks tests that need a CUDA GPU: `pytest -m cuda` runs just those (bench_gpu.py's
# first stage). A test is marked if it says so (@pytest.mark.cuda, skipped here without a GPU)
# or if it carries a skipif whose reason names CUDA or a GPU.
def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); select with -m cuda")


@pytest.hookimpl(tryfirst=True)         # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    import re
    try:
        import torch
        have_cuda = torch.cuda.is_available()
    except ImportError:
        have_cuda = False
    for item in items:
        if any(re.search(r"\b(cuda|gpus?)\b", str(m.kwargs.get("reason", "")), re.I)
               for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
        if not have_cuda and item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def run_without_repository(tmp_path_factory):
    """``run(script, *args)`` runs Python code in a fresh process that cannot import this
    repository (working directory elsewhere, the repository off PYTHONPATH; the script itself
    asserts that ``import model`` fails), offline, with its own transformers module cache and
    stdin closed; ``env`` adds variables (e.g. PYTHONPATH to another transformers release).
    Returns the CompletedProcess; a non-zero exit fails the test with its output."""
    work = tmp_path_factory.mktemp("without_repository")
    scripts = []

    def run(script: str, *args: str, timeout: float = 600, env: dict | None = None):
        path = work / f"script_{len(scripts)}.py"
        scripts.append(path)
        path.write_text(_NO_REPOSITORY_CHECK + script)
        extra = dict(env or {})
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [extra.pop("PYTHONPATH", ""), *env.get("PYTHONPATH", "").split(os.pathsep)]
            if p and os.path.realpath(p) != os.path.realpath(ROOT))
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf_modules"))
        env.update(extra)
        result = subprocess.run([sys.executable, str(path), *args], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        return result

    return run


@pytest.fixture
def gpu_bfloat16_arithmetic(monkeypatch):
    """Give Triton's interpreter the GPU's bfloat16 arithmetic, which Triton 3.9's lacks:
    tl.dot of bfloat16 operands forms exact products and sums them in float32 (the interpreter
    multiplies the raw 16-bit patterns as integers), and a float32 -> bfloat16 cast rounds to
    nearest even (the interpreter truncates). Everything else (loads, stores, the kernels' own
    code) is the interpreter's."""
    if torch.cuda.is_available():
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain_dot, plain_cast = builder.create_dot, builder.cast_impl

    def widened(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return plain_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                            tl.bfloat16)
        return plain_cast(self, src, dst_type)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    yield


_NO_REPOSITORY_CHECK = '''
try:
    import model  # noqa: F401
    raise SystemExit("this process can import the repository's model.py")
except ModuleNotFoundError:
    pass
'''
