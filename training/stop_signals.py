"""Stopping a run from outside: SIGTERM (a cluster's pre-emption) and Ctrl-C.

Both ask the run to finish the step it is in, save a checkpoint and exit with status 0; the
training loop polls ``requested`` once per step (every rank, so that under DDP all stop at the
same step). A second Ctrl-C stops at once: KeyboardInterrupt, nothing saved, the last
checkpoint untouched (a save it interrupts leaves only a temporary, see checkpoint.py).
"""
from __future__ import annotations

import signal
import sys
import threading


class StopRequests:
    """Installed on the main thread for the length of a run; restores the previous handlers."""

    def __init__(self, announce: bool = True):
        self.requested: str | None = None       # 'SIGTERM' or 'Ctrl-C', the first that asked
        self.ctrl_c = False                     # pressed once already
        self.announce = announce                # rank 0 says what happens; the others stay quiet
        self.previous: dict[int, object] = {}

    def install(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.ctrl_c:
                raise KeyboardInterrupt
            self.ctrl_c = True
            if self.announce:
                print("\nCtrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again stops at once, "
                      "without saving)", file=sys.stderr, flush=True)
        self.requested = self.requested or ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


class Interrupted(Exception):
    """A second Ctrl-C stopped the run without saving."""
