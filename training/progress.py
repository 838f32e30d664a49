"""Progress bars, one convention everywhere (tqdm's): drawn when stderr is a terminal, left out
when it is a file or a pipe, so logs hold lines and not carriage-return animations."""
from __future__ import annotations

import sys
from contextlib import contextmanager


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar shown on a terminal only (``disable=None``), never when ``enabled`` is False.
    A hidden bar still counts and still ``write``s lines (to stdout, as print would)."""
    from tqdm import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


@contextmanager
def hf_progress_bars_off(off: bool = True):
    """transformers' progress bars off inside the block (when ``off``), as they were after it."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    if off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if off and was_enabled:
            hf_logging.enable_progress_bar()
