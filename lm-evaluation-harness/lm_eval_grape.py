"""lm_eval's own command line, with this repository's ``grape`` model registered.

lm_eval 0.4.13 has no plugin hook for out-of-tree models (``--include_path`` is for tasks
only), so this script imports the adapter and then hands ``sys.argv`` to lm_eval's CLI
unchanged. Every lm_eval option works, e.g.

    python lm-evaluation-harness/lm_eval_grape.py --model grape \
        --model_args pretrained=out-pydoc --tasks arc_easy,piqa --batch_size 16
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grape_lm  # noqa: E402,F401  (registers --model grape)
from lm_eval.__main__ import cli_evaluate  # noqa: E402

if __name__ == "__main__":
    cli_evaluate()
