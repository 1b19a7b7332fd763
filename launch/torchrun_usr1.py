#!/usr/bin/env python
"""torchrun that leaves SIGUSR1 to its workers and turns SIGTERM into a clean stop.

Slurm's ``--signal=USR1@120`` signals every process of the job step: the torchrun launcher
and the trainer workers alike. torchrun has no USR1 handler, so the default action would kill
the launcher (and with it the workers, mid-checkpoint). Here the launcher ignores USR1; the
workers install their own handler (save a checkpoint, exit 0) and torchrun then exits 0.
An ignored disposition is inherited across exec, so a worker signalled before it installed
its handler keeps running instead of dying.

SIGTERM to the launcher alone (a ``kill`` of the launcher, a scheduler stopping it) and Ctrl-C
(SIGINT to the terminal's process group; torchrun's workers sit in sessions of their own and
do not receive it) are passed on to the workers, which save and exit 0, and the launcher then
exits 0; plain torchrun would raise and exit 1 while tearing the workers down (and kill them
if the save takes over 30 s). A second Ctrl-C is passed on too: the workers abort at once. A worker failure ends in one line rather
than torchrun's report (the trainer has already printed its one-line reason). Arguments
are exactly torchrun's.
"""

import os
import signal
import sys

from torch.distributed.run import main


def _forward_to_workers(signum, _frame):
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _forward_to_workers)
    signal.signal(signal.SIGINT, _forward_to_workers)
    # SIGTERM and SIGINT stay ours: torchrun's --signals-to-handle (its PET_ variable) and, for
    # versions without that flag, the variable its process start reads
    os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    try:
        sys.exit(main())
    except ChildFailedError as exc:  # the workers said why; one line instead of torchrun's report
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"torchrun: {len(exc.failures)} worker(s) failed (exit code {', '.join(map(str, codes))}); "
              "their message is above", file=sys.stderr)
        sys.exit(1)
