"""Stop signals (Slurm's time limit and preemption, Ctrl-C) turned into a save-and-stop."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class StopSignals:
    """SIGTERM / SIGUSR1 (Slurm's time limit, preemption) and Ctrl-C (SIGINT) recorded, to be
    acted on between steps: the run saves a checkpoint and stops. Installed before the model
    is built, so a signal during a long init still saves.

    A second Ctrl-C aborts at once without saving (the last checkpoint is kept), except
    while a checkpoint is being written: that save completes first, then the run aborts."""

    def __init__(self):
        self.received: str | None = None
        self.saving = False
        self.abort_after_save = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received == "SIGINT":
            if self.saving:
                self.abort_after_save = True
                self._say("Ctrl-C again: a checkpoint is being written; aborting as soon as it is complete")
                return
            self._abort()
        if self.received is None:
            self.received = name
            if signum == signal.SIGINT:
                self._say("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts at "
                          "once, keeping the last checkpoint)")

    @staticmethod
    def _say(text: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_milora: {text}", file=sys.stderr, flush=True)

    def _abort(self):
        self._say("Ctrl-C again: aborted without saving; rerunning the same command resumes from the last "
                  "checkpoint")
        os._exit(130)

    @contextlib.contextmanager
    def saving_checkpoint(self):
        """A Ctrl-C that arrives during the block waits for it to finish."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
            if self.abort_after_save:
                self._abort()
