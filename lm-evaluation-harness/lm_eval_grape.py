"""lm_eval's own command line, with this repository's ``grape`` model registered.

lm_eval 0.4.13 has no plugin hook for out-of-tree models (``--include_path`` is for tasks
only), so this script imports the adapter and then hands ``sys.argv`` to lm_eval's CLI. Every
lm_eval option works; without ``--device`` it picks CUDA when there is a GPU and the CPU
otherwise (lm_eval's own default is CUDA), e.g.

    python lm-evaluation-harness/lm_eval_grape.py --model grape \
        --model_args pretrained=out-pydoc --tasks arc_easy,piqa --batch_size 16
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grape_lm  # noqa: E402,F401  (registers --model grape)
from lm_eval.__main__ import cli_evaluate  # noqa: E402


def with_default_device(argv: list[str]) -> list[str]:
    if any(a == "--device" or a.startswith("--device=") for a in argv):
        return argv
    import torch
    return [*argv, "--device", "cuda" if torch.cuda.is_available() else "cpu"]


if __name__ == "__main__":
    sys.argv[1:] = with_default_device(sys.argv[1:])
    cli_evaluate()
