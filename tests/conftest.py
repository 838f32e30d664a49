import os
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
