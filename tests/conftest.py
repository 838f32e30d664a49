import os
import subprocess
import sys

import pytest

# Tests import the repository's top-level modules (grape, model, ...) directly.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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


@pytest.fixture(scope="session")
def run_without_repository(tmp_path_factory):
    """``run(script, *args)`` runs Python code in a fresh process that cannot import this
    repository (working directory elsewhere, the repository off PYTHONPATH; the script itself
    asserts that ``import model`` fails), offline, with its own transformers module cache and
    stdin closed. Returns the CompletedProcess; a non-zero exit fails the test with its output."""
    work = tmp_path_factory.mktemp("without_repository")
    scripts = []

    def run(script: str, *args: str, timeout: float = 600):
        path = work / f"script_{len(scripts)}.py"
        scripts.append(path)
        path.write_text(_NO_REPOSITORY_CHECK + script)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.realpath(p) != os.path.realpath(ROOT))
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf_modules"))
        result = subprocess.run([sys.executable, str(path), *args], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        return result

    return run


_NO_REPOSITORY_CHECK = '''
try:
    import model  # noqa: F401
    raise SystemExit("this process can import the repository's model.py")
except ModuleNotFoundError:
    pass
'''
